"""The report's figures (matplotlib, Agg backend, PNG), after the paper's Figures 1, 4, 5 and 6.

Each function takes a ``StudyData`` and a path, draws what the directory holds, and returns the path
(or None when the study has nothing to draw).
"""
from __future__ import annotations

from pathlib import Path

from .results import StudyData, paper_results

COLORS = {"bn": "tab:blue", "gn": "tab:red", "brn": "tab:purple", "ln": "tab:green", "in": "tab:orange",
          "gn+ws": "tab:brown", "none": "tab:gray"}
LABELS = {"bn": "BN", "gn": "GN", "brn": "BR", "ln": "LN", "in": "IN", "gn+ws": "GN+WS", "none": "no norm"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def batch_error(data: StudyData, path: Path) -> Path | None:
    """Figure 1: validation error vs images per worker, BN and GN, mean ± seed spread; the paper's
    ImageNet numbers beside it."""
    sizes = data.values("batch", "images_per_worker", norm="gn")
    if not sizes:
        return None
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    for norm in ("bn", "gn"):
        pts = [(n, data.point("batch", norm=norm, images_per_worker=n)) for n in sizes]
        pts = [(n, p) for n, p in pts if p is not None]
        if pts:
            ax.errorbar([n for n, _ in pts], [p.mean for _, p in pts], yerr=[p.std for _, p in pts],
                        marker="o", capsize=4, color=COLORS[norm], label=LABELS[norm])
    paper = paper_results()["table2_batch_sensitivity"]
    for norm in ("BN", "GN"):
        bx.plot(paper["images_per_worker"], paper[norm], marker="o", color=COLORS[norm.lower()], label=norm)
    for axis, title in ((ax, f"this run ({data.preset('batch').get('dataset', '')})"),
                        (bx, "paper (ImageNet, ResNet-50)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks([32, 16, 8, 4, 2], ["32", "16", "8", "4", "2"])
        axis.invert_xaxis()
        axis.set_xlabel("images per worker")
        axis.set_ylabel("validation error (%)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend()
    return _save(fig, path)


def batch_curves(data: StudyData, path: Path) -> Path | None:
    """Figure 5: validation error per epoch for each batch size, BN (left) and GN (right), mean of seeds."""
    sizes = data.values("batch", "images_per_worker")
    if not sizes:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, norm in zip(axes, ("bn", "gn")):
        for i, n in enumerate(sorted(sizes, reverse=True)):
            p = data.point("batch", norm=norm, images_per_worker=n)
            if p is None:
                continue
            epochs, err = data.mean_curve(p.runs, "val_error")
            ax.plot(epochs, err, color=cmap(i / max(1, len(sizes) - 1)), label=f"{LABELS[norm]}, {n} img/worker")
        ax.set_title(f"{LABELS[norm]}: validation error")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("validation error (%)")
    return _save(fig, path)


def norm_curves(data: StudyData, path: Path, norms=("bn", "ln", "in", "gn", "gn+ws")) -> Path | None:
    """Figure 4: training (left) and validation (right) error per epoch for each norm, mean of seeds."""
    present = [n for n in norms if data.point("norms", norm=n) is not None]
    if not present:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in ((axes[0], "train_error", "training error"), (axes[1], "val_error", "validation error")):
        for norm in present:
            epochs, err = data.mean_curve(data.point("norms", norm=norm).runs, key)
            ax.plot(epochs, err, color=COLORS[norm], label=LABELS[norm])
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("error (%)")
    return _save(fig, path)


def percentiles(data: StudyData, path: Path, norms=("none", "bn", "gn")) -> Path | None:
    """Figure 6: the {1, 20, 80, 99} percentiles of the probed layer's output over training, one panel
    per norm (the first seed's run)."""
    present = [(n, data.point("features", norm=n)) for n in norms]
    present = [(n, p) for n, p in present if p is not None and data.probe(p.runs[0])]
    if not present:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.6), squeeze=False)
    for ax, (norm, p) in zip(axes[0], present):
        records = data.probe(p.runs[0])
        it = [r["iteration"] for r in records]
        for q, shade in (("p1", 0.35), ("p20", 0.7), ("p80", 0.7), ("p99", 0.35)):
            ax.plot(it, [r[q] for r in records], color=COLORS[norm], alpha=shade, label=q)
        ax.fill_between(it, [r["p20"] for r in records], [r["p80"] for r in records], color=COLORS[norm], alpha=0.15)
        ax.set_title(f"VGG-16 {LABELS[norm]}: conv5_3 output")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)
