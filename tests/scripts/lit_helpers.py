"""Helpers of the Lightning pipeline tests: tiny webdataset shards, configs and subprocess runs."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent

#: distributed / launcher variables that must not leak into a subprocess run
DIST_VARS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_WORLD_SIZE",
             "GROUP_RANK", "TORCHELASTIC_RUN_ID", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


def clean_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(SCRIPTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TOKENPRUNE_SCAN", "cpu")
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def _image(label: int, rng: np.random.Generator, size: int = 32) -> bytes:
    """A 32x32 JPEG whose colour and stripe orientation depend on the label (learnable), plus noise."""
    hue = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53 + 80) % 256], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = ((xx if label % 2 else yy) // (2 + label % 4)) % 2
    img = hue[None, None, :] * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 12, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_shards(root: Path, train_sizes=(16, 16, 16, 16), val_sizes=(20, 17, 13), num_classes: int = 10,
                seed: int = 0) -> dict:
    """Train / validation tar shards (jpg + cls) and an _info.json in timm's layout; returns the specs."""
    from tokenprune.data.writer import write_info, write_shard

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, sizes, width in (("train", train_sizes, 4), ("validation", val_sizes, 2)):
        names, lengths, n = [], [], 0
        for s, size in enumerate(sizes):
            name = f"tiny-{split}-{s:0{width}d}.tar"
            samples = []
            for _ in range(size):
                label = int(rng.integers(num_classes))
                samples.append({"__key__": f"{split}{n:05d}", "jpg": _image(label, rng), "cls": label})
                n += 1
            write_shard(str(root / name), samples)
            names.append(name)
            lengths.append(size)
        splits[split] = (names, lengths)
    write_info(str(root), "tiny", splits)
    return {
        "train_shards": str(root / f"tiny-train-{{0000..{len(train_sizes) - 1:04d}}}.tar"),
        "val_shards": str(root / f"tiny-validation-{{00..{len(val_sizes) - 1:02d}}}.tar"),
        "train_samples": sum(train_sizes),
        "val_samples": sum(val_sizes),
    }


def _merge(base: dict, extra: dict | None) -> dict:
    for k, v in (extra or {}).items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def write_config(path: Path, shards: dict, *, backbone: str = "vim_test_patch4_32", method: str | None = "top",
                 keep: float = 0.75, batch_size: int = 8, num_workers: int = 0, extra: dict | None = None) -> Path:
    """A complete fit/validate config for the tiny model on the tiny shards (CPU); ``extra`` is merged in."""
    import yaml

    cfg = {
        "seed_everything": 0,
        "model": {"backbone": backbone, "method": method, "keep": keep, "lr": 1e-3, "weight_decay": 0.05,
                  "warmup_steps": 2, "min_lr": 1e-5},
        "data": {**{k: shards[k] for k in ("train_shards", "val_shards")}, "image_size": 32, "resize_size": 32,
                 "batch_size": batch_size, "val_batch_size": 16, "num_workers": num_workers, "shuffle_buffer": 16,
                 "num_classes": 10, "mixup": 0.0, "cutmix": 0.0},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                    "enable_model_summary": False, "log_every_n_steps": 1, "num_sanity_val_steps": 0},
        "flops": {"enabled": False},
        "throughput": {"enabled": False},
    }
    path.write_text(yaml.safe_dump(_merge(cfg, extra), sort_keys=False))
    return path


def run_train(args: list, timeout: float = 300, env_extra: dict | None = None, cwd: Path | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    """python train.py <args> in a subprocess with a cleaned environment."""
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, args)], cwd=str(cwd or REPO),
                          env=clean_env(env_extra), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}")
    return proc
