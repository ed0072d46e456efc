"""The report from run directories: REPORT.md content, PNG figures, the paper's numbers side by side,
and the findings decided from the data.

The run directories here are TEST FIXTURES written by ``fake_study`` with made-up errors (a clear BN
degradation and a flat GN, or the opposite), never results of training.
"""
import dataclasses
import json
import math

import pytest

from groupnorm.studies import findings
from groupnorm.studies.report import make_report
from groupnorm.studies.files import StudyFileError
from groupnorm.studies.results import StudyData
from groupnorm.studies.runner import save_plan, unique_runs, write_summary
from groupnorm.studies.specs import QUICK, STUDIES, expand

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PRESET = dataclasses.replace(QUICK, name="fixture", seeds=3, batch_sizes=(32, 16, 8, 4, 2), batch_renorm=True,
                             model="small_resnet", model_args={"depth": 8, "width": 32}, gn_groups=32,
                             gn_group_size=None, per_study={})


def paper_like(spec) -> float:
    """Made-up errors shaped like the paper's claims (fixture, not a result)."""
    n = spec.images_per_worker
    base = {"bn": 10.0 + {32: 0.0, 16: 0.1, 8: 0.6, 4: 2.0, 2: 6.0}.get(n, 0.0), "brn": 11.0,
            "gn": 10.4, "ln": 11.5, "in": 13.0, "gn+ws": 10.2, "none": 12.0}[spec.norm]
    if spec.study == "groups":
        base = 10.4 if spec.groups == 32 or spec.group_size == 16 else 10.8
    return base + 0.1 * (spec.seed - 1) + _jitter(spec)


def _jitter(spec) -> float:
    """A small run-specific part, so that seed-paired differences have a non-zero spread; 0 for GN
    (so that the GN and BN means stay the round numbers the tables are checked against)."""
    if spec.norm == "gn":
        return 0.0
    return 0.04 * {0: -1, 1: 2, 2: -1}[spec.seed]


def bn_flat(spec) -> float:
    """Made-up errors where nothing the paper claims holds (fixture)."""
    return {"bn": 10.0, "gn": 12.0 + (2.0 if spec.images_per_worker == 2 else 0.0), "ln": 11.0, "in": 11.0,
            "gn+ws": 12.0, "brn": 10.0, "none": 12.0}[spec.norm] + 0.5 * spec.seed


def fake_study(out, error, stable_gn=True):
    """Write plan.json, run directories (result.json, metrics.jsonl, probe.jsonl) and summary.csv."""
    specs = expand("all", PRESET)
    save_plan(out, list(STUDIES), PRESET, specs)
    for spec in unique_runs(specs):
        d = out / spec.name
        d.mkdir(parents=True)
        final = error(spec)
        history = [{"epoch": e, "train_error": final + 3 - e, "val_error": final + 2.0 / e, "train_loss": 1.0 / e,
                    "lr": 0.1, "seconds": 1.0, "images_per_s": 100.0} for e in (1, 2, 3)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        diagnostics = {"train_error": final - 2}
        if spec.norm == "bn":   # made-up diagnostics: running stats cost 1 point over precise ones
            diagnostics.update(val_error_running=final + 0.5, val_error_precise=final - 0.5,
                               val_error_batch=final + 2.0, train_error_precise=final - 2.5)
        (d / "result.json").write_text(json.dumps({"val_error": final, "train_error": final - 1, "epochs": 3,
                                                   "seconds": 3.0, "config": spec.config,
                                                   "diagnostics": diagnostics}))
        if spec.config["probe"]:
            grow = spec.norm == "none" or (spec.norm == "gn" and not stable_gn)
            records = [{"epoch": i // 10, "step": i % 10, "iteration": i,
                        "p1": -(1 + (i if grow else 0.01 * math.sin(i))), "p20": -0.5, "p80": 0.5,
                        "p99": 1 + (i if grow else 0.0)} for i in range(0, 40)]
            (d / "probe.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_summary(out)
    return specs


@pytest.fixture(scope="module")
def paper_like_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper_like")
    fake_study(out, paper_like)
    return out, make_report(out).read_text()


def test_report_files(paper_like_report):
    out, text = paper_like_report
    for name in ("fig1_batch_error.png", "fig5_batch_curves.png", "fig4_norm_curves.png", "fig6_percentiles.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in text
    for heading in ("## Findings", "## Batch size (Table 2", "## Normalization methods", "## Group division (Table 3)",
                    "## Feature distributions (Figure 6)", "## A deeper ResNet"):
        assert heading in text


def test_tables_put_the_paper_beside_the_data(paper_like_report):
    _, text = paper_like_report
    # Table 2 row at 2 images per worker: BN, GN (mean ± seed spread), BN − GN seed by seed (mean ± SE),
    # and the paper's 34.7 / 24.1. BN at 2: 15.86, 16.08, 16.06; BN − GN: 5.56, 5.68, 5.56
    assert "| 2 | 16.00 ± 0.12 | 10.40 ± 0.10 | +5.60 ± 0.04 | 34.7 | 24.1 | +10.6 |" in text
    # BN's diagnostics at 2 beside GN's and the paper's
    assert "| 2 | 16.00 | 16.50 | 15.50 | 18.00 | 14.00 | 13.50 | 10.40 | 8.40 | 34.7 | 24.1 |" in text
    assert "| BR | 11.00 ± 0.12 | 26.3 |" in text                      # Batch Renorm at 4
    assert "| IN | 13.00 ± 0.12 | 12.00 | 28.4 |" in text               # Table 1
    assert "| 32 | 10.40 ± 0.10 | +0.00 | 24.1 | +0.0 |" in text         # Table 3, G = 32
    assert "| 64 | — |" in text and "G = 64 left out" in text             # clipped: width 32 has no G = 64
    assert "| 2 | 16.00 ± 0.12 | 10.40 ± 0.10 | +5.60 ± 0.04 | 31.9 | 23.0 |" in text   # depth vs ResNet-101


def test_findings_reproduced_with_numbers(paper_like_report):
    _, text = paper_like_report
    lines = [line for line in text.splitlines() if line.startswith("- *")]
    assert len(lines) == 7
    assert all("**reproduced**" in line for line in lines), lines
    assert "seed-paired GN − BN = +0.40 (sd 0.07, n = 3, SE 0.04, 10.0 SE)" in lines[0]
    assert "Seed-paired BN − GN at 2: +5.60 (sd 0.07, n = 3, SE 0.04, 140.0 SE)" in lines[1]
    assert "GN(2) − GN(32) = +0.00" in lines[2]


def test_criteria_come_before_the_numbers(paper_like_report):
    _, text = paper_like_report
    criteria = text.index("## Criteria")
    assert criteria < text.index("## Findings") < text.index("## Batch size")
    block = text[criteria:text.index("## Findings")]
    for constant in (findings.GAP, findings.FLAT, findings.CLOSE, findings.NEAR_BEST):
        assert f"{constant:.1f} points" in block
    assert f"{findings.MIN_SE:.0f} standard errors" in block


def test_findings_not_reproduced(tmp_path):
    fake_study(tmp_path, bn_flat, stable_gn=False)
    data = StudyData(tmp_path)
    verdicts = [f.reproduced for f in findings.all_findings(data)]
    # close, degrades, flat, LN/IN, groups, Figure 6, depth
    assert verdicts == [False, False, False, False, True, False, False]
    assert "**not reproduced**" in make_report(tmp_path).read_text()


def _batch_dir(tmp_path, error, seeds=3):
    """A batch study at 32 and 2 images per worker with made-up errors ``error(norm, n, seed)``."""
    preset = dataclasses.replace(PRESET, batch_sizes=(32, 2), batch_renorm=False, seeds=seeds)
    specs = expand("batch", preset)
    save_plan(tmp_path, ["batch"], preset, specs)
    for spec in specs:
        (tmp_path / spec.name).mkdir()
        (tmp_path / spec.name / "result.json").write_text(json.dumps(
            {"val_error": error(spec.norm, spec.images_per_worker, spec.seed), "train_error": 5.0, "epochs": 3,
             "seconds": 1.0, "config": spec.config}))
    write_summary(tmp_path)
    return StudyData(tmp_path)


def test_pairing_sees_through_a_seed_effect(tmp_path):
    """Seeds 1 point apart in every setting (a shared data order and initialization), BN 1.2 points
    worse than GN at 2 images per worker in each seed: unpaired spreads of 1.0 would hide it, the
    per-seed differences do not."""
    data = _batch_dir(tmp_path, lambda norm, n, seed: 12.0 + seed + (1.2 + 0.05 * seed if (norm, n) == ("bn", 2)
                                                                      else 0.0))
    degrades, flat = findings.bn_degrades(data), findings.gn_flat(data)
    assert degrades.reproduced and flat.reproduced, (degrades.text, flat.text)
    assert "+1.25 (sd 0.05, n = 3, SE 0.03, 43.3 SE)" in degrades.text


@pytest.mark.parametrize("gap, noise, verdict", [
    (0.9, 0.05, False),    # clear, but under 1.0 point
    (1.3, 1.0, False),     # 1.3 points, but the seeds disagree: under 3 standard errors
    (1.3, 0.05, True),
])
def test_bn_degrades_needs_one_point_and_three_standard_errors(tmp_path, gap, noise, verdict):
    wobble = {0: 0.0, 1: noise, 2: -noise}
    data = _batch_dir(tmp_path, lambda norm, n, seed: 12.0 + (gap + wobble[seed] if (norm, n) == ("bn", 2) else 0.0))
    assert findings.bn_degrades(data).reproduced is verdict


def test_gn_flat_needs_under_half_a_point(tmp_path):
    data = _batch_dir(tmp_path, lambda norm, n, seed: 12.0 + (0.6 if (norm, n) == ("gn", 2) else 0.0))
    assert findings.gn_flat(data).reproduced is False
    assert "GN(2) − GN(32) = +0.60" in findings.gn_flat(data).text


def test_one_seed_is_not_tested(tmp_path):
    data = _batch_dir(tmp_path, lambda norm, n, seed: 12.0 + (3.0 if (norm, n) == ("bn", 2) else 0.0), seeds=1)
    assert findings.bn_degrades(data).reproduced is None


def test_report_of_a_partial_directory(tmp_path):
    specs = expand("batch", dataclasses.replace(PRESET, batch_sizes=(32, 2), batch_renorm=False))
    save_plan(tmp_path, ["batch"], PRESET, specs)
    for spec in specs[:2]:  # only the first two runs finished
        (tmp_path / spec.name).mkdir()
        (tmp_path / spec.name / "result.json").write_text(json.dumps(
            {"val_error": 10.0, "train_error": 9.0, "epochs": 3, "seconds": 1.0, "config": spec.config}))
    write_summary(tmp_path)
    text = make_report(tmp_path).read_text()
    assert "**not tested**" in text and "## Batch size" in text


def test_report_needs_a_summary(tmp_path):
    with pytest.raises(StudyFileError, match="no summary.csv"):
        make_report(tmp_path)


def test_report_command(paper_like_report, capsys):
    from groupnorm.cli import main

    out, _ = paper_like_report
    assert main(["report", str(out)]) == 0
    assert str(out / "REPORT.md") in capsys.readouterr().out
    assert main(["report", str(out / "missing")]) == 1
