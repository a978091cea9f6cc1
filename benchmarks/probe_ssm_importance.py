"""Does an SSM importance score rank the object above the background? (the shipped digits ViM)

For each pruning layer of ToP's schedule, the AUC of "a digit patch scores higher than a clean background
patch" (1 = always, 0.5 = chance) for ToP's score (`ssm_out`, after the SiLU(z) gate), the same score before
the gate (`ssm_out_ungated`) and the gate alone (channel sum of SiLU(z)), on the first validation images. Digit
patches: more than half inside the digit's box and with ink; background: outside the box, no bright pixel.

    python benchmarks/probe_ssm_importance.py [--images 64]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tarfile

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import tokenprune  # noqa: F401  (registers the models)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def load_images(n: int):
    """The first n validation samples: normalised images, (n, 49) digit and background patch masks."""
    images, digit, background = [], [], []
    with tarfile.open(os.path.join(ROOT, "data", "digits", "digits-validation-00.tar")) as tar:
        members = {m.name: m for m in tar.getmembers()}
        keys = sorted({name.rsplit(".", 1)[0] for name in members})[:n]
        for key in keys:
            rgb = np.asarray(Image.open(io.BytesIO(tar.extractfile(members[key + ".jpg"]).read())).convert("RGB"))
            meta = json.loads(tar.extractfile(members[key + ".json"]).read())
            img = torch.tensor(rgb, dtype=torch.float32).permute(2, 0, 1) / 255
            box = torch.zeros(56, 56)
            x0, y0, x1, y1 = meta["bbox"]
            box[y0:y1, x0:x1] = 1
            ink = (img.max(0).values > 0.75).float()
            cover = F.avg_pool2d(box[None, None], 8).flatten()
            inked = F.avg_pool2d(ink[None, None], 8).flatten()
            digit.append((cover > 0.5) & (inked > 0.05))
            background.append((cover == 0) & (inked == 0))
            images.append((img - MEAN[:, None, None]) / STD[:, None, None])
    return torch.stack(images), torch.stack(digit), torch.stack(background)


def auc(scores: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties count half, averaged over images."""
    values = []
    for s, p, q in zip(scores, pos, neg):
        a, b = s[p], s[q]
        if len(a) and len(b):
            values.append(((a[:, None] > b[None]).float() + 0.5 * (a[:, None] == b[None]).float()).mean())
    return torch.stack(values).mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--weights", default=os.path.join(ROOT, "weights", "digits", "vim_micro.pth"))
    args = parser.parse_args()
    model = timm.create_model("vim_micro_patch8_56", checkpoint_file=args.weights).eval()
    layers = [s.layer for s in tokenprune.create_model(model, "top", keep=0.7).stages]
    images, digit, background = load_images(args.images)
    gates = {}
    for i in layers:  # the gate: SiLU of the z half of in_proj, summed over channels
        model.layers[i].mixer.register_forward_pre_hook(
            lambda mod, inp, i=i: gates.__setitem__(i, F.silu(inp[0] @ mod.in_proj.weight.chunk(2)[1].t()).sum(-1)))

    class Capture:
        needs = {"ssm_out", "ssm_out_ungated"}

        def __init__(self):
            self.signals = {}

        def __call__(self, state, signals):
            self.signals = signals
            return state

    print(f"{len(images)} images, {digit.sum(1).float().mean():.1f} digit and "
          f"{background.sum(1).float().mean():.1f} background patches each; AUC(digit > background)")
    print(f"{'after block (0-based)':>22} {'ssm_out (ToP)':>14} {'ungated':>8} {'gate alone':>11}")
    with torch.no_grad():
        state = model.embed(images)
        patches = state.patch_index()[0] >= 0  # drop the CLS column
        for i in range(max(layers) + 1):
            hook = Capture() if i in layers else None
            state = model.run_block(i, state, hook)
            if hook is not None:
                row = [hook.signals["ssm_out"], hook.signals["ssm_out_ungated"], gates[i]]
                row = [auc(s[:, patches], digit, background) for s in row]
                print(f"{i:>22} {row[0]:>14.3f} {row[1]:>8.3f} {row[2]:>11.3f}")


if __name__ == "__main__":
    main()
