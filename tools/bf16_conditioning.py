"""How well a bf16 gradient golden could discriminate on plr_small, before and after training.

Usage (from the repository root):  python3 tools/bf16_conditioning.py [--steps 600] [--every 200]

Takes plr_small's model (tests/fixtures/plr_small.safetensors), trains it with Adam and the PLR loss
on synthetic identities (smooth random colour templates plus noise, batches of 4 ids x 2 images),
and every `--every` steps measures, on a fresh batch with bf16-exact input and convolution weights
(training-mode BatchNorm, the f64 result as the reference):
- `f32`: PyTorch f32 against f64 (what an f32 golden can assert);
- `input 2^-9`: the f64 run on the input times (1 + 2^-9 N(0,1)), about one bf16 rounding:
  the smallest change any bf16 run makes, so no bf16 gradient can be asserted tighter than this;
- `autocast bf16`: PyTorch's CPU bf16 autocast (what PyTorch's own bf16 reaches).
Each is the norm-wise relative error of v1 and of the whole parameter gradient. After the last step
it prints the `input 2^-9` gradient error per top-level module, with training-mode and with
eval-mode BatchNorm: where, going backwards, the error grows. It answers whether
a golden taken from a trained checkpoint would be better conditioned than the random one
(docs/DECISIONS.md, "bf16 mixed precision").
"""

import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plr_reference as R  # noqa: E402


def bf16(t):
    return t.to(torch.bfloat16).to(t.dtype)


def norm_rel_err(a, b):
    return ((a - b).norm() / max(a.norm(), b.norm())).item()


class Synthetic:
    def __init__(self, num_classes, height, width, seed):
        self.gen = torch.Generator().manual_seed(seed)
        self.num_classes, self.shape = num_classes, (3, height, width)
        coarse = torch.randn(num_classes, 3, height // 8, width // 8, generator=self.gen)
        self.templates = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)

    def batch(self, ids=4, per_id=2):
        chosen = torch.randperm(self.num_classes, generator=self.gen)[:ids]
        labels = chosen.repeat_interleave(per_id)[torch.randperm(ids * per_id, generator=self.gen)]
        n = len(labels)
        contrast = 1 + 0.2 * torch.randn(n, 1, 1, 1, generator=self.gen)
        return self.templates[labels] * contrast + 0.5 * torch.randn(n, *self.shape, generator=self.gen), labels


def train_step_grad(model, x, labels, centers, autocast=False, eval_bn=False):
    """Loss, v1 and the gradient (f64; whole, and per top-level module) of one forward_train + PLR
    loss + backward."""
    model.train()
    if eval_bn:
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outputs = model(x)
    outputs = [o.to(x.dtype) for o in outputs]
    total, _ = R.plr_loss(outputs, labels, *(c.to(x.dtype) for c in centers))
    model.zero_grad(set_to_none=True)
    total.backward()
    # The PAM key biases have an analytically zero gradient (f64 round-off); leave them out.
    grads = {n: p.grad.flatten().double() for n, p in model.named_parameters() if p.grad is not None and "key_conv.bias" not in n}
    by_module = {}
    for n, g in grads.items():
        by_module.setdefault(n.split(".")[0], []).append(g)
    by_module = {k: torch.cat(v) for k, v in by_module.items()}
    return total.item(), outputs[2].detach().double(), torch.cat([grads[n] for n in sorted(grads)]), by_module


def bf16_exact_batch(model, data, gen):
    """A fresh batch, the f64 model with bf16-exact conv weights, and the input nudged by 2^-9."""
    x, labels = data.batch()
    x = bf16(x)
    exact = copy.deepcopy(model).double()
    with torch.no_grad():
        for p in exact.parameters():
            if p.dim() == 4:
                p.copy_(bf16(p))
    nudged = x.double() * (1 + 2**-9 * torch.randn(x.shape, generator=gen, dtype=torch.float64))
    return exact, x, labels, nudged


def measure(model, data, centers, gen):
    exact, x, labels, nudged = bf16_exact_batch(model, data, gen)
    loss, v1, grad, _ = train_step_grad(copy.deepcopy(exact), x.double(), labels, centers)
    runs = {
        "f32": train_step_grad(copy.deepcopy(exact).float(), x, labels, centers),
        "input 2^-9": train_step_grad(copy.deepcopy(exact), nudged, labels, centers),
        "autocast bf16": train_step_grad(copy.deepcopy(exact).float(), x, labels, centers, autocast=True),
    }
    cells = [f"{k} {norm_rel_err(v1, r[1]):.1e} / {norm_rel_err(grad, r[2]):.1e}" for k, r in runs.items()]
    return loss, "; ".join(cells)


def by_module(model, data, centers, gen):
    exact, x, labels, nudged = bf16_exact_batch(model, data, gen)
    print("input 2^-9: gradient error per module (training-mode BN / eval-mode BN), from the loss backwards")
    runs = [
        (train_step_grad(copy.deepcopy(exact), x.double(), labels, centers, eval_bn=e)[3],
         train_step_grad(copy.deepcopy(exact), nudged, labels, centers, eval_bn=e)[3])
        for e in (False, True)
    ]
    for name in reversed(list(runs[0][0])):
        print(f"  {name:18s} " + " / ".join(f"{norm_rel_err(a[name], b[name]):.1e}" for a, b in runs))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", default="tests/fixtures/plr_small.safetensors")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    small = load_file(args.fixture)
    meta_shape = small["input"].shape
    num_classes = small["out.logits1"].shape[1]
    model = R.PLR_OSNet(num_classes=num_classes, width=0.25, parts=4)
    model.load_state_dict({k[len("weights.") :]: v for k, v in small.items() if k.startswith("weights.")})
    centers = (small["centers1"], small["centers2"])
    data = Synthetic(num_classes, meta_shape[2], meta_shape[3], args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    print("step | loss (fresh batch) | norm-wise relative error vs f64, v1 / whole gradient")
    for step in range(args.steps + 1):
        if step % args.every == 0:
            loss, cells = measure(model, data, centers, gen)
            print(f"{step:5d} | {loss:.4f} | {cells}", flush=True)
        if step < args.steps:
            x, labels = data.batch()
            model.train()
            total, _ = R.plr_loss(model(x), labels, *centers)
            opt.zero_grad()
            total.backward()
            opt.step()
    by_module(model, data, centers, gen)


if __name__ == "__main__":
    main()
