"""aten ops per forward and per training step (fwd + bwd + AdamW), every backbone x preset, counted on CPU.

    python benchmarks/count_ops.py [--backbones vim_s,deit_s,plainmamba_l3] [--reduction 0.4] [--batch 2]
    python benchmarks/count_ops.py --tiny --no-write     # smoke run on the test-sized backbones
    python benchmarks/count_ops.py --device meta         # no compute, same counts (capturable forwards only)

A device-free proxy for kernel launches (docs/CONVENTIONS.md): a TorchDispatchMode counts the aten ops one forward
dispatches ("ops"), and those that launch a kernel on a GPU ("kernels": views and metadata ops left out).
Value checks of the pruning ops are off (TOKENPRUNE_VALUE_CHECKS=never), as on a GPU. The training step is
counted after one warm-up step (AdamW's state exists), with foreach AdamW as CUDA runs it. Presets run at the
per-stage keep whose token reduction is --reduction (solve_keep), PaPr with a MobileNetV2-1.0 proposal.
Random weights: the counts do not depend on them. Writes a table to benchmarks/results_ops.md.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import timm
import torch

sys.path.insert(0, os.path.dirname(__file__))
import tokenprune  # noqa: E402,F401  (registers the models)
from common import BACKBONES, TINY_BACKBONES, build_variant, header, presets_for  # noqa: E402

try:
    from tokenprune.bench.dispatch import OpCounter
except ImportError:  # an older checkout (the "before" numbers): the same counter, local copy
    from _dispatch_copy import OpCounter  # type: ignore
try:
    from tokenprune.tokens import value_checks
except ImportError:
    def value_checks(mode):
        return contextlib.nullcontext()


class _OneKernelScan(torch.autograd.Function):
    """Stand-in for the selective scan when counting: one op forward, one per gradient backward, as a
    fused GPU kernel launches (the CPU kernel's numba work is invisible to the dispatcher anyway, and
    skipping it keeps a count of ViM-S / PlainMamba-L3 training steps to seconds on a loaded CPU)."""

    @staticmethod
    def forward(ctx, u, *rest):
        ctx.shapes = [None if t is None else t for t in rest]
        return torch.empty_like(u, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        grads = [None if not isinstance(t, torch.Tensor) or not t.requires_grad else torch.zeros_like(t)
                 for t in ctx.shapes]
        return (torch.zeros_like(grad), *grads)


def _fake_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, impl=None):
    return _OneKernelScan.apply(u, delta, A, B, C, D, z, delta_bias)


@contextlib.contextmanager
def patched_scan(on: bool = True):
    """Replace the scan the models call by the one-op stand-in while counting (restored afterwards)."""
    import importlib
    saved = []
    if on:
        for name in ("tokenprune.models.vim", "tokenprune.models.plainmamba"):
            mod = importlib.import_module(name)
            if hasattr(mod, "selective_scan"):
                saved.append((mod, mod.selective_scan))
                mod.selective_scan = _fake_scan
    try:
        yield
    finally:
        for mod, fn in saved:
            mod.selective_scan = fn


def count_forward(model, x):
    model.eval()
    with torch.no_grad():
        model(x)  # warm-up: lazy caches
        with OpCounter() as c:
            model(x)
    return c


def count_train_step(model, x, y):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    step()
    with OpCounter() as c:
        step()
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="vim_s,deit_s,plainmamba_l3")
    ap.add_argument("--presets", default=None, help="comma-separated; default every applicable preset")
    ap.add_argument("--reduction", type=float, default=0.4, help="token reduction of the pruned variants")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--no-train", action="store_true", help="forward counts only")
    ap.add_argument("--tiny", action="store_true", help="test-sized backbones (smoke run)")
    ap.add_argument("--proposal", default="mobilenetv2_100")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--real-scan", action="store_true", help="count with the CPU scan kernel (slow)")
    ap.add_argument("--device", default="cpu", help="cpu, or meta (no compute: fast; needs a capturable "
                                                    "forward, i.e. no host sync)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results_ops.md"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = TINY_BACKBONES if args.tiny else BACKBONES
    lines = ["| backbone | preset | keep/stage | ops / forward | kernels / forward | ops / train step "
             "| kernels / train step |", "|---|---|---:|---:|---:|---:|---:|"]
    for key in args.backbones.split(","):
        torch.manual_seed(0)
        base = timm.create_model(names[key])
        proposal = timm.create_model("papr_convnet_micro" if args.tiny else args.proposal).eval()
        size = (3, 32, 32) if args.tiny else (3, 224, 224)
        x = torch.randn(args.batch, *size).to(args.device)
        y = torch.zeros(args.batch, dtype=torch.long).to(args.device)
        wanted = presets_for(tokenprune.create_model(base).backbone)
        if args.presets:
            wanted = [m for m in args.presets.split(",") if m in wanted]
        for method in [None] + wanted:
            t0 = time.perf_counter()
            model, keep = build_variant(base, method, args.reduction, proposal=proposal)
            model.to(args.device)
            with value_checks("never"), patched_scan(not args.real_scan):
                fwd = count_forward(model, x)
                train = None if args.no_train else count_train_step(model, x, y)
            tr = ("-", "-") if train is None else (f"{train.total:,}", f"{train.kernels:,}")
            row = (f"| {key} | {method or 'unpruned'} | {keep:.3g} | {fwd.total:,} | {fwd.kernels:,} | "
                   f"{tr[0]} | {tr[1]} |")
            print(row, f"({time.perf_counter() - t0:.1f} s)", flush=True)
            lines.append(row)
    text = (header(f"aten ops per forward / training step at {int(args.reduction * 100)} % token reduction, "
                   f"batch {args.batch}") + "\n" + "\n".join(lines))
    print(text)
    if not args.no_write:
        with open(args.out, "a") as fh:
            fh.write(text.rstrip() + "\n\n")
        print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
