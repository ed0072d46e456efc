"""Reading a study directory's files back, checked: plan.json, summary.csv, result.json, *.jsonl.

Every reader refuses a file it cannot trust with a ``StudyFileError`` whose one-line message names
the file (and the line, for summary.csv and the JSON-lines files) and the problem: a row cut short
(a copy or a write interrupted mid-row), a number that is not a number or not a possible value (an
error of -50 % or 1e9 %), JSON that does not parse or lacks a key. The report never counts a partial
row or drops a cell without a word.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

try:   # the package's error family, where the CLI prints one line and no traceback
    from groupnorm.errors import GroupnormError as _Base
except ImportError:  # pragma: no cover - older trees without groupnorm.errors
    _Base = Exception

# summary.csv: one row per (study, finished run). The first 13 columns are required; the diagnostics
# (``groupnorm.train.diagnostics``, empty where a run has none) may be missing from older files.
BASE_COLUMNS = ["study", "model", "norm", "groups", "group_size", "workers", "images_per_worker", "seed",
                "val_error", "train_error", "epochs", "seconds", "run"]
DIAGNOSTIC_COLUMNS = ["train_error_eval", "val_error_running", "val_error_precise", "val_error_batch",
                      "train_error_precise"]
SUMMARY_COLUMNS = BASE_COLUMNS + DIAGNOSTIC_COLUMNS
NORMS = ("bn", "brn", "gn", "gn+ws", "ln", "in", "none")
_INTS = {"groups": 1, "group_size": 1, "workers": 1, "images_per_worker": 1, "seed": 0, "epochs": 1}
_PERCENT = {"val_error", "train_error", *DIAGNOSTIC_COLUMNS}
_OPTIONAL = {"groups", "group_size", *DIAGNOSTIC_COLUMNS}
RESULT_KEYS = ("val_error", "train_error", "epochs", "seconds")


class StudyFileError(_Base, ValueError):
    """A study file that cannot be used; the message names it (and the line) and the problem."""


def _fix(path: Path) -> str:
    return (f"rerun the same `groupnorm study` command to rewrite it from the run directories"
            if path.name == "summary.csv" else "delete that run's directory to retrain it, or restore the file")


def read_json(path: str | Path, what: str = "a JSON object") -> dict:
    """A JSON object from ``path``; StudyFileError naming the file when it is not one."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except OSError as exc:
        raise StudyFileError(f"cannot read {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StudyFileError(f"{path} is not valid JSON ({exc}); {_fix(path)}") from None
    if not isinstance(value, dict):
        raise StudyFileError(f"{path} must hold {what}, got a JSON {type(value).__name__}")
    return value


def read_jsonl(path: str | Path) -> list[dict]:
    """One JSON object per non-empty line of ``path`` ([] when there is no file)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StudyFileError(f"{path} line {number} is not valid JSON ({exc.msg}): the file is cut or "
                                 f"corrupt") from None
        if not isinstance(record, dict):
            raise StudyFileError(f"{path} line {number} must be a JSON object")
        records.append(record)
    return records


def read_result(path: str | Path) -> dict:
    """A run's result.json, with its numbers checked (errors in [0, 100], finite seconds)."""
    path = Path(path)
    result = read_json(path, "a run's result")
    for key in RESULT_KEYS:
        if key not in result:
            raise StudyFileError(f"{path} has no {key!r}: not a finished run's result; {_fix(path)}")
    for key in ("val_error", "train_error"):
        _percent(result[key], f"{path}: {key}")
    if not _is_number(result["seconds"]) or result["seconds"] < 0:
        raise StudyFileError(f"{path}: seconds {result['seconds']!r} is not a duration")
    if isinstance(result["epochs"], bool) or not isinstance(result["epochs"], int) or result["epochs"] < 1:
        raise StudyFileError(f"{path}: epochs {result['epochs']!r} is not a positive integer")
    diagnostics = result.get("diagnostics", {})
    if not isinstance(diagnostics, dict):
        raise StudyFileError(f"{path}: diagnostics must be a JSON object")
    for key, value in diagnostics.items():
        if "error" in key:
            _percent(value, f"{path}: diagnostics.{key}")
    return result


def load_plan(out: str | Path) -> dict:
    """DIR/plan.json: {"presets": {study: preset}, "notes": {study: [...]}, "runs": [RunSpec dicts]}
    (empty when there is none)."""
    path = Path(out) / "plan.json"
    if not path.exists():
        return {"presets": {}, "notes": {}, "runs": []}
    plan = read_json(path, "a study plan")
    for key, kind, name in (("presets", dict, "object"), ("notes", dict, "object"), ("runs", list, "array")):
        if not isinstance(plan.get(key), kind):
            raise StudyFileError(f"{path}: {key!r} is missing or not a JSON {name}; delete plan.json and "
                                 f"rerun the study command to rewrite it")
    for i, run in enumerate(plan["runs"]):
        if not isinstance(run, dict) or not isinstance(run.get("name"), str) or not isinstance(run.get("config"), dict):
            raise StudyFileError(f"{path}: runs[{i}] is not a planned run (a name and a config); delete "
                                 f"plan.json and rerun the study command to rewrite it")
    return plan


def read_summary(path: str | Path) -> list[dict]:
    """DIR/summary.csv (or the file ``path``) with numbers parsed (empty optional cells -> None).

    Refused, naming the file and line: a missing or unknown column, a row with fewer or more cells
    than the header, a file that ends mid-row (no final line end), a number that does not parse or
    is impossible (an error outside [0, 100], a negative count), an unknown study or norm, one run
    listed twice in a study."""
    from .specs import STUDIES

    path = Path(path)
    if path.is_dir():
        path = path / "summary.csv"
    try:
        text = path.read_text()
    except OSError as exc:
        raise StudyFileError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise StudyFileError(f"{path} is not a text file; {_fix(path)}") from None
    if not text.strip():
        raise StudyFileError(f"{path} is empty; {_fix(path)}")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader)
    missing = [c for c in BASE_COLUMNS if c not in header]
    unknown = [c for c in header if c not in SUMMARY_COLUMNS]
    if missing or unknown or len(set(header)) != len(header):
        problem = (f"lacks column(s) {', '.join(missing)}" if missing else
                   f"has unknown column(s) {', '.join(unknown)}" if unknown else "repeats a column")
        raise StudyFileError(f"{path} line 1: the header {problem}; expected {','.join(SUMMARY_COLUMNS)}")
    rows, seen = [], set()
    ends_cleanly = text.endswith(("\n", "\r"))
    for cells in reader:
        line = reader.line_num
        if not cells:
            continue
        where = f"{path} line {line}"
        if len(cells) != len(header):
            raise StudyFileError(f"{where} has {len(cells)} cells, the header {len(header)}: the row is "
                                 f"{'cut short' if len(cells) < len(header) else 'too long'}; {_fix(path)}")
        if not ends_cleanly and reader.line_num == text.count("\n") + 1:
            raise StudyFileError(f"{where} is cut: the file ends mid-row (no line end); {_fix(path)}")
        raw = dict(zip(header, cells))
        row = {}
        for key in SUMMARY_COLUMNS:
            row[key] = _cell(raw.get(key, ""), key, where)
        if row["study"] not in STUDIES:
            raise StudyFileError(f"{where}: unknown study {row['study']!r} (one of {', '.join(STUDIES)})")
        if row["norm"] not in NORMS:
            raise StudyFileError(f"{where}: unknown norm {row['norm']!r} (one of {', '.join(NORMS)})")
        for key in ("model", "run"):
            if not row[key] or "/" in row[key] or "\\" in row[key]:
                raise StudyFileError(f"{where}: {key} {row[key]!r} is not a run directory name")
        if (row["study"], row["run"]) in seen:
            raise StudyFileError(f"{where}: run {row['run']} is listed twice in study {row['study']}")
        seen.add((row["study"], row["run"]))
        rows.append(row)
    return rows


def _cell(value: str, key: str, where: str):
    if value == "":
        if key in _OPTIONAL:
            return None
        raise StudyFileError(f"{where}: {key} is empty")
    if key in _INTS:
        try:
            number = int(value)
        except ValueError:
            raise StudyFileError(f"{where}: {key} {value!r} is not an integer") from None
        if number < _INTS[key]:
            raise StudyFileError(f"{where}: {key} {number} is below {_INTS[key]}")
        return number
    if key in _PERCENT:
        return _percent(_float(value, key, where), f"{where}: {key}")
    if key == "seconds":
        number = _float(value, key, where)
        if number < 0:
            raise StudyFileError(f"{where}: seconds {value!r} is negative")
        return number
    return value


def _float(value: str, key: str, where: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise StudyFileError(f"{where}: {key} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise StudyFileError(f"{where}: {key} {value!r} is not a finite number")
    return number


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _percent(value, what: str) -> float:
    """An error rate in percent: a finite number in [0, 100]."""
    if not _is_number(value) or not 0 <= value <= 100:
        raise StudyFileError(f"{what} {value!r} is not an error rate in [0, 100] %")
    return float(value)
