"""A tiny study run end to end through the real engine: summary.csv, skipping, resuming, parallel jobs."""
import csv
import dataclasses
import json

import pytest

from groupnorm.studies import runner
from groupnorm.studies.runner import SUMMARY_COLUMNS, read_summary, run_specs, save_plan, threads_per_job
from groupnorm.studies.specs import QUICK, expand

# A tiny model on a tiny subset: 2 workers x (4 | 2) images, one epoch of 32 images.
TINY = dataclasses.replace(QUICK, name="tiny", train_subset=32, val_subset=20, epochs=1, seeds=1, workers=2,
                           model="small_resnet", model_args={"depth": 8, "width": 4}, gn_groups=2, gn_group_size=None,
                           batch_sizes=(4, 2), batch_renorm=False, per_study={})


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    specs = expand("batch", TINY)
    save_plan(out, ["batch"], TINY, specs)
    rows = run_specs(specs, out, jobs=1, progress=False)
    return out, specs, rows


def test_summary_has_one_row_per_run(tiny_study):
    out, specs, rows = tiny_study
    assert len(rows) == len(specs) == 4
    with open(out / "summary.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == SUMMARY_COLUMNS
        lines = list(reader)
    assert len(lines) == 4
    parsed = read_summary(out)
    assert {(r["norm"], r["images_per_worker"]) for r in parsed} == {("bn", 4), ("bn", 2), ("gn", 4), ("gn", 2)}
    for r in parsed:
        assert r["study"] == "batch" and r["workers"] == 2 and r["epochs"] == 1 and r["seed"] == 0
        assert 0 <= r["val_error"] <= 100 and 0 <= r["train_error"] <= 100 and r["seconds"] > 0
        assert r["groups"] == (2 if r["norm"] == "gn" else None) and r["group_size"] is None
        run_dir = out / r["run"]
        assert (run_dir / "result.json").exists() and (run_dir / "metrics.jsonl").exists()
        assert (run_dir / "log.txt").read_text().strip()  # the engine's output went to the run's log


def test_finished_runs_are_skipped_and_interrupted_ones_resume(tiny_study, monkeypatch):
    out, specs, _ = tiny_study
    # "interrupt" one run: its checkpoint stays, its result is gone
    victim = specs[0].name
    (out / victim / "result.json").unlink()
    assert runner.run_status(out, specs[0]) == "partial"
    calls = []
    real = runner.train_one

    def counting(config, fd_level=False):
        calls.append(config)
        return real(config, fd_level)

    monkeypatch.setattr(runner, "train_one", counting)
    rows = run_specs(specs, out, jobs=1, progress=False)
    assert [c["out"] for c in calls] == [str(out / victim)] and calls[0]["resume"] is True
    assert "resumed" in (out / victim / "log.txt").read_text()  # continued from its checkpoint
    assert len(rows) == 4
    calls.clear()
    run_specs(specs, out, jobs=1, progress=False)
    assert calls == []  # everything finished: nothing trains


def test_a_finished_run_with_other_settings_is_refused(tiny_study):
    out, specs, _ = tiny_study
    changed = [dataclasses.replace(s, config={**s.config, "epochs": 2}) for s in specs]
    with pytest.raises(ValueError, match="trained with other settings.*epochs"):
        run_specs(changed, out, jobs=1, progress=False)


def test_a_failing_run_does_not_stop_the_others(tmp_path):
    specs = expand("batch", dataclasses.replace(TINY, batch_sizes=(2,)))
    bad = dataclasses.replace(specs[0], config={**specs[0].config, "model": "no_such_model"})
    with pytest.raises(RuntimeError, match="1 of 2 runs failed"):
        run_specs([bad, specs[1]], tmp_path, jobs=1, progress=False)
    assert (tmp_path / specs[1].name / "result.json").exists()
    assert "no_such_model" in (tmp_path / bad.name / "log.txt").read_text()


def test_parallel_jobs(tmp_path):
    specs = expand("batch", dataclasses.replace(TINY, batch_sizes=(2,)))
    save_plan(tmp_path, ["batch"], TINY, specs)
    rows = run_specs(specs, tmp_path, jobs=2, progress=False)
    assert len(rows) == 2
    for s in specs:
        cfg = json.loads((tmp_path / s.name / "result.json").read_text())["config"]
        assert cfg["threads"] == threads_per_job(2)


def test_threads_share_the_cores():
    assert threads_per_job(2, cores=2) == 1 and threads_per_job(1, cores=2) == 2
    assert threads_per_job(4, cores=2) == 1 and threads_per_job(2, cores=16) == 8


def test_study_command_passes_its_options(monkeypatch, tmp_path):
    from groupnorm.cli import main

    seen = {}
    monkeypatch.setattr(runner, "run_study", lambda *a, **k: seen.update(args=a, kwargs=k) or [])
    code = main(["study", "batch", "--preset", "quick", "--out", str(tmp_path), "--jobs", "2", "--seeds", "2",
                 "--data-dir", "/data", "--dataset", "fashion-mnist", "--no-progress"])
    assert code == 0
    assert seen["args"] == ("batch", "quick", str(tmp_path))
    assert seen["kwargs"] == {"jobs": 2, "seeds": 2, "dataset": "fashion-mnist", "data_dir": "/data",
                              "progress": False}
