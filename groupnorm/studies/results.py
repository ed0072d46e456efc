"""Reading a study directory back: summary rows grouped over seeds, paired differences, curves,
probes, the paper's numbers.

A *point* is one setting of a study (model, norm, groups, channels per group, images per worker);
its seeds give the mean and the seed spread (sample standard deviation, ddof = 1; 0 for one seed).

Runs of one seed are *paired*: the same data order and the same initial weights for every norm and
batch size (``groupnorm.train``; tests/train/test_bn_stats.py). A comparison of two settings is
therefore made on the per-seed differences (``paired``), whose spread leaves out what the two runs
of a seed share; its standard error is sd / sqrt(n) over the n seeds both settings have.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from .files import StudyFileError, load_plan, read_jsonl, read_summary

PAPER_JSON = Path(__file__).resolve().parent.parent / "data" / "paper_results.json"


def paper_results() -> dict:
    """The paper's numbers (groupnorm/data/paper_results.json)."""
    return json.loads(PAPER_JSON.read_text())


@dataclass
class Point:
    """The seeds of one setting: their errors, mean and spread, and their run directories.
    ``rows`` are the summary rows (one per seed), for the seeds and the diagnostics columns."""

    values: list
    runs: list
    train_values: list
    rows: list = None

    @property
    def n(self) -> int:
        return len(self.values)

    def by_seed(self, key: str = "val_error") -> dict:
        """{seed: value of column ``key``} over this setting's runs (those with a value)."""
        return {r["seed"]: r[key] for r in self.rows or [] if r.get(key) is not None}

    def column_mean(self, key: str) -> float | None:
        values = list(self.by_seed(key).values())
        return statistics.fmean(values) if values else None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    @property
    def train_mean(self) -> float:
        vals = [v for v in self.train_values if v is not None]
        return statistics.fmean(vals) if vals else math.nan

    def fmt(self) -> str:
        """"12.34 ± 0.56" (mean ± seed spread over n seeds)."""
        return f"{self.mean:.2f} ± {self.std:.2f}" if self.n > 1 else f"{self.mean:.2f}"


@dataclass
class Paired:
    """Per-seed differences between settings, over the seeds they share."""

    diffs: list
    seeds: list

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.diffs)

    @property
    def sd(self) -> float:
        """Sample standard deviation of the differences (NaN for fewer than 2 seeds)."""
        return statistics.stdev(self.diffs) if self.n > 1 else math.nan

    @property
    def se(self) -> float:
        """Standard error of the mean difference: sd / sqrt(n) (NaN for fewer than 2 seeds)."""
        return self.sd / math.sqrt(self.n) if self.n > 1 else math.nan

    @property
    def t(self) -> float:
        """mean / se: how many standard errors the mean difference is from 0 (inf when every seed
        gives the same non-zero difference, NaN for fewer than 2 seeds)."""
        if self.n < 2:
            return math.nan
        if self.se == 0:
            return 0.0 if self.mean == 0 else math.copysign(math.inf, self.mean)
        return self.mean / self.se

    def fmt(self) -> str:
        """"+1.23 (sd 0.45, n = 3, SE 0.26, 4.7 SE)"."""
        if self.n < 2:
            return f"{self.mean:+.2f} (n = {self.n})"
        return f"{self.mean:+.2f} (sd {self.sd:.2f}, n = {self.n}, SE {self.se:.2f}, {self.t:.1f} SE)"


def paired(*terms, key: str = "val_error") -> Paired | None:
    """Per-seed sum of signed points, over the seeds every point has: ``paired((1, a), (-1, b))`` is
    a − b seed by seed; four terms give an interaction contrast. None when a point is missing or no
    seed is shared."""
    if any(p is None for _, p in terms):
        return None
    values = [(sign, p.by_seed(key)) for sign, p in terms]
    seeds = sorted(set.intersection(*(set(v) for _, v in values)))
    if not seeds:
        return None
    return Paired([sum(sign * v[s] for sign, v in values) for s in seeds], seeds)


def difference(a: Point | None, b: Point | None, key: str = "val_error") -> Paired | None:
    """a − b, seed by seed."""
    return paired((1, a), (-1, b), key=key)


class StudyData:
    """Everything the report needs from DIR: summary rows, plan (presets, notes) and run files."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        if not (self.out / "summary.csv").exists():
            raise StudyFileError(f"{self.out} has no summary.csv: run `groupnorm study NAME --out {self.out}` "
                                 f"first")
        self.rows = read_summary(self.out)
        self.plan = load_plan(self.out)

    def studies(self) -> list[str]:
        return sorted({r["study"] for r in self.rows})

    def select(self, study: str, **where) -> list[dict]:
        return [r for r in self.rows if r["study"] == study and all(r[k] == v for k, v in where.items())]

    def point(self, study: str, **where) -> Point | None:
        """The seeds of the setting matching ``where`` in ``study`` (None when no run finished)."""
        rows = self.select(study, **where)
        if not rows:
            return None
        return Point([r["val_error"] for r in rows], [r["run"] for r in rows], [r["train_error"] for r in rows],
                     rows)

    def values(self, study: str, key: str, **where) -> list:
        """Distinct values of column ``key`` among ``study``'s rows matching ``where``, sorted."""
        return sorted({r[key] for r in self.select(study, **where) if r[key] is not None})

    def preset(self, study: str) -> dict:
        return self.plan.get("presets", {}).get(study, {})

    def notes(self, study: str) -> list[str]:
        return self.plan.get("notes", {}).get(study, [])

    # ---- run files ----------------------------------------------------------------------------------
    def history(self, run: str) -> list[dict]:
        """metrics.jsonl of a run: one dict per epoch."""
        return _jsonl(self.out / run / "metrics.jsonl")

    def probe(self, run: str) -> list[dict]:
        """probe.jsonl of a run: {"iteration", "p1", "p20", "p80", "p99", ...} records."""
        return _jsonl(self.out / run / "probe.jsonl")

    def mean_curve(self, runs: list[str], key: str) -> tuple[list[int], list[float]]:
        """Epochs and the mean of ``key`` over ``runs`` at each epoch all of them reached."""
        curves = []
        for run in runs:
            curve = self.history(run)
            for i, record in enumerate(curve, start=1):
                if not all(isinstance(record.get(k), (int, float)) for k in ("epoch", key)):
                    raise StudyFileError(f"{self.out / run / 'metrics.jsonl'} record {i} has no number for "
                                         f"'epoch' or {key!r}")
            if curve:
                curves.append(curve)
        if not curves:
            return [], []
        length = min(len(c) for c in curves)
        epochs = [curves[0][i]["epoch"] for i in range(length)]
        return epochs, [statistics.fmean(c[i][key] for c in curves) for i in range(length)]


def _jsonl(path: Path) -> list[dict]:
    return read_jsonl(path)
