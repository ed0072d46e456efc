"""Command line: ``groupnorm train|eval|study|report`` (also ``python -m groupnorm``).

    groupnorm train --workers 8 --images-per-worker 2 --norm gn:8 --epochs 10 --out runs/gn-n2
    groupnorm train --config runs/gn-n2/config.yaml --resume
    groupnorm train norm=bn lr_steps=[0.5,0.75] model_args.width=32
    torchrun --nproc_per_node 8 -m groupnorm train --launcher torchrun --workers 8 ...
    groupnorm eval runs/gn-n2 --split val

Every training option is a field of ``groupnorm.train.Config``; its ``--flag`` and its help text are
generated from the field, so they cannot drift apart. Precedence: defaults < --config file <
key=value < --flags.

Errors: a ``groupnorm.errors.GroupnormError`` (a bad setting, data file, checkpoint or run directory,
a diverged training) or an OSError (a file the system refuses) is printed as one line,
``groupnorm COMMAND: error: MESSAGE``, with exit status 2 for a bad setting (ConfigError) and 1
otherwise. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import typing

def _type_name(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union,) or type(tp).__name__ == "UnionType":
        return _type_name(args[0])
    if typing.get_origin(tp) is list or tp is list:
        return "LIST"
    if typing.get_origin(tp) is dict or tp is dict:
        return "MAP"
    return {int: "INT", float: "FLOAT", str: "STR", bool: "BOOL"}.get(tp, "VALUE")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per Config field, help text from the field's documentation."""
    from groupnorm.train.config import field_docs
    group = parser.add_argument_group("training options (also accepted as key=value; see groupnorm.train.Config)")
    for name, doc in field_docs().items():
        flag = "--" + name.replace("_", "-")
        default = doc["default"]
        text = doc["help"] + (f" [choices: {', '.join(doc['choices'])}]" if doc["choices"] else "")
        text = (text + f" (default: {default!r})").replace("%", "%%")  # argparse formats help with %
        if doc["type"] in (bool, typing.Optional[bool]):
            group.add_argument(flag, dest=f"cfg_{name}", action=argparse.BooleanOptionalAction,
                               default=None, help=text)
        else:
            group.add_argument(flag, dest=f"cfg_{name}", metavar=_type_name(doc["type"]), default=None,
                               help=text)


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train one model (the paper's recipe, W workers of N images)",
        description="Train one model in a run directory (config.yaml, metrics.jsonl, checkpoint.pt, "
                    "result.json). Options come from a --config file, key=value pairs and --flags, in "
                    "increasing precedence. Under torchrun every rank runs this same command.",
        epilog="key=value values are read as YAML: lr_steps=[0.5,0.75], model_args={width: 32}, "
               "norm_weight_decay=none, sync_bn=true; model_args.width=32 sets one entry of a mapping.")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="set a Config field, e.g. epochs=20")
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of Config fields (e.g. a run's config.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config as YAML and exit")
    _add_config_flags(p)
    p.set_defaults(func=cmd_train)


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a run's checkpoint",
                       description="Error (%%) and loss of a run directory's checkpoint on a split, with "
                                   "the run's own data settings (subsets included).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `groupnorm train`")
    p.add_argument("--split", choices=("val", "train"), default="val", help="which split (default: val)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:K (default: auto)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="evaluation batch size, >= 1 (default: the run's)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="groupnorm", description="Group Normalization (Wu & He, 2018): training, evaluation, the "
                                      "paper's studies and their report.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _train_parser(sub)
    _eval_parser(sub)
    try:
        studies_cli = importlib.import_module("groupnorm.studies.cli")
    except ModuleNotFoundError as exc:  # the studies are optional; any other import error is a bug
        if exc.name not in ("groupnorm.studies", "groupnorm.studies.cli"):
            raise
    else:
        studies_cli.register(sub)
    return parser


def resolve_config(args):
    """The Config of ``groupnorm train`` arguments: defaults < --config < key=value < --flags."""
    from groupnorm.train import Config
    cfg = Config.load(args.config) if args.config else Config()
    flags = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    cfg = cfg.override(*args.overrides)
    return Config(**{**cfg.to_dict(), **flags})


def cmd_train(args) -> int:
    from groupnorm.train import run
    cfg = resolve_config(args)
    if args.dry_run:
        import yaml
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    result = run(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        print(json.dumps({k: v for k, v in result.items() if k not in ("history", "config")}, indent=2))
    return 0


def cmd_eval(args) -> int:
    from groupnorm.train import evaluate
    result = evaluate(args.run_dir, split=args.split, device=args.device, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['run_dir']}: {result['split']} error {result['error']:.2f}% "
              f"(loss {result['loss']:.4f}, {result['images']} images, epoch {result['epoch']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value pairs given after --flags land here
        if args.command == "train" and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from groupnorm.errors import ConfigError, GroupnormError
    try:
        return int(args.func(args) or 0)
    except (GroupnormError, OSError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"groupnorm {args.command}: error: {message}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
