"""The fused GPU mixer path (Triton ops) of ViM or PlainMamba against the per-direction / per-scan reference
path: logits and every gradient of the unpruned model, and the logits of hidden-state-aligned pruning (gap-aware
decay fused in the scan) and of plain pruning (scans restricted to the kept tokens); prints OK on the last line
or exits 1.

    TRITON_INTERPRET=1 python tests/scripts/vim_fused_check.py            # CPU: a 2-block ViM-micro
    TRITON_INTERPRET=1 python tests/scripts/vim_fused_check.py --model plainmamba_test_32
    python tests/scripts/vim_fused_check.py --device cuda --model vim_tiny_patch16_224
"""
import argparse
import sys

import timm
import torch

import tokenprune
from tokenprune.ssm import scan_impl, scan_impl_report


CPU_IMG_SIZE = {"vim_micro_patch8_56": 48, "plainmamba_test_32": 24}  # 6 x 6 patches (+ ViM's CLS)


def pruned_error(pruned, x):
    """Relative logits error of a pruned model on the fused path against the reference path."""
    pruned = pruned.to(x.device).eval()
    with torch.no_grad():
        with scan_impl("reference"):
            ref = pruned(x)
        with scan_impl("triton"):
            fused = pruned(x)
    return ((fused - ref).abs().max() / ref.abs().max().clamp(min=1)).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="vim_micro_patch8_56")
    ap.add_argument("--depth", type=int, default=None, help="fewer blocks (CPU interpreter speed)")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    if args.device == "cuda":
        # compare fp32 with fp32: the patch-embedding conv's weight grad in TF32 would turn the two paths'
        # rounding-level gradient differences into ~1e-3 ones
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    # on CPU (Triton's interpreter) a narrow 2-block model with 4 states on a smaller image: the same code paths
    # (L = 37 / 36 tokens: more than one forward and backward chunk, the last one partial), minutes not hours;
    # the interpreter's time grows with the tokens (PlainMamba at 64 tokens: ~380 s on 2 cores)
    kw = dict(depth=2, embed_dim=32, d_state=4) if args.device == "cpu" else {}
    if args.device == "cpu" and args.model in CPU_IMG_SIZE:
        kw["img_size"] = CPU_IMG_SIZE[args.model]
    if args.depth is not None:
        kw["depth"] = args.depth
    torch.manual_seed(0)
    model = timm.create_model(args.model, **kw).to(args.device)
    size = model.patch_embed.img_size
    x = torch.randn(2, 3, *size, device=args.device)
    res = {}
    for impl in ("reference", "triton"):
        model.zero_grad()
        with scan_impl(impl):
            out = model(x)
        out.square().mean().backward()
        res[impl] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (o_ref, g_ref), (o_fus, g_fus) = res["reference"], res["triton"]
    errs = {"logits": ((o_fus - o_ref).abs().max() / o_ref.abs().max().clamp(min=1)).item()}
    missing = set(g_ref) ^ set(g_fus)
    worst_grad = max(((g_fus[k] - g_ref[k]).abs().max() / g_ref[k].abs().max().clamp(min=1e-6)).item()
                     for k in g_ref if k in g_fus)
    errs["grads"] = worst_grad
    layers = [0] if len(model.layers) < 6 else None  # prune after block 0: block 1 runs with gaps
    errs["hsa_logits"] = pruned_error(tokenprune.create_model(model, "hsa", keep=0.7, layers=layers), x)
    # plain pruning (no gap-aware decay): the scans restricted to the kept tokens
    errs["l2_logits"] = pruned_error(tokenprune.create_model(model, "l2", keep=0.7), x)
    counts = scan_impl_report()["counts"]
    print(" ".join(f"{k}={v:.2e}" for k, v in errs.items()), f"params with grads: {len(g_ref)}",
          f"scan impl counts {counts}")
    ok = not missing and max(errs.values()) <= args.tol and counts["triton"] > 0
    print("OK" if ok else f"FAILED (missing grads: {sorted(missing)})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
