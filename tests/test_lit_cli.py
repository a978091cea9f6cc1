"""train.py / TokenPruneCLI: fast_dev_run through the real CLI, every shipped config parses, run directory and
checkpoint resolution, and that a checkpoint's saved hyperparameters never override the config."""
import contextlib
import io
import os
import shlex
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tokenprune.lit.cli import TokenPruneCLI, default_run_name, find_resume_checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))  # helpers
from lit_helpers import REPO, make_shards, run_train, write_config  # noqa: E402  (tests/scripts)

CONFIGS = REPO / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("cli_shards"))


def test_fit_fast_dev_run_through_cli(tmp_path, shards):
    cfg = write_config(tmp_path / "cfg.yaml", shards, backbone="vim_test_patch4_32", method="top", keep=0.75,
                       extra={"model": {"ema_decay": 0.9, "distill": "logits"},
                              "data": {"mixup": 0.8, "cutmix": 1.0}})
    proc = run_train(["fit", "-c", cfg, "--trainer.fast_dev_run=true", "--run_dir", tmp_path / "run"],
                     timeout=300, cwd=tmp_path)
    assert "`Trainer.fit` stopped: `max_steps=1` reached" in proc.stderr + proc.stdout


def print_config(*args) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exit_info:
        TokenPruneCLI(args=[*map(str, args), "--print_config"])
    assert exit_info.value.code in (0, None), buf.getvalue()
    return yaml.safe_load(buf.getvalue())


DATA_ARGS = ["--data.train_shards", "/data/imagenet1k-train-{0000..1023}.tar",
             "--data.val_shards", "/data/imagenet1k-validation-{00..63}.tar"]


def own(paths):
    return sorted(p for p in paths if "plainmamba" not in p.name)


@pytest.mark.parametrize("experiment", own((CONFIGS / "experiment").glob("*.yaml")), ids=lambda p: p.stem)
def test_experiment_configs_parse(experiment):
    args = ["fit", "-c", CONFIGS / "trainer" / "slurm_multi_node.yaml"]
    if experiment.stem.startswith(("ablation_", "finetune_recipe")):  # overlays: on top of an experiment
        args += ["-c", CONFIGS / "experiment" / "vim_s_papr_ss.yaml"]
    cfg = print_config(*args, "-c", experiment, *DATA_ARGS)
    text = yaml.safe_load(experiment.read_text())
    for key, value in text.get("model", {}).items():
        assert cfg["model"][key] == value, (experiment.name, key)
    assert cfg["model"]["backbone"]


PRUNING_MODELS = {"top": "vim_small", "hsa": "vim_small", "visionzip": "deit_small", "evit": "deit_small"}


@pytest.mark.parametrize("preset", sorted((CONFIGS / "pruning").glob("*.yaml")), ids=lambda p: p.stem)
def test_pruning_and_model_configs(preset):
    """Each preset file parses on top of a model file, names its method, and builds on a tiny backbone."""
    from tokenprune import list_methods
    from tokenprune.lit import PruningClassifier

    model_file = CONFIGS / "model" / f"{PRUNING_MODELS.get(preset.stem, 'vim_small')}.yaml"
    cfg = print_config("validate", "-c", model_file, "-c", preset, *DATA_ARGS)
    assert cfg["model"]["method"] == preset.stem and cfg["model"]["method"] in list_methods()
    assert cfg["model"]["backbone"] == yaml.safe_load(model_file.read_text())["model"]["backbone"]
    tiny = "deit_test_patch4_32" if "deit" in model_file.name else "vim_test_patch4_32"
    kwargs = {k: cfg["model"][k] for k in ("method", "keep", "smoothing", "alignment", "method_options")}
    if cfg["model"]["proposal"]:
        kwargs["proposal"] = "papr_convnet_micro"  # the preset's MobileNetV2 needs its ImageNet weights
    layers = cfg["model"]["layers"]
    kwargs["layers"] = sorted({min(i, 3) for i in layers}) if isinstance(layers, list) else layers
    m = PruningClassifier(tiny, **kwargs)
    assert m.model.method == preset.stem
    with torch.no_grad():
        assert m.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_model_configs_name_registered_backbones():
    import timm

    import tokenprune  # noqa: F401  (registers the backbones)
    for path in own((CONFIGS / "model").glob("*.yaml")):
        backbone = yaml.safe_load(path.read_text())["model"]["backbone"]
        assert backbone in timm.list_models(), (path.name, backbone)


def grid_runs(grid: Path):
    """(base args from the grid's sbatch example, [(name, overrides)]) of a grid file."""
    text = grid.read_text()
    example = " ".join(line.lstrip("# ").rstrip("\\").strip() for line in text.splitlines()
                       if line.startswith("#") and ("sbatch" in line or line.strip().startswith("#     ")))
    words = shlex.split(example)
    base = words[words.index(str(grid.relative_to(REPO))) + 1:]
    runs = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, *overrides = shlex.split(line)
            runs.append((name, overrides))
    return base, runs


@pytest.mark.parametrize("grid", sorted((REPO / "slurm" / "grids").glob("*.txt")), ids=lambda p: p.stem)
def test_grid_files(grid, monkeypatch):
    base, runs = grid_runs(grid)
    assert base[0] in ("fit", "validate", "test") and "-c" in base
    names = [n for n, _ in runs]
    assert len(names) == len(set(names)), "run names must be unique (they name the run directories)"
    n_array = int(grid.read_text().split("--array=0-")[1].split()[0]) + 1
    assert n_array == len(runs), f"the example's --array covers {n_array} runs, the grid has {len(runs)}"
    monkeypatch.chdir(REPO)
    base = [a.replace("configs/data/imagenet.yaml", str(CONFIGS / "trainer" / "gpu_1.yaml")) for a in base]
    for name, overrides in (runs[0], runs[-1]):  # full parses of the first and last line
        cfg = print_config(*base, *overrides, *DATA_ARGS)
        assert cfg["model"]["backbone"]
    parser_keys = set(print_config(*base, *DATA_ARGS)["model"])
    for name, overrides in runs:  # every override names a real option
        for word in overrides:
            if word.startswith("--model."):
                assert word[len("--model."):] in parser_keys, (name, word)


def test_run_dir_and_resume_resolution(tmp_path):
    assert default_run_name({"backbone": "vim_small_patch16_224", "method": "papr_ss", "keep": 0.6}) == \
        "vim_small_patch16_224-papr_ss-keep0.6"
    run = tmp_path / "run"
    assert find_resume_checkpoint(str(run)) is None
    (run / "checkpoints").mkdir(parents=True)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(b"x")
    hpc = run / "hpc_ckpt_2.ckpt"
    hpc.write_bytes(b"x")
    now = time.time()
    os.utime(last, (now - 10, now - 10))
    assert find_resume_checkpoint(str(run)) == str(hpc)
    os.utime(hpc, (now - 20, now - 20))
    assert find_resume_checkpoint(str(run)) == str(last)


def test_cli_layout_and_checkpoint_hparams_never_override(tmp_path, shards, monkeypatch):
    """run_dir / CSV logger / checkpoint dirs from --run_dir; `--ckpt_path FILE` does not replace the config
    by the checkpoint's hyperparameters (stock LightningCLI would build keep=0.75 here)."""
    from tokenprune.lit import PruningClassifier

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    trained = PruningClassifier("vim_test_patch4_32", "top", 0.75)
    ckpt = tmp_path / "earlier.ckpt"
    torch.save({"state_dict": trained.state_dict(), "hyper_parameters": dict(trained.hparams),
                "pytorch-lightning_version": "2.6.6"}, ckpt)
    cfg = write_config(tmp_path / "cfg.yaml", shards, method="top", keep=0.5)
    cli = TokenPruneCLI(args=["validate", "-c", str(cfg), "--ckpt_path", str(ckpt), "--run_dir", "runs/x"])
    assert cli.model.hparams.keep == 0.5 and cli.model.model.stages[0].keep == 0.5
    for k, v in trained.state_dict().items():  # the weights do come from the checkpoint
        assert torch.equal(cli.model.state_dict()[k], v), k
    assert cli.trainer.default_root_dir == "runs/x"
    assert type(cli.trainer.logger).__name__ == "CSVLogger" and cli.trainer.logger.save_dir == "runs/x"
    assert {cb.dirpath for cb in cli.trainer.checkpoint_callbacks} == {os.path.abspath("runs/x/checkpoints")}
    assert sorted(cb.save_last for cb in cli.trainer.checkpoint_callbacks) == [False, True]
    assert cli.model.num_classes == 10  # linked from data.num_classes
    saved = yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())
    assert saved["model"]["keep"] == 0.5 and saved["run_dir"] == "runs/x"
