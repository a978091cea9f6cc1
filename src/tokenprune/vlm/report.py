"""VLM section of the reports: prefill tokens / FLOPs / time / KV cache per budget, and the patches each
budget keeps on a sample photo.

    python -m tokenprune.vlm.report --out reports/vlm                       # small random LLaVA-1.5, CPU
    python -m tokenprune.vlm.report --out reports/vlm --weights /data/llava-1.5-7b-hf --device cuda

Writes vlm.md (the table, the settings) and vlm_kept_patches.png (rows: methods, columns: budgets; kept
patches as they are, the others greyed; for merging methods the tokens' representative patches). With random
weights the picture shows the machinery, not what a trained tower attends to; pass --weights for that.
"""
from __future__ import annotations

import datetime
import os
from typing import Dict, List, Optional, Sequence

import torch

from .attach import attach, load
from .bench import BUDGETS, build_model, environment, markdown_table, measure
from .reduce import METHODS

IMAGES = ("astronaut", "coffee", "chelsea", "rocket")  # scikit-image photos that ship with the package


def sample_image(name: str = "astronaut", size: int = 336):
    """A scikit-image photo, preprocessed as LLaVA-1.5 does (CLIP: shortest edge, centre crop, CLIP mean/std).

    Returns (pixel_values (1, 3, size, size), the cropped image (size, size, 3) in [0, 1] for display).
    """
    from skimage import data
    from transformers import CLIPImageProcessor

    if name not in IMAGES:
        raise ValueError(f"unknown sample image {name!r}; expected one of {list(IMAGES)}")
    proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    pixels = proc(images=getattr(data, name)(), return_tensors="pt")["pixel_values"]
    mean, std = torch.tensor(proc.image_mean)[:, None, None], torch.tensor(proc.image_std)[:, None, None]
    return pixels, (pixels[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


@torch.no_grad()
def kept_patches(model, pixels: torch.Tensor, methods: Sequence[str], budgets: Sequence[int]) -> Dict[str, dict]:
    """Per method and budget: the grid index of each visual token's patch (-1: the CLS)."""
    out = {}
    pixels = pixels.to(next(model.parameters()).device)
    for method in methods:
        per_budget = {}
        for b in budgets:
            reduced = attach(model, method, b)
            reduced.encode_images(pixels.to(model.dtype))
            per_budget[b] = reduced.last_kept[0]
        out[method] = per_budget
    return out


def plot(image, kept: Dict[str, dict], grid, path: str) -> Optional[str]:
    from ..report.plots import plot_kept_patches

    visuals, n = {}, grid[0] * grid[1]
    for method, per_budget in kept.items():
        merging = METHODS[method][1] in ("visionzip", "tome")
        visuals[method] = {"images": image[None], "methods": {
            f"{b} tokens": {"patch_index": idx, "keep": b / n, "token_reduction": 1 - b / n, "merging": merging}
            for b, idx in per_budget.items()}}
    return plot_kept_patches(visuals, {m: grid for m in visuals}, path)


def write(out_dir: str, rows: List[dict], env: str, settings: str, picture: Optional[str]) -> str:
    os.makedirs(out_dir, exist_ok=True)
    lines = ["## VLM: visual-token reduction in LLaVA-1.5", "",
             f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}", f"- {env}", f"- {settings}", "",
             markdown_table(rows), "",
             "Ratios against the unreduced budget (576) of the same run. FLOPs: analytic, one multiply-add = one "
             "FLOP (tokenprune/vlm/cost.py). TTFT: vision tower + reduction + projector + LLM prefill.", ""]
    if picture:
        lines += [f"![kept patches per budget]({os.path.basename(picture)})", ""]
    path = os.path.join(out_dir, "vlm.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))
    return path


def parser():
    """jsonargparse, as eval.py: every option also from a YAML file (--config configs/vlm/llava15.yaml)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    ap = ArgumentParser(prog="python -m tokenprune.vlm.report", description=__doc__)
    ap.add_argument("--config", action=ActionConfigFile)
    ap.add_argument("--out", type=str, default="reports/vlm")
    ap.add_argument("--weights", type=Optional[str], default=None,
                    help="local llava-hf LLaVA-1.5 directory (from_pretrained); default: small random config")
    ap.add_argument("--device", type=str, default="cpu")
    ap.add_argument("--dtype", type=Optional[str], default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--method", type=str, default="visionzip", help=f"method timed in the table: {sorted(METHODS)}")
    ap.add_argument("--methods", type=List[str], default=list(METHODS), help="methods drawn in the picture")
    ap.add_argument("--budgets", type=List[int], default=list(BUDGETS))
    ap.add_argument("--image", type=str, default="astronaut", help=f"one of {list(IMAGES)}")
    ap.add_argument("--prompt_tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    return ap


def main(argv=None) -> str:
    args = parser().parse_args(argv)
    for m in [args.method] + list(args.methods):
        if m not in METHODS:
            raise ValueError(f"unknown visual-token method {m!r}; expected one of {sorted(METHODS)}")
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    budgets = [576] + [b for b in args.budgets if b != 576]
    if args.weights:
        model = load(args.weights, dtype=dtype).model.to(args.device)
        what = f"weights {args.weights}"
    else:
        model = build_model(device=args.device, dtype=dtype)
        what = "small random LLaVA-1.5 config (tokenprune.vlm.configs; random weights)"
    rows = measure(model, budgets, args.method, args.prompt_tokens, warmup=args.warmup, iters=args.iters)
    pixels, image = sample_image(args.image, model.config.vision_config.image_size)
    vc = model.config.vision_config
    side = vc.image_size // vc.patch_size
    os.makedirs(args.out, exist_ok=True)
    picture = plot(image, kept_patches(model, pixels, args.methods, budgets), (side, side),
                   os.path.join(args.out, "vlm_kept_patches.png"))
    settings = (f"{what}; table: {args.method}, one image, {args.prompt_tokens}-token prompt, batch 1, median of "
                f"{args.iters}; picture: scikit-image '{args.image}'")
    path = write(args.out, rows, environment(model), settings, picture)
    print(open(path).read())
    return path


if __name__ == "__main__":
    main()
