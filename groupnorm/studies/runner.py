"""Run a study: expand it into training runs, train the ones not done yet, write DIR/summary.csv.

    DIR/plan.json          the preset and every planned run (merged over calls: several studies may share DIR)
    DIR/summary.csv        one row per (study, finished run): SUMMARY_COLUMNS
    DIR/<run name>/        the engine's run directory (config.yaml, metrics.jsonl, checkpoint.pt,
                           result.json, probe.jsonl) plus log.txt (the run's own output)

Resumable: a run with result.json is skipped; a run with only a checkpoint continues from it (the
engine's ``resume``); a run is never silently redone with other settings (the engine refuses a
checkpoint whose config differs, and so does this module for a finished run).

Parallel: ``jobs`` processes each train one run at a time with ``cores // jobs`` torch threads. On
2 cores two single-threaded runs beat one two-threaded run: small batches leave a second thread
mostly idle.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path

from groupnorm.train.config import result_neutral_keys

from .files import SUMMARY_COLUMNS, StudyFileError, load_plan, read_summary
from .files import read_result as _read_result_file
from .specs import Preset, RunSpec, expand, get_preset, study_notes

# Config keys that may differ between a finished run and a new plan: those marked same_results in Config.
_FREE_KEYS = result_neutral_keys()


def available_cores() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """Torch threads for each of ``jobs`` parallel runs: the cores shared out, at least 1."""
    return max(1, (cores or available_cores()) // max(1, jobs))


# ---- state of the run directories --------------------------------------------------------------------
def run_status(out: str | os.PathLike, spec: RunSpec) -> str:
    """"done" (result.json), "partial" (a checkpoint to resume from) or "new"."""
    d = Path(out) / spec.name
    if (d / "result.json").exists():
        return "done"
    if (d / "checkpoint.pt").exists():
        return "partial"
    return "new"


def read_result(out: str | os.PathLike, name: str) -> dict | None:
    """DIR/<name>/result.json, checked (``files.read_result``), or None when the run has not finished."""
    path = Path(out) / name / "result.json"
    if not path.exists():
        return None
    return _read_result_file(path)


_MISSING = "(not set)"


def _check_finished(out: Path, spec: RunSpec) -> None:
    """A finished run must have been trained with the planned settings, or the study would mix them:
    every Config field that changes results (defaults included) must match."""
    from groupnorm.train import Config

    result = read_result(out, spec.name) or {}
    old = result.get("config")
    if not isinstance(old, dict):
        raise StudyFileError(f"{out / spec.name / 'result.json'} has no config; delete that run's directory "
                             f"to retrain it")
    planned = Config(**spec.config).to_dict()
    diff = [k for k, v in planned.items() if k not in _FREE_KEYS and old.get(k, _MISSING) != v]
    if diff:
        raise ValueError(f"{out / spec.name} was trained with other settings ("
                         + ", ".join(f"{k}: {old.get(k, _MISSING)!r} there, {planned[k]!r} planned" for k in diff)
                         + "); use another --out directory, or delete that run to retrain it")


# ---- plan.json and summary.csv ------------------------------------------------------------------------
def _spec_dict(spec: RunSpec) -> dict:
    return dataclasses.asdict(spec)


def planned_specs(out: str | os.PathLike) -> list[RunSpec]:
    specs = []
    for i, r in enumerate(load_plan(out)["runs"]):
        try:
            specs.append(RunSpec(**r))
        except TypeError:
            raise StudyFileError(f"{Path(out) / 'plan.json'}: runs[{i}] does not have a planned run's fields; "
                                 f"delete plan.json and rerun the study command to rewrite it") from None
    return specs


def save_plan(out: Path, studies: list[str], preset: Preset, specs: list[RunSpec]) -> None:
    """Merge these runs (replacing the same studies' earlier plans) into DIR/plan.json."""
    plan = load_plan(out)
    keep = [r for r in plan["runs"] if r["study"] not in studies]
    plan["runs"] = keep + [_spec_dict(s) for s in specs]
    for study in studies:
        plan["presets"][study] = dataclasses.asdict(preset.for_study(study))
        plan["notes"][study] = study_notes(study, preset)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".plan.json.tmp"
    tmp.write_text(json.dumps(plan, indent=2) + "\n")
    os.replace(tmp, out / "plan.json")


def summary_rows(out: str | os.PathLike, specs: list[RunSpec] | None = None) -> list[dict]:
    """One row per planned (study, run) that has finished, in plan order."""
    out = Path(out)
    rows = []
    for spec in planned_specs(out) if specs is None else specs:
        result = read_result(out, spec.name)
        if result is None:
            continue
        diag = result.get("diagnostics", {})
        rows.append({**spec.row(), "val_error": result["val_error"], "train_error": result["train_error"],
                     "epochs": result["epochs"], "seconds": result["seconds"], "run": spec.name,
                     "train_error_eval": diag.get("train_error"),
                     **{k: diag.get(k) for k in ("val_error_running", "val_error_precise", "val_error_batch",
                                                 "train_error_precise")}})
    return rows


def write_summary(out: str | os.PathLike) -> Path:
    """(Re)write DIR/summary.csv from the run directories of every planned run."""
    out = Path(out)
    path = out / "summary.csv"
    tmp = out / ".summary.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        for row in summary_rows(out):
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in SUMMARY_COLUMNS})
    os.replace(tmp, path)
    return path


# ---- training one run (in this process or in a worker process) -----------------------------------------
def _init_worker(threads: int) -> None:
    """Pool initializer: cap every thread pool of the worker process before any work."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch
    torch.set_num_threads(threads)


@contextlib.contextmanager
def _output_to(path: Path, fd_level: bool):
    """Send stdout and stderr to ``path`` (also at file-descriptor level in worker processes, so
    messages from C++ go there too)."""
    with open(path, "a", buffering=1) as log:
        if not fd_level:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
            return
        sys.stdout.flush(), sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


def train_one(config: dict, fd_level: bool = False) -> dict:
    """Train one run (``config``: Config fields, ``out`` included); its output goes to out/log.txt.
    Returns the result without its history (the run directory keeps that)."""
    from groupnorm.train import Config, run

    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    with _output_to(out / "log.txt", fd_level):
        try:
            result = run(Config(**config))
        except BaseException:
            traceback.print_exc()  # into log.txt, which the failure message names
            raise
    return {k: v for k, v in result.items() if k not in ("history", "config")}


def _train_in_worker(config: dict) -> dict:
    return train_one(config, fd_level=True)


# ---- the sweep ----------------------------------------------------------------------------------------------
def unique_runs(specs: list[RunSpec]) -> list[RunSpec]:
    """The distinct runs among ``specs`` (studies share runs), first occurrence first."""
    seen: dict[str, RunSpec] = {}
    for spec in specs:
        if spec.name in seen:
            if seen[spec.name].config != spec.config:
                raise ValueError(f"two different runs are both named {spec.name!r}")
            continue
        seen[spec.name] = spec
    return list(seen.values())


def _cost_rank(spec: RunSpec) -> tuple:
    """Sort key, most expensive first: fewer images per worker means more steps per epoch; BN's
    per-worker statistics cost more than GN's."""
    return (-spec.config["epochs"] * (spec.config.get("train_subset") or 60000) / spec.images_per_worker ** 0.5,
            spec.norm != "bn", spec.name)


def run_specs(specs: list[RunSpec], out: str | os.PathLike, *, jobs: int = 1, progress: bool = True,
              threads: int | None = None) -> list[dict]:
    """Train every run of ``specs`` that has no result.json yet (continuing from checkpoints), ``jobs``
    at a time; keep DIR/summary.csv current. Returns the summary rows of ``specs``.

    Raises RuntimeError naming the failed runs (and their log files) after the others finished."""
    from tqdm import tqdm

    out = Path(out)
    runs = unique_runs(specs)
    for spec in runs:
        if run_status(out, spec) == "done":
            _check_finished(out, spec)
    # Longest first (small batches cost the most per image), so the last runs do not leave a core idle.
    todo = sorted((s for s in runs if run_status(out, s) != "done"), key=_cost_rank)
    jobs = max(1, min(jobs, len(todo) or 1))
    threads = threads or threads_per_job(jobs)
    configs = {s.name: {**s.config, "out": str(out / s.name), "threads": threads, "resume": True,
                        "progress": False} for s in todo}
    write_summary(out)
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), unit="run", desc="runs", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    failures = []

    def finished(name: str, result: dict | None, error: BaseException | None) -> None:
        if error is not None:
            failures.append((name, error))
            bar.write(f"run {name} failed: {type(error).__name__}: {error} (log: {out / name / 'log.txt'})")
        else:
            bar.set_postfix_str(f"{name}: val {result['val_error']:.2f}%")
        write_summary(out)
        bar.update(1)

    try:
        if jobs == 1:
            for spec in todo:
                bar.set_postfix_str(f"training {spec.name}")
                try:
                    result, error = train_one(configs[spec.name]), None
                except Exception as exc:  # one bad run must not lose the others
                    result, error = None, exc
                finished(spec.name, result, error)
        else:
            _run_parallel(todo, configs, jobs, threads, finished)
    finally:
        bar.close()
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(runs)} runs failed: "
                           + "; ".join(f"{n} ({type(e).__name__}: {e})" for n, e in failures))
    return summary_rows(out, specs)


def _run_parallel(todo: list[RunSpec], configs: dict, jobs: int, threads: int, finished) -> None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    # spawn, not fork: forking a process that has started torch's thread pools is unsafe.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
        pending = {pool.submit(_train_in_worker, configs[s.name]): s.name for s in todo}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    name = pending.pop(future)
                    error = future.exception()
                    finished(name, None if error else future.result(), error)
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def run_study(study: str, preset: Preset | str = "quick", out: str | os.PathLike | None = None, *,
              jobs: int | None = None, seeds: int | None = None, dataset: str | None = None,
              data_dir: str | None = None, progress: bool = True) -> list[dict]:
    """Expand ``study`` ("all" for the five) under ``preset`` and run it into ``out``
    (default results/<study>-<preset>). jobs: parallel runs (default: the preset's, at most the cores)."""
    p = get_preset(preset)
    out = Path(out or f"results/{study}-{p.name}")
    specs = expand(study, p, seeds=seeds, dataset=dataset, data_dir=data_dir)
    studies = sorted({s.study for s in specs})
    if seeds is not None:
        p = dataclasses.replace(p, seeds=seeds, per_study={k: {**v, "seeds": seeds} for k, v in p.per_study.items()})
    if dataset is not None:
        p = dataclasses.replace(p, dataset=dataset)
    save_plan(out, studies, p, specs)
    jobs = jobs if jobs is not None else min(p.jobs, available_cores())
    start = time.perf_counter()
    rows = run_specs(specs, out, jobs=jobs, progress=progress)
    if progress:
        print(f"{len(unique_runs(specs))} runs in {out} ({time.perf_counter() - start:.0f} s this call); "
              f"summary: {out / 'summary.csv'}", file=sys.stderr)
    return rows
