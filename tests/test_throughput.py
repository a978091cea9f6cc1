"""tokenprune.bench: iteration counts, modes, keys, interleaving and that a model doing 2x the work is slower."""
import warnings

import pytest
import torch
from torch import nn

import tokenprune.bench.throughput as throughput
from tokenprune.bench import compare_throughput, measure_throughput
from tokenprune.bench.throughput import as_dtype

REQUIRED = {"images_per_s", "ms_per_batch", "peak_mem_mb", "device", "dtype", "batch", "torch", "timm", "iters",
            "warmup", "convention_ok"}


class Counting(nn.Module):
    """Counts forwards and records the mode they ran in; `log` (shared) records the order of calls."""

    def __init__(self, name="m", log=None, repeats=1):
        super().__init__()
        self.name, self.log = name, log
        self.lin = nn.Linear(16, 16)
        self.repeats = repeats
        self.calls = 0
        self.modes = set()

    def forward(self, x):
        self.calls += 1
        self.modes.add((self.training, torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu")))
        if self.log is not None:
            self.log.append(self.name)
        for _ in range(self.repeats):
            x = torch.tanh(self.lin(x))
        return x


def test_measure_counts_modes_and_keys():
    m = Counting()
    m.train()
    r = measure_throughput(m, input_size=(16,), batch_size=4, warmup=10, iters=30)
    assert m.calls == 10 + 30
    assert m.modes == {(False, True, False)}  # eval mode, inference_mode, no autocast
    assert m.training  # the caller's mode is restored
    assert REQUIRED <= set(r)
    assert r["iters"] == 30 and r["warmup"] == 10 and r["batch"] == 4 and r["convention_ok"]
    assert r["device"] == "cpu" and r["dtype"] == "float32" and r["torch"] == torch.__version__
    assert r["images_per_s"] > 0
    assert r["images_per_s"] == pytest.approx(4 * 1000.0 / r["ms_per_batch"], rel=1e-9)
    assert r["peak_mem_method"] == "ru_maxrss_delta" and r["peak_mem_mb"] >= 0


def test_below_convention_warns():
    with pytest.warns(UserWarning, match="convention"):
        r = measure_throughput(Counting(), input_size=(16,), batch_size=2, warmup=1, iters=3)
    assert not r["convention_ok"] and r["iters"] == 3


def test_bf16_runs_under_autocast():
    m = Counting()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = measure_throughput(m, input_size=(16,), batch_size=2, warmup=1, iters=2, dtype="bf16")
    assert r["dtype"] == "bfloat16"
    assert m.modes == {(False, True, True)}
    with pytest.raises(ValueError, match="unknown dtype"):
        as_dtype("int7")


class WorkClock:
    """Stands in for the ``time`` module of the throughput code: its ``perf_counter`` advances by the work done (one
    unit per layer application), so a speed ratio is exact on any machine load; wall-clock speed is benchmarks'."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


class Timed(Counting):
    def __init__(self, clock, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.clock = clock

    def forward(self, x):
        self.clock.now += self.repeats
        return super().forward(x)


def test_compare_interleaves_and_double_work_is_slower(monkeypatch):
    clock = WorkClock()
    monkeypatch.setattr(throughput, "time", clock)
    log = []
    a = Timed(clock, "a", log, repeats=4)
    b = Timed(clock, "b", log, repeats=8)  # the same layer applied twice as often: 2x the work
    out = compare_throughput({"a": a, "b": b}, input_size=(16,), batch_size=8, warmup=10, iters=30, rounds=5,
                             reference="a")
    assert a.calls == b.calls == 40
    assert out["reference"] == "a" and out["rounds"] == 5
    assert out["speedup"] == {"a": 1.0, "b": 0.5}
    assert out["speedup_rounds"]["b"] == [0.5] * 5
    # a: 4 clock units (seconds) per batch; b: 8 units per batch of 8 images
    assert out["models"]["a"]["ms_per_batch"] == pytest.approx(1000.0 * 4)
    assert out["models"]["b"]["images_per_s"] == pytest.approx(8 / 8.0)
    # interleaving: after the warm-ups (10 a, 10 b), blocks of 6 alternate a b | b a | a b | b a | a b
    timed = log[20:]
    blocks = [timed[i] for i in range(0, 60, 6)]
    assert blocks == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]
    assert all(len(set(timed[i:i + 6])) == 1 for i in range(0, 60, 6))
    for name in ("a", "b"):
        assert REQUIRED <= set(out["models"][name])


def test_compare_rejects_unknown_reference():
    with pytest.raises(ValueError, match="reference"):
        compare_throughput({"a": Counting()}, input_size=(16,), batch_size=2, warmup=10, iters=30, reference="x")


def test_host_time_of_a_cpu_call_and_no_gpu_time():
    """On a CPU the host does the work: host time is the call's wall time (a 30 ms sleep, median of 3), and
    there is no GPU time to compare it with."""
    import time

    from tokenprune.bench.host_time import host_and_gpu_ms
    out = host_and_gpu_ms(lambda: time.sleep(0.03), device="cpu", repeats=3)
    assert 29.0 <= out["host_ms"] < 300.0, out
    assert out["gpu_ms"] is None and out["host_over_gpu"] is None and out["gapless"] is None
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        host_and_gpu_ms(lambda: None, device="cpu", repeats=0)


def test_cpu_results_carry_no_host_gpu_ratio():
    r = measure_throughput(Counting(), input_size=(16,), batch_size=2, warmup=10, iters=30)
    assert r["host_over_gpu"] is None and r["gpu_ms_per_batch"] is None and r["host_ms_per_batch"] is None
