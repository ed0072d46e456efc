"""The training configuration: one dataclass, YAML/JSON round trip, ``key=value`` overrides.

Every field carries its documentation in ``metadata["help"]``; the CLI builds its ``--help`` and its
``--flags`` from it, so the two cannot drift. ``metadata["same_results"]`` marks the keys that do not
change a run's numbers (where it is written, how fast, what is logged besides): the one list that
resuming a run (engine) and reusing a finished run in a study (studies.runner) both read, through
``result_neutral_keys()``. Values are coerced to the field's type wherever they
come from (a YAML file, a ``key=value`` string, Python code), and checked: a typo in a key gives an
error that lists the valid keys and the closest match.

The defaults are the paper's recipe (Sec. 4.1): 8 workers, 32 images per worker, SGD with momentum
0.9, weight decay 1e-4 on every weight *including* gamma and beta, lr = 0.1 * N / 32, decay x0.1 at
30%, 60% and 90% of the epochs; the run's error is the median of the last 5 epochs.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from groupnorm.errors import ConfigError

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder")
LAUNCHERS = ("simulated", "torchrun")
RUNNING_STATS = ("worker0", "average")   # groupnorm.functional.RUNNING_STATS
BACKENDS = ("auto", "native", "cpu", "triton")
SEED_LIMIT = 2 ** 32  # numpy's legacy seeding (np.random.seed) takes [0, 2**32)


def _f(default, help: str, choices: tuple | None = None, same_results: bool = False):
    """A dataclass field with its documentation, allowed values and whether it leaves the run's
    numbers unchanged (``same_results``) in the metadata."""
    meta = {"help": help, "choices": choices, "same_results": same_results}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    """One training run. See each field's help (``groupnorm train --help``)."""

    # data
    dataset: str = _f("fashion-mnist", "dataset to train on", DATASETS)
    data_dir: Optional[str] = _f(None, "folder holding the dataset (None: the dataset's default place, "
                                       "e.g. /usr/share/datasets/fashion-mnist)", same_results=True)
    train_subset: Optional[int] = _f(None, "train on this many images (class-balanced, chosen with "
                                           "subset_seed); None: all")
    val_subset: Optional[int] = _f(None, "validate on this many images (class-balanced); None: all")
    subset_seed: int = _f(0, "seed that picks the subsets (fixed apart from `seed`, so that runs with "
                             "different seeds see the same images)")
    augment: bool = _f(True, "random crop with padding + horizontal flip (small datasets); random resized "
                             "crop + flip (imagefolder)")
    image_size: int = _f(224, "imagefolder only: training crop and validation center-crop size")
    loader_workers: int = _f(4, "imagefolder only: DataLoader processes per worker/rank", same_results=True)
    # model
    model: str = _f("resnet20", "model name (groupnorm.models.list_models())")
    model_args: dict = _f({}, "extra keyword arguments for build_model, e.g. {width: 8}")
    norm: str = _f("gn:8", "normalization spec for make_norm: bn, brn, gn:G (G groups), gn/K (K channels "
                           "per group), ln, in, none. Default G = 8 because resnet20's 16-channel layers "
                           "cannot be split into the paper's 32 groups (gn = gn:32 for wider models)")
    ws: bool = _f(False, "weight-standardized convolutions")
    zero_init_residual: bool = _f(True, "gamma = 0 for the last normalization of each residual block")
    backend: str = _f("auto", "GroupNorm backend (groupnorm.backends)", BACKENDS, same_results=True)
    # workers
    workers: int = _f(8, "number of workers W (the paper uses 8)")
    images_per_worker: int = _f(32, "images per worker N; the global batch is W*N; BN statistics are "
                                    "computed over each worker's N images")
    launcher: str = _f("simulated", "simulated: all W workers in one process (BN per chunk of N); "
                                    "torchrun: W processes with DistributedDataParallel", LAUNCHERS,
                       same_results=True)
    sync_bn: bool = _f(False, "synchronize BN statistics across workers (BN over the whole W*N batch)")
    bn_running_stats: str = _f("worker0", "where BN's running (eval-time) statistics come from when not "
                                          "synchronized: worker0 (worker / rank 0's, broadcast to the "
                                          "others, as the paper's trainer and DDP do) or average (the "
                                          "average over the workers: W times less noisy; changes results)",
                               RUNNING_STATS)
    # recipe
    epochs: int = _f(10, "number of epochs (the paper: 100 on ImageNet)")
    base_lr: float = _f(0.1, "learning rate for 32 images per worker; lr = base_lr * images_per_worker / 32")
    lr_steps: list[float] = _f([0.3, 0.6, 0.9], "epochs (as fractions of `epochs`) at which lr is "
                                               "multiplied by lr_decay")
    lr_decay: float = _f(0.1, "learning-rate decay factor at each step")
    warmup_epochs: float = _f(0.0, "linear learning-rate warm-up from 0 over this many epochs (per iteration)")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(1e-4, "weight decay of conv and linear weights")
    norm_weight_decay: Optional[float] = _f(None, "weight decay of gamma and beta; None: same as "
                                                  "weight_decay (the paper)")
    seed: int = _f(0, "random seed (initialization, data order, augmentation)")
    # run
    out: str = _f("runs/train", "run directory (config.yaml, metrics.jsonl, checkpoint.pt, result.json)",
                  same_results=True)
    resume: bool = _f(False, "continue the run in `out` from its checkpoint (starts fresh if there is none)",
                      same_results=True)
    overwrite: bool = _f(False, "start a fresh run in `out` even when it holds another run's files (result.json, "
                                "metrics.jsonl, checkpoint.pt): they are deleted first", same_results=True)
    device: str = _f("auto", "auto (cuda when available), cpu, cuda or cuda:K", same_results=True)
    threads: Optional[int] = _f(None, "torch threads per process; None: all cores (divided among "
                                      "torchrun ranks)", same_results=True)
    eval_batch_size: int = _f(500, "batch size for evaluation", same_results=True)
    progress: Optional[bool] = _f(None, "progress bars; None: only when stderr is a terminal", same_results=True)
    tensorboard: bool = _f(False, "also log scalars to TensorBoard (out/tensorboard) when installed",
                           same_results=True)
    probe: Optional[str] = _f(None, "module path (as in model.named_modules()) whose output percentiles "
                                    "{1,20,80,99} are recorded into probe.jsonl", same_results=True)
    probe_every: int = _f(10, "record the probe every this many iterations", same_results=True)

    def __post_init__(self):
        hints = _hints()
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name), hints[f.name]))
        self.validate()

    # ---- checks ---------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the field and value when a value is out of range."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"{f.name}={value!r} is not one of {', '.join(choices)}")
        positive = ("workers", "images_per_worker", "epochs", "probe_every", "eval_batch_size",
                    "image_size", "train_subset", "val_subset", "threads")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        for name in ("base_lr", "lr_decay", "weight_decay", "norm_weight_decay", "warmup_epochs",
                     "momentum"):  # YAML's .nan / .inf, or --base-lr nan, would train to NaN
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value}")
        for name in ("base_lr", "lr_decay"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "norm_weight_decay", "warmup_epochs", "loader_workers"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        for name in ("seed", "subset_seed"):
            if not 0 <= getattr(self, name) < SEED_LIMIT:
                raise ConfigError(f"{name} must be in [0, 2**32), got {getattr(self, name)}")
        if any(not 0 < s <= 1 for s in self.lr_steps) or list(self.lr_steps) != sorted(self.lr_steps):
            raise ConfigError(f"lr_steps must be increasing fractions of the epochs in (0, 1], got {self.lr_steps}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device={self.device!r} is not one of auto, cpu, cuda, cuda:K")
        if self.resume and self.overwrite:
            raise ConfigError("resume=True continues the run in `out`, overwrite=True deletes it: set one of them")
        self._check_model_and_norm()

    def _check_model_and_norm(self) -> None:
        from groupnorm.models import list_models
        from groupnorm.nn import NormSpec
        if self.model.lower() not in list_models():
            raise ConfigError(f"model={self.model!r} is not one of {', '.join(list_models())}")
        try:
            NormSpec.parse(self.norm)  # the one parser of norm specs; the engine reads it the same way
        except ValueError as exc:
            raise ConfigError(f"norm={self.norm!r}: {exc}") from None

    # ---- derived values -------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        """Images per optimizer step over all workers: W * N."""
        return self.workers * self.images_per_worker

    @property
    def lr(self) -> float:
        """The paper's linear scaling rule: base_lr * N / 32 for N images per worker."""
        return self.base_lr * self.images_per_worker / 32

    # ---- I/O ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        check_keys(values)
        return cls(**values)

    def dump(self, path: str | os.PathLike) -> None:
        """Write the config to ``path``: JSON when it ends in .json, YAML otherwise."""
        path = Path(path)
        text = (json.dumps(self.to_dict(), indent=2) + "\n" if path.suffix == ".json"
                else yaml.safe_dump(self.to_dict(), sort_keys=False))
        path.write_text(text)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Config":
        """Read a config written by ``dump`` (or by hand); missing keys take their defaults."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                              f"{exc}") from None
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values, got "
                              f"{type(values).__name__}")
        try:
            return cls.from_dict(values)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def override(self, *assignments: str) -> "Config":
        """A copy with ``key=value`` strings applied (``model_args.width=8`` sets one dict entry)."""
        values = self.to_dict()
        for item in assignments:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            head, dot, sub = key.partition(".")
            check_keys({head: None})
            if dot:
                if not isinstance(values[head], dict):
                    raise ConfigError(f"{head} is not a mapping, so {key}= is not allowed")
                values[head] = dict(values[head], **{sub: _parse_scalar(raw)})
            else:
                values[key] = coerce(key, raw, _hints()[key])
        return Config(**values)


def field_docs() -> dict[str, dict]:
    """{name: {"help", "choices", "same_results", "default", "type"}} for every field, in order."""
    hints = _hints()
    out = {}
    for f in dataclasses.fields(Config):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        out[f.name] = {"help": f.metadata["help"], "choices": f.metadata["choices"],
                       "same_results": f.metadata["same_results"], "default": default, "type": hints[f.name]}
    return out


def result_neutral_keys() -> frozenset[str]:
    """The keys that do not change a run's numbers (``same_results=True`` in their field): they may
    differ between a run and its resumption, or between a finished run and a study that reuses it."""
    return frozenset(f.name for f in dataclasses.fields(Config) if f.metadata["same_results"])


def check_keys(values: dict) -> None:
    """Raise ConfigError for a key that is not a field, with the closest match and the valid keys."""
    valid = [f.name for f in dataclasses.fields(Config)]
    for key in values:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(sorted(valid))}")


# ---- type coercion --------------------------------------------------------------------------------
_NONE = ("none", "null", "~", "")
_TRUE = ("true", "yes", "on", "1", "y")
_FALSE = ("false", "no", "off", "0", "n")


def _hints() -> dict:
    return typing.get_type_hints(Config)


def _parse_scalar(raw: Any) -> Any:
    """A command-line string as YAML would read it, plus numbers like 1e-4 that YAML 1.1 leaves as text."""
    if not isinstance(raw, str):
        return raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return value


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (maybe a string from the command line) to the field type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or isinstance(tp, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        return coerce(name, value, inner[0])
    bad = ConfigError(f"{name}={value!r} is not a valid {getattr(tp, '__name__', tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if tp is int:
        if isinstance(value, str):
            value = _parse_scalar(value)
        if isinstance(value, bool):
            raise bad
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        raise bad
    if tp is float:
        if isinstance(value, str):
            value = _parse_scalar(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if origin is list or tp is list:
        if isinstance(value, str):
            parsed = _parse_scalar(value)
            value = parsed if isinstance(parsed, list) else [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        item = args[0] if args else None
        return [coerce(f"{name}[{i}]", v, item) if item else v for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = _parse_scalar(value) if value.strip() else {}
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    return value
