"""PLR-OSNet training and inference speed: PyTorch (tools/plr_reference.py) side by side with plr-engine.

Usage (from the repository root):

    python3 tools/compare_pytorch.py --device cpu --batch-ids 4 --instances 4 --engine target/release/plr-engine
    python3 tools/compare_pytorch.py --device cuda --engine target/release/plr-engine

Training step = forward (train mode) + the PLR loss (label-smoothed CE, soft-margin batch-hard
triplet, frozen-center loss) + backward + Adam (weight decay 5e-4), the same work as
`plr-engine bench`. Inference = eval-mode forward to the 2560-d feature. Inputs are random
256x128 images; labels are a P x K batch. Each figure is the median over timed iterations after
untimed warm-up ones, each ending in a device synchronisation.

PyTorch configurations:
  fp32-eager       the official configuration (CPU and CUDA)
  bf16             bf16 autocast (CUDA)
  bf16-cl          bf16 autocast + channels_last (CUDA)
  bf16-cl-compile  bf16 autocast + channels_last + torch.compile of the model (CUDA)
On the CPU only fp32-eager runs unless --configs asks for more. PyTorch uses as many threads as
the engine (--threads, default one per core).

With --cost it prints the cost model of one training step instead (per image, from the reference
model: multiply-adds counted with hooks, plus the position-attention matrix products; activation
bytes; the H100 bounds of docs/PERFORMANCE.md).

With --engine PATH it also runs `PATH bench --json ...` with the same batch, size, classes,
iteration counts and threads, once per --engine-configs variant (precision f32 or bf16, +graph for
the CUDA-graph replayed step), and prints one table with every engine variant and every PyTorch
configuration and their ratios to the first engine variant.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plr_reference as R  # noqa: E402

CONFIGS = ("fp32-eager", "bf16", "bf16-cl", "bf16-cl-compile")
# The official recipe's peak learning rate and Adam settings (as `plr-engine bench`).
LR = 3.5e-4
WEIGHT_DECAY = 5e-4


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch-ids", type=int, default=16)
    p.add_argument("--instances", type=int, default=4)
    p.add_argument("--width", type=float, default=1.0, help="OSNet width multiplier")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width-px", type=int, default=128)
    p.add_argument("--classes", type=int, default=751)
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations [CUDA 10, CPU 1]")
    p.add_argument("--iters", type=int, default=None, help="timed iterations [CUDA 30, CPU 3]")
    p.add_argument("--eval-batch", type=int, default=None, help="inference batch, 0 skips [CUDA 256, CPU 16]")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for both (0: one per core)")
    p.add_argument("--configs", default=None, help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--engine", default=None, help="plr-engine binary to run in the same invocation")
    p.add_argument(
        "--engine-configs",
        default=None,
        help="comma-separated engine variants, each a precision (f32 or bf16) with an optional +graph "
        "(CUDA graph replay); the first is the reference of the ratio columns [CUDA: bf16+graph,bf16,f32+graph,f32; CPU: f32]",
    )
    p.add_argument("--json", default=None, help="also write all results to this file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cost", action="store_true", help="print the training-step cost model and exit")
    a = p.parse_args()
    gpu = a.device == "cuda"
    a.warmup = a.warmup if a.warmup is not None else (10 if gpu else 1)
    a.iters = a.iters if a.iters is not None else (30 if gpu else 3)
    a.eval_batch = a.eval_batch if a.eval_batch is not None else (256 if gpu else 16)
    if a.batch_ids < 2 or a.instances < 2:
        p.error("--batch-ids and --instances must be at least 2 (batch-hard triplet)")
    if a.iters < 1 or a.warmup < 0 or a.eval_batch < 0 or a.threads < 0:
        p.error("--iters must be positive; --warmup, --eval-batch and --threads non-negative")
    if a.configs is None:
        a.configs = list(CONFIGS) if gpu else ["fp32-eager"]
    else:
        a.configs = [c.strip() for c in a.configs.split(",") if c.strip()]
        bad = [c for c in a.configs if c not in CONFIGS]
        if bad:
            p.error(f"--configs: unknown {bad}; choose from {list(CONFIGS)}")
    if gpu and not torch.cuda.is_available():
        p.error("--device cuda: this PyTorch build sees no CUDA device")
    if a.engine is not None and not os.access(a.engine, os.X_OK):
        p.error(f"--engine {a.engine}: not an executable file")
    default_engine = "bf16+graph,bf16,f32+graph,f32" if gpu else "f32"
    a.engine_configs = [c.strip() for c in (a.engine_configs or default_engine).split(",") if c.strip()]
    for c in a.engine_configs:
        prec, _, rest = c.partition("+")
        if prec not in ("f32", "bf16") or rest not in ("", "graph"):
            p.error(f"--engine-configs: {c!r} is not f32|bf16 with an optional +graph")
        if rest and not gpu:
            p.error(f"--engine-configs: {c!r}: CUDA graphs need --device cuda")
    return a


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, warmup, iters, fn):
    """Median, min, max in ms of `iters` synchronised calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def pk_labels(ids, instances, classes, device):
    return torch.tensor([i * classes // ids for i in range(ids) for _ in range(instances)], device=device)


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device):
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else None


def run_config(name, a, device):
    """Inference and training figures of one PyTorch configuration on fresh models."""
    torch.manual_seed(a.seed)
    bf16 = name.startswith("bf16")
    channels_last = "-cl" in name
    compiled = name.endswith("compile")
    model = R.PLR_OSNet(num_classes=a.classes, width=a.width).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    net = torch.compile(model) if compiled else model
    c = R.scaled_channels(a.width)[3]
    # Frozen centers, as the official code keeps them (a buffer the optimizer never sees).
    centers1 = torch.randn(a.classes, 4 * c, device=device)
    centers2 = torch.randn(a.classes, c, device=device)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    result = {"config": name}

    if a.eval_batch > 0:
        x = torch.randn(a.eval_batch, 3, a.height, a.width_px, device=device).to(memory_format=memory_format)
        model.eval()

        def infer():
            with torch.inference_mode(), autocast():
                net(x)

        # A first call outside the peak window: torch.compile's compilation is not inference memory.
        infer()
        peak_reset(device)
        t = timed(device, a.warmup, a.iters, infer)
        result["infer"] = {"batch": a.eval_batch, "forward": t, "img_per_s": a.eval_batch / (t["median_ms"] / 1e3), "peak_memory_bytes": peak_bytes(device)}

    batch = a.batch_ids * a.instances
    x = torch.randn(batch, 3, a.height, a.width_px, device=device).to(memory_format=memory_format)
    labels = pk_labels(a.batch_ids, a.instances, a.classes, device)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    last = {}

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            out = net(x)
        # The loss in fp32, as autocast would run log_softmax and the distances anyway.
        total, _ = R.plr_loss(tuple(o.float() for o in out), labels, centers1, centers2)
        total.backward()
        opt.step()
        last["loss"] = total.detach()

    step()
    peak_reset(device)
    t = timed(device, a.warmup, a.iters, step)
    result["train"] = {
        "batch": batch,
        "step": t,
        "img_per_s": batch / (t["median_ms"] / 1e3),
        "peak_memory_bytes": peak_bytes(device),
        "last_loss": float(last["loss"]),
    }
    return result


# H100 SXM figures used by the bounds (shared/spec/performance-and-conventions.md, 1.3).
H100_BYTES_PER_S = 3.35e12
H100_REALISTIC_FLOPS = (100e12, 200e12)


def cost_model(a):
    """Per-image forward MACs and activation traffic of PLR-OSNet, and the bounds they imply."""
    import torch.nn as nn

    model = R.PLR_OSNet(num_classes=a.classes, width=a.width).train()
    macs = {"conv 1x1": 0, "conv depthwise": 0, "conv other": 0, "linear": 0, "attention bmm": 0}
    # Elements written by each kind of layer in the forward pass (what backward reads back).
    written = {"conv": 0, "batchnorm": 0, "relu/sigmoid": 0, "pool": 0, "other": 0}

    def hook(module, inputs, output):
        out = output.numel()
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            per = module.in_channels // module.groups * kh * kw
            kind = "conv depthwise" if module.groups > 1 else ("conv 1x1" if kh == kw == 1 else "conv other")
            macs[kind] += out * per
            written["conv"] += out
        elif isinstance(module, nn.Linear):
            macs["linear"] += module.in_features * module.out_features * inputs[0].shape[0]
            written["other"] += out
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            written["batchnorm"] += out
        elif isinstance(module, (nn.ReLU, nn.Sigmoid)):
            written["relu/sigmoid"] += out
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            written["pool"] += out
        elif isinstance(module, R.PAM_Module):
            b, c, h, w = inputs[0].shape
            n = h * w
            macs["attention bmm"] += b * (n * n * (c // 8) + c * n * n)  # q k^T, then x A^T
            written["other"] += b * n * n * 2 + out  # energy, softmax, output

    leaves = [m for m in model.modules() if not list(m.children()) or isinstance(m, R.PAM_Module)]
    handles = [m.register_forward_hook(hook) for m in leaves]
    x = torch.randn(2, 3, a.height, a.width_px)
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    macs = {k: v / 2 for k, v in macs.items()}
    written = {k: v / 2 for k, v in written.items()}
    fwd_macs = sum(macs.values())
    # Training = forward + backward data + backward filter: 3x the forward multiply-adds.
    train_flop = 3 * 2 * fwd_macs
    elems = sum(written.values())
    # fp32 traffic of an unfused step: forward writes each activation once and reads it ~1.5
    # times (its consumer, BN statistics); backward reads activation and gradient and writes the
    # input gradient for each, ~2.5x the forward traffic (spec 1.3's model).
    fwd_bytes = elems * 4 * 2.5
    step_bytes = fwd_bytes * (1 + 2.5)
    print(f"PLR-OSNet x{a.width}, {a.height}x{a.width_px}, {a.classes} classes: cost of one training image")
    for k, v in macs.items():
        print(f"  forward MACs {k:<16} {v / 1e6:9.1f} M")
    print(f"  forward MACs total            {fwd_macs / 1e9:9.3f} G")
    print(f"  training FLOPs (3 x 2 x MACs)  {train_flop / 1e9:9.2f} GFLOP")
    for k, v in written.items():
        print(f"  activations written {k:<10} {v / 1e6:9.2f} M elements")
    print(f"  activation traffic, fp32 unfused: forward {fwd_bytes / 1e6:.0f} MB, step {step_bytes / 1e6:.0f} MB; bf16 {step_bytes / 2e6:.0f} MB")
    print(f"  H100 bounds: memory (3.35 TB/s) fp32 {H100_BYTES_PER_S / step_bytes:.0f} img/s, bf16 {2 * H100_BYTES_PER_S / step_bytes:.0f} img/s; "
          f"compute at {H100_REALISTIC_FLOPS[0] / 1e12:.0f}-{H100_REALISTIC_FLOPS[1] / 1e12:.0f} TFLOP/s "
          f"{H100_REALISTIC_FLOPS[0] / train_flop:.0f}-{H100_REALISTIC_FLOPS[1] / train_flop:.0f} img/s")


def run_engine(a, config):
    """`plr-engine bench` in one variant; returns its JSON report with the variant's training
    throughput (the graph replay's when +graph) as report["train_img_per_s"]."""
    precision, _, graph = config.partition("+")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.json")
        cmd = [
            a.engine, "bench", "--device", a.device,
            "--batch-ids", str(a.batch_ids), "--instances", str(a.instances),
            "--width", str(a.width), "--height", str(a.height), "--width-px", str(a.width_px),
            "--classes", str(a.classes), "--warmup", str(a.warmup), "--iters", str(a.iters),
            "--eval-batch", str(a.eval_batch), "--profile-iters", "0", "--threads", str(a.threads),
            "--seed", str(a.seed), "--json", path, "--precision", precision,
        ] + (["--cuda-graph"] if graph else [])  # fmt: skip
        print("$ " + " ".join(cmd), flush=True)
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            sys.exit(f"error: {a.engine} bench exited with status {proc.returncode}")
        with open(path) as f:
            e = json.load(f)
    e["train_img_per_s"] = e["train"]["img_per_s"]
    if graph:
        g = e.get("cuda_graph")
        if not isinstance(g, dict) or "img_per_s" not in g:
            print(f"warning: engine {config}: no graph timing ({g}); the row shows the eager step", file=sys.stderr)
        else:
            e["train_img_per_s"] = g["img_per_s"]
    return e


def fmt(v, spec):
    return format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0]))


def mib(b):
    return None if b is None else b / 2**20


def print_table(rows, engine):
    """rows: (name, train img/s, infer img/s, train peak bytes, infer peak bytes); with the engine,
    the ratio columns divide the first row (the first engine variant) by each row."""
    ref = rows[0] if engine else None
    head = f"{'':<26} {'train img/s':>11} {'infer img/s':>11} {'train MiB':>9} {'infer MiB':>9}"
    if ref:
        head += f" {'ref/this train':>17} {'ref/this infer':>17}"
    print(head)
    for name, tr, inf, ptr, pinf in rows:
        line = f"{name:<26} {fmt(tr, '11.2f')} {fmt(inf, '11.2f')} {fmt(mib(ptr), '9.0f')} {fmt(mib(pinf), '9.0f')}"
        if ref:
            rt = ref[1] / tr if tr else None
            ri = ref[2] / inf if (inf and ref[2]) else None
            line += f" {fmt(rt, '17.2f')} {fmt(ri, '17.2f')}"
        print(line)


def main():
    a = parse_args()
    if a.cost:
        cost_model(a)
        return
    device = torch.device(a.device)
    threads = a.threads or os.cpu_count()
    torch.set_num_threads(threads)
    batch = a.batch_ids * a.instances
    desc = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {threads} threads"
    print(f"torch {torch.__version__} on {a.device} ({desc}); PLR-OSNet x{a.width}, {a.classes} classes, {a.height}x{a.width_px}")
    print(f"training batch {batch} = {a.batch_ids} x {a.instances}, inference batch {a.eval_batch}; {a.warmup} warm-up + {a.iters} timed iterations (median)")

    report = {"torch": torch.__version__, "device": a.device, "device_name": desc, "threads": threads, "pytorch": []}
    rows = []
    if a.engine:
        report["engine"] = {}
        for config in a.engine_configs:
            e = run_engine(a, config)
            report["engine"][config] = e
            if a.device == "cpu" and e.get("threads") != threads:
                print(f"warning: the engine ran {e.get('threads')} threads, PyTorch {threads}", file=sys.stderr)
            inf = e.get("infer") or {}
            rows.append((f"plr-engine {config}", e["train_img_per_s"], inf.get("img_per_s"), e["train"].get("peak_memory_bytes"), inf.get("peak_memory_bytes")))
    for name in a.configs:
        print(f"PyTorch {name} ...", flush=True)
        r = run_config(name, a, device)
        report["pytorch"].append(r)
        inf = r.get("infer") or {}
        tr = r["train"]
        print(f"  train {tr['step']['median_ms']:.1f} ms/step -> {tr['img_per_s']:.2f} img/s (loss {tr['last_loss']:.4f})" + (f"; infer {inf['img_per_s']:.2f} img/s" if inf else ""))
        rows.append((f"pytorch {name}", tr["img_per_s"], inf.get("img_per_s"), tr["peak_memory_bytes"], inf.get("peak_memory_bytes")))
    print()
    print_table(rows, a.engine is not None)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
