"""Shard discovery and sample counts for webdataset tar shards.

A *shard spec* is a string naming tar shards in one of these forms (``::`` joins several specs):

* a brace pattern: ``/data/imagenet/imagenet1k-train-{0000..1023}.tar``
* a glob: ``/data/imagenet/imagenet1k-train-*.tar``
* a directory: ``/data/imagenet`` -- every ``*.tar`` file in it whose name contains ``-<split>-``,
  sorted by name, where ``<split>`` is ``train`` for the training split and ``validation`` or ``val``
  for the validation split (timm imagenet-1k-wds names: ``imagenet1k-train-0000.tar``,
  ``imagenet1k-validation-00.tar``)
* one file path (``pipe:...`` and URLs are passed through unchanged to webdataset's ``gopen``)

Environment variables (``$IMAGENET_WDS`` or ``${IMAGENET_WDS}``) are expanded first; an unset one is an
error naming it.

The number of samples of a split comes from, in this order:

1. an explicit count (``train_samples`` / ``val_samples`` of the data module);
2. an ``_info.json`` (or ``info.json``) in the directory of the first shard, in either form

   * timm / Hugging Face imagenet-1k-wds form::

       {"name": "imagenet-1k",
        "splits": {"train": {"name": "train", "num_samples": 1281167,
                             "filenames": ["imagenet1k-train-0000.tar", ...],
                             "shard_lengths": [1252, ...]},
                   "validation": {...}}}

     With ``filenames`` and ``shard_lengths`` the count is the sum over the *selected* shards, so a
     pattern that picks a subset of shards gets the right count.
   * simple form: ``{"train": 1281167, "validation": 50000}``

3. otherwise :class:`SampleCountError` says what is missing.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import braceexpand

from ..envpaths import expand_env

__all__ = [
    "ShardSpecError",
    "SampleCountError",
    "SPLIT_ALIASES",
    "expand_shard_spec",
    "find_info_file",
    "load_info",
    "num_samples_from_info",
    "resolve_num_samples",
    "shard_lengths_from_info",
    "ShardSet",
    "resolve_shards",
]

INFO_NAMES = ("_info.json", "info.json")

#: names a split may have in file names and in ``_info.json``
SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "validation": ("validation", "val"),
}

_GLOB_CHARS = re.compile(r"[*?\[]")


class ShardSpecError(ValueError):
    """A shard spec that names no readable shard."""


class SampleCountError(ValueError):
    """The number of samples of a split cannot be determined."""


def canonical_split(split: str) -> str:
    for name, aliases in SPLIT_ALIASES.items():
        if split in aliases:
            return name
    raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_ALIASES)} (or 'val')")


def _is_remote(path: str) -> bool:
    return path.startswith("pipe:") or "://" in path


def _expand_env(spec: str) -> str:
    return expand_env(spec, "shard spec", ShardSpecError)


def _files_for_split_in_dir(directory: str, split: str) -> list[str]:
    names = sorted(f for f in os.listdir(directory) if f.endswith(".tar"))
    aliases = SPLIT_ALIASES[canonical_split(split)]
    picked = [f for f in names if any(f"-{a}-" in f for a in aliases)]
    return [os.path.join(directory, f) for f in picked]


def expand_shard_spec(spec: str, split: str = "train") -> list[str]:
    """Expand a shard spec (see module docstring) into a list of shard paths.

    Local paths are checked to exist; the result keeps the order of the spec (brace expansion order,
    sorted order for globs and directories).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ShardSpecError(f"empty shard spec for split {split!r}")
    urls: list[str] = []
    for part in _expand_env(spec.strip()).split("::"):
        part = part.strip()
        if not part:
            continue
        if _is_remote(part):
            urls.extend(braceexpand.braceexpand(part))
            continue
        part = os.path.expanduser(part)
        if os.path.isdir(part):
            found = _files_for_split_in_dir(part, split)
            if not found:
                present = sorted(os.listdir(part))[:10]
                raise ShardSpecError(
                    f"directory {part!r} has no '*-{'/'.join(SPLIT_ALIASES[canonical_split(split)])}-*.tar' "
                    f"shards for split {split!r} (it holds: {present})"
                )
            urls.extend(found)
            continue
        for item in braceexpand.braceexpand(part):
            if _GLOB_CHARS.search(item):
                matched = sorted(glob.glob(item))
                if not matched:
                    raise ShardSpecError(f"glob {item!r} (from shard spec {spec!r}) matches no file")
                urls.extend(matched)
            else:
                urls.append(item)
    if not urls:
        raise ShardSpecError(f"shard spec {spec!r} names no shard")
    missing = [u for u in urls if not _is_remote(u) and not os.path.exists(u)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ShardSpecError(
            f"shard spec {spec!r} names {len(missing)} missing file(s): {missing[:3]}{more}"
        )
    return urls


def find_info_file(urls: list[str]) -> str | None:
    """Path of ``_info.json``/``info.json`` next to the first local shard, or None."""
    for url in urls:
        if _is_remote(url):
            continue
        directory = os.path.dirname(os.path.abspath(url))
        for name in INFO_NAMES:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                return path
        return None
    return None


def load_info(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise SampleCountError(f"cannot read dataset info file {path!r}: {exc}") from exc
    if not isinstance(info, dict):
        raise SampleCountError(f"dataset info file {path!r} must hold a JSON object, got {type(info).__name__}")
    return info


def _split_entry(info: dict[str, Any], split: str) -> Any:
    aliases = SPLIT_ALIASES[canonical_split(split)]
    table = info["splits"] if isinstance(info.get("splits"), dict) else info
    for a in aliases:
        if a in table:
            return table[a]
    return None


def num_samples_from_info(info: dict[str, Any], split: str, urls: list[str] | None = None,
                          source: str = "_info.json") -> int | None:
    """Sample count of ``split`` restricted to ``urls`` from a parsed info dict; None if it has no entry.

    Raises :class:`SampleCountError` when the entry exists but cannot give the count of the selected
    shards (a selected shard not listed, or a subset selected without ``shard_lengths``).
    """
    entry = _split_entry(info, split)
    if entry is None:
        return None
    if isinstance(entry, bool):
        raise SampleCountError(f"{source}: entry for split {split!r} is not a sample count: {entry!r}")
    if isinstance(entry, int):
        return int(entry)
    if not isinstance(entry, dict) or "num_samples" not in entry and "shard_lengths" not in entry:
        raise SampleCountError(
            f"{source}: entry for split {split!r} has neither 'num_samples' nor 'shard_lengths': {entry!r}"
        )
    filenames = entry.get("filenames")
    lengths = entry.get("shard_lengths")
    selected = [os.path.basename(u) for u in urls] if urls else None
    if filenames and lengths:
        if len(filenames) != len(lengths):
            raise SampleCountError(f"{source}: split {split!r} has {len(filenames)} filenames "
                                   f"but {len(lengths)} shard_lengths")
        table = {os.path.basename(f): int(n) for f, n in zip(filenames, lengths)}
        if selected is None:
            return sum(table.values())
        unknown = [s for s in selected if s not in table]
        if unknown:
            raise SampleCountError(
                f"{source}: shard(s) {unknown[:3]} of split {split!r} are not listed in its 'filenames'; "
                "give the sample count explicitly"
            )
        return sum(table[s] for s in selected)
    if "num_samples" not in entry:
        raise SampleCountError(f"{source}: split {split!r} has shard_lengths but no filenames")
    if filenames and selected is not None:
        listed = {os.path.basename(f) for f in filenames}
        if set(selected) != listed:
            raise SampleCountError(
                f"{source}: the spec selects {len(selected)} of the {len(listed)} shards of split {split!r} "
                "and the file has no 'shard_lengths' to count a subset; give the sample count explicitly"
            )
    return int(entry["num_samples"])


def shard_lengths_from_info(info: dict[str, Any], split: str, urls: list[str]) -> list[int] | None:
    """Per-shard sample counts of ``urls`` from a timm-form info dict, or None if it does not list them all."""
    entry = _split_entry(info, split)
    if not isinstance(entry, dict) or not entry.get("filenames") or not entry.get("shard_lengths"):
        return None
    table = {os.path.basename(f): int(n) for f, n in zip(entry["filenames"], entry["shard_lengths"])}
    names = [os.path.basename(u) for u in urls]
    if any(n not in table for n in names):
        return None
    return [table[n] for n in names]


def resolve_num_samples(urls: list[str], split: str, explicit: int | None = None,
                        arg_name: str | None = None, required: bool = True) -> int | None:
    """Number of samples of ``split`` in ``urls``: ``explicit`` if given, else from ``_info.json``.

    With ``required=False`` a missing count gives None instead of raising.
    """
    if explicit is not None:
        if explicit <= 0:
            raise SampleCountError(f"{arg_name or 'num_samples'} must be positive, got {explicit}")
        return int(explicit)
    info_path = find_info_file(urls)
    if info_path is not None:
        n = num_samples_from_info(load_info(info_path), split, urls, source=info_path)
        if n is not None:
            return n
    if not required:
        return None
    where = (f"{info_path!r} has no entry for split {split!r}" if info_path
             else f"no {' / '.join(INFO_NAMES)} next to the shards "
                  f"({os.path.dirname(urls[0]) if urls else '?'})")
    raise SampleCountError(
        f"cannot determine the number of {split} samples: {arg_name or 'the sample count'} is not given and "
        f"{where}. Pass {arg_name or 'the count'} explicitly or add an _info.json such as "
        f'{{"{canonical_split(split)}": N}}'
    )


@dataclass(frozen=True)
class ShardSet:
    """Resolved shards of one split."""

    split: str
    urls: tuple[str, ...]
    num_samples: int | None
    spec: str
    #: samples per shard (same order as ``urls``) when ``_info.json`` lists them, else None
    shard_lengths: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.urls)


def resolve_shards(spec: str, split: str, explicit: int | None = None, arg_name: str | None = None,
                   count_required: bool = True) -> ShardSet:
    urls = expand_shard_spec(spec, split)
    n = resolve_num_samples(urls, split, explicit, arg_name=arg_name, required=count_required)
    lengths = None
    info_path = find_info_file(urls)
    if info_path is not None:
        lengths = shard_lengths_from_info(load_info(info_path), split, urls)
    return ShardSet(split=canonical_split(split), urls=tuple(urls), num_samples=n, spec=spec,
                    shard_lengths=tuple(lengths) if lengths is not None else None)
