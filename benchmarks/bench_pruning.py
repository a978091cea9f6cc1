"""Measured speed-up of one-step token pruning vs its FLOPs ratio, for ViM and DeiT, in one run.

    python benchmarks/bench_pruning.py [--vim vim_tiny_patch16_224] [--deit deit_tiny_patch16_224] [--batch 8]
    python benchmarks/bench_pruning.py --device cuda --batch 128 --method l2   # GPU (ViM scans: Triton)

For each backbone: unpruned, and one-step pruning before the encoder (PaPr with a MobileNetV2 proposal
network, random weights: speed does not depend on them) at 20/30/40/50 % token reduction. images/s of all
variants of a backbone are measured interleaved in the same compare_throughput call; the FLOPs ratio is
unpruned / pruned fvcore FLOPs (proposal network included). Goal: speed-up >= 0.9 x FLOPs ratio at 40 %.
"""
from __future__ import annotations

import argparse
import os
import sys

import timm
import torch

sys.path.insert(0, os.path.dirname(__file__))
import tokenprune  # noqa: E402
from common import append_results, header  # noqa: E402
from tokenprune.bench import compare_throughput  # noqa: E402

REDUCTIONS = (0.2, 0.3, 0.4, 0.5)


def bench_backbone(name, args, proposal):
    torch.manual_seed(0)
    if proposal is not None:  # shared by both backbones: the previous one's timing moved it to the device
        proposal.cpu()
    base = timm.create_model(name)
    variants = {"unpruned": tokenprune.create_model(base)}
    for r in REDUCTIONS:
        variants[f"{args.method} -{int(r * 100)}%"] = tokenprune.create_model(base, args.method, keep=1 - r,
                                                                               proposal=proposal)
    flops = {k: tokenprune.count_flops(m).total for k, m in variants.items()}
    res = compare_throughput(variants, input_size=(3, 224, 224), batch_size=args.batch, warmup=args.warmup,
                             device=args.device, dtype=args.dtype,
                             iters=args.iters, reference="unpruned", verbose=True)
    rows = []
    for k in variants:
        ratio = flops["unpruned"] / flops[k]
        speed = res["speedup"][k]
        rows.append(f"| {name} | {k} | {flops[k] / 1e9:.3f} | {ratio:.3f} | "
                    f"{res['models'][k]['images_per_s']:.1f} | {speed:.3f} | {speed / ratio:.3f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vim", default="vim_tiny_patch16_224")
    ap.add_argument("--deit", default="deit_tiny_patch16_224")
    ap.add_argument("--method", default="papr")
    ap.add_argument("--proposal", default="mobilenetv2_100")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (GPU: CUDA events, synchronize around the timing)")
    ap.add_argument("--dtype", default="float32", help="input/model dtype, e.g. float32 or bfloat16")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    proposal = timm.create_model(args.proposal) if args.method.startswith("papr") else None
    lines = ["| backbone | variant | GFLOPs | FLOPs ratio | images/s | speed-up | speed-up / FLOPs ratio |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name in (args.vim, args.deit):
        lines += bench_backbone(name, args, proposal)
    text = header(f"One-step pruning speed-up vs FLOPs ratio, batch {args.batch}") + "\n" + "\n".join(lines)
    print(text)
    append_results(args.out, text)


if __name__ == "__main__":
    main()
