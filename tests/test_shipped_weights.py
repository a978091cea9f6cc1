"""The shipped digits models (weights/digits) and the exporter that wrote them.

The accuracies pinned here are the ones README.md and weights/digits/README.md state: the files load strictly
through the official-layout path (``checkpoint_file=``) and give them on the shipped validation shards.
"""
import json
import os
import re

import pytest
import timm
import torch

import tokenprune  # noqa: F401  (registers the models)
from tokenprune.data import ShardDataModule
from tokenprune.lit import PruningClassifier
from tokenprune.lit.export import export_backbone, unwrap_backbone
from tokenprune.models.checkpoint import CheckpointMismatchError
from tolerances import fp32_tol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, "weights", "digits")
DATA = os.path.join(ROOT, "data", "digits")

# name, weights file, unpruned validation top-1 in % on the 1,000 shipped samples (weights/digits/README.md)
SHIPPED = [
    ("vim_micro_patch8_56", "vim_micro.pth", 95.4),
    ("deit_micro_patch8_56", "deit_micro.pth", 95.8),
    ("papr_convnet_micro", "proposal_micro.pth", 97.8),
]


# ---------------------------------------------------------------------------------------------- exporter
@pytest.mark.parametrize("backbone", ["vim_test_patch4_32", "deit_test_patch4_32", "papr_convnet_micro"])
def test_export_gives_the_trained_backbone(tmp_path, backbone):
    torch.manual_seed(0)
    method = "hsa" if backbone.startswith("vim") else ("evit" if backbone.startswith("deit") else None)
    module = PruningClassifier(backbone, method, 0.5 if method else 1.0, ema_decay=0.9)
    with torch.no_grad():  # "trained": live and EMA weights differ from a fresh model and from each other
        for p in module.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "epoch": 7,
            "global_step": 70, "pytorch-lightning_version": "2.6.6"}
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    out = tmp_path / "w.pth"
    meta = export_backbone(str(path), str(out))
    assert meta["backbone"] == backbone and meta["epoch"] == 7 and not meta["ema"]
    saved = torch.load(out, weights_only=True)
    assert set(saved) == {"model", "meta"}
    size = 56 if backbone == "papr_convnet_micro" else 32
    x = torch.randn(2, 3, size, size)
    loaded = timm.create_model(backbone, checkpoint_file=str(out)).eval()
    want = unwrap_backbone(module.model.backbone).eval()
    assert_same_network(loaded, want, x)
    # the EMA weights on request, and they are not the live ones
    export_backbone(str(path), str(tmp_path / "ema.pth"), use_ema=True)
    ema = timm.create_model(backbone, checkpoint_file=str(tmp_path / "ema.pth")).eval()
    assert_same_network(ema, unwrap_backbone(module.ema.module.backbone).eval(), x)
    with torch.no_grad():
        assert not torch.allclose(ema(x), want(x))


def assert_same_network(a, b, x):
    """Two builds of one network: every tensor of the state dict bit for bit, so the same outputs. The
    outputs are compared to float rounding only: on some CPUs (seen on an AVX2 AMD EPYC) MKL's batched
    matmul rounds differently for equal weights at other addresses (3e-8 here), so separate instances are
    not bitwise reproducible there. The tolerance is fp32 rounding at the outputs' scale through the deepest of
    these networks (4 blocks or stages, reductions of <= 256: 65 tokens in ViM/DeiT, 256 channels in the ConvNet)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        want = b(x)
        torch.testing.assert_close(a(x), want, **fp32_tol(want, terms=1024))


def test_export_refuses_other_files(tmp_path):
    official = tmp_path / "official.pth"
    torch.save({"model": timm.create_model("vim_test_patch4_32").state_dict()}, official)
    with pytest.raises(CheckpointMismatchError, match="not a Lightning checkpoint"):
        export_backbone(str(official), str(tmp_path / "out.pth"))


# ---------------------------------------------------------------------------------------------- shipped files
def _top1(model, image_size=56):
    dm = ShardDataModule(val_shards=DATA, image_size=image_size, resize_size=image_size, num_classes=10,
                         val_batch_size=250, num_workers=0)
    dm.setup("validate")
    correct = total = 0
    model.eval()
    with torch.inference_mode():
        for images, labels in dm.val_dataloader():
            correct += int((model(images).argmax(-1) == labels).sum())
            total += len(labels)
    return 100.0 * correct / total, total


@pytest.mark.parametrize("name,file,top1", SHIPPED, ids=[s[0] for s in SHIPPED])
def test_shipped_weights_give_the_stated_accuracy(name, file, top1):
    path = os.path.join(WEIGHTS, file)
    assert os.path.isfile(path), f"{path} is missing: the shipped weights are part of the repository"
    meta = torch.load(path, weights_only=True)["meta"]
    assert meta["backbone"] == name
    model = timm.create_model(name, checkpoint_file=path)
    acc, n = _top1(model)
    assert n == 1000
    assert acc == pytest.approx(top1, abs=0.25), f"{name}: {acc:.2f} % vs stated {top1} %"


def test_readme_states_the_pinned_accuracies():
    with open(os.path.join(WEIGHTS, "README.md")) as f:
        text = f.read()
    for name, _, top1 in SHIPPED:
        assert f"{top1:.1f} %" in text, f"weights/digits/README.md does not state {name}'s {top1:.1f} %"


def test_front_readme_results_are_those_of_the_shipped_weights():
    """The front README's results section names the unpruned accuracies of the files that ship: retraining a
    model without rerunning `python eval.py` and rewriting that section fails here."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    start = text.index("## Built-in default: results")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end > 0 else None]
    stated = section.split("\n\n")[1]  # the paragraph that states the unpruned top-1 of each shipped model
    for label, (name, _, top1) in zip(["ViM-micro", "DeiT-micro", "proposal ConvNet"], SHIPPED):
        assert re.search(rf"{label}\W+{top1:.1f} %", stated), \
            f"README.md's results section does not state {name}'s unpruned {top1:.1f} %:\n{stated}"


def test_info_of_shipped_validation_shards():
    with open(os.path.join(DATA, "_info.json")) as f:
        info = json.load(f)
    assert info["splits"]["validation"]["num_samples"] == 1000
