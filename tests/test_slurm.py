"""SLURM: the sbatch scripts agree with the trainer configs they launch, their shell logic (run directory,
resume, grid lines) works with a fake srun, and the CLI builds a trainer on Lightning's SLURMEnvironment with
the right world size / ranks and auto-requeue on SIGUSR1 from simulated SLURM variables."""
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))  # helpers
from lit_helpers import REPO, make_shards, write_config  # noqa: E402  (tests/scripts)

SLURM_DIR = REPO / "slurm"


def directives(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            out[m.group(1)] = m.group(2) if m.group(2) is not None else True
    return out


def default_trainer_config(script: Path) -> dict:
    m = re.search(r"TRAINER_CONFIG=\$\{TRAINER_CONFIG:-(\S+?)\}", script.read_text())
    assert m, f"{script.name} names no default trainer config"
    return yaml.safe_load((REPO / m.group(1)).read_text())["trainer"]


def test_train_sbatch_matches_its_trainer_config():
    script = SLURM_DIR / "train.sbatch"
    d = directives(script)
    trainer = default_trainer_config(script)
    assert d["signal"] == "SIGUSR1@90" and d["requeue"] is True
    assert int(d["nodes"]) == trainer["num_nodes"]
    assert int(d["ntasks-per-node"]) == trainer["devices"] == int(d["gpus-per-node"])  # one task per GPU
    assert trainer["strategy"] == "ddp" and trainer["accelerator"] == "gpu"
    text = script.read_text()
    assert re.search(r"srun .*python train\.py fit", text)
    assert "NNODES=${SLURM_NNODES" in text and "NTASKS_PER_NODE=${SLURM_NTASKS_PER_NODE" in text
    assert '--trainer.num_nodes "$NNODES" --trainer.devices "$NTASKS_PER_NODE"' in text


def test_eval_and_array_sbatch():
    for name in ("eval.sbatch", "ablation_array.sbatch"):
        script = SLURM_DIR / name
        d = directives(script)
        assert int(d["ntasks-per-node"]) == int(d["gpus-per-node"]) == 1
        assert '--trainer.num_nodes "$NNODES" --trainer.devices "$NTASKS_PER_NODE"' in script.read_text()
    assert default_trainer_config(SLURM_DIR / "eval.sbatch")["devices"] == 1
    d = directives(SLURM_DIR / "ablation_array.sbatch")
    assert d["signal"] == "SIGUSR1@90" and d["requeue"] is True
    for name in ("train.sbatch", "eval.sbatch", "ablation_array.sbatch"):
        subprocess.run(["bash", "-n", str(SLURM_DIR / name)], check=True)


# ---------------------------------------------------------------------------------------------- shell logic
@pytest.fixture
def fake_srun(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/bash\nfor a in "$@"; do printf "%s\\n" "$a"; done > "$FAKE_SRUN_ARGS"\n')
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def run_script(script, args, bin_dir, workdir, extra_env):
    out = workdir / "srun_args.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "FAKE_SRUN_ARGS": str(out),
                "SLURM_SUBMIT_DIR": str(workdir), **extra_env})
    subprocess.run(["bash", str(SLURM_DIR / script), *args], env=env, check=True, capture_output=True, text=True)
    return out.read_text().splitlines()


def test_train_sbatch_run_dir_and_resume(tmp_path, fake_srun):
    env = {"SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "99",
           "SLURM_JOB_NAME": "ft"}
    args = run_script("train.sbatch", ["-c", "exp.yaml", "--run_dir", "runs/a"], fake_srun, tmp_path, env)
    assert args[:5] == ["--kill-on-bad-exit=1", "python", "train.py", "fit", "-c"]
    assert args[5] == "configs/trainer/slurm_multi_node.yaml" and args[6:10] == ["-c", "exp.yaml", "--run_dir", "runs/a"]
    assert args[-4:] == ["--trainer.num_nodes", "2", "--trainer.devices", "4"]  # fresh start: no --ckpt_path
    (tmp_path / "runs/a/checkpoints").mkdir(parents=True)
    (tmp_path / "runs/a/checkpoints/last.ckpt").write_bytes(b"")
    args = run_script("train.sbatch", ["-c", "exp.yaml", "--run_dir", "runs/a"], fake_srun, tmp_path, env)
    assert args[-2:] == ["--ckpt_path", "last"]
    args = run_script("train.sbatch", ["-c", "exp.yaml", "--run_dir=runs/a", "--ckpt_path", "x.ckpt"], fake_srun,
                      tmp_path, env)
    assert args.count("--ckpt_path") == 1 and "x.ckpt" in args
    # no --run_dir: one named after the job (stable across requeues of the job), an hpc checkpoint resumes
    (tmp_path / "runs/ft-99").mkdir(parents=True)
    (tmp_path / "runs/ft-99/hpc_ckpt_1.ckpt").write_bytes(b"")
    args = run_script("train.sbatch", ["-c", "exp.yaml"], fake_srun, tmp_path, env)
    i = args.index("--run_dir")
    assert args[i + 1] == "runs/ft-99" and args[-2:] == ["--ckpt_path", "last"]


def test_ablation_array_picks_one_grid_line(tmp_path, fake_srun):
    grid = tmp_path / "mygrid.txt"
    grid.write_text("# comment\n\nfirst  --model.keep 0.8\n  # indented comment\n"
                    "second --model.keep 0.7 --model.method_options '{border: replicate}'\n")
    base = ["fit", "-c", "base.yaml"]
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "1"}
    args = run_script("ablation_array.sbatch", [str(grid), *base], fake_srun, tmp_path, env)
    assert args[:4] == ["python", "train.py", "fit", "-c"]
    assert args[4:] == ["base.yaml", "--model.keep", "0.7", "--model.method_options", "{border: replicate}",
                        "--run_dir", "runs/mygrid/second", "--trainer.num_nodes", "1", "--trainer.devices", "1"]
    (tmp_path / "runs/mygrid/second/checkpoints").mkdir(parents=True)
    (tmp_path / "runs/mygrid/second/checkpoints/last.ckpt").write_bytes(b"")
    assert run_script("ablation_array.sbatch", [str(grid), *base], fake_srun, tmp_path, env)[-2:] == \
        ["--ckpt_path", "last"]
    env["SLURM_ARRAY_TASK_ID"] = "2"
    with pytest.raises(subprocess.CalledProcessError):
        run_script("ablation_array.sbatch", [str(grid), *base], fake_srun, tmp_path, env)


# ---------------------------------------------------------------------------------------------- Lightning
def test_cli_builds_a_slurm_trainer(tmp_path, monkeypatch):
    """Rank 5 of 8 (node 1 of 2, local rank 1): Lightning's SLURMEnvironment with auto-requeue on SIGUSR1."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from tokenprune.lit.callbacks import RequeueAtStepBoundary
    from tokenprune.lit.cli import TokenPruneCLI

    shards = make_shards(tmp_path / "shards", train_sizes=(4,), val_sizes=(4,))
    cfg = write_config(tmp_path / "cfg.yaml", shards)
    slurm = {"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2", "SLURM_JOB_ID": "1234",
             "SLURM_JOB_NAME": "tokenprune-train", "SLURM_NODELIST": "node[01-02]", "SLURM_PROCID": "5",
             "SLURM_LOCALID": "1", "SLURM_NODEID": "1"}
    saved = dict(os.environ)
    monkeypatch.chdir(tmp_path)
    try:
        for k in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK"):
            os.environ.pop(k, None)
        os.environ.update(slurm)
        args = ["-c", str(cfg), "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
                "--trainer.devices", "4", "--trainer.num_nodes", "2", "--run_dir", "runs/slurm"]
        cli = TokenPruneCLI(args=args, run=False)
        trainer = cli.trainer
        env = trainer._accelerator_connector.cluster_environment
        assert isinstance(env, SLURMEnvironment)
        assert env.auto_requeue and env.requeue_signal == signal.SIGUSR1
        assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (8, 5, 1, 1)
        assert (trainer.num_nodes, trainer.num_devices) == (2, 4)
        assert env.main_address == "node01" and 10000 <= env.main_port <= 20000
        assert type(trainer.strategy).__name__ == "DDPStrategy" and env.creates_processes_externally  # srun starts them
        assert any(isinstance(cb, RequeueAtStepBoundary) for cb in trainer.callbacks)
        assert trainer.default_root_dir == "runs/slurm"  # where Lightning writes hpc_ckpt_<n>.ckpt
        env.validate_settings(trainer.num_devices, trainer.num_nodes)  # what the launcher checks at fit
        # a trainer that disagrees with the allocation is refused when it launches
        bad = TokenPruneCLI(args=args[:-6] + ["--trainer.devices", "2", "--trainer.num_nodes", "2"], run=False).trainer
        with pytest.raises(ValueError, match="ntasks-per-node"):
            bad._accelerator_connector.cluster_environment.validate_settings(bad.num_devices, bad.num_nodes)
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ---------------------------------------------------------------------------------------------- gathering a grid
def test_gather_reads_the_newest_version_of_each_run(tmp_path):
    from tokenprune.lit.gather import gather, main

    def run(name, version, method, keep, rows):
        d = tmp_path / "grid" / name / "logs" / f"version_{version}"
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump({"model": {"backbone": "deit_micro_patch8_56",
                                                                 "method": method, "keep": keep}}))
        (d / "metrics.csv").write_text("epoch,val/top1,val/top5,flops/token_reduction,step\n" + rows)

    run("dense", 0, None, 1.0, ",,,0.0,0\n0,0.5,0.9,,3\n")
    run("evit", 0, "evit", 0.7, "0,0.1,0.2,,3\n")  # an older version of the run, replaced by version_1
    run("evit", 1, "evit", 0.7, ",,,0.25,0\n0,0.375,0.75,,3\n")
    (tmp_path / "grid" / "not_started").mkdir()
    rows = gather(str(tmp_path / "grid"))
    assert [(r["label"], r["method"], r["keep"], r["top1"], r["top5"], r["token_reduction"]) for r in rows] == \
        [("dense", None, 1.0, 50.0, 90.0, 0.0), ("evit", "evit", 0.7, 37.5, 75.0, 0.25)]
    md, csv_path = main([str(tmp_path / "grid"), "--out", str(tmp_path / "report")])
    assert "| evit | 0.7 | 25.0 % |" in open(md).read() and os.path.isfile(csv_path)
    with pytest.raises(SystemExit, match="no run with"):
        main([str(tmp_path / "empty")])
