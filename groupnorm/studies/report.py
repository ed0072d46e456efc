"""`groupnorm report DIR`: DIR/REPORT.md and PNG figures from a study directory.

Tables give this directory's validation error (mean ± seed spread, %) beside the paper's ImageNet
numbers (groupnorm/data/paper_results.json); figures follow the paper's Figures 1, 4, 5 and 6; the
findings section checks each of the paper's claims with the explicit criteria of ``findings``.
"""
from __future__ import annotations

from pathlib import Path

from . import figures
from .findings import all_findings, criteria
from .results import Point, StudyData, difference, paper_results

NORM_NAMES = {"bn": "BN", "gn": "GN", "brn": "BR", "ln": "LN", "in": "IN", "gn+ws": "GN+WS", "none": "no norm"}


def _cell(p: Point | None) -> str:
    return "—" if p is None else p.fmt()


def _num(x) -> str:
    return "—" if x is None else f"{x:.1f}"


def _mean(p: Point | None, key: str) -> str:
    value = None if p is None else p.column_mean(key)
    return "—" if value is None else f"{value:.2f}"


def _paired_cell(a: Point | None, b: Point | None) -> str:
    """a − b seed by seed: "+1.23 ± 0.20" (mean ± standard error; the seeds' count in the header)."""
    d = difference(a, b)
    if d is None:
        return "—"
    return f"{d.mean:+.2f}" if d.n < 2 else f"{d.mean:+.2f} ± {d.se:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _setup(data: StudyData, study: str) -> str:
    p = data.preset(study)
    if not p:
        return ""
    subset = "all" if p.get("train_subset") is None else str(p["train_subset"])
    val = "all" if p.get("val_subset") is None else str(p["val_subset"])
    config = dict(p.get("config") or {})
    base_lr = config.pop("base_lr", 0.1)
    extra = "".join(f", {k}={v}" for k, v in config.items())
    return (f"Preset `{p.get('name')}`: {p.get('dataset')}, {subset} training / {val} validation images, "
            f"{p.get('epochs')} epochs, {p.get('workers')} workers, {p.get('seeds')} seed(s), "
            f"lr {base_lr:g} × N / 32, lr steps at {p.get('lr_steps')} of the epochs, augment={p.get('augment')}{extra}.")


def _figure(made: bool, name: str, alt: str, caption: str | None = None) -> list[str]:
    """Markdown lines that show the figure file ``name`` when it was made (caption: alt + ".")."""
    return ["", f"![{alt}]({name})", "", f"*{caption or alt + '.'}*"] if made else []


def batch_section(data: StudyData, paper: dict, out: Path) -> list[str]:
    lines = ["## Batch size (Table 2, Figures 1 and 5)", "", _setup(data, "batch"), ""]
    sizes = sorted(data.values("batch", "images_per_worker", norm="gn") + data.values("batch", "images_per_worker", norm="bn"),
                   reverse=True)
    sizes = sorted(set(sizes), reverse=True)
    t2 = paper["table2_batch_sensitivity"]
    rows = []
    for n in sizes:
        bn, gn = data.point("batch", norm="bn", images_per_worker=n), data.point("batch", norm="gn", images_per_worker=n)
        i = t2["images_per_worker"].index(n) if n in t2["images_per_worker"] else None
        pb, pg = (t2["BN"][i], t2["GN"][i]) if i is not None else (None, None)
        pdiff = f"{pb - pg:+.1f}" if i is not None else "—"
        rows.append([str(n), _cell(bn), _cell(gn), _paired_cell(bn, gn), _num(pb), _num(pg), pdiff])
    model = ", ".join(sorted({r["model"] for r in data.select("batch")}))
    lines += [f"Validation error (%), {model}, mean ± seed spread; BN − GN seed by seed, mean ± standard "
              f"error; the paper: ImageNet, ResNet-50.", ""]
    lines += _table(["images / worker", "BN", "GN", "BN − GN (paired)", "paper BN", "paper GN", "paper BN − GN"],
                    rows)
    lines += _diagnostics(data, "batch", sizes, t2)
    br = data.point("batch", norm="brn", images_per_worker=4)
    if br is not None:
        pbr = paper["batch_renorm_batch4"]
        lines += ["", "Batch Renorm at 4 images per worker (r_max = 1.5, d_max = 0.5):", ""]
        lines += _table(["norm", "this run", "paper"],
                        [["BN", _cell(data.point("batch", norm="bn", images_per_worker=4)), _num(pbr["BN"])],
                         ["BR", _cell(br), _num(pbr["BR"])],
                         ["GN", _cell(data.point("batch", norm="gn", images_per_worker=4)), _num(pbr["GN"])]])
    for fn, name, caption in ((figures.batch_error, "fig1_batch_error.png",
                               "Figure 1: error vs images per worker (error bars: seed spread)"),
                              (figures.batch_curves, "fig5_batch_curves.png",
                               "Figure 5: validation error curves per batch size")):
        lines += _figure(fn(data, out / name), name, caption)
    return lines + [""]


def _diagnostics(data: StudyData, study: str, sizes: list, paper_table: dict | None) -> list[str]:
    """BN's evaluation diagnostics (``groupnorm.train.diagnostics``), means over seeds, beside GN's
    train error and the paper's numbers."""
    bns = {n: data.point(study, norm="bn", images_per_worker=n) for n in sizes}
    if not any(p is not None and p.column_mean("val_error_precise") is not None for p in bns.values()):
        return []
    rows = []
    for n in sizes:
        bn, gn = bns[n], data.point(study, norm="gn", images_per_worker=n)
        ref = paper_table or {}
        i = ref["images_per_worker"].index(n) if n in ref.get("images_per_worker", []) else None
        rows.append([str(n), _mean(bn, "val_error"), _mean(bn, "val_error_running"), _mean(bn, "val_error_precise"),
                     _mean(bn, "val_error_batch"), _mean(bn, "train_error_eval"), _mean(bn, "train_error_precise"),
                     _mean(gn, "val_error"), _mean(gn, "train_error_eval"),
                     _num(ref["BN"][i]) if i is not None else "—", _num(ref["GN"][i]) if i is not None else "—"])
    return ["", "BN's evaluation diagnostics after training (weights frozen; % error, mean over seeds): "
                "*reported* is the run's error (median of its last 5 epochs); *running*: the final model "
                "with its running statistics; *precise*: with population statistics recomputed on training "
                "images; *batch*: each group of N test images normalized by its own statistics, as in "
                "training; *train*: training images in eval mode (running / precise statistics). Running "
                "above precise is the noise of the running statistics; precise above GN, and BN's train "
                "error above GN's, is what training with noisy batch statistics cost.", "",
            *_table(["images / worker", "BN reported", "BN running", "BN precise", "BN batch", "BN train",
                     "BN train precise", "GN reported", "GN train", "paper BN", "paper GN"], rows)]


def norms_section(data: StudyData, paper: dict, out: Path) -> list[str]:
    lines = ["## Normalization methods at 32 images per worker (Table 1, Figure 4)", "", _setup(data, "norms"), ""]
    t1 = paper["table1_norms_batch32"]
    rows = []
    for norm in ("bn", "ln", "in", "gn", "gn+ws"):
        p = data.point("norms", norm=norm)
        if p is None:
            continue
        rows.append([NORM_NAMES[norm], _cell(p), f"{p.train_mean:.2f}",
                     _num(t1.get(NORM_NAMES[norm]))])
    lines += _table(["norm", "val error", "train error (last epoch)", "paper val error"], rows)
    lines += ["", "The paper has no GN+WS entry in Table 1 (weight standardization is a later addition here)."]
    lines += _figure(figures.norm_curves(data, out / "fig4_norm_curves.png"), "fig4_norm_curves.png",
                     "Figure 4: training and validation error per norm",
                     "Figure 4: training (left) and validation (right) error per norm.")
    return lines + [""]


def groups_section(data: StudyData, paper: dict, out: Path) -> list[str]:
    lines = ["## Group division (Table 3)", "", _setup(data, "groups"), ""]
    t3 = paper["table3_group_division"]
    for key, other, head, paper_row, ref_key in (("groups", "group_size", "G", t3["groups"], "G"),
                                                 ("group_size", "groups", "channels per group",
                                                  t3["channels_per_group"], "C_per_G")):
        ref, perr = paper_row[ref_key], paper_row["error"]
        values = sorted(data.values("groups", key, **{other: None}), reverse=True)
        if not values:
            continue
        points = {v: data.point("groups", **{key: v, other: None}) for v in values}
        best = min(p.mean for p in points.values())
        pbest = min(perr)
        rows = []
        for i, v in enumerate(ref):
            p = points.get(v)
            rows.append([str(v), _cell(p), "—" if p is None else f"{p.mean - best:+.2f}", _num(perr[i]),
                         f"{perr[i] - pbest:+.1f}"])
        lines += [f"By {head} (— : not run, see the note below):", ""]
        lines += _table([head, "val error", "Δ vs best", "paper", "paper Δ"], rows) + [""]
    lines += [f"Note: {n}" for n in data.notes("groups")]
    return lines + [""]


def features_section(data: StudyData, paper: dict, out: Path) -> list[str]:
    lines = ["## Feature distributions (Figure 6)", "", _setup(data, "features"), ""]
    f6 = paper["figure6_vgg16_batch32"]
    rows = []
    for norm, key in (("none", "none"), ("bn", "BN"), ("gn", "GN")):
        rows.append([NORM_NAMES[norm], _cell(data.point("features", norm=norm)), _num(f6.get(key))])
    lines += _table(["VGG-16", "val error", "paper"], rows)
    lines += _figure(figures.percentiles(data, out / "fig6_percentiles.png"), "fig6_percentiles.png",
                     "Figure 6: percentiles of conv5_3's output",
                     "Figure 6: {1, 20, 80, 99} percentiles of conv5_3's output (before norm and ReLU) "
                     "over training.")
    return lines + [""]


def depth_section(data: StudyData, paper: dict, out: Path) -> list[str]:
    lines = ["## A deeper ResNet (the paper's ResNet-101)", "", _setup(data, "depth"), ""]
    r101 = paper["resnet101"]
    rows = []
    sizes = sorted(data.values("depth", "images_per_worker"), reverse=True)
    for n in sizes:
        ref = r101.get(f"batch{n}", {})
        bn, gn = data.point("depth", norm="bn", images_per_worker=n), data.point("depth", norm="gn", images_per_worker=n)
        rows.append([str(n), _cell(bn), _cell(gn), _paired_cell(bn, gn), _num(ref.get("BN")), _num(ref.get("GN"))])
    model = ", ".join(sorted({r["model"] for r in data.select("depth")}))
    lines += [f"Validation error (%), {model}; BN − GN seed by seed, mean ± standard error; the paper: "
              f"ResNet-101 on ImageNet.", ""]
    lines += _table(["images / worker", "BN", "GN", "BN − GN (paired)", "paper BN", "paper GN"], rows)
    paper_rows = {"images_per_worker": [n for n in sizes if f"batch{n}" in r101],
                  "BN": [r101[f"batch{n}"]["BN"] for n in sizes if f"batch{n}" in r101],
                  "GN": [r101[f"batch{n}"]["GN"] for n in sizes if f"batch{n}" in r101]}
    lines += _diagnostics(data, "depth", sizes, paper_rows)
    return lines + [""]


SECTIONS = {"batch": batch_section, "norms": norms_section, "groups": groups_section,
            "features": features_section, "depth": depth_section}


def make_report(out: str | Path) -> Path:
    """Write DIR/REPORT.md (and its PNG figures beside it); return its path."""
    data = StudyData(out)
    out = data.out
    paper = paper_results()
    seconds = sum(r["seconds"] or 0 for r in {r["run"]: r for r in data.rows}.values())
    runs = len({r["run"] for r in data.rows})
    lines = ["# Group Normalization: study report", "",
             f"Directory `{out}`: {runs} finished runs ({seconds / 60:.1f} training minutes), "
             f"studies: {', '.join(data.studies())}. Errors are top-1 validation errors (%), the median of "
             f"each run's last 5 epochs (the paper's metric), as mean ± seed spread (sample standard "
             f"deviation over seeds). Paper numbers: {paper['source']}", "",
             "## Criteria", "",
             "Fixed in `groupnorm/studies/findings.py` before any result was seen. Runs of one seed share "
             "their data order and initial weights, so comparisons are made seed by seed: the mean of the "
             "per-seed differences, their standard deviation (sd), the number of seeds (n) and the standard "
             "error SE = sd / √n.", ""]
    lines += criteria() + ["", "## Findings", ""]
    lines += [f.markdown() for f in all_findings(data)] + [""]
    for study in ("batch", "norms", "groups", "features", "depth"):
        if study in data.studies():
            lines += SECTIONS[study](data, paper, out)
    path = out / "REPORT.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
