"""The paper's findings, each checked against a study directory with an explicit, fixed criterion.

Every check returns a ``Finding``: whether it was reproduced (None when the directory lacks the runs
or the seeds to decide), and one sentence with the numbers. The criteria are the constants below,
fixed in code before any result was seen, and printed in the report *before* the numbers
(``criteria``); nothing is decided by hand.

Comparisons are seed-paired (``results.paired``): runs of one seed share their data order and
initial weights, so a claim "A is worse than B" is judged on the per-seed differences A − B: their
mean, standard deviation sd, number of seeds n and standard error SE = sd / sqrt(n). "k SE" means
the mean difference is at least k standard errors above 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .results import Paired, StudyData, difference, paired

CLOSE = 1.0       # GN close to BN at 32 images per worker: mean GN − BN at most this (points)
GAP = 1.0         # BN worse than GN at the smallest batch: mean BN − GN at least this (points) ...
MIN_SE = 3.0      # ... and at least this many standard errors; also the interaction contrast, LN/IN − GN
FLAT = 0.5        # GN flat: |mean GN(smallest) − GN(largest)| under this (points)
NEAR_BEST = 0.5   # G = 32 / 16 channels per group near the best: mean difference to the row's best at most this
STABLE = 2.0      # GN's feature percentiles stable: (p99 − p1) varies by at most this factor after 10 %


@dataclass
class Finding:
    claim: str
    reproduced: bool | None
    text: str

    def markdown(self) -> str:
        verdict = {True: "**reproduced**", False: "**not reproduced**", None: "**not tested**"}[self.reproduced]
        return f"- *{self.claim}* — {verdict}. {self.text}"


def criteria() -> list[str]:
    """The criteria of every finding, as markdown bullets (the report prints them before the numbers)."""
    return [
        f"- GN close to BN at 32 images per worker: seed-paired mean GN − BN at most +{CLOSE:.1f} points.",
        f"- BN degrades at small batches (batch study, and the deeper ResNet): at the smallest batch, "
        f"seed-paired BN − GN at least {GAP:.1f} points and at least {MIN_SE:.0f} standard errors; and the "
        f"interaction (BN(small) − BN(32)) − (GN(small) − GN(32)), seed by seed, at least {MIN_SE:.0f} "
        f"standard errors above 0.",
        f"- GN flat across batch sizes: |seed-paired mean GN(smallest) − GN(32)| under {FLAT:.1f} points.",
        f"- LN and IN worse than GN at 32 images per worker: each seed-paired mean (LN − GN, IN − GN) "
        f"above 0 by at least {MIN_SE:.0f} standard errors.",
        f"- G = 32 and 16 channels per group near the best of their rows of Table 3: mean error at most "
        f"{NEAR_BEST:.1f} points above the row's best setting.",
        f"- GN's conv5_3 percentiles stable (Figure 6): (p99 − p1) varies by at most {STABLE:.1f}× after "
        f"the first 10 % of training (worst seed), and less than without normalization.",
        "A standard error needs 2 or more seeds; with fewer, a claim that needs one is *not tested*.",
    ]


def _gn_bn_at(data: StudyData, n: int):
    for study in ("batch", "norms"):
        bn, gn = data.point(study, norm="bn", images_per_worker=n), data.point(study, norm="gn", images_per_worker=n)
        if bn is not None and gn is not None:
            return bn, gn
    return None, None


def _at_least(d: Paired, k: float) -> bool:
    """The mean difference is above 0 by at least k standard errors."""
    return d.n > 1 and d.mean > 0 and d.t >= k


def gn_close_to_bn(data: StudyData) -> Finding:
    claim = "GN is close to BN at 32 images per worker (paper: 24.1 vs 23.6)"
    bn, gn = _gn_bn_at(data, 32)
    d = difference(gn, bn)
    if d is None:
        return Finding(claim, None, "No BN and GN runs of a common seed at 32 images per worker here.")
    ok = d.mean <= CLOSE
    return Finding(claim, ok, f"GN {gn.fmt()} % vs BN {bn.fmt()} %; seed-paired GN − BN = {d.fmt()} "
                              f"(criterion: at most +{CLOSE:.1f}).")


def _sizes(data: StudyData, study: str) -> list[int]:
    return [n for n in data.values(study, "images_per_worker")
            if data.point(study, norm="bn", images_per_worker=n) and data.point(study, norm="gn", images_per_worker=n)]


def bn_degrades(data: StudyData, study: str = "batch") -> Finding:
    if study == "batch":
        claim = "BN degrades at small batches where GN does not (paper: BN 23.6 → 34.7, GN 24.1 → 24.1 at 2)"
    else:
        claim = "The same with a deeper ResNet (paper, ResNet-101: BN 22.0 → 31.9, GN 22.4 → 23.0 at 2)"
    sizes = _sizes(data, study)
    if len(sizes) < 2:
        return Finding(claim, None, f"The {study} study needs BN and GN at two or more batch sizes.")
    small, large = min(sizes), max(sizes)
    bn = {n: data.point(study, norm="bn", images_per_worker=n) for n in (small, large)}
    gn = {n: data.point(study, norm="gn", images_per_worker=n) for n in (small, large)}
    gap = difference(bn[small], gn[small])
    inter = paired((1, bn[small]), (-1, bn[large]), (-1, gn[small]), (1, gn[large]))
    if gap is None or inter is None or gap.n < 2 or inter.n < 2:
        return Finding(claim, None, f"Fewer than 2 seeds shared by BN and GN at {small} and {large} images per "
                                    f"worker: no standard error.")
    big = gap.mean >= GAP and _at_least(gap, MIN_SE)
    specific = _at_least(inter, MIN_SE)
    return Finding(claim, big and specific,
                   f"BN {bn[large].fmt()} % at {large} → {bn[small].fmt()} % at {small} images per worker, "
                   f"GN {gn[large].fmt()} % → {gn[small].fmt()} %. Seed-paired BN − GN at {small}: {gap.fmt()} "
                   f"(criterion: ≥ {GAP:.1f} points and ≥ {MIN_SE:.0f} SE, {'met' if big else 'not met'}); "
                   f"interaction (BN − GN at {small}) − (BN − GN at {large}): {inter.fmt()} "
                   f"(criterion: ≥ {MIN_SE:.0f} SE above 0, {'met' if specific else 'not met'}).")


def gn_flat(data: StudyData) -> Finding:
    claim = "GN's error does not depend on the batch size (paper: 24.1, 24.2, 24.0, 24.2, 24.1)"
    sizes = [n for n in data.values("batch", "images_per_worker", norm="gn")]
    if len(sizes) < 2:
        return Finding(claim, None, "The batch study needs GN at two or more batch sizes.")
    small, large = min(sizes), max(sizes)
    points = {n: data.point("batch", norm="gn", images_per_worker=n) for n in sizes}
    d = difference(points[small], points[large])
    if d is None:
        return Finding(claim, None, f"No common seed of GN at {small} and {large} images per worker.")
    ok = abs(d.mean) < FLAT
    means = [p.mean for p in points.values()]
    return Finding(claim, ok, f"GN {points[large].fmt()} % at {large}, {points[small].fmt()} % at {small} images "
                              f"per worker; seed-paired GN({small}) − GN({large}) = {d.fmt()} (criterion: "
                              f"|mean| under {FLAT:.1f}). Span of GN's means over "
                              f"{', '.join(map(str, sorted(sizes, reverse=True)))}: {max(means) - min(means):.2f}.")


def ln_in_worse(data: StudyData) -> Finding:
    claim = "LN and IN are worse than GN at 32 images per worker (paper: 25.3 and 28.4 vs 24.1)"
    gn, ln, inn = (data.point("norms", norm=n) for n in ("gn", "ln", "in"))
    if gn is None or ln is None or inn is None:
        return Finding(claim, None, "The norms study has not run GN, LN and IN here.")
    parts, ok = [], True
    for name, p in (("LN", ln), ("IN", inn)):
        d = difference(p, gn)
        if d is None or d.n < 2:
            return Finding(claim, None, f"Fewer than 2 seeds shared by {name} and GN: no standard error.")
        worse = _at_least(d, MIN_SE)
        ok &= worse
        parts.append(f"{name} {p.fmt()} % vs GN {gn.fmt()} %, seed-paired {name} − GN = {d.fmt()} "
                     f"({'worse' if worse else 'not clearly worse'})")
    return Finding(claim, ok, "; ".join(parts) + f". Criterion: above 0 by ≥ {MIN_SE:.0f} SE each.")


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
        near = points[value].mean - points[best_value].mean <= NEAR_BEST
        ok &= near
        best_label = f"G = {best_value}" if key == "groups" else f"{best_value} channels per group"
        if best_value == value:
            rows.append(f"{label} {points[value].fmt()} % is the best of its row")
        else:
            d = difference(points[value], points[best_value])
            rows.append(f"{label} {points[value].fmt()} % vs the row's best, {best_label} {points[best_value].fmt()} %: "
                        f"seed-paired difference {d.fmt() if d else '—'} ({'near' if near else 'not near'})")
    if not tested:
        return Finding(claim, None, "; ".join(rows) + ".")
    return Finding(claim, ok, "; ".join(rows) + f". Criterion: at most {NEAR_BEST:.1f} points above the best.")


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
    return [gn_close_to_bn(data), bn_degrades(data), gn_flat(data), ln_in_worse(data), groups_near_best(data),
            percentiles_stable(data), bn_degrades(data, "depth")]
