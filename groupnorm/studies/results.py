"""Reading a study directory back: summary rows grouped over seeds, curves, probes, the paper's numbers.

A *point* is one setting of a study (model, norm, groups, channels per group, images per worker);
its seeds give the mean and the seed spread (sample standard deviation, ddof = 1; 0 for one seed).
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from .runner import load_plan, read_summary

PAPER_JSON = Path(__file__).resolve().parent.parent / "data" / "paper_results.json"


def paper_results() -> dict:
    """The paper's numbers (groupnorm/data/paper_results.json)."""
    return json.loads(PAPER_JSON.read_text())


@dataclass
class Point:
    """The seeds of one setting: their errors, mean and spread, and their run directories."""

    values: list
    runs: list
    train_values: list

    @property
    def n(self) -> int:
        return len(self.values)

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


class StudyData:
    """Everything the report needs from DIR: summary rows, plan (presets, notes) and run files."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        if not (self.out / "summary.csv").exists():
            raise FileNotFoundError(f"{self.out} has no summary.csv: run `groupnorm study NAME --out {self.out}` "
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
        return Point([r["val_error"] for r in rows], [r["run"] for r in rows], [r["train_error"] for r in rows])

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
        curves = [self.history(r) for r in runs]
        curves = [c for c in curves if c]
        if not curves:
            return [], []
        length = min(len(c) for c in curves)
        epochs = [curves[0][i]["epoch"] for i in range(length)]
        return epochs, [statistics.fmean(c[i][key] for c in curves) for i in range(length)]


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
