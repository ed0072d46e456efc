"""The paper's studies: sweeps of training runs (specs, runner) and their report (tables + PNG figures).

    groupnorm study batch --preset quick --out results/batch-quick    # BN vs GN at 32 and 2 images/worker
    groupnorm report results/batch-quick                             # REPORT.md + figures

    from groupnorm.studies import expand, run_study, make_report
"""
from .runner import run_specs, run_study, write_summary
from .specs import PRESETS, STUDIES, Preset, RunSpec, expand


def make_report(out):
    """Write DIR/REPORT.md and its figures (see ``groupnorm.studies.report``)."""
    from .report import make_report as _make

    return _make(out)


__all__ = ["Preset", "RunSpec", "PRESETS", "STUDIES", "expand", "run_specs", "run_study", "write_summary",
           "make_report"]
