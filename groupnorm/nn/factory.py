"""One string-keyed factory for every normalization layer, so that no model hard-codes BN.

    make_norm("gn", 64)                       GroupNorm(32, 64)
    make_norm("gn/16", 64)                    GroupNorm(group_size=16): 4 groups of 16 channels
    make_norm("bn@4", 64)                     BatchNorm(64, images_per_worker=4)
    make_norm(NormSpec("brn", images_per_worker=4), 64, r_max=1.5, d_max=0.5)

Kinds (case-insensitive): "bn", "syncbn", "brn", "gn", "ln", "in", "none" (nn.Identity).
"""

from __future__ import annotations

import dataclasses
import re

import torch

from .batch_norm import BatchNorm, BatchRenorm
from .group_norm import GroupNorm, InstanceNorm, LayerNorm

__all__ = ["KINDS", "NormSpec", "make_norm"]

KINDS = ("bn", "syncbn", "brn", "gn", "ln", "in", "none")

_COMMON = {"eps", "affine", "bias", "device", "dtype"}
_OPTIONS = {
    "bn": _COMMON | {"momentum", "images_per_worker", "track_running_stats"},
    "syncbn": _COMMON | {"momentum", "track_running_stats", "process_group"},
    "brn": _COMMON | {"momentum", "images_per_worker", "r_max", "d_max", "warmup_iters",
                      "hold_iters"},
    "gn": _COMMON | {"num_groups", "group_size", "activation"},
    "ln": _COMMON | {"activation"},
    "in": _COMMON | {"activation"},
    "none": None,  # any option is accepted and ignored
}

# "gn", "gn:32", "gn/16", "bn@4", "brn@4"
_SPEC_RE = re.compile(r"^\s*([a-zA-Z]+)\s*(?:(:|/|@)\s*(\d+))?\s*$")


def _kind(name) -> str:
    if not isinstance(name, str) or name.strip().lower() not in KINDS:
        raise ValueError(f"unknown normalization kind {name!r}; valid kinds: {', '.join(KINDS)} "
                         f"(as strings also 'gn:32' groups, 'gn/16' channels per group, "
                         f"'bn@4' images per worker)")
    return name.strip().lower()


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """A normalization choice: kind plus its one main hyper-parameter.

    kind: one of KINDS. num_groups: G for "gn" (default 32, ignored when group_size is set).
    group_size: channels per group for "gn". images_per_worker: per-worker statistics for "bn"/"brn".
    """

    kind: str
    num_groups: int = 32
    group_size: int | None = None
    images_per_worker: int | None = None

    def __post_init__(self):
        kind = _kind(self.kind)
        object.__setattr__(self, "kind", kind)
        for name in ("num_groups", "group_size", "images_per_worker"):
            value = getattr(self, name)
            if value is None and name != "num_groups":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"NormSpec: {name} must be an int >= 1, got {value!r}")
            if value < 1:
                raise ValueError(f"NormSpec: {name} must be >= 1, got {value}")
        if self.group_size is not None and kind != "gn":
            raise ValueError(f"NormSpec: group_size applies to 'gn' only, got kind {kind!r}")
        if self.images_per_worker is not None and kind not in ("bn", "brn"):
            raise ValueError(f"NormSpec: images_per_worker applies to 'bn' and 'brn' only, "
                             f"got kind {kind!r}")

    @classmethod
    def parse(cls, text: str, *, num_groups: int = 32, group_size: int | None = None) -> "NormSpec":
        """'gn', 'gn:32' (32 groups), 'gn/16' (16 channels per group), 'bn@4' (4 images per worker).

        The one reader of spec strings (models, the training engine and convert_norm all call it):
        case and spaces around the parts do not matter ("BN @ 4" is "bn@4"). A bare "gn" takes
        ``num_groups`` (or ``group_size`` when given) as its G; a number in the text wins.
        """
        match = _SPEC_RE.match(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"cannot parse normalization spec {text!r}; expected KIND, 'gn:G', "
                             f"'gn/CHANNELS_PER_GROUP' or 'bn@IMAGES_PER_WORKER' with KIND in "
                             f"{', '.join(KINDS)}")
        kind, sep, number = _kind(match.group(1)), match.group(2), match.group(3)
        if sep is None:
            if kind == "gn":
                return cls(kind, num_groups=num_groups, group_size=group_size)
            return cls(kind)
        value = int(number)
        if sep in ":/" and kind != "gn":
            raise ValueError(f"spec {text!r}: '{sep}' applies to 'gn' only")
        if sep == "@" and kind not in ("bn", "brn"):
            raise ValueError(f"spec {text!r}: '@' applies to 'bn' and 'brn' only")
        if sep == ":":
            return cls(kind, num_groups=value)
        if sep == "/":
            return cls(kind, group_size=value)
        return cls(kind, images_per_worker=value)

    def __str__(self) -> str:
        if self.kind == "gn":
            return f"gn/{self.group_size}" if self.group_size is not None else f"gn:{self.num_groups}"
        if self.images_per_worker is not None:
            return f"{self.kind}@{self.images_per_worker}"
        return self.kind


def _as_spec(kind) -> NormSpec:
    if isinstance(kind, NormSpec):
        return kind
    if isinstance(kind, str):
        return NormSpec.parse(kind)
    raise TypeError(f"make_norm: kind must be a str or NormSpec, got {type(kind).__name__}")


def make_norm(kind, num_channels: int, **options) -> torch.nn.Module:
    """Normalization layer for ``num_channels`` channels.

    Args:
        kind: a kind name, a spec string ('gn:32', 'gn/16', 'bn@4') or a NormSpec.
        num_channels: C.
        options: eps, affine, bias, device, dtype for every kind; num_groups, group_size, activation (gn);
            activation (ln, in); momentum, images_per_worker, track_running_stats (bn);
            momentum, track_running_stats, process_group (syncbn); momentum, images_per_worker,
            r_max, d_max, warmup_iters, hold_iters (brn). An option set to None means "default";
            explicit options override the spec's fields. "none" ignores all options.
    """
    spec = _as_spec(kind)
    options = {k: v for k, v in options.items() if v is not None}
    allowed = _OPTIONS[spec.kind]
    if allowed is None:
        return torch.nn.Identity()
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"make_norm: option(s) {unknown} do not apply to kind {spec.kind!r}; "
                        f"valid options: {sorted(allowed)}")
    if spec.kind == "gn":
        if "num_groups" not in options and "group_size" not in options:
            if spec.group_size is not None:
                options["group_size"] = spec.group_size
            else:
                options["num_groups"] = spec.num_groups
        return GroupNorm(num_channels=num_channels, **options)
    if spec.kind == "ln":
        return LayerNorm(num_channels, **options)
    if spec.kind == "in":
        return InstanceNorm(num_channels, **options)
    if spec.kind in ("bn", "brn") and spec.images_per_worker is not None:
        options.setdefault("images_per_worker", spec.images_per_worker)
    if spec.kind == "bn":
        return BatchNorm(num_channels, **options)
    if spec.kind == "syncbn":
        return BatchNorm(num_channels, sync=True, **options)
    return BatchRenorm(num_channels, **options)
