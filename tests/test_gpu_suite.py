"""The GPU suite's plan: a GPU lease is short (one device call runs at most 600 s), so the suite must put its
stages in priority order and fit the issues' tables inside its time budget. Checked on CPU with its dry run."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")


def plan(stages="all", budget=None, tmp_path=None):
    env = dict(os.environ, SUITE_DRY_RUN="1")
    if budget is not None:
        env["SUITE_BUDGET_S"] = str(budget)
    out = subprocess.run(["bash", SUITE, str(tmp_path / "out"), stages], env=env, capture_output=True, text=True,
                         cwd=ROOT)
    return out


def parse(stdout):
    rows = [line.split() for line in stdout.splitlines() if " cap " in line]
    return [(r[0], int(r[2]), int(r[4])) for r in rows], int(stdout.split("budget")[-1])


def test_suite_plan_puts_correctness_first_and_fits_the_issue_tables_in_one_call(tmp_path):
    out = plan(tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    rows, budget = parse(out.stdout)
    names = [r[0] for r in rows]
    assert names[:5] == ["parity", "tests", "ssm", "grid", "vlm"]
    assert set(names) == {"parity", "tests", "ssm", "grid", "vlm", "tiles", "sweep", "ckpt", "vlm2"}
    ends = [r[2] for r in rows]
    assert ends == sorted(ends) and max(ends) == budget
    # the kernel parity, the gpu tests and one table per issue (16, 17, 20) are planned inside the budget, which
    # leaves a device call's 600 s limit room for the wheel install and the start-up
    assert dict((r[0], r[2]) for r in rows)["vlm"] <= budget <= 570
    assert sum(r[1] for r in rows[:5]) <= budget


def test_suite_groups_and_budget(tmp_path):
    rows, _ = parse(plan("tests", tmp_path=tmp_path).stdout)
    assert [r[0] for r in rows] == ["parity", "tests", "tiles"]
    rows, budget = parse(plan("ssm,grid", budget=200, tmp_path=tmp_path).stdout)
    assert [r[0] for r in rows] == ["ssm", "grid"] and budget == 200
    assert rows[-1][2] == 200  # clipped to the budget


def test_suite_rejects_an_unknown_stage(tmp_path):
    out = plan("parity,bogus", tmp_path=tmp_path)
    assert out.returncode == 2
    assert "unknown stage 'bogus'" in out.stdout


@pytest.mark.parametrize("script", ["benchmarks/gpu_suite.sh", "scripts/prepare_gpu_wheels.sh",
                                    "scripts/build_mamba_wheels.sh"])
def test_gpu_scripts_parse(script):
    out = subprocess.run(["bash", "-n", os.path.join(ROOT, script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_ssm_benchmark_rejects_an_unknown_section():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_ssm_gpu.py"), "--smoke",
                          "--sections", "scan,bogus", "--out", os.devnull], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0
    assert "unknown section(s) ['bogus']" in out.stderr


def test_suite_runs_every_file_with_gpu_tests():
    """The tests stage names its files (a CPU-only module that cannot import on the device must not stop the
    collection): a gpu-marked test in a file missing from the list would never run on a GPU."""
    text = open(SUITE).read()
    listed = re.search(r"GPU_TEST_FILES=\(([^)]*)\)", text).group(1).split()
    tests_dir = os.path.join(ROOT, "tests")
    uses_mark = re.compile(r"^\s*(@pytest\.mark\.gpu\b|pytestmark\s*=.*\bpytest\.mark\.gpu\b)", re.M)
    marked = sorted(f"tests/{f}" for f in os.listdir(tests_dir)
                    if f.startswith("test_") and f.endswith(".py")
                    and uses_mark.search(open(os.path.join(tests_dir, f)).read()))
    assert len(listed) == len(set(listed))
    assert sorted(listed) == marked
