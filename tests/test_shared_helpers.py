"""Helpers that exist once: the dtype names, the machine description, the scan FLOP formula, the checkpoint
parsing (free of Lightning), the evaluate package's import graph, the data module's hyper-parameters and its
DataLoader worker seeding (Lightning's, per rank)."""
import ast
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import tokenprune
from tokenprune.bench.throughput import as_dtype, environment, machine_info
from tokenprune.data import ShardDataModule
from tokenprune.evaluate.config import BackboneEntry, DataConfig, EvalConfig, MethodEntry, normalise_config
from tokenprune.flops import scan_flop_handle
from tokenprune.ssm.scan import scan_flops

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src", "tokenprune")


# ---------------------------------------------------------------------------------------------- dtypes
def test_dtype_names_one_table():
    assert as_dtype("bf16") is torch.bfloat16 and as_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match=r"unknown dtype 'int7'; expected one of .*'bfloat16'.*'float32'"):
        as_dtype("int7")
    cfg = EvalConfig(backbones=[BackboneEntry("vim_test_patch4_32")], methods=[MethodEntry("random")],
                     data=DataConfig(val_shards="/nowhere"), dtype="int7")
    with pytest.raises(ValueError, match=r"unknown dtype 'int7'; expected one of"):
        normalise_config(cfg)


# ---------------------------------------------------------------------------------------------- machine
def test_machine_info_is_the_one_source():
    cpu = torch.device("cpu")
    info = machine_info(cpu)
    assert set(info) == {"cpu", "cpu_cores", "torch_threads", "platform", "python", "torch", "timm", "tokenprune",
                         "device", "gpu", "cuda"}
    assert info["device"] == "cpu" and info["gpu"] is None and info["cuda"] is None and info["cpu"]
    assert info["tokenprune"] == tokenprune.__version__
    env = environment(cpu, torch.bfloat16, 4)
    assert env["dtype"] == "bfloat16" and env["batch"] == 4 and env["device_name"]
    assert (env["threads"], env["cpu_count"], env["torch"], env["timm"], env["cuda"]) == (
        info["torch_threads"], info["cpu_cores"], info["torch"], info["timm"], info["cuda"])
    from tokenprune.evaluate.grid import machine_info as grid_machine_info
    assert grid_machine_info is machine_info


def test_vlm_environment_line_uses_machine_info():
    pytest.importorskip("transformers")
    from tokenprune.vlm.bench import environment as vlm_environment

    line = vlm_environment(torch.nn.Linear(2, 2))
    info = machine_info(torch.device("cpu"))
    assert line.startswith(f"device cpu ({info['cpu']}), dtype torch.float32, torch {info['torch']}")
    assert line.endswith(f"threads {info['torch_threads']}")


# ---------------------------------------------------------------------------------------------- FLOPs
class _Shape:  # what fvcore's get_shape reads
    def __init__(self, *shape):
        self._shape = list(shape)

    def type(self):
        return self

    def sizes(self):
        return self._shape


@pytest.mark.parametrize("with_d", [False, True])
def test_scan_handle_uses_the_scan_formula(with_d, monkeypatch):
    import tokenprune.flops as flops

    monkeypatch.setattr(flops, "get_shape", lambda v: None if v is None else v._shape)
    b, e, length, n = 2, 8, 5, 4
    inputs = [_Shape(b, e, length), _Shape(b, e, length), _Shape(e, n), _Shape(b, n, length), _Shape(b, n, length)]
    if with_d:
        inputs.append(_Shape(e))
    assert scan_flop_handle(inputs, []) == b * scan_flops(length, e, n, with_D=with_d)


# ---------------------------------------------------------------------------------------------- imports
def test_checkpoint_parsing_imports_no_lightning():
    code = ("import sys, tokenprune.pruning.checkpoint; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning') "
            "or m.startswith(('tokenprune.lit', 'tokenprune.evaluate'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_evaluate_package_has_no_import_cycle():
    pkg = os.path.join(SRC, "evaluate")
    edges = {}
    for f in os.listdir(pkg):
        if f.endswith(".py") and f != "__init__.py":
            tree = ast.parse(open(os.path.join(pkg, f)).read())
            edges[f[:-3]] = {node.module for node in ast.walk(tree)  # every relative import, lazy ones too
                             if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
    done, active = set(), []

    def visit(mod):
        assert mod not in active, f"import cycle: {' -> '.join(active + [mod])}"
        if mod in done:
            return
        active.append(mod)
        for dep in edges.get(mod, ()):
            visit(dep)
        active.pop()
        done.add(mod)

    for mod in edges:
        visit(mod)


# ---------------------------------------------------------------------------------------------- data module
def test_datamodule_reads_its_hparams():
    dm = ShardDataModule(val_shards="/v", batch_size=6, num_workers=0, num_classes=7, seed=3, mixup=0, cutmix=0)
    assert dict(dm.hparams)["batch_size"] == 6 and dm.hparams.seed == 3
    assert (dm.val_shards, dm.num_classes, dm.seed, dm.val_batch_size) == ("/v", 7, 3, 6)
    assert ShardDataModule(batch_size=6, val_batch_size=10).val_batch_size == 10
    with pytest.raises(AttributeError):
        dm.seed = 4  # one place holds the value: hparams


class _Draws(torch.utils.data.IterableDataset):
    """Per worker: its id and one draw of python's, numpy's and torch's global generators."""

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        yield (info.id, random.random(), float(np.random.rand()), float(torch.rand(())))


def _draws(rank: int, seed: int):
    dm = ShardDataModule(num_workers=2, mixup=0, cutmix=0)
    torch.manual_seed(seed)  # the DataLoader's base seed comes from the main process's generator
    return sorted(dm._loader(_Draws(), rank))


@pytest.mark.usefixtures("one_thread")
def test_worker_seeding_per_seed_rank_and_worker():
    a = _draws(rank=0, seed=0)
    assert a == _draws(rank=0, seed=0)  # reproducible
    assert [w for w, *_ in a] == [0, 1] and a[0][1:] != a[1][1:]  # workers differ
    assert [d[1:] for d in a] != [d[1:] for d in _draws(rank=1, seed=0)]  # ranks differ
    assert [d[1:] for d in a] != [d[1:] for d in _draws(rank=0, seed=1)]  # seeds differ
