"""Tiny shards for tests: sample ``id`` is a constant grey PNG of value ``10 * id + 5`` with label ``id``.

The label is the id, so a test sees which samples arrived; the grey value lets a model "read" the id back.
Lossless PNG and a constant image survive any resize/crop, so ``mean=(0,0,0), std=(1,1,1)`` gives back
``(10 * id + 5) / 255`` in every pixel.
"""

from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from .writer import write_info, write_shard

__all__ = ["grey_png", "write_id_shards"]


def grey_png(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), int(value), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_id_shards(directory: str, sizes: Sequence[int], split: str = "validation", prefix: str = "toy",
                    corrupt_ids: Iterable[int] = (), missing_cls_ids: Iterable[int] = (),
                    info: bool = True, size: int = 8) -> list[str]:
    """Write ``len(sizes)`` shards ``<prefix>-<split>-NN.tar`` holding ids 0..sum(sizes)-1 in order.

    ``corrupt_ids`` get garbage image bytes, ``missing_cls_ids`` no ``cls``. With ``info`` an
    ``_info.json`` (timm form, counting every sample written, corrupt ones included) is written.
    Ids must stay below 25 for the grey value to fit a byte.
    """
    corrupt, missing = set(corrupt_ids), set(missing_cls_ids)
    paths, names, lengths = [], [], []
    next_id = 0
    for s, n in enumerate(sizes):
        samples = []
        for _ in range(n):
            sid = next_id
            next_id += 1
            sample: dict = {"__key__": f"{prefix}_{sid:05d}",
                            "png": b"\x89PNG garbage" if sid in corrupt else grey_png(min(255, 10 * sid + 5), size)}
            if sid not in missing:
                sample["cls"] = sid
            samples.append(sample)
        path = os.path.join(directory, f"{prefix}-{split}-{s:02d}.tar")
        write_shard(path, samples)
        paths.append(path)
        names.append(os.path.basename(path))
        lengths.append(n)
    if info:
        write_info(directory, prefix, {split: (names, lengths)})
    return paths
