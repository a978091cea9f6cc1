"""Report figures: accuracy vs GFLOPs (one panel per architecture) and the kept patches of a few images."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import numpy as np

__all__ = ["plot_accuracy_vs_gflops", "gflops_panels", "plot_kept_patches", "kept_mask", "dim_pruned"]

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "h", "<", ">"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def gflops_panels(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Group report entries into figure panels: one panel per architecture (row ``model``).

    The first entry of an architecture owns the panel (its unpruned star and method lines); later entries of the
    same architecture (other weights, e.g. the papers' fine-tuned rows) are overlaid on it, so that fine-tuned and
    training-free points share axes. Returns [{"title", "primary", "overlays": [entry names]}] in report order.
    """
    panels: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        arch = r.get("model") or r["backbone"]
        panel = panels.setdefault(arch, {"title": r["backbone"], "primary": r["backbone"], "overlays": []})
        if r["backbone"] != panel["primary"] and r["backbone"] not in panel["overlays"]:
            panel["overlays"].append(r["backbone"])
    return list(panels.values())


def _short_name(entry: str, primary: str) -> str:
    """'ViM-micro, ToP+HSA fine-tuned at 40 %' on the 'ViM-micro' panel -> 'ToP+HSA fine-tuned at 40 %'."""
    if not entry.startswith(primary):
        return entry
    return entry[len(primary):].lstrip(" ,:-") or entry


def plot_accuracy_vs_gflops(rows: List[Dict[str, Any]], path: str, title: Optional[str] = None) -> Optional[str]:
    """Top-1 vs GFLOPs: a line per method, a marker shape per budget, the unpruned model as a star.

    One panel per architecture (``gflops_panels``); entries with other weights of the same architecture are drawn
    on it as hollow markers with a dashed line, labelled with their entry name (their unpruned accuracy is in the
    tables, not on the figure, where it would sit on the panel's star). Returns None (and writes nothing) when no
    row has GFLOPs (FLOP counting was off).
    """
    rows = [r for r in rows if r.get("gflops") is not None and r.get("top1") is not None]
    if not rows:
        return None
    plt = _plt()
    from matplotlib.lines import Line2D

    panels = gflops_panels(rows)
    labels = list(dict.fromkeys(r["label"] for r in rows if not r.get("unpruned")))
    budgets = list(dict.fromkeys((r.get("budget_mode"), r.get("budget")) for r in rows if not r.get("unpruned")))
    budgets_sorted = sorted(budgets, key=lambda b: (b[0] or "", b[1] if b[1] is not None else 0))
    marker = {b: MARKERS[i % len(MARKERS)] for i, b in enumerate(budgets_sorted)}
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    color = {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}
    n = len(panels)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.6 * ncols + 2.6, 4.4 * nrows), squeeze=False)

    def method_lines(ax, sub, overlay_name=None):
        for lab in labels:
            pts = sorted((r for r in sub if r["label"] == lab and not r.get("unpruned")), key=lambda r: r["gflops"])
            if not pts:
                continue
            ax.plot([r["gflops"] for r in pts], [r["top1"] for r in pts], "--" if overlay_name else "-",
                    color=color[lab], lw=1.6, alpha=0.85)
            for r in pts:
                face = "white" if overlay_name else color[lab]
                edge = color[lab] if overlay_name else "white"
                ax.plot(r["gflops"], r["top1"], marker[(r.get("budget_mode"), r.get("budget"))], mfc=face,
                        mec=edge, mew=2.0 if overlay_name else 0.8, ms=8 if overlay_name else 7, zorder=4)
            if overlay_name:
                ax.annotate(f"{overlay_name}: {pts[-1]['top1']:.1f}", (pts[-1]["gflops"], pts[-1]["top1"]),
                            textcoords="offset points", xytext=(8, 4), ha="left", va="bottom", fontsize=8,
                            color=color[lab], zorder=6,
                            bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85))

    for ax, panel in zip(axes.flat, panels):
        sub = [r for r in rows if r["backbone"] == panel["primary"]]
        method_lines(ax, sub)
        for entry in panel["overlays"]:
            method_lines(ax, [r for r in rows if r["backbone"] == entry], _short_name(entry, panel["primary"]))
        base = next((r for r in sub if r.get("unpruned")), None)
        if base is not None:
            ax.plot(base["gflops"], base["top1"], "*", color="black", ms=16, mec="white", mew=0.8, zorder=5)
            ax.axhline(base["top1"], color="black", lw=0.8, ls=":", alpha=0.6)
            ax.annotate(f"unpruned {base['top1']:.1f}", (base["gflops"], base["top1"]), textcoords="offset points",
                        xytext=(-10, 4), ha="right", va="bottom", fontsize=8.5)
        ax.set_title(panel["title"], fontsize=12)
        ax.set_xlabel("GFLOPs (fvcore, all ops, batch 1)", fontsize=10)
        ax.set_ylabel("Top-1 (%)", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    from ..report.tables import budget_label

    handles = [Line2D([], [], color="black", marker="*", ls="", ms=14, label="Unpruned")]
    handles += [Line2D([], [], color=color[lab], marker="o", lw=1.6, ms=6, label=lab) for lab in labels]
    handles += [Line2D([], [], color="grey", marker=marker[b], ls="", ms=7, label=budget_label(*b))
                for b in budgets_sorted]
    if any(p["overlays"] for p in panels):
        handles.append(Line2D([], [], color="grey", marker="o", ls="--", mfc="white", mew=2.0, ms=7,
                              label="other weights (labelled)"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0 - 2.5 / fig.get_figwidth(), 0.5),
               fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=13)
    fig.tight_layout(rect=(0, 0, 1.0 - 2.6 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def kept_mask(patch_index, grid) -> np.ndarray:
    """(N, T) patch indices (-1 = non-patch) -> (N, H, W) bool grid of kept patches."""
    idx = np.asarray(patch_index)
    h, w = grid
    mask = np.zeros((idx.shape[0], h * w), dtype=bool)
    for i, row in enumerate(idx):
        row = row[row >= 0]
        mask[i, row] = True
    return mask.reshape(-1, h, w)


def dim_pruned(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W, 3) image in [0, 1] with the patches outside mask (h, w) greyed and darkened."""
    H, W = image.shape[:2]
    h, w = mask.shape
    full = np.kron(mask.astype(np.uint8), np.ones((math.ceil(H / h), math.ceil(W / w)), dtype=np.uint8))[:H, :W]
    grey = image.mean(axis=2, keepdims=True) * 0.35 + 0.12
    return np.where(full[..., None].astype(bool), image, np.repeat(grey, 3, axis=2))


def _patch_edges(ax, mask: np.ndarray, H: int, W: int) -> None:
    """Thin outline around the kept region (patch borders between kept and pruned)."""
    h, w = mask.shape
    ph, pw = H / h, W / w
    segs = []
    for i in range(h):
        for j in range(w):
            if not mask[i, j]:
                continue
            if i == 0 or not mask[i - 1, j]:
                segs.append([(j * pw - 0.5, i * ph - 0.5), ((j + 1) * pw - 0.5, i * ph - 0.5)])
            if i == h - 1 or not mask[i + 1, j]:
                segs.append([(j * pw - 0.5, (i + 1) * ph - 0.5), ((j + 1) * pw - 0.5, (i + 1) * ph - 0.5)])
            if j == 0 or not mask[i, j - 1]:
                segs.append([(j * pw - 0.5, i * ph - 0.5), (j * pw - 0.5, (i + 1) * ph - 0.5)])
            if j == w - 1 or not mask[i, j + 1]:
                segs.append([((j + 1) * pw - 0.5, i * ph - 0.5), ((j + 1) * pw - 0.5, (i + 1) * ph - 0.5)])
    if segs:
        from matplotlib.collections import LineCollection

        ax.add_collection(LineCollection(segs, colors="#ffd400", linewidths=0.9, alpha=0.9))


def plot_kept_patches(visuals: Dict[str, Dict[str, Any]], grids: Dict[str, Any], path: str,
                      class_names: Optional[List[str]] = None) -> Optional[str]:
    """For each backbone: rows = images, columns = the input then one method each (final kept set).

    visuals[backbone] = {"images": (N, 3, H, W) in [0, 1], "labels": (N,),
                         "methods": {label: {"patch_index": (N, T), "keep", "budget", "token_reduction", "merging"}}}
    Kept patches are shown as they are (outlined), pruned ones greyed; for merging methods the kept set is
    the tokens' representative patches (a merged token shows the patch whose position it carries).
    """
    visuals = {k: v for k, v in (visuals or {}).items() if v and len(v["images"])}
    if not visuals:
        return None
    plt = _plt()
    columns = ["Input"] + list(dict.fromkeys(lab for v in visuals.values() for lab in v["methods"]))
    n_rows = sum(len(v["images"]) for v in visuals.values())
    cell = 2.1
    fig, axes = plt.subplots(n_rows, len(columns), figsize=(cell * len(columns) + 0.9, cell * n_rows + 0.9),
                             squeeze=False)
    r = 0
    for bb, vis in visuals.items():
        images = np.asarray(vis["images"].permute(0, 2, 3, 1) if hasattr(vis["images"], "permute") else vis["images"])
        labels = np.asarray(vis.get("labels", [None] * len(images)))
        masks = {lab: kept_mask(m["patch_index"], grids[bb]) for lab, m in vis["methods"].items()}
        for i, img in enumerate(images):
            H, W = img.shape[:2]
            for c, col in enumerate(columns):
                ax = axes[r, c]
                ax.set_xticks([])
                ax.set_yticks([])
                for s in ax.spines.values():
                    s.set_visible(False)
                if col == "Input":
                    ax.imshow(img, interpolation="nearest" if H < 96 else "antialiased")
                    lab = labels[i] if i < len(labels) else None
                    name = (class_names[int(lab)] if class_names and lab is not None else
                            (f"class {int(lab)}" if lab is not None else ""))
                    ax.set_ylabel(f"{bb}\n{name}" if len(visuals) > 1 else name, fontsize=9)
                elif col in masks:
                    mask = masks[col][i]
                    m = vis["methods"][col]
                    ax.imshow(dim_pruned(img, mask), interpolation="nearest" if H < 96 else "antialiased")
                    _patch_edges(ax, mask, H, W)
                    ax.set_xlabel(f"{int(mask.sum())}/{mask.size} patches · keep {m['keep']:.3g}\n"
                                  f"−{100 * m['token_reduction']:.0f} % tokens", fontsize=8)
                else:
                    ax.text(0.5, 0.5, "n/a", ha="center", va="center", fontsize=9, color="grey",
                            transform=ax.transAxes)
                if r == 0:
                    merging = any(v["methods"][col].get("merging") for v in visuals.values() if col in v["methods"])
                    ax.set_title(col + ("\n(merging: representatives)" if merging else ""), fontsize=9.5)
            r += 1
    target = next((v.get("target") for v in visuals.values() if v.get("target") is not None), None)
    at = f" at the budget closest to {100 * target:.0f} % token reduction" if target is not None else ""
    fig.suptitle(f"Kept patches after the last reduction stage{at} (pruned patches greyed)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
