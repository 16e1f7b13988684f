"""Convert a PyTorch checkpoint (.pth / .pth.tar) to a safetensors state dict the engine loads.

Usage:  python3 tools/convert_pth.py IN.pth OUT.safetensors

Accepts a bare state dict or a torchreid/fast-reid checkpoint dict holding one under
"state_dict" or "model". Tensors are written unchanged (names, shapes, dtypes); a leading
"module." (DataParallel) may stay, the engine strips it. Non-tensor entries are dropped with a
note. Typical use: torchreid's ImageNet OSNet weights (osnet_x1_0_imagenet.pth) to initialise
PLR-OSNet with `plr-engine train --init-osnet OUT.safetensors`.
"""

import os
import sys

import torch
from safetensors.torch import save_file


def state_dict_of(obj, path):
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    sys.exit(f"{path}: no state dict found (expected a dict of tensors, or one under 'state_dict' or 'model')")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, dst = sys.argv[1], sys.argv[2]
    obj = torch.load(src, map_location="cpu", weights_only=False)
    sd = state_dict_of(obj, src)
    tensors, dropped = {}, []
    for name, value in sd.items():
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().contiguous().clone()
        else:
            dropped.append(name)
    if dropped:
        print(f"dropped {len(dropped)} non-tensor entries: {', '.join(dropped[:5])}{' ...' if len(dropped) > 5 else ''}")
    tmp = dst + ".tmp"
    save_file(tensors, tmp, metadata={"source": os.path.basename(src)})
    os.replace(tmp, dst)
    print(f"wrote {dst}: {len(tensors)} tensors")


if __name__ == "__main__":
    main()
