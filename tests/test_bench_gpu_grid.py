"""benchmarks/bench_gpu_grid.py smoke run on CPU with a test-sized DeiT: one table row per variant x mode x
dtype, each speed-up next to its FLOPs ratio, FLOPs cached and reused; count_ops.py counts on meta."""
import importlib.util
import json
import os
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_grid_smoke_on_cpu(tmp_path, one_thread):
    grid = load("bench_gpu_grid")
    cache, out = tmp_path / "flops.json", tmp_path / "grid.md"
    args = ["--device", "cpu", "--tiny", "--backbones", "deit_s", "--presets", "tome,l2", "--iters", "1",
            "--warmup", "0", "--rounds", "1", "--batch", "2", "--train-batch", "2", "--dtypes", "float32",
            "--flops-cache", str(cache), "--out", str(out)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = grid.main(args)
    rows = [ln for ln in text.splitlines() if ln.startswith("| deit_s")]
    assert len(rows) == 2 * 3  # {inference, train} x {unpruned, tome, l2}
    assert {r.split("|")[2].strip() for r in rows} == {"inference", "train"}
    unpruned = [r for r in rows if "| unpruned |" in r]
    assert all(r.split("|")[7].strip() == "1.00" and r.split("|")[9].strip() == "1.00" for r in unpruned)
    assert all(r.split("|")[11:14] == [" - ", " - ", " - "] for r in rows)  # host ÷ GPU: GPU runs only
    tome = [r for r in rows if "tome -40%" in r][0].split("|")
    assert float(tome[7]) > 1.2  # 40 % fewer tokens: a FLOPs ratio well above 1
    assert "command:" in out.read_text() and "device: cpu" in out.read_text()
    flops = json.loads(cache.read_text())
    assert len(flops) == 3 and all(v > 0 for v in flops.values())
    # a second run takes the FLOPs from the cache (a planted value shows up in the table)
    key = next(k for k in flops if "|l2|" in k)
    flops[key] = flops[next(k for k in flops if "unpruned" in k)] / 4
    cache.write_text(json.dumps(flops))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = grid.main(args[:-2] + ["--no-write", "--modes", "inference"])
    l2 = [ln for ln in text.splitlines() if "l2 -40%" in ln][0].split("|")
    assert l2[7].strip() == "4.00"


def test_grid_writes_as_it_goes_and_a_failing_block_keeps_the_others(tmp_path, one_thread, monkeypatch):
    """A block that raises (on the GPU: out of memory) becomes a 'failed' row; the rows before and after it are
    in --out, and the file is a valid table even when the run stops early."""
    grid = load("bench_gpu_grid")
    out = tmp_path / "grid.md"

    def oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB | more text")
    monkeypatch.setattr(grid, "compare_train_step", oom)
    args = ["--device", "cpu", "--tiny", "--backbones", "deit_s", "--presets", "l2", "--iters", "1", "--warmup",
            "0", "--rounds", "1", "--batch", "2", "--dtypes", "float32,bfloat16", "--modes", "train,inference",
            "--flops-cache", str(tmp_path / "flops.json"), "--out", str(out)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = grid.main(args)
    written = out.read_text()
    assert written.strip() == text.strip()
    rows = [ln for ln in written.splitlines() if ln.startswith("| deit_s")]
    failed = [r for r in rows if "failed:" in r]
    assert [r.split("|")[2:4] for r in failed] == [[" train ", " float32 "], [" train ", " bfloat16 "]]
    assert "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB / more text" in failed[0]
    assert all(len(r.split("|")) == 15 for r in rows)  # failed rows keep the table's 13 columns
    assert len([r for r in rows if "| inference |" in r]) == 2 * 2  # {fp32, bf16} x {unpruned, l2}
    assert written.rstrip().splitlines()[-1].startswith("- total ")
    with pytest.raises(SystemExit, match=r"unknown mode\(s\) \['inferrence'\]"):
        grid.main(args[:-2] + ["--modes", "inferrence", "--no-write"])


def test_count_ops_smoke_on_meta(tmp_path, one_thread):
    ops = load("count_ops")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sys_argv = sys.argv
        sys.argv = ["count_ops.py", "--tiny", "--backbones", "vim_s", "--presets", "hsa", "--device", "meta",
                    "--no-train", "--out", str(tmp_path / "ops.md")]
        try:
            ops.main()
        finally:
            sys.argv = sys_argv
    text = (tmp_path / "ops.md").read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| vim_s")]
    assert [r.split("|")[2].strip() for r in rows] == ["unpruned", "hsa"]
    fwd = [int(r.split("|")[4].replace(",", "")) for r in rows]
    assert fwd[1] > fwd[0] > 100  # the stages add ops; a forward is hundreds of ops
    import tokenprune.models.vim as vim
    assert vim.selective_scan.__module__ == "tokenprune.ssm.scan"  # the counting stand-in is gone again
