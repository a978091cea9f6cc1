"""Where a model's GPU time goes: torch.profiler over a few inference batches, top CUDA kernels.

    python benchmarks/profile_gpu.py [--model vim_tiny_patch16_224] [--batch 128] [--method l2 --keep 0.6]
"""
import argparse

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import tokenprune


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vim_tiny_patch16_224")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--method", default=None)
    ap.add_argument("--keep", type=float, default=1.0)
    ap.add_argument("--rows", type=int, default=15)
    args = ap.parse_args()
    torch.manual_seed(0)
    base = timm.create_model(args.model)
    model = (tokenprune.create_model(base, args.method, keep=args.keep) if args.method else base).cuda().eval()
    x = torch.randn(args.batch, 3, 224, 224, device="cuda")
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                model(x)
            torch.cuda.synchronize()
    print(f"# {args.model} batch {args.batch} method {args.method} keep {args.keep}, 5 forwards, "
          f"{torch.cuda.get_device_name()}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
