"""Tiny webdataset shards for the data tests: sample ``k`` (global index over the split) has ``cls == k``
and a flat 32x32 JPEG whose colour encodes ``k``, so every delivered sample can be identified."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def colour(k: int) -> tuple[int, int, int]:
    return ((k * 37) % 200 + 20, (k * 91) % 200 + 20, (k * 53) % 200 + 20)


def jpg(k: int, size: int = 32) -> bytes:
    img = np.zeros((size, size, 3), dtype=np.uint8) + np.array(colour(k), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_indexed_shards(root, sizes=(5, 2, 9), split: str = "validation", info: bool = True,
                        extra: dict | None = None) -> dict:
    """Shards ``idx-<split>-{00..}.tar`` with ``sizes`` samples; ``extra[(shard, pos)]`` replaces a sample's
    members (e.g. ``{"jpg": b"garbage"}`` or a dict without ``cls``). Returns spec, urls, total, labels."""
    from tokenprune.data.writer import write_info, write_shard

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    names, labels, k = [], [], 0
    for s, n in enumerate(sizes):
        samples = []
        for i in range(n):
            sample = {"__key__": f"{split}{k:05d}", "jpg": jpg(k), "cls": k}
            if extra and (s, i) in extra:
                sample = {"__key__": f"{split}{k:05d}", **extra[(s, i)]}
            else:
                labels.append(k)
            samples.append(sample)
            k += 1
        name = f"idx-{split}-{s:02d}.tar"
        write_shard(str(root / name), samples)
        names.append(name)
    if info:
        write_info(str(root), "idx", {split: (names, list(sizes))})
    return {"spec": str(root / f"idx-{split}-{{00..{len(sizes) - 1:02d}}}.tar"),
            "urls": [str(root / n) for n in names], "total": k, "labels": labels}
