"""Prefill cost of LLaVA-1.5 with visual-token reduction at budgets 576 (unreduced) / 192 / 128 / 64, in one run.

    python benchmarks/bench_vlm.py --device cpu                              # small random config (CPU)
    python benchmarks/bench_vlm.py --device cuda --real-shapes               # LLaVA-1.5-7B shapes, bf16 (GPU)
    python benchmarks/bench_vlm.py --device cpu --real-shapes --layers 2     # the GPU code path, 2 layers, on CPU

Per budget: visual tokens fed to the LLM (counted in the fitted input_ids), prefill FLOPs (analytic, formula in
tokenprune/vlm/cost.py), time to first token (vision tower + reduction + projector + LLM prefill), LLM prefill
alone, KV-cache bytes (read from the returned cache) and, on CUDA, the peak memory of one prefill above the
weights; ratios against the unreduced model. One image, a 32-token prompt, batch 1, median of the timed runs.
Real shapes are built from random weights directly on the device (no init), so weights are never downloaded.
Goal (GPU, 7B shapes, 64 tokens): time to first token <= 0.25 x unreduced.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import append_results, header  # noqa: E402
from tokenprune.vlm.bench import BUDGETS, build_model, environment, markdown_table, measure  # noqa: E402
from tokenprune.vlm.reduce import METHODS  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--real-shapes", action="store_true", help="LLaVA-1.5-7B shapes (CLIP-L/14-336 + Vicuna-7B)")
    ap.add_argument("--layers", type=int, default=None, help="override both tower and LLM depths (code-path checks)")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 for --real-shapes)")
    ap.add_argument("--method", default="visionzip", choices=sorted(METHODS))
    ap.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--record", default=None, help="append the table to this markdown file (benchmarks/results.md)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but torch.cuda.is_available() is False")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.real_shapes else torch.float32)
    budgets = [576] + [b for b in args.budgets if b != 576]  # the unreduced model first: the ratios' base
    cuda = args.device.startswith("cuda")
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 2)
    iters = args.iters if args.iters is not None else (10 if cuda else 20)

    t0 = time.perf_counter()
    model = build_model(real=args.real_shapes, device=args.device, dtype=dtype, text_layers=args.layers,
                        vision_layers=args.layers)
    built = time.perf_counter() - t0
    rows = measure(model, budgets, args.method, args.prompt_tokens, warmup=warmup, iters=iters)
    total = time.perf_counter() - t0
    shapes = "LLaVA-1.5-7B shapes" if args.real_shapes else "small random LLaVA-1.5 config (tokenprune.vlm.configs)"
    if args.layers:
        shapes += f", {args.layers} tower + {args.layers} LLM layers"
    title = f"VLM prefill with {args.method}, {shapes}"
    text = (f"{header(title)}- {environment(model)}\n- one image, {args.prompt_tokens}-token prompt, batch 1, "
            f"median of {iters} runs after {warmup} warm-up; model built in {built:.1f} s, whole run {total:.1f} s; "
            f"load average at the end {os.getloadavg()[0]:.1f}\n\n"
            f"{markdown_table(rows)}\n")
    print(text)
    if args.record:
        append_results(args.record, text)


if __name__ == "__main__":
    main()
