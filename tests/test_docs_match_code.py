"""The documentation states what the code does: facts that docs repeat are read back from the docs and checked
against the code, so the two cannot drift apart silently.

Markers (keep their wording when editing the docs; the tests parse them):
* README.md and docs/ARCHITECTURE.md: "scan implementations (`tokenprune.ssm.IMPLS`): `a`, `b`, ..."
* docs/ARCHITECTURE.md: "GPU order: `a`, `b`, ..." and "CPU order: `a`, `b`" (automatic dispatch), the
  `signals: set[str]` line of the backbone interface, and "`triton_scan.DEFAULT_TILE` = (..)" /
  "`triton_conv.CONV_TILE` = (..)".
Also: the README's scan_impl example is a `with` block, the README does not promise every timm ViT, a CLS-based
evaluator replaced on a backbone without a CLS is reported (warning + `evaluator_substitution`), and nothing
cites a design file the repository does not hold.
"""
import re
import types
import warnings
from pathlib import Path

import pytest
import timm
import torch

import tokenprune
from tokenprune.models.plainmamba import PlainMamba
from tokenprune.models.vim import VisionMamba
from tokenprune.pruning.methods import as_backbone
from tokenprune.ssm import IMPLS, scan

ROOT = Path(__file__).resolve().parents[1]
NAMES = r"(`[a-z_]+`(?:,\s+`[a-z_]+`)*)"
IMPLS_MARKER = re.compile(r"scan\s+implementations\s+\(`tokenprune\.ssm\.IMPLS`\):\s+" + NAMES, re.IGNORECASE)


def _names(text: str):
    return re.findall(r"`([a-z_]+)`", text)


def _one(pattern: re.Pattern, text: str, where: str):
    found = pattern.findall(text)
    assert len(found) == 1, f"{where}: expected the marker {pattern.pattern!r} once, found it {len(found)} times"
    return _names(found[0])


@pytest.mark.parametrize("doc", ["README.md", "docs/ARCHITECTURE.md"])
def test_documented_scan_implementations_are_the_dispatchers(doc):
    documented = _one(IMPLS_MARKER, (ROOT / doc).read_text(), doc)
    assert sorted(documented) == sorted(IMPLS), (doc, documented, IMPLS)
    assert len(documented) == len(set(documented))


def test_architecture_impl_set_in_the_signature_table_is_the_dispatchers():
    text = (ROOT / "docs/ARCHITECTURE.md").read_text()
    found = re.findall(r"`impl` ∈ \{([^}]*)\}", text)
    assert len(found) == 1
    assert sorted(re.findall(r'"([a-z_]+)"', found[0])) == sorted(IMPLS)


def _fake(device: str, dtype=torch.float32):
    """What get_scan_impl reads of a tensor (device type, is_cuda, dtype), without a GPU."""
    return types.SimpleNamespace(device=types.SimpleNamespace(type=device), is_cuda=device == "cuda", dtype=dtype)


@pytest.fixture
def automatic(monkeypatch):
    monkeypatch.delenv(scan.ENV_VAR, raising=False)
    monkeypatch.setitem(scan._state, "default", None)
    return monkeypatch


def _resolved_order(monkeypatch, device, availability):
    """The impls automatic dispatch picks as the optional back-ends disappear one by one."""
    order = []
    available = dict.fromkeys(availability, True)
    for _ in range(len(availability) + 1):
        for name, fn in availability.items():
            monkeypatch.setattr(scan, fn, (lambda ok: (lambda: ok))(available[name]))
        pick = scan.get_scan_impl(_fake(device))
        order.append(pick)
        if pick in available:
            available[pick] = False
        else:
            break
    return order


def test_documented_gpu_order_is_the_dispatch_order(automatic):
    text = (ROOT / "docs/ARCHITECTURE.md").read_text()
    documented = _one(re.compile(r"GPU order:\s+" + NAMES), text, "docs/ARCHITECTURE.md")
    order = _resolved_order(automatic, "cuda", {"triton": "triton_available", "cuda": "mamba_available"})
    assert order == documented
    assert scan.get_scan_impl(_fake("cuda", torch.float64)) == "reference"  # fp64 stays on the loop (documented)


def test_documented_cpu_order_is_the_dispatch_order(automatic):
    text = (ROOT / "docs/ARCHITECTURE.md").read_text()
    documented = _one(re.compile(r"CPU order:\s+" + NAMES), text, "docs/ARCHITECTURE.md")
    assert _resolved_order(automatic, "cpu", {"cpu": "numba_available"}) == documented


def test_documented_tile_sizes_are_the_kernels():
    from tokenprune.ssm import triton_conv, triton_scan

    text = (ROOT / "docs/ARCHITECTURE.md").read_text()
    for name, value in (("triton_scan.DEFAULT_TILE", triton_scan.DEFAULT_TILE),
                        ("triton_scan.FWD_TILE", triton_scan.FWD_TILE),
                        ("triton_conv.CONV_TILE", triton_conv.CONV_TILE)):
        found = re.findall(re.escape(name) + r"` = \(([\d, ]+)\)", text)
        assert len(found) == 1, name
        assert tuple(int(v) for v in found[0].split(",")) == tuple(value), name


def test_scan_impl_is_a_context_manager_as_the_readme_says():
    readme = (ROOT / "README.md").read_text()
    assert 'with tokenprune.ssm.scan_impl("reference"):' in readme
    before = scan.get_scan_impl()
    with tokenprune.ssm.scan_impl("reference"):
        assert scan.get_scan_impl() == "reference"
    assert scan.get_scan_impl() == before


def test_documented_backbone_signals_are_the_backbones():
    text = (ROOT / "docs/ARCHITECTURE.md").read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("signals: set[str]")]
    assert len(lines) == 1
    documented = set(re.findall(r'"([a-z_]+)"', lines[0]))
    vit = as_backbone(timm.create_model("deit_test_patch4_32"))
    exposed = set(VisionMamba.signals) | set(PlainMamba.signals) | set(vit.signals)
    assert documented == exposed


def test_readme_states_which_vision_transformers_are_accepted():
    """README: timm's VisionTransformer class itself; a subclass is rejected (exact class-name match)."""
    readme = (ROOT / "README.md").read_text()
    assert "every timm `VisionTransformer`" not in readme
    assert as_backbone(timm.create_model("deit_test_patch4_32")).has_cls

    class Sub(timm.models.vision_transformer.VisionTransformer):
        pass

    with pytest.raises(TypeError, match="no token interface"):
        as_backbone(Sub(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=10))


# ------------------------------------------------------------------ evaluator substitution is reported, not silent
@pytest.mark.parametrize("backbone,kwargs,method,requested,used", [
    ("plainmamba_test_32", {}, "pumer", "cls_similarity", "l2"),
    ("deit_test_patch4_32", {"class_token": False, "global_pool": "avg"}, "pumer", "cls_attn", "attn_received"),
])
def test_cls_evaluator_substitution_warns_and_is_recorded(backbone, kwargs, method, requested, used):
    bb = as_backbone(timm.create_model(backbone, **kwargs))
    assert not bb.has_cls
    with pytest.warns(UserWarning, match=f"evaluator '{requested}' needs a CLS token.*scored by '{used}'"):
        model = tokenprune.create_model(bb, method, keep=0.7)
    assert model.evaluator_substitution == {"requested": requested, "used": used,
                                            "reason": f"{type(bb).__name__} has no CLS token"}
    assert model.evaluator_name == used
    assert model.stages and all(s.evaluator.name == used for s in model.stages)


@pytest.mark.parametrize("backbone,method,used", [("vim_test_patch4_32", "pumer", "cls_similarity"),
                                                  ("deit_test_patch4_32", "pumer", "cls_attn"),
                                                  ("plainmamba_test_32", "l2", "l2")])
def test_no_substitution_no_warning(backbone, method, used):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = tokenprune.create_model(backbone, method, keep=0.7)
    assert model.evaluator_substitution is None
    assert model.evaluator_name == used


def test_nothing_cites_a_document_outside_the_repository():
    """Facts live in docs/ or in the code: no comment, config or doc points at a design file the repository
    does not hold."""
    pattern = re.compile("DESIGN" + r"(\.md|\s*§|\s+section)")
    here = Path(__file__).resolve()
    roots = [ROOT / d for d in ("src", "configs", "benchmarks", "scripts", "slurm", "docs", "tests", "weights")]
    files = [ROOT / f for f in ("README.md", "environment.yml", "pyproject.toml", "eval.py", "train.py")]
    files += [p for r in roots if r.is_dir() for p in r.rglob("*")
              if p.suffix in {".py", ".md", ".yaml", ".yml", ".sh", ".sbatch", ".txt", ".toml"}]
    hits = []
    for path in files:
        if path.resolve() == here or not path.is_file() or "egg-info" in str(path):
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "citations of a file outside the repository:\n" + "\n".join(hits)
