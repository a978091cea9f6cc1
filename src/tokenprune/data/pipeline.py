"""Webdataset pipelines: training (resampled, fixed length) and evaluation (each sample exactly once).

Both datasets are ``torch.utils.data.IterableDataset`` objects that batch *inside* the worker; wrap
them in ``DataLoader(dataset, batch_size=None, ...)``. Each yields ``(images, labels)``:
``images`` float32 (B, 3, H, W) already normalised, ``labels`` int64 (B,).

Training (:class:`TrainShardDataset`)
    Shards are drawn uniformly *with replacement* (the semantics of ``wds.ResampledShards``) with a
    random stream seeded from (seed, rank, worker, worker seed, iteration), samples pass a shuffle buffer
    of raw bytes, then decode and transform. The epoch has a fixed length of
    ``batches_per_rank = ceil(num_samples / (world_size * batch_size))`` full batches on every rank,
    split over the DataLoader workers (worker w yields ``n // W + (w < n % W)``), so ``len(loader)`` is
    exact and all DDP ranks run the same number of steps.

Evaluation (:class:`EvalShardDataset`)
    No resampling, no padding, no duplicates, no drops: sample (s, i) -- the i-th sample of shard s --
    belongs to exactly one (rank, worker):

    * ranks: with at least as many shards as ranks, shard s goes to rank ``s % world_size``; with
      fewer shards than ranks (or, when ``_info.json`` gives shard lengths, if dealing shards would leave
      a rank only empty shards) every rank reads every shard and keeps sample i of shard s when
      ``(s + i) % world_size == rank``. So every rank gets at least one sample whenever the split has
      at least ``world_size`` samples -- which matters: a rank with *no* validation batch never registers
      the logged metrics, and Lightning's epoch-end sync then hangs (checked under DDP: it hangs with
      torchmetrics and with ``self.log(sync_dist=True)`` alike). The data module refuses fewer samples
      than ranks. Not covered: a rank all of whose samples are lost to corruption (e.g. its only shard
      truncated) still ends with no batch -- the skip warnings say so before the sync;
    * workers, within the shards of a rank: with at least as many shards as workers, the rank's shard
      list is dealt round-robin to the workers; otherwise every worker of the rank reads the rank's
      shards and keeps the j-th sample it owns when ``(s + j) % num_workers == worker``.

    The last batch of each worker may be partial. Ranks may end with different numbers of batches
    (>= 1); Lightning's evaluation loop is fine with that as long as metrics are synchronised at epoch
    end (torchmetrics, or ``self.log(..., sync_dist=True)`` with the default ``on_epoch=True``), which
    ``tests/test_data_ddp.py`` checks. Do not use collectives inside ``validation_step``.

Corrupt samples
    A sample whose image does not decode, which has no image or no ``cls``, whose label is not an
    integer in ``[0, num_classes)``, or whose transform fails, is skipped; a tar file that cannot be
    opened or read (missing, not a tar, truncated) is abandoned after the samples read so far
    (``read_error``, one per shard read) and, in evaluation with ``_info.json`` shard lengths, the
    samples it lacks are counted as ``short_shard``. Every event is counted once, by the (rank, worker)
    that owns the sample (shard-level events: by one designated reader), in a :class:`SampleCounter` --
    a small int64 table in shared memory, one row per DataLoader worker, so counts made inside worker
    processes are visible in the main process without a side channel in the batches. The first few
    events are logged one by one with key and shard, every worker logs a summary when its stream ends,
    and the counter also counts the samples delivered (``ok``).
"""

from __future__ import annotations

import io
import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

import webdataset as wds

log = logging.getLogger("tokenprune.data")

__all__ = [
    "SKIP_REASONS",
    "SAMPLE_SKIP_REASONS",
    "COLUMNS",
    "SampleCounter",
    "SkipSample",
    "decode_sample",
    "assign_eval_shards",
    "EvalAssignment",
    "TrainShardDataset",
    "EvalShardDataset",
    "batches_per_rank",
]

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
LABEL_KEY = "cls"

#: reasons a sample is skipped (each counts samples). ``short_shard`` counts samples missing from a shard
#: compared with the ``shard_lengths`` of ``_info.json`` (evaluation only; it also catches a tar truncated at
#: a member boundary, which ``tarfile`` reads as a clean end).
SAMPLE_SKIP_REASONS = ("decode_error", "missing_image", "missing_label", "bad_label", "transform_error",
                       "short_shard")
#: ``read_error`` counts shard *reads* abandoned part-way (tar missing, not a tar, truncated inside a member);
#: the samples lost that way are known only through ``short_shard`` (evaluation with ``_info.json``).
SKIP_REASONS = SAMPLE_SKIP_REASONS + ("read_error",)
COLUMNS = ("ok",) + SKIP_REASONS
_COL = {c: i for i, c in enumerate(COLUMNS)}

#: number of skip events per worker logged one by one before only the summary is logged
LOG_FIRST_SKIPS = 10


class SampleCounter:
    """Counts of delivered and skipped samples, shared between the DataLoader workers and the main process.

    One row per worker (row 0 in the main process when ``num_workers=0``), one column per entry of
    ``("ok",) + SKIP_REASONS``. The table lives in shared memory, so it survives both ``fork`` and
    ``spawn`` workers; each worker writes only its own row, so no lock is needed.
    """

    def __init__(self, num_slots: int = 1, name: str = "data"):
        self.name = name
        self.table = torch.zeros((max(1, num_slots), len(COLUMNS)), dtype=torch.int64).share_memory_()

    def _slot(self) -> int:
        info = get_worker_info()
        return 0 if info is None else info.id % self.table.shape[0]

    def add(self, column: str, n: int = 1) -> None:
        self.table[self._slot(), _COL[column]] += n

    def row(self) -> dict[str, int]:
        """Counts of the calling worker."""
        return {c: int(v) for c, v in zip(COLUMNS, self.table[self._slot()].tolist())}

    def totals(self) -> dict[str, int]:
        """Counts summed over workers: ``ok``, one entry per skip reason, and ``skipped`` (samples skipped:
        the sum over :data:`SAMPLE_SKIP_REASONS`; ``read_error`` events are not samples and not in it)."""
        sums = self.table.sum(0).tolist()
        out = {c: int(v) for c, v in zip(COLUMNS, sums)}
        out["skipped"] = sum(out[r] for r in SAMPLE_SKIP_REASONS)
        return out

    def vector(self) -> torch.Tensor:
        """Totals as a tensor in ``COLUMNS`` order (for all-reduce across ranks)."""
        return self.table.sum(0).clone()

    def reset(self) -> None:
        self.table.zero_()


class SkipSample(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _parse_label(raw: Any, num_classes: int | None) -> int:
    if isinstance(raw, (bytes, bytearray)):
        raw = raw.decode("utf-8", errors="replace")
    try:
        label = int(str(raw).strip())
    except ValueError:
        raise SkipSample("bad_label", f"cls {str(raw)[:20]!r} is not an integer") from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise SkipSample("bad_label", f"label {label} outside [0, {num_classes})")
    return label


def decode_sample(sample: dict[str, Any], num_classes: int | None = None) -> tuple[Image.Image, int]:
    """Decode one raw webdataset sample into (RGB PIL image, int label) or raise :class:`SkipSample`."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        present = sorted(k for k in sample if not k.startswith("__"))
        raise SkipSample("missing_image", f"no image ({'/'.join(IMAGE_KEYS)}) among {present}")
    if LABEL_KEY not in sample:
        present = sorted(k for k in sample if not k.startswith("__"))
        raise SkipSample("missing_label", f"no '{LABEL_KEY}' among {present}")
    label = _parse_label(sample[LABEL_KEY], num_classes)
    try:
        with Image.open(io.BytesIO(sample[key])) as img:
            img.load()
            rgb = img.convert("RGB")
    except Exception as exc:  # PIL raises many types for broken data
        raise SkipSample("decode_error", f"{key} does not decode: {type(exc).__name__}: {exc}") from None
    return rgb, label


class _SkipLog:
    """Counts and logs skip events of one worker's stream."""

    def __init__(self, counter: SampleCounter, what: str):
        self.counter = counter
        self.what = what
        self.events = 0
        self.by_reason: dict[str, int] = {}

    def skip(self, reason: str, message: str, key: str = "?", url: str = "?") -> None:
        self.counter.add(reason)
        self.events += 1
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        if self.events <= LOG_FIRST_SKIPS:
            log.warning("%s: skipped sample %r in %s (%s): %s", self.what, key, url, reason, message)
        elif self.events == LOG_FIRST_SKIPS + 1:
            log.warning("%s: more skipped samples; only the summary will be logged", self.what)

    def read_error(self, url: str, exc: BaseException) -> None:
        self.skip("read_error", f"shard abandoned: {type(exc).__name__}: {str(exc)[:300]}", key="<tar>", url=url)

    def short_shard(self, url: str, missing: int, expected: int) -> None:
        self.skip("short_shard", f"{missing} of the {expected} samples listed in _info.json are missing",
                  key="<tar>", url=url)
        if missing > 1:
            self.counter.add("short_shard", missing - 1)
            self.by_reason["short_shard"] += missing - 1

    def summary(self, delivered: int) -> None:
        if self.events:
            info = get_worker_info()
            wid = "main" if info is None else f"worker {info.id}"
            samples = sum(n for r, n in self.by_reason.items() if r != "read_error")
            log.warning("%s (%s): skipped %d sample(s), %d shard read error(s) %s; delivered %d samples",
                        self.what, wid, samples, self.by_reason.get("read_error", 0), self.by_reason, delivered)


def _raw_samples(url: str, on_error: Callable[[str, BaseException], None] | None) -> Iterator[dict[str, Any]]:
    """Raw samples (dicts of bytes) of one tar shard, in tar order.

    A tar-level error ends the shard and is passed to ``on_error`` once (webdataset may raise the same
    failure twice, from the member reader and from the tar iterator).
    """
    errors: list[BaseException] = []

    def handler(exc: BaseException) -> bool:
        errors.append(exc)
        return True

    yield from wds.tarfile_samples([{"url": url}], handler=handler)
    if errors and on_error is not None:
        on_error(url, errors[0])


def _collate(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([x for x, _ in items])
    labels = torch.tensor([y for _, y in items], dtype=torch.long)
    return images, labels


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _DecodeTransform:
    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], num_classes: int | None,
                 skips: _SkipLog):
        self.transform = transform
        self.num_classes = num_classes
        self.skips = skips

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int] | None:
        key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
        try:
            img, label = decode_sample(sample, self.num_classes)
        except SkipSample as s:
            self.skips.skip(s.reason, str(s), key, url)
            return None
        try:
            x = self.transform(img)
        except Exception as exc:
            self.skips.skip("transform_error", f"{type(exc).__name__}: {exc}", key, url)
            return None
        return x, label


def batches_per_rank(num_samples: int, batch_size: int, world_size: int) -> int:
    """Fixed training epoch length: ``ceil(num_samples / (world_size * batch_size))``."""
    return max(1, math.ceil(num_samples / (world_size * batch_size)))


def _seed_words(*parts: int) -> list[int]:
    return [int(p) & 0xFFFFFFFF for p in parts] + [(int(p) >> 32) & 0xFFFFFFFF for p in parts]


class TrainShardDataset(IterableDataset):
    """Resampled training stream with a fixed number of batches per rank (see module docstring)."""

    def __init__(self, urls: Sequence[str], transform: Callable, batch_size: int, num_samples: int,
                 rank: int = 0, world_size: int = 1, shuffle_buffer: int = 5000, seed: int = 0,
                 num_classes: int | None = None, counter: SampleCounter | None = None):
        super().__init__()
        if not urls:
            raise ValueError("TrainShardDataset needs at least one shard")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.urls = list(urls)
        self.transform = transform
        self.batch_size = int(batch_size)
        self.num_samples = int(num_samples)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.num_classes = num_classes
        self.counter = counter if counter is not None else SampleCounter(1, "train")
        self.num_batches = batches_per_rank(self.num_samples, self.batch_size, self.world_size)
        self._iterations = 0  # per process: distinguishes epochs with persistent workers

    def __len__(self) -> int:
        return self.num_batches

    def worker_quota(self, worker: int, num_workers: int) -> int:
        n = self.num_batches
        return n // num_workers + (1 if worker < n % num_workers else 0)

    def _rng(self, worker: int) -> random.Random:
        info = get_worker_info()
        # worker seed: drawn by the DataLoader from the main-process torch RNG for every new iterator
        base = info.seed if info is not None else int(torch.randint(0, 2**62, ()).item())
        ss = np.random.SeedSequence(_seed_words(self.seed, self.rank, worker, base, self._iterations))
        return random.Random(int(ss.generate_state(2, dtype=np.uint64)[0]))

    def _resampled(self, rng: random.Random, skips: _SkipLog) -> Iterator[dict[str, Any]]:
        empty_reads = 0
        while True:
            url = self.urls[rng.randrange(len(self.urls))]
            got = False
            for sample in _raw_samples(url, skips.read_error):
                got = True
                yield sample
            empty_reads = 0 if got else empty_reads + 1
            if empty_reads > 2 * len(self.urls) + 10:
                raise RuntimeError(f"{empty_reads} consecutive shard reads gave no sample; "
                                   f"are the training shards readable? (e.g. {url})")

    def _shuffled(self, src: Iterable[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        if self.shuffle_buffer <= 1:
            yield from src
            return
        buf: list[dict[str, Any]] = []
        for sample in src:
            if len(buf) < self.shuffle_buffer:
                buf.append(sample)
                continue
            k = rng.randrange(len(buf))
            out, buf[k] = buf[k], sample
            yield out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker, num_workers = _worker()
        quota = self.worker_quota(worker, num_workers)
        rng = self._rng(worker)
        self._iterations += 1
        skips = _SkipLog(self.counter, f"train rank {self.rank}")
        decode = _DecodeTransform(self.transform, self.num_classes, skips)
        stream = self._shuffled(self._resampled(rng, skips), rng)
        produced, batch, delivered = 0, [], 0
        consecutive_bad = 0
        try:
            while produced < quota:
                item = decode(next(stream))
                if item is None:
                    consecutive_bad += 1
                    if consecutive_bad > 10000:
                        raise RuntimeError("10000 consecutive training samples were skipped; see the "
                                           "warnings above for the reasons")
                    continue
                consecutive_bad = 0
                batch.append(item)
                if len(batch) == self.batch_size:
                    self.counter.add("ok", len(batch))
                    delivered += len(batch)
                    yield _collate(batch)
                    batch = []
                    produced += 1
        finally:
            stream.close()
            skips.summary(delivered)


@dataclass(frozen=True)
class EvalAssignment:
    """What one (rank, worker) reads during evaluation."""

    shards: tuple[int, ...]
    rank_by_sample: bool   # every rank reads these shards, keeps (s + i) % world == rank
    worker_by_sample: bool  # every worker of the rank reads them, keeps (s + j) % num_workers == worker

    def owns(self, s: int, i: int, j: int, rank: int, world: int, worker: int, num_workers: int) -> tuple[bool, bool]:
        """(owned by this rank, owned by this worker) for sample i of shard s, j = its rank-local index."""
        rank_ok = (not self.rank_by_sample) or (s + i) % world == rank
        worker_ok = (not self.worker_by_sample) or (s + j) % num_workers == worker
        return rank_ok, worker_ok

    def reports(self, s: int, rank: int, world: int, worker: int, num_workers: int) -> bool:
        """Whether this (rank, worker) reports shard-level problems of shard s (exactly one reader does)."""
        rank_ok = (not self.rank_by_sample) or s % world == rank
        worker_ok = (not self.worker_by_sample) or s % num_workers == worker
        return rank_ok and worker_ok


def assign_eval_shards(num_shards: int, rank: int, world_size: int, worker: int, num_workers: int,
                       shard_lengths: Sequence[int] | None = None) -> EvalAssignment:
    """The shards (rank, worker) reads and how it filters them (see module docstring).

    Shards are dealt to ranks only if every rank then gets a sample (at least ``world_size`` shards, and
    with known ``shard_lengths`` no rank left with only empty shards); otherwise ranks split by sample.
    """
    if not 0 <= rank < world_size or not 0 <= worker < num_workers:
        raise ValueError(f"bad rank/worker {rank}/{world_size}, {worker}/{num_workers}")
    by_shard = num_shards >= world_size
    if by_shard and shard_lengths is not None:
        by_shard = all(sum(shard_lengths[r::world_size]) > 0 for r in range(world_size))
    if by_shard:
        rank_shards = list(range(rank, num_shards, world_size))
        rank_by_sample = False
    else:
        rank_shards = list(range(num_shards))
        rank_by_sample = True
    if len(rank_shards) >= num_workers:
        return EvalAssignment(tuple(rank_shards[worker::num_workers]), rank_by_sample, False)
    return EvalAssignment(tuple(rank_shards), rank_by_sample, True)


class EvalShardDataset(IterableDataset):
    """Every sample of ``urls`` exactly once over all ranks and workers (see module docstring)."""

    def __init__(self, urls: Sequence[str], transform: Callable, batch_size: int, rank: int = 0,
                 world_size: int = 1, num_classes: int | None = None, counter: SampleCounter | None = None,
                 what: str = "validation", shard_lengths: Sequence[int] | None = None):
        super().__init__()
        if not urls:
            raise ValueError("EvalShardDataset needs at least one shard")
        if shard_lengths is not None and len(shard_lengths) != len(urls):
            raise ValueError(f"{len(shard_lengths)} shard_lengths for {len(urls)} shards")
        self.shard_lengths = list(shard_lengths) if shard_lengths is not None else None
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.urls = list(urls)
        self.transform = transform
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_classes = num_classes
        self.counter = counter if counter is not None else SampleCounter(1, what)
        self.what = what

    def _owned_raw(self, assignment: EvalAssignment, worker: int, num_workers: int,
                   skips: _SkipLog) -> Iterator[dict[str, Any]]:
        for s in assignment.shards:
            url = self.urls[s]
            reporter = assignment.reports(s, self.rank, self.world_size, worker, num_workers)
            j = n_raw = 0
            for i, sample in enumerate(_raw_samples(url, skips.read_error if reporter else None)):
                n_raw = i + 1
                rank_ok, worker_ok = assignment.owns(s, i, j, self.rank, self.world_size, worker, num_workers)
                if not rank_ok:
                    continue
                j += 1
                if worker_ok:
                    yield sample
            if reporter and self.shard_lengths is not None:
                expected = self.shard_lengths[s]
                if n_raw < expected:
                    skips.short_shard(url, expected - n_raw, expected)
                elif n_raw > expected:
                    log.warning("%s: %s holds %d samples but _info.json lists %d", self.what, url, n_raw, expected)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker, num_workers = _worker()
        assignment = assign_eval_shards(len(self.urls), self.rank, self.world_size, worker, num_workers,
                                        self.shard_lengths)
        skips = _SkipLog(self.counter, f"{self.what} rank {self.rank}")
        decode = _DecodeTransform(self.transform, self.num_classes, skips)
        batch, delivered = [], 0
        for sample in self._owned_raw(assignment, worker, num_workers, skips):
            item = decode(sample)
            if item is None:
                continue
            batch.append(item)
            if len(batch) == self.batch_size:
                self.counter.add("ok", len(batch))
                delivered += len(batch)
                yield _collate(batch)
                batch = []
        if batch:
            self.counter.add("ok", len(batch))
            delivered += len(batch)
            yield _collate(batch)
        skips.summary(delivered)
