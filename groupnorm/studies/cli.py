"""The `study` and `report` commands; groupnorm.cli adds them with ``register(subparsers)``.

    groupnorm study batch --preset quick --out results/batch-quick [--jobs 2] [--seeds 3]
    groupnorm report results/batch-quick
"""
from __future__ import annotations

import argparse
import sys

from .specs import PRESETS, STUDIES


def register(subparsers) -> None:
    """Add the ``study`` and ``report`` sub-commands to an argparse ``subparsers`` object. Each sets
    ``func`` (called with the parsed args, returns an exit code)."""
    p = subparsers.add_parser(
        "study", help="run one of the paper's studies (a sweep of training runs)",
        description="Run a study: its training runs (skipping finished ones, resuming interrupted ones), "
                    "then DIR/summary.csv. Studies: batch (BN vs GN over images per worker, + Batch Renorm), "
                    "norms (BN, LN, IN, GN, GN+WS), groups (GN's G and channels per group), features "
                    "(VGG-16 percentiles), depth (a deeper ResNet), all (the five).")
    p.add_argument("name", choices=STUDIES + ("all",), help="which study")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="quick: ~8 minutes (the README's first command); "
                        "full: all five studies, ~80 minutes on 2 cores")
    p.add_argument("--out", default=None, help="study directory (default results/NAME-PRESET)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs trained in parallel processes, the cores shared among them (default: the preset's)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per setting (default: the preset's)")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: the dataset's usual place)")
    p.add_argument("--dataset", default=None, choices=("fashion-mnist", "cifar10", "cifar100"),
                   help="dataset (default: the preset's, fashion-mnist)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=study_command)

    r = subparsers.add_parser("report", help="write DIR/REPORT.md and its figures from a study directory",
                              description="Tables beside the paper's numbers, figures (PNG) and a verdict on "
                                          "each of the paper's findings, from DIR/summary.csv and the runs.")
    r.add_argument("dir", help="study directory (written by `groupnorm study`)")
    r.set_defaults(func=report_command)


def study_command(args: argparse.Namespace) -> int:
    from .runner import run_study

    if args.jobs is not None and args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    if args.seeds is not None and args.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
    out = args.out or f"results/{args.name}-{args.preset}"
    try:
        run_study(args.name, args.preset, out, jobs=args.jobs, seeds=args.seeds, dataset=args.dataset,
                  data_dir=args.data_dir, progress=not args.no_progress)
    except (RuntimeError, ValueError) as exc:  # failed runs (the others are in summary.csv), or a clash
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"summary: {out}/summary.csv; next: groupnorm report {out}")
    return 0


def report_command(args: argparse.Namespace) -> int:
    from .files import StudyFileError
    from .report import make_report

    try:
        path = make_report(args.dir)
    except (StudyFileError, FileNotFoundError) as exc:  # a missing or malformed study file, named
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"report: {path}")
    return 0


def main(argv=None) -> int:
    """Stand-alone entry (``python -m groupnorm.studies.cli``), for when groupnorm.cli is absent."""
    parser = argparse.ArgumentParser(prog="groupnorm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
