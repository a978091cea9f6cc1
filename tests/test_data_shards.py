"""Shard specs and sample counts: _info.json in the timm form (with splits, subsets through shard_lengths)
and the simple form, explicit counts, and clear errors when the count is missing."""
import json
import os
import sys

import pytest

from tokenprune.data import (
    SampleCountError,
    ShardDataModule,
    ShardSpecError,
    expand_shard_spec,
    num_samples_from_info,
    resolve_num_samples,
    resolve_shards,
)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
from data_helpers import make_indexed_shards  # noqa: E402


def test_timm_info_with_splits(tmp_path):
    sh = make_indexed_shards(tmp_path, sizes=(5, 2, 9))
    info = json.load(open(tmp_path / "_info.json"))
    assert info["splits"]["validation"]["num_samples"] == 16
    s = resolve_shards(sh["spec"], "validation")
    assert s.num_samples == 16 and s.shard_lengths == (5, 2, 9) and len(s) == 3
    # a subset of the shards: counted from shard_lengths
    sub = resolve_shards(str(tmp_path / "idx-validation-{01..02}.tar"), "val")
    assert sub.num_samples == 11 and sub.shard_lengths == (2, 9) and sub.split == "validation"
    # directory spec picks the split's shards by name
    assert resolve_shards(str(tmp_path), "validation").num_samples == 16
    # explicit count wins
    assert resolve_shards(sh["spec"], "validation", explicit=7).num_samples == 7


def test_timm_info_dict_forms():
    info = {"name": "x", "splits": {"train": {"num_samples": 10, "filenames": ["a-train-0.tar", "a-train-1.tar"],
                                              "shard_lengths": [6, 4]},
                                    "validation": {"num_samples": 3}}}
    assert num_samples_from_info(info, "train") == 10
    assert num_samples_from_info(info, "train", ["/d/a-train-1.tar"]) == 4
    assert num_samples_from_info(info, "validation") == 3
    assert num_samples_from_info(info, "val") == 3
    with pytest.raises(SampleCountError, match="not listed"):
        num_samples_from_info(info, "train", ["/d/a-train-9.tar"])
    # num_samples only + filenames, subset selected: cannot count -> clear error
    info2 = {"splits": {"train": {"num_samples": 10, "filenames": ["a-train-0.tar", "a-train-1.tar"]}}}
    with pytest.raises(SampleCountError, match="give the sample count explicitly"):
        num_samples_from_info(info2, "train", ["/d/a-train-0.tar"])
    with pytest.raises(SampleCountError, match="neither 'num_samples' nor 'shard_lengths'"):
        num_samples_from_info({"splits": {"train": {"name": "train"}}}, "train")


def test_simple_info_form(tmp_path):
    sh = make_indexed_shards(tmp_path, sizes=(3, 4), split="train", info=False)
    (tmp_path / "_info.json").write_text(json.dumps({"train": 7, "validation": 50}))
    s = resolve_shards(sh["spec"], "train")
    assert s.num_samples == 7 and s.shard_lengths is None
    assert num_samples_from_info({"val": 5}, "validation") == 5
    with pytest.raises(SampleCountError, match="not a sample count"):
        num_samples_from_info({"train": True}, "train")


def test_missing_count_raises_clear_error(tmp_path):
    sh = make_indexed_shards(tmp_path, sizes=(3, 4), split="train", info=False)
    with pytest.raises(SampleCountError, match=r"cannot determine the number of train samples.*train_samples"):
        resolve_num_samples(sh["urls"], "train", arg_name="train_samples")
    assert resolve_num_samples(sh["urls"], "train", required=False) is None
    # an _info.json without the split
    (tmp_path / "_info.json").write_text(json.dumps({"validation": 5}))
    with pytest.raises(SampleCountError, match="has no entry for split 'train'"):
        resolve_num_samples(sh["urls"], "train", arg_name="train_samples")
    # through the data module: fit needs the count, validation does not
    dm = ShardDataModule(train_shards=sh["spec"], val_shards=sh["spec"], image_size=32, resize_size=32,
                         num_classes=10, mixup=0, cutmix=0, num_workers=0)
    with pytest.raises(SampleCountError, match="train_samples"):
        dm.setup("fit")
    (tmp_path / "_info.json").write_text("{not json")
    with pytest.raises(SampleCountError, match="cannot read dataset info file"):
        resolve_num_samples(sh["urls"], "train")


def test_shard_spec_errors_and_env(tmp_path, monkeypatch):
    sh = make_indexed_shards(tmp_path, sizes=(3, 4))
    monkeypatch.delenv("TP_TEST_WDS", raising=False)
    with pytest.raises(ShardSpecError, match="TP_TEST_WDS"):
        expand_shard_spec("${TP_TEST_WDS}/idx-validation-{00..01}.tar", "validation")
    monkeypatch.setenv("TP_TEST_WDS", str(tmp_path))
    assert expand_shard_spec("${TP_TEST_WDS}/idx-validation-{00..01}.tar", "validation") == sh["urls"]
    with pytest.raises(ShardSpecError, match="missing file"):
        expand_shard_spec(str(tmp_path / "idx-validation-{00..05}.tar"), "validation")
    with pytest.raises(ShardSpecError, match="matches no file"):
        expand_shard_spec(str(tmp_path / "nothing-*.tar"), "validation")
