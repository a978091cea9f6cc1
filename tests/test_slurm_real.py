"""slurm/*.sbatch on a real one-node SLURM cluster (scripts/slurm_cluster.sh: munged, slurmctld, slurmd of this
machine), with the CPU overrides of slurm/README.md: 2 tasks, gloo DDP, the digits DeiT-micro on tiny generated
digits shards.

1. train.sbatch runs to completion, both ranks log, the run directory holds the checkpoints and logs;
2. preemption: SIGUSR1 from `scancel --signal=USR1` while it trains, and from SLURM itself (short `--time`,
   `--signal=USR1@N`): requeue checkpoint, the job requeued under the same id (Restarts=1), resumed, finished,
   with the weights of the uninterrupted run, bit for bit;
3. ablation_array.sbatch: each array task runs its own grid line, all finish, one report gathers them;
4. eval.sbatch (2 ranks) gives the metrics of `train.py validate` run directly (1 process);
5. bad input (grid shorter than the array, missing config file, run directory not writable) fails the job with a
   clear message in its output and leaves the run directory as it was.

Skipped when the SLURM / munge binaries are missing (`apt-get install -y slurm-wlm munge`; .ci/run does it).
SLURM makes a requeued job wait ~2 minutes before it is eligible again; the tests move its start time to now
(`scontrol update StartTime=now`) and give the requeued job of the `--time` test a longer limit (otherwise every
restart is signalled again, as its limit is as short as the first one's).
"""
import csv
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))  # helpers
from lit_helpers import REPO, clean_env  # noqa: E402  (tests/scripts)

BINARIES = ("sbatch", "squeue", "scontrol", "scancel", "slurmctld", "slurmd", "munged")
MISSING = [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"SLURM not installed (missing {', '.join(MISSING)}; "
                                             "apt-get install -y slurm-wlm munge)"),
]

CLUSTER = REPO / "scripts" / "slurm_cluster.sh"
MAX_STEPS = 32  # 16 steps per epoch (256 samples, batch 8 x 2 ranks): a resume crosses an epoch and a validation
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
        "PREEMPTED"}
CPU = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1"]  # the scripts' GPU directives, overridden


# ---------------------------------------------------------------------------------------------- cluster
class Cluster:
    def __init__(self, root: Path, data: Path):
        self.root, self.data = root, data
        self.conf = root / "cluster" / "slurm.conf"
        self.out = root / "out"  # job output files (writable by every user: one test submits as `nobody`)

    def env(self, **extra) -> dict:
        env = clean_env({"SLURM_CONF": str(self.conf), **extra})
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the jobs' python
        env.pop("OMP_NUM_THREADS", None)  # the scripts set it from --cpus-per-task
        return env

    def cmd(self, *args, check=True) -> str:
        proc = subprocess.run(list(map(str, args)), env=self.env(), capture_output=True, text=True, timeout=60)
        if check and proc.returncode:
            raise AssertionError(f"{' '.join(map(str, args))}: {proc.stderr}")
        return proc.stdout

    def sbatch(self, script: str, sbatch_args: list, args: list, user=None, **env) -> str:
        cmd = ["sbatch", "--parsable", *sbatch_args, f"slurm/{script}", *map(str, args)]
        if user:
            cmd = ["runuser", "-u", user, "--", *cmd]
        proc = subprocess.run(cmd, cwd=REPO, env=self.env(**env), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list:
        """`scontrol show job -o` of a job (one dict per array task)."""
        out = self.cmd("scontrol", "show", "job", "-o", job_id)
        return [dict(t.split("=", 1) for t in line.split() if "=" in t) for line in out.splitlines() if line.strip()]

    def wait(self, job_id: str, until, timeout: float, what: str, out_file=None, poll: float = 0.5) -> list:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            jobs = self.jobs(job_id)
            if until(jobs):
                return jobs
            time.sleep(poll)
        tail = Path(out_file).read_text()[-3000:] if out_file and Path(out_file).exists() else ""
        raise AssertionError(f"job {job_id}: no {what} after {timeout:.0f} s: "
                             f"{[(j.get('JobState'), j.get('Restarts')) for j in jobs]}\n{tail}")

    def wait_done(self, job_id: str, out_file=None, timeout: float = 300) -> list:
        return self.wait(job_id, lambda js: all(j["JobState"] in DONE for j in js), timeout, "end", out_file)

    def bring_forward_requeued(self, job_id: str, out_file, **update) -> None:
        """Wait for the requeue (Restarts=1, pending), then let it start now (SLURM delays it ~2 minutes)."""
        self.wait(job_id, lambda js: js[0]["Restarts"] == "1" and js[0]["JobState"] == "PENDING", 300,
                  "requeue", out_file)
        self.cmd("scontrol", "update", f"JobId={job_id}", "StartTime=now", *[f"{k}={v}" for k, v in update.items()])


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="tokenprune-slurm-"))
    root.chmod(0o755)  # munge's socket and the output folder are reached by every user
    (root / "out").mkdir()
    (root / "out").chmod(0o777)
    data = root / "digits"
    subprocess.run([sys.executable, "-m", "tokenprune.data.digits", "--out", data, "--train-samples", "256",
                    "--val-samples", "64", "--train-per-shard", "64", "--val-per-shard", "32", "--no-progress"],
                   env=clean_env(), check=True, capture_output=True, timeout=120)
    start = subprocess.run(["bash", CLUSTER, "start", root / "cluster"], capture_output=True, text=True, timeout=120)
    c = Cluster(root, data)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        yield c
    finally:
        subprocess.run(["bash", CLUSTER, "stop", root / "cluster"], capture_output=True, timeout=180)
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- runs
def data_args(c: Cluster) -> list:
    return ["--data.train_shards", c.data, "--data.val_shards", c.data, "--data.batch_size", "8",
            "--data.val_batch_size", "32", "--data.shuffle_buffer", "64"]


def train_args(c: Cluster, run_dir: Path) -> list:
    """The digits DeiT-micro of configs/default, a few dozen steps on the tiny shards."""
    return ["-c", "configs/default/data_digits_train.yaml", "-c", "configs/default/deit_micro.yaml", *data_args(c),
            "--trainer.max_steps", MAX_STEPS, "--run_dir", run_dir]


def submit_train(c: Cluster, name: str, extra_sbatch=(), extra_args=()) -> tuple:
    run_dir, out = c.root / name, c.out / f"{name}-%j.out"
    jid = c.sbatch("train.sbatch", ["--ntasks-per-node=2", *CPU, f"--output={out}", *extra_sbatch],
                   [*train_args(c, run_dir), *extra_args], TRAINER_CONFIG="configs/trainer/slurm_cpu.yaml")
    return jid, run_dir, Path(str(out).replace("%j", jid))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_weights(a: dict, b: dict):
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    assert sorted(a["state_dict"]) == sorted(b["state_dict"])
    different = [k for k, v in a["state_dict"].items() if not torch.equal(v, b["state_dict"][k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


def metrics(run_dir: Path) -> dict:
    """The last logged value of each metric of the run's newest log version."""
    version = max((run_dir / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    last = {}
    with open(version / "metrics.csv", newline="") as f:
        for rec in csv.DictReader(f):
            last.update({k: float(v) for k, v in rec.items() if v})
    return last


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(cluster):
    """1. the uninterrupted run (also the reference of the preemption tests)."""
    jid, run_dir, out = submit_train(cluster, "reference")
    (job,) = cluster.wait_done(jid, out)
    return jid, job, run_dir, out


# ---------------------------------------------------------------------------------------------- tests
def test_train_sbatch_runs_ddp_on_two_tasks(reference):
    jid, job, run_dir, out = reference
    text = out.read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", text[-3000:]
    assert f"[train.sbatch] job {jid} restart 0: 1 node(s) x 2 task(s), run_dir={run_dir}" in text
    assert "distributed_backend=gloo" in text
    for rank in (0, 1):  # both ranks log
        assert f"Initializing distributed: GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in text
        assert f"[rank: {rank}] Seed set to 0" in text
    assert text.count("requeue guard: SIGUSR1 is handled at the next training-step boundary") == 2
    assert f"`max_steps={MAX_STEPS}` reached" in text
    ckpts = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert "last.ckpt" in ckpts and f"latest-epoch001-step{MAX_STEPS:07d}.ckpt" in ckpts
    assert any(n.startswith("best-epoch") for n in ckpts), ckpts
    logs = {p.name for p in (run_dir / "logs" / "version_0").iterdir()}
    assert {"metrics.csv", "config.yaml", "hparams.yaml", "flops.json"} <= logs
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt"))
    m = metrics(run_dir)
    assert m["step"] == MAX_STEPS - 1 and 0 <= m["val/top1"] <= 1 and m["flops/gflops"] > 0
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == MAX_STEPS


def check_requeued_run(c, jid, run_dir, out, reference):
    (job,) = c.wait_done(jid, out)
    text = out.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", text[-3000:]
    assert f"[train.sbatch] job {jid} restart 0:" in text
    assert f"[train.sbatch] job {jid} restart 1: 1 node(s) x 2 task(s), run_dir={run_dir} --ckpt_path last" in text
    assert f"Requeued SLURM job: {jid}" in text
    assert f"--ckpt_path last: resuming from {run_dir / 'hpc_ckpt_1.ckpt'}" in text
    hpc = load(run_dir / "hpc_ckpt_1.ckpt")
    assert 0 < hpc["global_step"] < MAX_STEPS
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["version_0", "version_1"]  # one per start
    assert_same_weights(load(reference[2] / "checkpoints" / "last.ckpt"), load(run_dir / "checkpoints" / "last.ckpt"))
    return text, hpc


def test_scancel_usr1_requeues_and_resumes_exactly(cluster, reference):
    jid, run_dir, out = submit_train(cluster, "scancel")
    first_ckpt = run_dir / "checkpoints" / "last.ckpt"  # written first at step 8
    cluster.wait(jid, lambda js: first_ckpt.exists() or js[0]["JobState"] in DONE, 300, "step 8", out, poll=0.1)
    assert first_ckpt.exists(), out.read_text()[-3000:]
    cluster.cmd("scancel", "--signal=USR1", jid)  # what SLURM sends before the time limit, while it trains
    cluster.bring_forward_requeued(jid, out)
    text, hpc = check_requeued_run(cluster, jid, run_dir, out, reference)
    assert hpc["global_step"] >= 8
    assert text.count("requeue checkpoint written and job requeued") == 2  # both ranks stop there


def test_time_limit_signal_requeues_and_resumes_exactly(cluster, reference):
    # slurmctld sends the signal at its first 30-s check once `now + N + 30 >= end`: here 5-35 s after the start,
    # possibly while the ranks still start up (train.py holds it then). The first run sleeps 1 s per step (a test
    # callback that does not change the weights) so that it cannot finish before the signal.
    jid, run_dir, out = submit_train(cluster, "timelimit", ["--time=2", "--signal=USR1@85"],
                                     ["--trainer.callbacks+=lit_test_callbacks.SlowFirstRun"])
    cluster.bring_forward_requeued(jid, out, TimeLimit=30)  # the restart gets time to finish
    check_requeued_run(cluster, jid, run_dir, out, reference)


GRID = """# a 3-run grid (name, then train.py overrides)
dense      --model.method null --model.keep 1.0

evit_k70   --model.method evit --model.keep 0.7
tome_k80   --model.method tome --model.keep 0.8 --model.method_options '{}'
"""


def eval_args(c: Cluster) -> list:
    """The shipped digits DeiT-micro, training-free, on the tiny validation shards."""
    return ["-c", "configs/trainer/slurm_cpu.yaml", "-c", "configs/data/digits.yaml", *data_args(c),
            "--model.backbone", "deit_micro_patch8_56", "--model.checkpoint_file", "weights/digits/deit_micro.pth"]


def test_ablation_array_runs_one_grid_line_per_task(cluster):
    from tokenprune.lit.gather import main as gather

    grid = cluster.root / "abl.txt"
    grid.write_text(GRID)
    out = cluster.out / "abl-%A_%a.out"
    jid = cluster.sbatch("ablation_array.sbatch", ["--array=0-2", "--ntasks-per-node=1", *CPU, f"--output={out}"],
                         [grid, "validate", *eval_args(cluster)], RUN_ROOT=str(cluster.root / "grid_runs"))
    jobs = cluster.wait_done(jid, timeout=400)
    assert sorted((j["ArrayTaskId"], j["JobState"]) for j in jobs) == [(str(i), "COMPLETED") for i in range(3)]
    runs = cluster.root / "grid_runs" / "abl"
    expected = [("dense", "null", "1.0"), ("evit_k70", "evit", "0.7"), ("tome_k80", "tome", "0.8")]
    for i, (name, method, keep) in enumerate(expected):
        text = Path(str(out).replace("%A", jid).replace("%a", str(i))).read_text()
        assert f"[ablation_array] task {i}: {name} -> {runs / name}: --model.method {method} --model.keep {keep}" in text
        cfg = (runs / name / "logs" / "version_0" / "config.yaml").read_text()
        assert f"method: {method}" in cfg and f"keep: {keep}" in cfg
    files = gather([str(runs)])
    rows = list(csv.DictReader(open(runs / "results.csv")))
    assert [r["label"] for r in rows] == ["dense", "evit_k70", "tome_k80"] and files[0].endswith("results.md")
    assert float(rows[0]["token_reduction"]) == 0 and all(float(r["token_reduction"]) > 0 for r in rows[1:])
    assert all(0 <= float(r["top1"]) <= 100 for r in rows)
    assert "| dense |" in (runs / "results.md").read_text()


def test_eval_sbatch_matches_validate(cluster):
    args = [*eval_args(cluster), "--model.method", "evit", "--model.keep", "0.7"]
    out = cluster.out / "eval-%j.out"
    jid = cluster.sbatch("eval.sbatch", ["--ntasks-per-node=2", *CPU, f"--output={out}"],
                         [*args, "--run_dir", cluster.root / "eval_slurm"],
                         TRAINER_CONFIG="configs/trainer/slurm_cpu.yaml")
    direct = subprocess.run([sys.executable, "train.py", "validate", *map(str, args), "--trainer.strategy", "auto",
                             "--run_dir", cluster.root / "eval_direct"], cwd=REPO, env=clean_env(),
                            capture_output=True, text=True, timeout=300)
    assert direct.returncode == 0, direct.stderr[-3000:]
    (job,) = cluster.wait_done(jid, Path(str(out).replace("%j", jid)))
    text = Path(str(out).replace("%j", jid)).read_text()
    assert job["JobState"] == "COMPLETED", text[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in text  # 2 ranks
    a, b = metrics(cluster.root / "eval_slurm"), metrics(cluster.root / "eval_direct")
    for key in ("val/top1", "val/top5", "flops/gflops", "flops/token_reduction"):
        assert a[key] == b[key], key
    assert a["val/loss"] == pytest.approx(b["val/loss"], rel=1e-6)


def test_bad_input_fails_clearly_and_keeps_the_run_dir(cluster, reference):
    _, _, ref_dir, _ = reference
    jobs = {}
    # a grid with 2 runs, submitted as an array over 2-3
    grid = cluster.root / "short.txt"
    grid.write_text("a --model.keep 0.9\nb --model.keep 0.8\n")
    grid_root = cluster.root / "short_runs"
    shutil.copytree(ref_dir, grid_root / "short" / "a")  # an earlier result of the grid
    jobs["grid"] = cluster.sbatch("ablation_array.sbatch", ["--array=2-3", "--ntasks-per-node=1", *CPU,
                                                             f"--output={cluster.out}/short-%A_%a.out"],
                                  [grid, "validate", *eval_args(cluster)], RUN_ROOT=str(grid_root))
    # a config file that does not exist, on a run directory holding an earlier run
    missing = cluster.root / "missing"
    shutil.copytree(ref_dir, missing)
    jobs["config"] = cluster.sbatch("train.sbatch", ["--ntasks-per-node=1", *CPU, f"--output={cluster.out}/config-%j.out"],
                                    [*train_args(cluster, missing), "-c", "configs/does_not_exist.yaml"],
                                    TRAINER_CONFIG="configs/trainer/slurm_cpu.yaml")
    # a run directory the job's user cannot write (root writes everywhere: then the job runs as `nobody`)
    locked = cluster.root / "locked"
    shutil.copytree(ref_dir, locked)
    user = None
    if os.geteuid() == 0:
        user = "nobody"
    else:
        for p in [locked, *locked.rglob("*")]:
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    jobs["locked"] = cluster.sbatch("train.sbatch", ["--ntasks-per-node=1", *CPU, f"--output={cluster.out}/locked-%j.out"],
                                    train_args(cluster, locked), user=user,
                                    TRAINER_CONFIG="configs/trainer/slurm_cpu.yaml")
    before = {k: snapshot(d) for k, d in (("grid", grid_root), ("config", missing), ("locked", locked))}

    for jid in jobs.values():
        cluster.wait_done(jid, timeout=240)
    grid_jobs = cluster.jobs(jobs["grid"])
    assert sorted(j["JobState"] for j in grid_jobs) == ["FAILED", "FAILED"]
    for i in (2, 3):
        text = (cluster.out / f"short-{jobs['grid']}_{i}.out").read_text()
        assert f"[ablation_array] error: {grid} has no line {i} (it has 2 runs: submit with --array=0-1)" in text
    (job,) = cluster.jobs(jobs["config"])
    text = (cluster.out / f"config-{jobs['config']}.out").read_text()
    assert job["JobState"] == "FAILED"
    assert "File does not exist: " in text and "configs/does_not_exist.yaml" in text, text[-2000:]
    (job,) = cluster.jobs(jobs["locked"])
    text = (cluster.out / f"locked-{jobs['locked']}.out").read_text()
    assert job["JobState"] == "FAILED"
    assert f"[train.sbatch] error: the run directory {locked} is not writable by user" in text, text[-2000:]
    after = {k: snapshot(d) for k, d in (("grid", grid_root), ("config", missing), ("locked", locked))}
    assert after == before
