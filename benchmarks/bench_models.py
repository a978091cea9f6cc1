"""ViM-T vs DeiT-T images/s at batch 8 (224x224), measured interleaved in one run.

    python benchmarks/bench_models.py [--batch 8] [--iters 30] [--scans cpu,reference] [--out benchmarks/results.md]
    python benchmarks/bench_models.py --device cuda --batch 128 --scans triton,reference   # GPU

The issue goal on 2 CPU cores: ViM-T at >= 0.3x DeiT-T images/s (a plain per-step loop gives ~0.06x).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import tokenprune  # noqa: E402
from common import append_results, header  # noqa: E402
from tokenprune.bench import compare_throughput  # noqa: E402
from tokenprune.ssm import scan_impl  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (GPU: CUDA events, synchronize around the timing)")
    ap.add_argument("--dtype", default="float32", help="input/model dtype, e.g. float32 or bfloat16")
    ap.add_argument("--scans", default="cpu,reference", help="scan implementations to compare for ViM-T")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    deit = tokenprune.create_model("deit_tiny_patch16_224")
    vim = tokenprune.create_model("vim_tiny_patch16_224")
    lines = ["| model | scan | images/s | ratio to DeiT-T |", "|---|---|---:|---:|"]
    for impl in args.scans.split(","):
        iters = args.iters if impl != "reference" else max(30, args.iters // 3)
        with scan_impl(impl):
            res = compare_throughput({"DeiT-T": deit, "ViM-T": vim}, input_size=(3, 224, 224),
                                     batch_size=args.batch, warmup=args.warmup, iters=iters, reference="DeiT-T",
                                     device=args.device, dtype=args.dtype,
                                     verbose=True)
        ips = {k: v["images_per_s"] for k, v in res["models"].items()}
        lines.append(f"| DeiT-T | - | {ips['DeiT-T']:.1f} | 1.00 |")
        lines.append(f"| ViM-T | {impl} | {ips['ViM-T']:.1f} | {res['speedup']['ViM-T']:.3f} |")
    text = header(f"ViM-T vs DeiT-T throughput, batch {args.batch}") + "\n" + "\n".join(lines)
    print(text)
    append_results(args.out, text)


if __name__ == "__main__":
    main()
