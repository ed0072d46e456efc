"""The paper's findings, each checked against a study directory with an explicit criterion.

Every check returns a ``Finding``: whether it was reproduced (None when the directory lacks the runs),
and one sentence with the numbers. The criteria are the constants below; nothing is decided by hand.
The seed spread of a comparison is the larger of the two sample standard deviations over seeds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .results import Point, StudyData

CLOSE = 1.0       # "GN close to BN at 32": GN's mean error at most this many points above BN's
FLAT = 1.0        # "GN flat": GN's mean errors over the batch sizes span less than this many points
SPREADS = 2.0     # "BN degrades": BN's excess over GN at the smallest batch is more than SPREADS seed spreads
NEAR_BEST = 0.5   # "G = 32 / 16 channels per group near best": within this many points of the row's best
STABLE = 2.0      # "percentiles stable": (p99 - p1) varies by at most this factor after the first 10%


@dataclass
class Finding:
    claim: str
    reproduced: bool | None
    text: str

    def markdown(self) -> str:
        verdict = {True: "**reproduced**", False: "**not reproduced**", None: "**not tested**"}[self.reproduced]
        return f"- *{self.claim}* — {verdict}. {self.text}"


def _spread(*points: Point) -> float:
    return max(p.std for p in points)


def _gn_bn_at(data: StudyData, n: int) -> tuple[Point | None, Point | None]:
    for study in ("batch", "norms"):
        bn, gn = data.point(study, norm="bn", images_per_worker=n), data.point(study, norm="gn", images_per_worker=n)
        if bn is not None and gn is not None:
            return bn, gn
    return None, None


def gn_close_to_bn(data: StudyData) -> Finding:
    claim = "GN is close to BN at 32 images per worker (paper: 24.1 vs 23.6)"
    bn, gn = _gn_bn_at(data, 32)
    if bn is None:
        return Finding(claim, None, "No BN and GN runs at 32 images per worker here.")
    gap = gn.mean - bn.mean
    ok = gap <= CLOSE
    return Finding(claim, ok, f"GN {gn.fmt()} % vs BN {bn.fmt()} %: GN − BN = {gap:+.2f} points "
                              f"(criterion: at most +{CLOSE:.1f}).")


def gn_flat_bn_degrades(data: StudyData) -> Finding:
    claim = ("GN is flat across batch sizes while BN degrades at small ones "
             "(paper: GN 24.1–24.2, BN 23.6 → 34.7 at 2 images per worker)")
    sizes = [n for n in data.values("batch", "images_per_worker")
             if data.point("batch", norm="bn", images_per_worker=n) and data.point("batch", norm="gn", images_per_worker=n)]
    if len(sizes) < 2:
        return Finding(claim, None, "The batch study needs BN and GN at two or more batch sizes.")
    small, large = min(sizes), max(sizes)
    gn = {n: data.point("batch", norm="gn", images_per_worker=n) for n in sizes}
    bn = {n: data.point("batch", norm="bn", images_per_worker=n) for n in sizes}
    gn_means = [gn[n].mean for n in sizes]
    gn_range = max(gn_means) - min(gn_means)
    excess = bn[small].mean - gn[small].mean
    spread = _spread(bn[small], gn[small])
    flat = gn_range < FLAT
    degrades = excess > SPREADS * spread and bn[small].mean > bn[large].mean
    return Finding(claim, flat and degrades,
                   f"GN's mean error spans {gn_range:.2f} points over {', '.join(map(str, sorted(sizes, reverse=True)))} "
                   f"images per worker ({gn[large].fmt()} % at {large}, {gn[small].fmt()} % at {small}; "
                   f"criterion: under {FLAT:.1f}, {'met' if flat else 'not met'}). "
                   f"BN goes from {bn[large].fmt()} % at {large} to {bn[small].fmt()} % at {small}, "
                   f"BN − GN = {excess:+.2f} points there, against a seed spread of {spread:.2f} "
                   f"(criterion: more than {SPREADS:.0f} spreads = {SPREADS * spread:.2f}, "
                   f"{'met' if degrades else 'not met'}).")


def ln_in_worse(data: StudyData) -> Finding:
    claim = "LN and IN are worse than GN at 32 images per worker (paper: 25.3 and 28.4 vs 24.1)"
    gn, ln, inn = (data.point("norms", norm=n) for n in ("gn", "ln", "in"))
    if gn is None or ln is None or inn is None:
        return Finding(claim, None, "The norms study has not run GN, LN and IN here.")
    parts, ok = [], True
    for name, p in (("LN", ln), ("IN", inn)):
        margin, spread = p.mean - gn.mean, _spread(p, gn)
        worse = margin > spread
        ok &= worse
        parts.append(f"{name} {p.fmt()} % is {margin:+.2f} points from GN {gn.fmt()} % "
                     f"(seed spread {spread:.2f}: {'worse' if worse else 'not clearly worse'})")
    return Finding(claim, ok, "; ".join(parts) + ". Criterion: mean error above GN's by more than the seed spread.")


def groups_near_best(data: StudyData) -> Finding:
    claim = "G = 32 and 16 channels per group are near the best division (paper: both best, 24.1 and 24.2)"
    if not data.select("groups"):
        return Finding(claim, None, "The groups study has not run here.")
    rows, ok, tested = [], True, False
    for key, value, label in (("groups", 32, "G = 32"), ("group_size", 16, "16 channels per group")):
        other = "group_size" if key == "groups" else "groups"
        choices = data.values("groups", key, **{other: None})
        points = {v: data.point("groups", **{key: v, other: None}) for v in choices}
        if value not in points or points[value] is None:
            rows.append(f"{label}: not run (see the clipping note of Table 3)")
            continue
        tested = True
        best_value = min(points, key=lambda v: points[v].mean)
        gap = points[value].mean - points[best_value].mean
        near = gap <= NEAR_BEST
        ok &= near
        best_label = f"G = {best_value}" if key == "groups" else f"{best_value} channels per group"
        if best_value == value:
            rows.append(f"{label} {points[value].fmt()} % is the best of its row")
        else:
            rows.append(f"{label} {points[value].fmt()} % is {gap:.2f} points above the best, {best_label} "
                        f"{points[best_value].fmt()} % ({'near' if near else 'not near'})")
    if not tested:
        return Finding(claim, None, "; ".join(rows) + ".")
    return Finding(claim, ok, "; ".join(rows) + f". Criterion: within {NEAR_BEST:.1f} points of the best.")


def drift(records: list[dict]) -> float:
    """How much the width p99 - p1 of the probed output changes over training: max / min of it over
    the records after the first 10% (the start of training is left out as a transient)."""
    if len(records) < 2:
        return math.nan
    widths = [r["p99"] - r["p1"] for r in records[len(records) // 10:]]
    if not all(math.isfinite(w) for w in widths):  # the activations overflowed: training diverged
        return math.inf
    lo = min(widths)
    return math.inf if lo <= 0 else max(widths) / lo


def percentiles_stable(data: StudyData) -> Finding:
    claim = "GN keeps the feature distribution of conv5_3 stable over training, as BN does (paper, Figure 6)"
    drifts = {}
    for norm in ("none", "bn", "gn"):
        p = data.point("features", norm=norm)
        if p is not None:
            values = [drift(data.probe(r)) for r in p.runs]
            values = [v for v in values if not math.isnan(v)]
            if values:
                drifts[norm] = max(values)
    if "gn" not in drifts:
        return Finding(claim, None, "The features study has no GN probe records here.")
    ok = drifts["gn"] <= STABLE and ("none" not in drifts or drifts["gn"] < drifts["none"])
    text = ", ".join(f"{ {'none': 'no norm', 'bn': 'BN', 'gn': 'GN'}[k]} {v:.2f}×" for k, v in drifts.items())
    return Finding(claim, ok, f"Change of the p99 − p1 width after the first 10% of training (max/min, worst seed): "
                              f"{text}. Criterion: GN at most {STABLE:.1f}× and below the no-norm net's.")


def all_findings(data: StudyData) -> list[Finding]:
    return [gn_close_to_bn(data), gn_flat_bn_degrades(data), ln_in_worse(data), groups_near_best(data),
            percentiles_stable(data)]
