"""Every Triton kernel of the GPU path compiles for sm_90 (H100/H200) and spills no registers at its shipped
tile, checked on a CPU: ``benchmarks/triton_sm90.py`` compiles through Triton's own compiler and the ptxas it
bundles (no device needed) and reads registers and spills from ``ptxas -v``.

A spill puts values in local memory, which costs the bandwidth the scan exists to save; before the tiles were
chosen this way the scan's backward spilled 4 KB per thread. Run in a subprocess: the kernels must not be
interpreted (TRITON_INTERPRET is read when their module is imported).
"""
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "triton_sm90.py")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
pytestmark = [pytest.mark.skipif(not os.path.exists(PTXAS), reason="this Triton ships no ptxas"),
              pytest.mark.slow]  # compiling (cold cache): 10-100 s a test


def _table(*args, **extra_env):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TOKENPRUNE_SCAN_TILE")}
    env.update(extra_env)
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, SCRIPT, "--no-write", *args], capture_output=True, text=True, env=env,
                         timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 11 and cells[3].isdigit():
            rows[cells[0]] = {"registers": int(cells[3]), "spill_stores": int(cells[4].replace(",", "")),
                              "spill_loads": int(cells[5].replace(",", "")), "verdict": cells[8],
                              "per_state": None if cells[9] == "-" else float(cells[9])}
    return rows


# Every kernel compiled once (~100 s on 2 cores), for the two tests that read the table: one xdist group, so
# they run on one worker and share the module-scoped table.
same_worker = pytest.mark.xdist_group("triton_sm90_table")


@pytest.fixture(scope="module")
def every_kernel():
    return _table()


@same_worker
def test_every_kernel_compiles_for_sm90_without_spills(every_kernel):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from triton_sm90 import CASES
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    rows = every_kernel
    assert set(rows) == set(CASES), sorted(rows)
    for case, r in rows.items():
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (case, r)
        assert r["registers"] <= 255 and r["verdict"] == "ok", (case, r)


@same_worker
def test_the_scans_keep_their_steps_in_registers(every_kernel):
    """Both scan kernels hold one channel per thread and the steps in registers: the forward stays near 8 SASS
    instructions per (token, channel, state), training and inference, in bf16 too (B and C reach the kernels in
    fp32: converted in every lane they cost 2 more), the backward near 30. A layout
    regression (Triton putting the steps back on the lanes, as the earlier (channels, steps) kernels had them:
    forward 69, backward 161), a reverse scan lowered with lane shuffles (+30 in the backward), dB and dC summed
    over the channels with tl.sum's butterfly per step (+13), a_{t+1} shifted through tl.gather (+69), the
    carried state added after the scan instead of seeded into it (+2 per scan) or the decays' subnormal range
    test (+4 per exponential) shows up here."""
    limits = {"scan_fwd": 9, "scan_infer": 9, "scan_infer_4idx": 9, "scan_infer_bf16": 9, "scan_fwd_bf16": 9,
              "scan_bwd": 32, "scan_bwd_4idx": 32, "scan_bwd_bf16": 32}
    rows = every_kernel
    for case, limit in limits.items():
        assert rows[case]["per_state"] <= limit, (case, rows)


def test_the_launches_keep_fma_contraction_whatever_tritons_default():
    """Our launches ask for FP fusion themselves (triton_scan.LAUNCH_OPTIONS): Triton 3.10 turns it off by
    default, which Triton 3.8 and 3.9 emulate with TRITON_DEFAULT_FP_FUSION=0 (the inference scan then takes 10.0
    SASS instructions per (token, channel, state) instead of 8.0)."""
    rows = _table("--kernels", "scan_infer", TRITON_DEFAULT_FP_FUSION="0")
    assert rows["scan_infer"]["per_state"] <= 9, rows


def test_the_check_sees_spills():
    """128 channels x 8 steps on one warp (4 channels per thread) spills in the scan's backward: the parser above
    reads real ptxas numbers, not a default."""
    rows = _table("--kernels", "scan_bwd", "--sweep", "128,8,1")
    assert rows["scan_bwd"]["spill_stores"] > 0 and rows["scan_bwd"]["verdict"] == "spills", rows
