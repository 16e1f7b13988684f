"""Check weight interchange with PyTorch both ways, through the engine binary.

Usage:  python3 tools/check_roundtrip.py [--engine target/release/plr-engine]

PyTorch's PLR-OSNet (tools/plr_reference.py, 751 classes) is saved as safetensors; the engine loads it
and exports it (`plr-engine export`); PyTorch loads the export with load_state_dict(strict=True) and
every tensor must equal the original in value and dtype (num_batches_tracked stays int64).
"""

import argparse
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plr_reference as R  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="target/release/plr-engine")
    args = parser.parse_args()
    torch.manual_seed(0)
    src = R.PLR_OSNet(num_classes=751)
    with tempfile.TemporaryDirectory() as tmp:
        pt, out = os.path.join(tmp, "pytorch.safetensors"), os.path.join(tmp, "engine.safetensors")
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, pt)
        subprocess.run([args.engine, "export", "--weights", pt, "--out", out], check=True)
        exported = load_file(out)
        dst = R.PLR_OSNet(num_classes=751)
        dst.load_state_dict(exported, strict=True)
        ref = src.state_dict()
        bad = [k for k in ref if not (torch.equal(exported[k], ref[k]) and exported[k].dtype == ref[k].dtype)]
        if bad:
            sys.exit(f"{len(bad)} tensors differ after the round trip, e.g. {bad[:3]}")
        dst.eval()
        assert dst(torch.randn(2, 3, 256, 128)).shape == (2, 2560)
    print(f"ok: {len(exported)} tensors round-trip PyTorch -> plr-engine -> PyTorch (strict=True), values and dtypes equal")


if __name__ == "__main__":
    main()
