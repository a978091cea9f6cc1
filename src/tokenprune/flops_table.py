"""Print params and GFLOPs (full count and ViM-paper convention) of the registered backbones.

    python -m tokenprune.flops_table                    # ViM-T/S/B, DeiT-T/S, PlainMamba-L1/L2/L3
    python -m tokenprune.flops_table vim_small_patch16_224 deit_small_patch16_224
"""
from __future__ import annotations

import argparse

import timm
import torch
from tqdm import tqdm

import tokenprune
from tokenprune.flops import count_flops

DEFAULT_MODELS = ["vim_tiny_patch16_224", "vim_small_patch16_224", "vim_base_patch16_224",
                  "deit_tiny_patch16_224", "deit_small_patch16_224",
                  "plainmamba_l1", "plainmamba_l2", "plainmamba_l3"]
PUBLISHED = {  # (params M, GFLOPs) as published
    "vim_tiny_patch16_224": (7.0, 1.5), "vim_small_patch16_224": (26.0, 5.1), "vim_base_patch16_224": (98.0, 18.9),
    "deit_tiny_patch16_224": (5.7, 1.3), "deit_small_patch16_224": (22.1, 4.6),
    "plainmamba_l1": (7.3, 3.0), "plainmamba_l2": (25.7, 8.1), "plainmamba_l3": (50.5, 14.4),
}


def flops_row(name: str) -> dict:
    torch.manual_seed(0)
    model = tokenprune.create_model(name).eval()
    report = count_flops(model)
    params = sum(p.numel() for p in model.backbone.parameters())
    pub = PUBLISHED.get(name, (None, None))
    return dict(model=name, params=params, gflops_full=report.total / 1e9, gflops_paper=report.paper / 1e9,
                published_params_m=pub[0], published_gflops=pub[1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="timm model names (default: the paper backbones)")
    args = parser.parse_args(argv)
    names = args.models or [m for m in DEFAULT_MODELS if m in timm.list_models()]
    rows = [flops_row(n) for n in tqdm(names, desc="counting FLOPs", leave=False)]
    print("| model | params | GFLOPs (all ops) | GFLOPs (ViM-paper convention) | published params (M) / GFLOPs |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        pub = "" if r["published_gflops"] is None else f"{r['published_params_m']} / {r['published_gflops']}"
        print(f"| {r['model']} | {r['params']:,} | {r['gflops_full']:.3f} | {r['gflops_paper']:.3f} | {pub} |")
    print("\nOne fused multiply-add = one FLOP, batch 1, attention matmuls and the selective scan (9·L·E·N + L·E) "
          "counted. ViM-paper convention = the full count without ViM's backward scan direction.")


if __name__ == "__main__":
    main()
