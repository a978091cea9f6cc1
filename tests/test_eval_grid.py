"""eval.py / tokenprune.evaluate.run_grid on tiny random models and tiny shards made here.

One grid (ViM-test and DeiT-test, PaPr+SS and ToMe at 20 / 40 % token reduction, weights and proposal network
from local files) runs once per module; the tests read its report and recompute its accuracy by hand.
"""
import glob
import io
import json
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import tokenprune
from tokenprune.data import write_info, write_shard
from tokenprune.evaluate import (BackboneEntry, DataConfig, EvalConfig, MethodEntry, ThroughputConfig,
                                 VisualizeConfig, main, parse_config, run_grid)
from tokenprune.evaluate.grid import build_backbone, build_datamodule
from tokenprune.models.proposal import build_proposal

pytestmark = pytest.mark.filterwarnings("ignore:throughput with .* below the project")

N_SAMPLES = 16  # 2 shards of 10 + 6, batch 8


def make_shards(directory, n=N_SAMPLES, per_shard=10, seed=0):
    """32x32 JPEGs (a coloured square on noise) + cls, ImageNet layout with an _info.json."""
    rng = np.random.default_rng(seed)
    names, lengths = [], []
    for s, start in enumerate(range(0, n, per_shard)):
        samples = []
        for i in range(start, min(n, start + per_shard)):
            img = (rng.random((32, 32, 3)) * 120).astype("uint8")
            y0, x0 = rng.integers(0, 16, size=2)
            img[y0:y0 + 14, x0:x0 + 14] = rng.integers(100, 255, size=3)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=95)
            samples.append({"__key__": f"sample{i:05d}", "jpg": buf.getvalue(), "cls": int(i % 10)})
        name = f"tiny-validation-{s:02d}.tar"
        lengths.append(write_shard(os.path.join(directory, name), samples))
        names.append(name)
    write_info(str(directory), "tiny", {"validation": (names, lengths)})
    return str(directory)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalgrid")
    data = make_shards(root / "data")
    torch.manual_seed(123)
    ckpt = {}
    for name in ("vim_test_patch4_32", "deit_test_patch4_32", "papr_convnet_micro"):
        path = str(root / f"{name}.pth")
        torch.save({"model": timm.create_model(name).state_dict()}, path)
        ckpt[name] = path
    return {"root": root, "data": data, "ckpt": ckpt}


def grid_config(files, out, **overrides):
    ck = files["ckpt"]
    cfg = dict(
        backbones=[BackboneEntry("vim_test_patch4_32", ck["vim_test_patch4_32"], name="ViM-test"),
                   BackboneEntry("deit_test_patch4_32", ck["deit_test_patch4_32"], name="DeiT-test")],
        methods=[MethodEntry("papr_ss", options={"smoothing": 3}), "tome"],
        reductions=[0.2, 0.4], proposal="papr_convnet_micro", proposal_checkpoint=ck["papr_convnet_micro"],
        data=DataConfig(val_shards=files["data"], image_size=32, resize_size=32, num_workers=0),
        batch_size=8, throughput=ThroughputConfig(batch_size=2, warmup=0, iters=2),
        visualize=VisualizeConfig(num_images=3, reduction=0.4), output_dir=str(out), device="cpu", progress=False)
    cfg.update(overrides)
    return EvalConfig(**cfg)


@pytest.fixture(scope="module")
def grid(files):
    out = files["root"] / "report"
    return run_grid(grid_config(files, out))


def test_report_files_are_written(grid):
    out = grid["output_dir"]
    for name in ("results.md", "results.csv", "results.json", "accuracy_vs_gflops.png", "kept_patches.png"):
        path = os.path.join(out, name)
        assert os.path.getsize(path) > 0, name
    with open(os.path.join(out, "accuracy_vs_gflops.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_rows_unpruned_first_and_grid_complete(grid):
    rows = grid["rows"]
    for bb in ("ViM-test", "DeiT-test"):
        sub = [r for r in rows if r["backbone"] == bb]
        assert len(sub) == 1 + 2 * 2
        assert sub[0]["unpruned"] and sub[0]["label"] == "Unpruned"
        assert sub[0]["speedup"] == 1.0 and sub[0]["delta_top1"] == 0.0 and sub[0]["token_reduction"] == 0.0
        assert [(r["label"], r["budget"]) for r in sub[1:]] == [
            ("PaPr+SS (k=3)", 0.2), ("PaPr+SS (k=3)", 0.4), ("ToMe", 0.2), ("ToMe", 0.4)]
        for r in sub:
            assert r["samples"] == N_SAMPLES
            assert r["images_per_s"] > 0 and r["speedup"] > 0
            assert r["gflops"] > 0 and r["params"] > 0
            assert 0.0 <= r["top1"] <= r["top5"] <= 100.0
        for r in sub[1:]:
            # measured in the validation pass == the simulation; within one token per block of the target
            assert r["token_reduction"] == pytest.approx(r["token_reduction_simulated"])
            assert abs(r["token_reduction"] - r["budget"]) * 65 <= 1.0
            assert r["gflops"] - r["gflops_proposal"] < sub[0]["gflops"]  # the tiny backbone costs less than the proposal net
        papr = [r for r in sub if r["method"] == "papr_ss"]
        assert [r["keep"] for r in papr] == [0.8, 0.6]  # one-step: keep = 1 - target
        assert all(r["gflops_proposal"] > 0 and r["params"] > r["params_backbone"] for r in papr)
    vim = [r for r in rows if r["backbone"] == "ViM-test"]
    assert all(r["gflops_paper"] < r["gflops"] for r in vim)  # one scan direction


def test_markdown_table_has_the_paper_columns_and_groups(grid):
    md = open(os.path.join(grid["output_dir"], "results.md")).read()
    lines = md.splitlines()
    start = lines.index("## ViM-test")
    table = [ln for ln in lines[start:] if ln.startswith("|")][: 2 + 1 + 2 * 3]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == ["Method", "Keep", "Token reduction", "Params (M)", "GFLOPs", "GFLOPs (ViM paper)", "Top-1",
                      "Δ Top-1", "Top-5", "images/s", "Speed-up"]
    first = [c.strip() for c in table[2].strip("|").split("|")]
    assert first[0] == "**Unpruned**" and first[-1] == "1.00×"
    assert [c.strip("|").split("|")[0].strip() for c in table[3:]] == [
        "*20 % token reduction*", "PaPr+SS (k=3)", "ToMe", "*40 % token reduction*", "PaPr+SS (k=3)", "ToMe"]
    for needle in ("Date", "Machine", "torch", "timm", f"{N_SAMPLES} samples", "How to read"):
        assert needle in md


def test_csv_json_and_kept_patches(grid):
    out = grid["output_dir"]
    doc = json.load(open(os.path.join(out, "results.json")))
    assert len(doc["rows"]) == 10 and doc["meta"]["machine"]["torch"] == torch.__version__
    kept = doc["kept_patches"]["ViM-test"]
    assert set(kept) == {"PaPr+SS (k=3)", "ToMe"} and kept["PaPr+SS (k=3)"]["budget"] == 0.4
    assert [len(k) for k in kept["PaPr+SS (k=3)"]["kept_patch_indices"]] == [38, 38, 38]  # round(0.6 * 64)
    header = open(os.path.join(out, "results.csv")).readline().strip().split(",")
    assert header[:4] == ["backbone", "model", "method", "label"]
    vis = grid["visuals"]["DeiT-test"]
    assert vis["images"].shape == (3, 3, 32, 32) and 0.0 <= vis["images"].min() and vis["images"].max() <= 1.0


def hand_accuracy(files, backbone, method=None, keep=1.0, **options):
    """Top-1/top-5 (%) by argmax / topk over the same shards, batches and weights as the runner."""
    entry = BackboneEntry(backbone, files["ckpt"][backbone])
    bb = build_backbone(entry)
    model = tokenprune.create_model(bb, method, keep=keep, **options).eval()
    dm = build_datamodule(DataConfig(val_shards=files["data"], image_size=32, resize_size=32, num_workers=0), 8, 10)
    correct1 = correct5 = n = 0
    with torch.no_grad():
        for images, labels in dm.val_dataloader():
            logits = model(images)
            top5 = logits.topk(5, dim=1).indices
            correct1 += (top5[:, 0] == labels).sum().item()
            correct5 += (top5 == labels[:, None]).any(dim=1).sum().item()
            n += len(labels)
    assert n == N_SAMPLES
    return 100 * correct1 / n, 100 * correct5 / n


def test_accuracy_equals_a_hand_computation(grid, files):
    rows = {(r["model"], r["label"], r["budget"]): r for r in grid["rows"]}
    proposal = build_proposal("papr_convnet_micro", files["ckpt"]["papr_convnet_micro"])
    cases = [("vim_test_patch4_32", "Unpruned", None, None, {}),
             ("vim_test_patch4_32", "PaPr+SS (k=3)", 0.4, "papr_ss", {"smoothing": 3, "proposal": proposal}),
             ("deit_test_patch4_32", "ToMe", 0.2, "tome", {})]
    for backbone, label, budget, method, options in cases:
        row = rows[(backbone, label, budget)]
        top1, top5 = hand_accuracy(files, backbone, method, row["keep"], **options)
        assert row["top1"] == pytest.approx(top1, abs=1e-4), (backbone, label)
        assert row["top5"] == pytest.approx(top5, abs=1e-4), (backbone, label)


def test_cli_with_yaml_and_overrides(files, tmp_path, capsys):
    config = tmp_path / "grid.yaml"
    config.write_text(f"""
name: cli
backbones:
  - model: deit_test_patch4_32
    checkpoint_file: {files['ckpt']['deit_test_patch4_32']}
    name: DeiT-test
methods:
  - l2
  - method: evit
    name: EViT (fused)
reductions: [0.2, 0.3, 0.4, 0.5]
data: {{val_shards: {files['data']}, image_size: 32, resize_size: 32, num_workers: 0}}
batch_size: 8
throughput: {{batch_size: 4, warmup: 1, iters: 2}}
progress: false
""")
    out = tmp_path / "out"
    result = main(["--config", str(config), "--reductions", "[0.3]", "--max_samples", "10", "--output_dir", str(out),
                   "--throughput.enabled", "false", "--visualize.enabled", "false", "--flops", "false"])
    assert [(r["label"], r["budget"]) for r in result["rows"]] == [("Unpruned", None), ("L2-norm (naive)", 0.3),
                                                                  ("EViT (fused)", 0.3)]
    assert all(r["samples"] == 10 and r["images_per_s"] is None for r in result["rows"])
    assert sorted(os.listdir(out)) == ["config.yaml", "results.csv", "results.json", "results.md"]
    assert "reductions:\n- 0.3" in (out / "config.yaml").read_text()
    assert f"report written to {out}" in capsys.readouterr().out


def test_keep_budgets_and_skipped_methods(files, tmp_path):
    cfg = grid_config(files, tmp_path, budget="keep", reductions=[0.5], methods=["visionzip"],
                      backbones=[BackboneEntry("vim_test_patch4_32", name="ViM-rand")], max_samples=8, flops=False,
                      throughput=ThroughputConfig(enabled=False), visualize=VisualizeConfig(enabled=False))
    result = run_grid(cfg)
    assert [r["label"] for r in result["rows"]] == ["Unpruned"]
    assert result["backbones"][0]["skipped"][0]["label"] == "VisionZip"
    md = open(os.path.join(tmp_path, "results.md")).read()
    assert "random weights" in md and "VisionZip" in md
    cfg = grid_config(files, tmp_path, budget="keep", reductions=[0.5], methods=["evit"], max_samples=8, flops=False,
                      backbones=[BackboneEntry("deit_test_patch4_32")], throughput=ThroughputConfig(enabled=False),
                      visualize=VisualizeConfig(enabled=False))
    assert [r["keep"] for r in run_grid(cfg)["rows"]] == [1.0, 0.5]


def test_data_yaml_in_lightning_form(files, tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text(f"""data:
  class_path: tokenprune.data.ShardDataModule
  init_args:
    val_shards: {files['data']}
    image_size: 32
    resize_size: 32
    num_workers: 0
    batch_size: 64
""")
    dm = build_datamodule(DataConfig(config=str(path), num_workers=0), 8, 10, {"mean": [0.5, 0.5, 0.5]})
    assert dm.val_shards == files["data"] and dm.image_size == 32 and dm.val_batch_size == 8
    assert dm.mean == (0.5, 0.5, 0.5) and dm.mixup_fn is None and dm.val_set.num_samples == N_SAMPLES
    path.write_text(f"val_shards: {files['data']}\nimage_sise: 32\n")
    with pytest.raises(ValueError, match="image_sise"):
        build_datamodule(DataConfig(config=str(path)), 8, 10)


def test_errors_come_from_create_model(files, tmp_path):
    kw = dict(flops=False, throughput=ThroughputConfig(enabled=False), visualize=VisualizeConfig(enabled=False))
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        run_grid(grid_config(files, tmp_path, methods=["nope"], **kw))
    with pytest.raises(ValueError, match="unknown backbone 'vim_nope'"):
        run_grid(grid_config(files, tmp_path, backbones=["vim_nope"], **kw))
    with pytest.raises(ValueError, match="budget must be one of"):
        run_grid(grid_config(files, tmp_path, budget="tokens", **kw))
    with pytest.raises(ValueError, match="same label"):
        run_grid(grid_config(files, tmp_path, methods=["tome", "tome"], **kw))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "eval",
                                                               "*.yaml"))),
                         ids=lambda p: os.path.basename(p))
def test_shipped_grid_files_parse(path):
    cfg, text = parse_config(["--config", path])
    assert cfg.backbones and cfg.methods and cfg.reductions
    names = set(timm.list_models())
    assert all(b.model in names for b in cfg.backbones)
    assert all(m.method in tokenprune.list_methods() for m in cfg.methods)
    if cfg.proposal:
        assert cfg.proposal in names


def test_per_backbone_methods_and_reductions(files, tmp_path):
    """Each backbone runs the rows of its own paper table, and a fine-tuned entry only its own budget."""
    kw = dict(flops=False, throughput=ThroughputConfig(enabled=False), max_samples=8, budget="keep",
              reductions=[0.5, 0.75])
    ck = files["ckpt"]
    cfg = grid_config(files, tmp_path, methods=["tome", "evit", MethodEntry("papr_ss", options={"smoothing": 5})],
                      backbones=[BackboneEntry("vim_test_patch4_32", ck["vim_test_patch4_32"], name="V",
                                               methods=["PaPr+SS (k=5)", "evit"]),
                                 BackboneEntry("deit_test_patch4_32", ck["deit_test_patch4_32"], name="D",
                                               methods=["tome"], reductions=[0.75], visualize=False)],
                      visualize=VisualizeConfig(num_images=2), **kw)
    result = run_grid(cfg)
    rows = result["rows"]
    assert list(result["visuals"]) == ["V"]  # D opted out of kept_patches.png
    assert set(result["visuals"]["V"]["methods"]) == {"EViT", "PaPr+SS (k=5)"}
    kw["visualize"] = VisualizeConfig(enabled=False)
    assert [(r["backbone"], r["label"], r["keep"]) for r in rows] == [
        ("V", "Unpruned", 1.0), ("V", "EViT", 0.5), ("V", "EViT", 0.75),
        ("V", "PaPr+SS (k=5)", 0.5), ("V", "PaPr+SS (k=5)", 0.75),
        ("D", "Unpruned", 1.0), ("D", "ToMe", 0.75)]
    with pytest.raises(ValueError, match=r"methods \['hsa'\] are not in the grid"):
        run_grid(grid_config(files, tmp_path, backbones=[BackboneEntry("vim_test_patch4_32", methods=["hsa"])], **kw))
    with pytest.raises(ValueError, match="keep ratios in"):
        run_grid(grid_config(files, tmp_path, backbones=[BackboneEntry("vim_test_patch4_32", reductions=[1.5])],
                             **kw))


def test_throughput_of_chosen_budgets_only(files, tmp_path):
    """throughput.reductions: the unpruned model and those budgets are timed in one run, the others show –;
    a backbone left with only its unpruned model is not timed; a value that is no budget is refused."""
    ck = files["ckpt"]
    cfg = grid_config(files, tmp_path, methods=["tome", "evit"], max_samples=8, flops=False,
                      backbones=[BackboneEntry("deit_test_patch4_32", ck["deit_test_patch4_32"], name="D"),
                                 BackboneEntry("deit_test_patch4_32", ck["deit_test_patch4_32"], name="D-0.2",
                                               methods=["tome"], reductions=[0.2], visualize=False)],
                      throughput=ThroughputConfig(batch_size=2, warmup=0, iters=2, reductions=[0.4]))
    result = run_grid(cfg)
    timed = {(r["backbone"], r["label"], r["budget"]) for r in result["rows"] if r["speedup"] is not None}
    assert timed == {("D", "Unpruned", None), ("D", "ToMe", 0.4), ("D", "EViT", 0.4)}
    assert all(r["images_per_s"] is None for r in result["rows"] if r["backbone"] == "D-0.2")
    md = open(os.path.join(tmp_path, "results.md")).read()
    assert "timed: the unpruned model and the 40 % token reduction rows (the other rows: –)" in md
    with pytest.raises(ValueError, match=r"throughput.reductions \[0.3\] are not budgets of the grid"):
        run_grid(grid_config(files, tmp_path, throughput=ThroughputConfig(reductions=[0.3])))
    with pytest.raises(ValueError, match=r"throughput.reductions is empty"):
        run_grid(grid_config(files, tmp_path, throughput=ThroughputConfig(reductions=[])))
    # unset, a backbone with its unpruned model alone still gets its images/s
    alone = run_grid(grid_config(files, tmp_path, max_samples=4, flops=False,
                                 backbones=[BackboneEntry("deit_test_patch4_32", ck["deit_test_patch4_32"],
                                                          name="D", methods=[], visualize=False)],
                                 throughput=ThroughputConfig(batch_size=2, warmup=0, iters=2)))
    assert [r["label"] for r in alone["rows"]] == ["Unpruned"] and alone["rows"][0]["images_per_s"] > 0


def test_kept_patches_figure_is_redrawn_only_when_it_changes(files, tmp_path, monkeypatch):
    """The report is rewritten after every backbone; kept_patches.png only when a backbone adds pictures."""
    from tokenprune import report

    drawn = []
    real = report.plot_kept_patches
    monkeypatch.setattr(report, "plot_kept_patches", lambda *a, **k: drawn.append(1) or real(*a, **k))
    ck = files["ckpt"]
    cfg = grid_config(files, tmp_path, methods=["tome"], max_samples=8, flops=False,
                      throughput=ThroughputConfig(enabled=False),
                      backbones=[BackboneEntry("deit_test_patch4_32", ck["deit_test_patch4_32"], name="D"),
                                 BackboneEntry("deit_test_patch4_32", ck["deit_test_patch4_32"], name="D2",
                                               visualize=False),
                                 BackboneEntry("vim_test_patch4_32", ck["vim_test_patch4_32"], name="V")])
    result = run_grid(cfg)
    assert len(drawn) == 2  # after D and after V, not after D2
    assert "kept_patches.png" in result["plots"] and os.path.isfile(tmp_path / "kept_patches.png")
    # a figure left by an earlier run is neither kept nor linked when this run draws none
    cfg.backbones = [BackboneEntry("deit_test_patch4_32", ck["deit_test_patch4_32"], name="D", visualize=False)]
    result = run_grid(cfg)
    assert "kept_patches.png" not in result["plots"] and not os.path.isfile(tmp_path / "kept_patches.png")


def test_label_names_a_substituted_scorer():
    from tokenprune.evaluate.labels import scorer_label
    model = tokenprune.create_model("plainmamba_test_32", "pumer", keep=0.7)
    assert scorer_label("PuMer", model) == "PuMer (L2 scorer)"
    assert scorer_label("PuMer (prune_fraction=0.5)", model) == "PuMer (prune_fraction=0.5, L2 scorer)"
    assert scorer_label("PuMer", tokenprune.create_model("vim_test_patch4_32", "pumer", keep=0.7)) == "PuMer"
