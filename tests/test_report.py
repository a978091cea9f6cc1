"""Report writers on a hand-made result: table shape and order, CSV/JSON content, plots written."""
import csv
import json

import numpy as np
import pytest
import torch

from tokenprune.report import ROW_FIELDS, markdown_table, write_report
from tokenprune.report.plots import _short_name, dim_pruned, gflops_panels, kept_mask, plot_accuracy_vs_gflops
from tokenprune.report.tables import budget_label

HEADER = ["Method", "Keep", "Token reduction", "Params (M)", "GFLOPs", "GFLOPs (ViM paper)", "Top-1", "Δ Top-1",
          "Top-5", "images/s", "Speed-up", "Peak mem (MiB)"]


def row(label, budget=None, top1=80.0, gflops=5.0, ips=100.0, method="papr", backbone="ViM-S", **kw):
    unpruned = budget is None
    r = dict(backbone=backbone, model="vim_small_patch16_224", method="none" if unpruned else method, label=label,
             unpruned=unpruned, budget_mode=None if unpruned else "reduction", budget=budget,
             keep=1.0 if unpruned else 1 - budget, token_reduction=0.0 if unpruned else budget,
             token_reduction_simulated=0.0 if unpruned else budget, tokens_per_block=[197] * 24,
             params=25_796_584, params_backbone=25_796_584, gflops=gflops, gflops_paper=None if gflops is None else gflops * 0.8,
             gflops_proposal=0.0, top1=top1, delta_top1=top1 - 80.5, top5=95.0, images_per_s=ips,
             speedup=None if ips is None else ips / 100.0, peak_mem_mib=512.0, samples=50000, options={}, checkpoint_file=None, throughput={})
    r.update(kw)
    return r


@pytest.fixture
def result():
    rows = [row("Unpruned", top1=80.5, ips=100.0, delta_top1=0.0)]
    for b in (0.2, 0.4):
        rows.append(row("PaPr", b, top1=77.0 - 10 * b, gflops=5 * (1 - b), ips=100 / (1 - b)))
        rows.append(row("PaPr+SS (k=3)", b, top1=78.0 - 10 * b, gflops=5 * (1 - b) + 0.1, ips=95 / (1 - b),
                        method="papr_ss", options={"smoothing": 3}))
    rows.append(row("Unpruned", top1=79.8, ips=200.0, delta_top1=0.0, backbone="DeiT-S", gflops_paper=4.6,
                    gflops=4.6))
    rows.append(row("EViT", 0.4, top1=78.0, gflops=3.0, gflops_paper=3.0, ips=300.0, backbone="DeiT-S",
                    method="evit", speedup=1.5, peak_mem_mib=None))
    grid = (4, 4)
    images = torch.rand(2, 3, 32, 32)
    patch_index = torch.tensor([[-1, 0, 5, 10, 15], [3, -1, 2, 1, 0]])
    visual = {"images": images, "labels": torch.tensor([1, 2]), "target": 0.4,
              "methods": {"PaPr": {"patch_index": patch_index, "keep": 0.6, "budget": 0.4, "token_reduction": 0.4,
                                   "merging": False}}}
    return {"meta": {"date": "2025-01-01T00:00:00", "name": "unit", "machine": {"cpu": "test cpu", "cpu_cores": 2,
                                                                                 "torch": "x", "timm": "y"},
                     "budget_mode": "reduction", "reductions": [0.2, 0.4], "throughput": {"enabled": True},
                     "batch_size": 64, "dtype": "float32", "command": "python eval.py --config x.yaml"},
            "backbones": [{"name": "ViM-S", "model": "vim_small_patch16_224", "grid": list(grid), "depth": 24,
                           "seq_len": 197, "samples": 50000, "data": {"val_shards": "/data/val"}, "skipped": [
                               {"label": "VisionZip", "reason": "defined for ['vit'] backbones only"}]},
                          {"name": "DeiT-S", "model": "deit_small_patch16_224", "grid": [14, 14], "depth": 12,
                           "seq_len": 197, "samples": 50000, "data": {}, "skipped": []}],
            "rows": rows, "visuals": {"ViM-S": visual}}


def table_lines(md, start_heading):
    lines = md.splitlines()
    i = lines.index(start_heading)
    j = next(k for k in range(i, len(lines)) if lines[k].startswith("| Method"))
    out = []
    for line in lines[j:]:
        if not line.startswith("|"):
            break
        out.append([c.strip() for c in line.strip("|").split("|")])
    return out


def test_markdown_table_shape_and_order(result, tmp_path):
    files = write_report(result, str(tmp_path))
    names = sorted(p.split("/")[-1] for p in files)
    assert names == ["accuracy_vs_gflops.png", "kept_patches.png", "results.csv", "results.json", "results.md"]
    md = (tmp_path / "results.md").read_text()
    for needle in ("2025-01-01", "test cpu", "How to read", "Token reduction", "VisionZip", "ViM paper"):
        assert needle in md
    t = table_lines(md, "## ViM-S")
    assert t[0] == HEADER
    body = t[2:]
    assert [r[0] for r in body] == ["**Unpruned**", "*20 % token reduction*", "PaPr", "PaPr+SS (k=3)",
                                    "*40 % token reduction*", "PaPr", "PaPr+SS (k=3)"]
    unpruned = dict(zip(HEADER, body[0]))
    assert unpruned["Speed-up"] == "1.00×" and unpruned["Δ Top-1"] == "–" and unpruned["Top-1"] == "80.50"
    papr40 = dict(zip(HEADER, body[5]))
    assert papr40["Token reduction"] == "40.0 %" and papr40["Keep"] == "0.6" and papr40["Δ Top-1"] == "-7.50"
    assert papr40["GFLOPs"] == "3.00" and papr40["Speed-up"] == "1.67×"
    deit = table_lines(md, "## DeiT-S")
    assert "GFLOPs (ViM paper)" not in deit[0]  # one convention for ViTs: the column is dropped
    assert "![kept_patches.png](kept_patches.png)" in md


def test_csv_and_json_hold_every_field(result, tmp_path):
    write_report(result, str(tmp_path))
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(result["rows"]) and list(rows[0])[:len(ROW_FIELDS)] == ROW_FIELDS
    assert float(rows[0]["speedup"]) == 1.0 and json.loads(rows[0]["tokens_per_block"]) == [197] * 24
    doc = json.loads((tmp_path / "results.json").read_text())
    assert set(doc) == {"meta", "backbones", "rows", "kept_patches"}
    assert doc["rows"][3]["label"] == "PaPr" and doc["rows"][3]["budget"] == 0.4
    assert doc["kept_patches"]["ViM-S"]["PaPr"]["kept_patch_indices"] == [[0, 5, 10, 15], [0, 1, 2, 3]]


def test_markdown_table_without_optional_measurements():
    rows = [row("Unpruned", ips=None, images_per_s=None, speedup=None, peak_mem_mib=None, gflops=None, gflops_paper=None),
            row("PaPr", 0.4, ips=None, images_per_s=None, speedup=None, peak_mem_mib=None, gflops=None, gflops_paper=None)]
    header = [c.strip() for c in markdown_table(rows).splitlines()[0].strip("|").split("|")]
    assert header == ["Method", "Keep", "Token reduction", "Params (M)", "Top-1", "Δ Top-1", "Top-5"]
    assert plot_accuracy_vs_gflops(rows, "/nonexistent/x.png") is None


def test_host_over_gpu_column_shows_on_gpu_runs_only():
    """CPU rows have no host ÷ GPU ratio (the column is dropped); GPU rows show it, a launch-bound one above 1."""
    cpu = [row("Unpruned"), row("ToMe", 0.4, method="tome")]
    assert "Host ÷ GPU" not in markdown_table(cpu)
    gpu = [row("Unpruned", host_over_gpu=0.31), row("ToMe", 0.4, method="tome", host_over_gpu=1.7)]
    lines = markdown_table(gpu).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[-1] == "Host ÷ GPU"
    assert lines[2].rstrip(" |").endswith("0.31") and lines[-1].rstrip(" |").endswith("1.70")


def test_fine_tuned_entries_share_their_architecture_panel(tmp_path):
    """Other weights of an architecture are overlaid on its panel, not given a near-empty panel of their own."""
    rows = [row("Unpruned", top1=80.5), row("PaPr", 0.4, top1=70.0),
            row("Unpruned", top1=79.0, backbone="ViM-S, fine-tuned at 40 %"),
            row("PaPr", 0.4, top1=76.0, backbone="ViM-S, fine-tuned at 40 %"),
            row("Unpruned", top1=79.8, backbone="DeiT-S", model="deit_small_patch16_224")]
    assert gflops_panels(rows) == [
        {"title": "ViM-S", "primary": "ViM-S", "overlays": ["ViM-S, fine-tuned at 40 %"]},
        {"title": "DeiT-S", "primary": "DeiT-S", "overlays": []}]
    assert _short_name("ViM-S, fine-tuned at 40 %", "ViM-S") == "fine-tuned at 40 %"
    assert _short_name("other", "ViM-S") == "other" and _short_name("ViM-S", "ViM-S") == "ViM-S"
    import matplotlib.image

    path = plot_accuracy_vs_gflops(rows, str(tmp_path / "f.png"))
    two_panels = matplotlib.image.imread(path)
    rows_split = [dict(r, model=r["backbone"]) for r in rows]  # three architectures -> three panels, wider figure
    wide = matplotlib.image.imread(plot_accuracy_vs_gflops(rows_split, str(tmp_path / "g.png")))
    assert wide.shape[1] > two_panels.shape[1]


def test_budget_labels():
    assert budget_label("reduction", 0.3) == "30 % token reduction"
    assert budget_label("flops", 0.25) == "25 % FLOPs reduction"
    assert budget_label("keep", 0.7) == "keep ratio 0.7"
    assert budget_label(None, None) == "unpruned"


def test_kept_mask_and_dimming():
    mask = kept_mask(torch.tensor([[-1, 0, 3], [1, 2, -1]]), (2, 2))
    assert mask.tolist() == [[[True, False], [False, True]], [[False, True], [True, False]]]
    img = np.ones((8, 8, 3)) * 0.8
    out = dim_pruned(img, mask[0])
    assert np.allclose(out[:4, :4], 0.8) and np.allclose(out[4:, 4:], 0.8)
    assert (out[:4, 4:] < 0.5).all() and np.allclose(out[:4, 4:, 0], out[:4, 4:, 1])  # greyed and darker
