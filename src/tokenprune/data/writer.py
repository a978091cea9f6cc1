"""Writing webdataset tar shards and their ``_info.json`` (byte-for-byte deterministic).

Members are written in sample order as ``<key>.<ext>`` with mtime 0, uid/gid 0, mode 0o444, so the same
samples give the same bytes on every run and machine (``wds.TarWriter`` stamps the current time).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Iterable, Mapping

__all__ = ["write_shard", "ShardWriter", "write_info"]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = 0
    ti.mode = 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    tar.addfile(ti, io.BytesIO(data))


def _encode(value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, int):
        return str(value).encode("ascii")
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")
    raise TypeError(f"cannot write a {type(value).__name__} into a shard")


def write_shard(path: str, samples: Iterable[Mapping[str, object]]) -> int:
    """Write samples (dicts with ``__key__`` and extension → bytes/str/int/json) to one tar; returns the count."""
    n = 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            if not isinstance(key, str) or "." in key or "/" in key:
                raise ValueError(f"bad sample key {key!r}: needs a string without '.' or '/'")
            for ext, value in sample.items():
                if ext.startswith("__"):
                    continue
                _add(tar, f"{key}.{ext}", _encode(value))
            n += 1
    os.replace(tmp, path)
    return n


class ShardWriter:
    """Write samples into numbered shards of at most ``per_shard`` samples: ``pattern % index``."""

    def __init__(self, pattern: str, per_shard: int):
        if per_shard <= 0:
            raise ValueError("per_shard must be > 0")
        self.pattern = pattern
        self.per_shard = per_shard
        self.filenames: list[str] = []
        self.lengths: list[int] = []

    def write_all(self, samples: Iterable[Mapping[str, object]]) -> None:
        buf: list[Mapping[str, object]] = []
        for s in samples:
            buf.append(s)
            if len(buf) == self.per_shard:
                self._flush(buf)
                buf = []
        if buf:
            self._flush(buf)

    def _flush(self, buf) -> None:
        path = self.pattern % len(self.filenames)
        self.lengths.append(write_shard(path, buf))
        self.filenames.append(os.path.basename(path))


def write_info(directory: str, name: str, splits: Mapping[str, tuple[list[str], list[int]]],
               extra: Mapping[str, object] | None = None) -> str:
    """Write ``_info.json`` in the timm imagenet-1k-wds form; returns its path."""
    info: dict[str, object] = {"name": name, "splits": {}}
    for split, (filenames, lengths) in splits.items():
        info["splits"][split] = {  # type: ignore[index]
            "name": split,
            "num_samples": int(sum(lengths)),
            "filenames": list(filenames),
            "shard_lengths": [int(n) for n in lengths],
        }
    if extra:
        info.update(extra)
    path = os.path.join(directory, "_info.json")
    with open(path, "w") as f:
        json.dump(info, f, indent=1, sort_keys=False)
        f.write("\n")
    return path
