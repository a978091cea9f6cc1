"""2-process DDP (gloo, CPU) validation through ShardDataModule: every sample scored exactly once over
ranks with uneven shards (2 ranks x 2 workers, 3 shards of 5/2/9), the accuracy equals the single-process
one, and SkippedSampleMonitor's summed count equals the split size. DDP runs in a subprocess (never inside
pytest) with the launcher variables removed and a timeout."""
import json
import os
import subprocess
import sys
from collections import Counter

import pytest

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")
sys.path.insert(0, SCRIPTS)
from data_helpers import make_indexed_shards  # noqa: E402
from lit_helpers import clean_env  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def test_ddp_validation_every_sample_once(tmp_path):
    from ddp_val_count import run

    sh = make_indexed_shards(tmp_path / "shards", sizes=(5, 2, 9))
    out = tmp_path / "ddp.json"
    proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, "ddp_val_count.py"), sh["spec"], "16", str(out),
                           "--devices", "2", "--num_workers", "2", "--batch", "2"],
                          env=clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = json.load(open(out))
    assert ddp["world_size"] == 2
    labels = Counter(label for label, _ in ddp["pairs"])
    assert sorted(labels) == list(range(16)) and set(labels.values()) == {1}, labels
    assert sum(ddp["per_rank"]) == 16 and all(n > 0 for n in ddp["per_rank"])
    assert ddp["monitor"]["ok"] == 16 and ddp["monitor"]["skipped"] == 0
    assert ddp["metrics"]["data/validation_samples"] == 16
    assert "scored" not in proc.stderr  # no false 'scored N but the split has M' warning

    single = run(sh["spec"], 16, devices=1, num_workers=0, batch=3, strategy="auto")
    assert sorted(label for label, _ in single["pairs"]) == list(range(16))
    acc = lambda pairs: sum(a == b for a, b in pairs) / len(pairs)  # noqa: E731
    assert sorted(map(tuple, single["pairs"])) == sorted(map(tuple, ddp["pairs"]))  # same predictions
    assert 0 < acc(single["pairs"]) < 1
    assert ddp["metrics"]["val/acc"] == pytest.approx(acc(single["pairs"]), abs=1e-6)
    assert single["metrics"]["val/acc"] == pytest.approx(acc(single["pairs"]), abs=1e-6)
