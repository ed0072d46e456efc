"""The paper's studies as data: which training runs each study makes under each preset.

A study expands, under a ``Preset`` (dataset, subset, epochs, seeds, model sizes), into a list of
``RunSpec``: one training run each, with the ``groupnorm.train.Config`` fields it needs and the
labels its row in summary.csv carries. Nothing here trains; ``runner`` does.

    batch     BN vs GN at 32, 16, 8, 4, 2 images per worker, 8 workers (Table 2, Figures 1 and 5),
              plus Batch Renorm (r_max 1.5, d_max 0.5) at 4 images per worker
    norms     BN, LN, IN, GN, GN+WS at 32 images per worker (Table 1, Figure 4)
    groups    GN with G in {64..1} and {64..1} channels per group, clipped to the model (Table 3)
    features  VGG-16-style net without norm, with BN, with GN; percentiles of conv5_3 (Figure 6)
    depth     a deeper ResNet, BN and GN at 32 and 2 images per worker (the paper's ResNet-101)

Runs are named by what they train (model, norm, workers x images, seed), not by study, so a run two
studies share (GN at 32 is in batch, norms and groups) is trained once.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

STUDIES = ("batch", "norms", "groups", "features", "depth")
PAPER_GROUPS = (64, 32, 16, 8, 4, 2, 1)          # Table 3 top: number of groups G
PAPER_GROUP_SIZES = (64, 32, 16, 8, 4, 2, 1)     # Table 3 bottom: channels per group
PAPER_BATCHES = (32, 16, 8, 4, 2)                # Table 2: images per worker
BR_IMAGES_PER_WORKER = 4                         # the paper's Batch Renorm comparison
FEATURES_PROBE = "features.conv5_3"              # VGG-16's conv5_3: output before norm and ReLU


@dataclass(frozen=True)
class Preset:
    """Everything a study's runs share. ``gn_groups`` is the G of "GN" in every study but ``groups``
    (the paper's 32 where the model's narrowest layer allows it); ``gn_group_size``, when set, makes
    "GN" a fixed number of channels per group instead (the paper's other form, Table 3).
    ``per_study`` overrides fields for one study, e.g. ``{"features": {"epochs": 5}}``."""

    name: str
    dataset: str = "fashion-mnist"
    train_subset: int | None = None
    val_subset: int | None = None
    epochs: int = 10
    seeds: int = 3
    workers: int = 8
    model: str = "resnet20"
    model_args: dict = field(default_factory=dict)
    gn_groups: int = 32
    gn_group_size: int | None = None   # when set, "GN" is this many channels per group instead of G
    batch_sizes: tuple = PAPER_BATCHES
    batch_renorm: bool = True
    norms: tuple = ("bn", "ln", "in", "gn", "gn+ws")
    groups: tuple = PAPER_GROUPS
    group_sizes: tuple = PAPER_GROUP_SIZES
    deep_model: str = "resnet56"
    deep_model_args: dict = field(default_factory=dict)
    deep_batches: tuple = (32, 2)
    vgg_model: str = "vgg16"
    vgg_args: dict = field(default_factory=lambda: {"small_input": True})
    feature_norms: tuple = ("none", "bn", "gn")
    probe: str = FEATURES_PROBE
    probe_every: int = 10
    lr_steps: tuple = (0.3, 0.6, 0.9)
    augment: bool = True
    jobs: int = 2
    config: dict = field(default_factory=dict)   # further Config fields for every run
    per_study: dict = field(default_factory=dict)

    def for_study(self, study: str) -> "Preset":
        """This preset with the study's overrides applied."""
        return dataclasses.replace(self, **self.per_study.get(study, {}))


@dataclass(frozen=True)
class RunSpec:
    """One training run of a study. ``config`` holds the Config fields (the runner adds ``out``,
    ``threads`` and ``resume``); the other fields are the run's labels in summary.csv."""

    study: str
    name: str
    model: str
    norm: str
    groups: int | None
    group_size: int | None
    workers: int
    images_per_worker: int
    seed: int
    config: dict

    def row(self) -> dict:
        """The labels of this run as a summary.csv row (results are added by the runner)."""
        return {"study": self.study, "model": self.model, "norm": self.norm, "groups": self.groups,
                "group_size": self.group_size, "workers": self.workers,
                "images_per_worker": self.images_per_worker, "seed": self.seed}


# ---- presets --------------------------------------------------------------------------------------
# The models are the CIFAR-style ResNets with the ImageNet ResNets' 4x stem (stem_stride=4: 28x28 ->
# 7, 4, 2), so that the last stages are as small as ResNet-50's 7x7 stage 4 at 224 px: there per-worker
# BN statistics of 2 images are as noisy as in the paper, and at full resolution they were not (BN at
# 2 images per worker then matched GN; docs/STUDIES.md, tuning record). Where the shape changes the
# shortcut is a projection (conv1x1 + norm), as in the paper's ResNet-50. GN divides channels in
# groups of 4 (gn_group_size), which every width allows. BN's running statistics are worker 0's, as
# the paper's trainer keeps them. Both presets start every residual block's last gamma at 1
# (zero_init_residual=False) instead of the paper's 0: with so few iterations at 8 x 32 images the
# zero start left these narrow nets far from converged (and was no better in the search, docs/STUDIES.md).
# Everything else is the paper's recipe: lr 0.1 x N / 32, the same epochs for every N, the data
# reshuffled every epoch, BN statistics per worker, lr x 0.1 at 30 %, 60 % and 90 % of the epochs, the
# median of the last 5 epochs' validation errors.
_RESNET = {"depth": 8, "width": 8, "stem_stride": 4, "shortcut": "conv"}
# VGG-16 has no residual path: at the ResNets' lr 0.1 (for 256 images) its GN version diverged and
# the one without normalization stayed at chance; VGG's own recipe is lr 0.01 for 256 images, and at
# 0.02 both train (docs/STUDIES.md).
_CONFIG = {"zero_init_residual": False, "bn_running_stats": "worker0"}
_VGG_CONFIG = {**_CONFIG, "base_lr": 0.02}
_PAPER_STEPS = (0.3, 0.6, 0.9)

# quick: the README's first command, `study batch --preset quick`: 3 seeds of BN and GN at 32 and 2
# images per worker on 20k images, within 10 minutes on 2 cores, install included (docs/STUDIES.md).
QUICK = Preset(
    name="quick",
    train_subset=20000,
    val_subset=None,
    epochs=10,
    seeds=3,
    model="small_resnet",
    model_args=_RESNET,
    gn_group_size=4,
    batch_sizes=(32, 2),
    batch_renorm=False,
    deep_model="small_resnet",
    deep_model_args={**_RESNET, "depth": 20},
    vgg_args={"small_input": True, "width": 16},
    lr_steps=_PAPER_STEPS,
    augment=False,
    jobs=2,
    config=_CONFIG,
    per_study={"groups": {"model_args": {**_RESNET, "width": 32}, "epochs": 4, "seeds": 2},
               "features": {"seeds": 1, "epochs": 2, "train_subset": 4000, "val_subset": 1000,
                            "config": _VGG_CONFIG},
               "depth": {"seeds": 2}},
)

# full: all five studies within 2 hours on 2 cores (docs/STUDIES.md). The batch and norms studies
# train on all 60k images (the under-fitting regime: more images, the same 10 epochs); the groups
# study uses width 32, so that the paper's G = 32 and 16 channels per group exist in every layer, on
# 10k images, and the deeper ResNet 30k images, to fit the budget.
FULL = dataclasses.replace(
    QUICK,
    name="full",
    train_subset=None,
    seeds=3,
    batch_sizes=PAPER_BATCHES,
    batch_renorm=True,
    per_study={"groups": {"model_args": {**_RESNET, "width": 32}, "train_subset": 10000},
               "features": {"seeds": 2, "epochs": 6, "train_subset": 10000, "probe_every": 20,
                            "lr_steps": (0.7, 0.9), "config": _VGG_CONFIG},
               "depth": {"seeds": 2, "train_subset": 30000}},
)

PRESETS = {"quick": QUICK, "full": FULL}


# ---- naming ---------------------------------------------------------------------------------------
def model_label(model: str, model_args: dict) -> str:
    """"resnet20" plus its arguments, e.g. "resnet20-width32" (the summary's model column)."""
    parts = [model] + [f"{k}{_short(v)}" for k, v in sorted(model_args.items())]
    return "-".join(parts)


def _short(value) -> str:
    if isinstance(value, bool):
        return "" if value else "0"
    return str(value)


def run_name(model: str, norm: str, groups, group_size, workers: int, images_per_worker: int,
             seed: int) -> str:
    """A run directory name that depends only on what is trained, e.g. "resnet20-gn32-8x2-s0"."""
    tag = norm.replace("+", "-")
    if norm.startswith("gn"):
        tag = tag.replace("gn", f"gn{groups}" if group_size is None else f"gn-c{group_size}", 1)
    return f"{model}-{tag}-{workers}x{images_per_worker}-s{seed}"


def _spec(study: str, p: Preset, seed: int, *, norm: str, images_per_worker: int, model: str,
          model_args: dict, groups: int | None = None, group_size: int | None = None,
          probe: str | None = None) -> RunSpec:
    """One RunSpec. norm: "bn", "brn", "ln", "in", "none", "gn" or "gn+ws" (G or channels per group
    given by ``groups`` / ``group_size``)."""
    label = model_label(model, model_args)
    kind = norm.split("+")[0]
    if kind == "gn":
        norm_spec = f"gn/{group_size}" if group_size is not None else f"gn:{groups}"
    else:
        norm_spec = kind
    config = {
        "dataset": p.dataset, "train_subset": p.train_subset, "val_subset": p.val_subset,
        "model": model, "model_args": dict(model_args), "norm": norm_spec, "ws": norm.endswith("+ws"),
        "workers": p.workers, "images_per_worker": images_per_worker, "epochs": p.epochs,
        "lr_steps": list(p.lr_steps), "augment": p.augment, "seed": seed, "probe": probe,
        "probe_every": p.probe_every,
    }
    config.update(p.config)
    name = run_name(label, norm, groups, group_size, p.workers, images_per_worker, seed)
    return RunSpec(study, name, label, norm, groups, group_size, p.workers, images_per_worker, seed,
                   config)


# ---- the studies ----------------------------------------------------------------------------------
def _gn_division(p: Preset, norm: str) -> dict:
    """How "GN" (and "GN+WS") divides channels under ``p``: {groups: G} or {group_size: K}."""
    if not norm.startswith("gn"):
        return {}
    return {"group_size": p.gn_group_size} if p.gn_group_size else {"groups": p.gn_groups}


def batch_study(p: Preset) -> list[RunSpec]:
    """BN and GN at each of ``p.batch_sizes`` images per worker, plus BR at 4 (Table 2, BR)."""
    runs = []
    for seed in range(p.seeds):
        for n in p.batch_sizes:
            for norm in ("bn", "gn"):
                runs.append(_spec("batch", p, seed, norm=norm, images_per_worker=n, model=p.model,
                                  model_args=p.model_args, **_gn_division(p, norm)))
        if p.batch_renorm:
            runs.append(_spec("batch", p, seed, norm="brn", images_per_worker=BR_IMAGES_PER_WORKER,
                              model=p.model, model_args=p.model_args))
            if BR_IMAGES_PER_WORKER not in p.batch_sizes:  # the comparison needs BN and GN at 4 too
                for norm in ("bn", "gn"):
                    runs.append(_spec("batch", p, seed, norm=norm, images_per_worker=BR_IMAGES_PER_WORKER,
                                      model=p.model, model_args=p.model_args,
                                      **_gn_division(p, norm)))
    return runs


def norms_study(p: Preset) -> list[RunSpec]:
    """Each of ``p.norms`` at 32 images per worker (Table 1, Figure 4)."""
    return [_spec("norms", p, seed, norm=norm, images_per_worker=32, model=p.model,
                  model_args=p.model_args, **_gn_division(p, norm))
            for seed in range(p.seeds) for norm in p.norms]


def groups_study(p: Preset) -> list[RunSpec]:
    """GN at 32 images per worker with each valid G and each valid channels-per-group (Table 3)."""
    valid_g, valid_s, _ = group_choices(p)
    runs = []
    for seed in range(p.seeds):
        runs += [_spec("groups", p, seed, norm="gn", images_per_worker=32, model=p.model,
                       model_args=p.model_args, groups=g) for g in valid_g]
        runs += [_spec("groups", p, seed, norm="gn", images_per_worker=32, model=p.model,
                       model_args=p.model_args, group_size=s) for s in valid_s]
    return runs


def features_study(p: Preset) -> list[RunSpec]:
    """The VGG-16-style net without norm, with BN and with GN at 32 images per worker, probing
    conv5_3's output (Figure 6)."""
    division = _gn_division(p, "gn")
    if "groups" in division:   # the paper's G where the narrowest layer allows it
        division["groups"] = min(division["groups"], min(model_channels(p.vgg_model, p.vgg_args)))
    return [_spec("features", p, seed, norm=norm, images_per_worker=32, model=p.vgg_model,
                  model_args=p.vgg_args, probe=p.probe, **(division if norm == "gn" else {}))
            for seed in range(p.seeds) for norm in p.feature_norms]


def depth_study(p: Preset) -> list[RunSpec]:
    """The deeper ResNet, BN and GN at each of ``p.deep_batches`` images per worker."""
    return [_spec("depth", p, seed, norm=norm, images_per_worker=n, model=p.deep_model,
                  model_args=p.deep_model_args, **_gn_division(p, norm))
            for seed in range(p.seeds) for n in p.deep_batches for norm in ("bn", "gn")]


_EXPANDERS = {"batch": batch_study, "norms": norms_study, "groups": groups_study,
              "features": features_study, "depth": depth_study}


def expand(study: str, preset: Preset | str = "quick", *, seeds: int | None = None,
           dataset: str | None = None, data_dir: str | None = None) -> list[RunSpec]:
    """The runs of ``study`` ("all" for the five) under ``preset`` (a name or a Preset).

    seeds: number of seeds (0 .. seeds-1) instead of the preset's; dataset, data_dir: replace the
    preset's dataset / add a data folder to every run."""
    p = get_preset(preset)
    names = STUDIES if study == "all" else (study,)
    runs = []
    for name in names:
        if name not in _EXPANDERS:
            raise ValueError(f"unknown study {name!r}; choose one of {', '.join(STUDIES)} or 'all'")
        q = p.for_study(name)
        if seeds is not None:
            if seeds < 1:
                raise ValueError(f"seeds must be >= 1, got {seeds}")
            q = dataclasses.replace(q, seeds=seeds)
        if dataset is not None:
            q = dataclasses.replace(q, dataset=dataset)
        if data_dir is not None:
            q = dataclasses.replace(q, config={**q.config, "data_dir": data_dir})
        runs += _EXPANDERS[name](q)
    return runs


def get_preset(preset: Preset | str) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


# ---- what the model's widths allow ------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _channels(model: str, args: tuple) -> tuple:
    from torch import nn

    from groupnorm.models import build_model

    net = build_model(model, num_classes=10, in_channels=1, norm="none", **dict(args))
    return tuple(sorted({m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)}))


def model_channels(model: str, model_args: dict) -> tuple:
    """The distinct channel counts of the model's normalized layers (its convs' outputs), sorted."""
    return _channels(model, tuple(sorted(model_args.items())))


def group_choices(p: Preset) -> tuple[list[int], list[int], list[str]]:
    """(valid G, valid channels per group, notes on the clipped values): a value is valid when it
    divides the channel count of every normalized layer, as GN needs."""
    channels = model_channels(p.model, p.model_args)
    valid_g = [g for g in p.groups if all(c % g == 0 for c in channels)]
    valid_s = [s for s in p.group_sizes if all(c % s == 0 for c in channels)]
    notes = []
    label = model_label(p.model, p.model_args)
    dropped_g = [g for g in p.groups if g not in valid_g]
    dropped_s = [s for s in p.group_sizes if s not in valid_s]
    if dropped_g:
        notes.append(f"G = {', '.join(map(str, dropped_g))} left out: {label}'s layers have "
                     f"{', '.join(map(str, channels))} channels, which G must divide.")
    if dropped_s:
        notes.append(f"{', '.join(map(str, dropped_s))} channels per group left out: {label}'s layers "
                     f"have {', '.join(map(str, channels))} channels, which must be multiples of it.")
    return valid_g, valid_s, notes


def study_notes(study: str, preset: Preset | str) -> list[str]:
    """Notes the report prints for a study (the group values clipped away)."""
    p = get_preset(preset)
    if study in ("groups", "all"):
        return group_choices(p.for_study("groups"))[2]
    return []
