"""Malformed study files are refused with one line naming the file (and line), never a traceback,
a partial row counted or a cell silently dropped (issue 15, items 7 and 12).

The study directories here are TEST FIXTURES with made-up errors, never results of training."""
import dataclasses
import json

import pytest

from groupnorm.cli import main
from groupnorm.studies.files import SUMMARY_COLUMNS, StudyFileError, read_summary
from groupnorm.studies.runner import run_specs, save_plan, summary_rows, write_summary
from groupnorm.studies.specs import QUICK, expand

PRESET = dataclasses.replace(QUICK, name="fixture", seeds=2, batch_sizes=(32, 2), batch_renorm=False,
                             model="small_resnet", model_args={"depth": 8, "width": 8}, per_study={})


@pytest.fixture
def study(tmp_path):
    """A finished batch study: plan.json, result.json and metrics.jsonl of 8 runs, summary.csv."""
    specs = expand("batch", PRESET)
    save_plan(tmp_path, ["batch"], PRESET, specs)
    for i, spec in enumerate(specs):
        d = tmp_path / spec.name
        d.mkdir()
        diagnostics = {"train_error": 7.0, "val_error_running": 12.5, "val_error_precise": 12.25,
                       "val_error_batch": 13.0, "train_error_precise": 6.75}
        (d / "result.json").write_text(json.dumps({"val_error": 12.0 + 0.1 * i, "train_error": 8.0, "epochs": 2,
                                                   "seconds": 1.5, "config": spec.config,
                                                   "diagnostics": diagnostics}))
        (d / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "val_error": 13.0, "train_error": 9.0})
                                                 + "\n" for e in (1, 2)))
    write_summary(tmp_path)
    return tmp_path, specs


def report_fails(out, capsys, *needles):
    """`groupnorm report out` exits non-zero with one line on stderr holding every needle."""
    code = main(["report", str(out)])
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_the_fixture_reports(study, capsys):
    out, _ = study
    assert main(["report", str(out)]) == 0
    assert len(read_summary(out)) == 8


def test_summary_cut_mid_row(study, capsys):
    out, _ = study
    path = out / "summary.csv"
    text = path.read_text()
    path.write_text(text[:text.rindex(",12.") + 3])   # the last row ends inside its val_error cell
    report_fails(out, capsys, str(path), "line 9", "cut")


def test_summary_cut_in_its_last_cell(study, capsys):
    """Every cell there, but the last one cut (no line end): the row's count would look right."""
    out, _ = study
    path = out / "summary.csv"
    path.write_text(path.read_text().rstrip("\r\n")[:-2])
    report_fails(out, capsys, str(path), "line 9", "ends mid-row")


@pytest.mark.parametrize("value, problem", [("-50", "not an error rate in [0, 100]"),
                                            ("1e9", "not an error rate in [0, 100]"),
                                            ("nan", "not a finite number"),
                                            ("12,5", "cells"),
                                            ("twelve", "not a number")])
def test_summary_impossible_values(study, capsys, value, problem):
    out, _ = study
    path = out / "summary.csv"
    lines = path.read_text().splitlines(keepends=True)
    cells = lines[3].split(",")
    cells[SUMMARY_COLUMNS.index("val_error")] = value
    lines[3] = ",".join(cells)
    path.write_text("".join(lines))
    report_fails(out, capsys, str(path), "line 4", problem)


@pytest.mark.parametrize("column, value, problem", [("seed", "-1", "seed -1 is below 0"),
                                                    ("images_per_worker", "2.5", "not an integer"),
                                                    ("seconds", "-3", "negative"),
                                                    ("norm", "xn", "unknown norm"),
                                                    ("study", "size", "unknown study"),
                                                    ("val_error_precise", "101", "not an error rate")])
def test_summary_other_bad_cells(study, capsys, column, value, problem):
    out, _ = study
    path = out / "summary.csv"
    lines = path.read_text().splitlines(keepends=True)
    cells = lines[2].rstrip("\r\n").split(",")
    cells[SUMMARY_COLUMNS.index(column)] = value
    lines[2] = ",".join(cells) + "\r\n"
    path.write_text("".join(lines))
    report_fails(out, capsys, str(path), "line 3", problem)


def test_summary_header_and_duplicates(study, capsys):
    out, _ = study
    path = out / "summary.csv"
    text = path.read_text()
    path.write_text(text.replace("val_error,", "val_err,", 1))
    report_fails(out, capsys, str(path), "line 1", "val_error")
    lines = text.splitlines(keepends=True)
    path.write_text("".join(lines + [lines[1]]))
    report_fails(out, capsys, str(path), "line 10", "listed twice")


def test_an_older_summary_without_the_diagnostics_columns_reads(study):
    out, _ = study
    path = out / "summary.csv"
    rows = [line.rstrip("\r\n").split(",")[:13] for line in path.read_text().splitlines()]
    path.write_text("".join(",".join(r) + "\r\n" for r in rows))
    assert all(r["val_error_precise"] is None and r["val_error"] >= 12 for r in read_summary(out))


@pytest.mark.parametrize("content, problem", [("{", "not valid JSON"), ("[1, 2]", "must hold a study plan"),
                                              ('{"presets": {}, "notes": {}}', "'runs' is missing"),
                                              ('{"presets": {}, "notes": {}, "runs": [{"name": 3}]}', "runs[0]")])
def test_malformed_plan(study, capsys, content, problem):
    out, _ = study
    (out / "plan.json").write_text(content)
    report_fails(out, capsys, str(out / "plan.json"), problem)


@pytest.mark.parametrize("content, problem", [("", "not valid JSON"), ('{"val_error": 12}', "has no 'train_error'"),
                                              ('{"val_error": -5, "train_error": 1, "epochs": 1, "seconds": 1}',
                                               "not an error rate"),
                                              ('{"val_error": NaN, "train_error": 1, "epochs": 1, "seconds": 1}',
                                               "not an error rate")])
def test_malformed_result(study, capsys, content, problem):
    out, specs = study
    path = out / specs[0].name / "result.json"
    path.write_text(content)
    with pytest.raises(StudyFileError, match=problem) as info:
        summary_rows(out)
    assert str(path) in str(info.value)
    # rerunning the study checks its finished runs first: refused before anything trains
    with pytest.raises(StudyFileError, match=problem):
        run_specs(specs, out, jobs=1, progress=False)


def test_study_command_prints_a_file_error_in_one_line(monkeypatch, tmp_path, capsys):
    from groupnorm.studies import runner

    def broken(*args, **kwargs):
        raise StudyFileError(f"{tmp_path / 'plan.json'} is not valid JSON")

    monkeypatch.setattr(runner, "run_study", broken)
    code = main(["study", "batch", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and str(tmp_path / "plan.json") in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_malformed_metrics(study, capsys):
    out, specs = study
    path = out / specs[1].name / "metrics.jsonl"
    path.write_text(path.read_text() + '{"epoch": 3, "val_er')
    report_fails(out, capsys, str(path), "line 3")
