"""Turn any model's batch norms into group norms (or another norm), and ours into stock torch layers.

    from groupnorm.convert import convert_norm
    report = convert_norm(model, to="gn", num_groups=32)   # in place
    print(report)                                           # what changed, and every adjustment

``convert_norm`` replaces every batch normalization layer — torch's BatchNorm1d/2d/3d and
SyncBatchNorm, torchvision's FrozenBatchNorm2d, and our BatchNorm / BatchRenorm — by the layer
``groupnorm.nn.make_norm`` builds for the target spec, copying gamma and beta (a FrozenBatchNorm2d's
``weight``/``bias`` buffers become trainable parameters), eps, the train/eval mode, device and
dtype. Running statistics are only carried over when the target is itself a batch norm; GN, LN and IN
have none. Convolutions are not touched, so a channels_last model stays channels_last.

GN needs C divisible by G. When it is not, the largest divisor of C not above G is used and the report
says so (e.g. C=24, G=32 -> G=24; C=40, G=32 -> G=20); ``strict=True`` raises instead.

A ``BatchNorm1d`` may normalize (N, C) features (after a Linear layer), where a group holds only its
C/G values of one sample: with C/G = 1 every output is beta, with C/G = 2 every value becomes -1 or
+1. Such a layer is broken, so a BatchNorm1d whose new groups would hold 2 channels or fewer (GN with
small groups, IN) is kept as it is, and listed in ``report.kept`` with the reason;
``allow_tiny_groups=True`` converts it anyway (for BatchNorm1d layers known to see (N, C, L) inputs).

``to_torch_native`` swaps our modules for stock ones (``torch.nn.GroupNorm`` + a separate activation,
``torch.nn.Conv2d`` with the standardized weight) so TorchScript, ``torch.export`` and ONNX see only
layers they know.
"""
from __future__ import annotations

import sys
from typing import NamedTuple

import torch
from torch import nn

import groupnorm.nn as gnn
from groupnorm.nn import NormSpec, make_norm


class Change(NamedTuple):
    """One replaced layer. groups: G of the new layer (GN, LN = 1, IN = C), None for batch norms."""
    path: str
    old_type: str
    new_type: str
    channels: int
    groups: int | None
    note: str = ""


class ConversionReport:
    """What ``convert_norm`` changed: a list of ``Change`` (path, old type, new type, C, G, note), and
    ``kept``: the batch norms left as they were, each with the reason in its note."""

    def __init__(self, changes: list[Change], target: str, kept: list[Change] = ()):
        self.changes = list(changes)
        self.target = target
        self.kept = list(kept)

    def __iter__(self):
        return iter(self.changes)

    def __len__(self) -> int:
        return len(self.changes)

    def __getitem__(self, i):
        return self.changes[i]

    @property
    def notes(self) -> list[Change]:
        """The changes that needed an adjustment or deserve attention."""
        return [c for c in self.changes if c.note]

    def __str__(self) -> str:
        head = (f"convert_norm -> {self.target}: {len(self)} layer(s) replaced, "
                f"{len(self.notes)} with notes" + (f", {len(self.kept)} kept" if self.kept else ""))
        if not self.changes and not self.kept:
            return head
        rows = [("module", "old", "new", "C", "G", "note")]
        rows += [(c.path, c.old_type, new, str(c.channels), "-" if c.groups is None else str(c.groups),
                  c.note) for changes, kept in ((self.changes, False), (self.kept, True)) for c in changes
                 for new in ["(kept)" if kept else c.new_type]]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(5)) + ("  " + r[5] if r[5] else "")
                 for r in rows]
        return "\n".join([head, *(line.rstrip() for line in lines)])

    def __repr__(self) -> str:
        kept = f", kept={len(self.kept)}" if self.kept else ""
        return f"ConversionReport(target={self.target!r}, changes={len(self)}, notes={len(self.notes)}{kept})"


def batch_norm_types() -> tuple[type, ...]:
    """The layers ``convert_norm`` replaces. torchvision's FrozenBatchNorm2d is included only when
    torchvision is already imported: a model cannot hold one otherwise, and importing it is slow."""
    types = [nn.modules.batchnorm._BatchNorm]  # BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants
    types += [getattr(gnn, name) for name in ("BatchNorm", "BatchRenorm") if hasattr(gnn, name)]
    misc = sys.modules.get("torchvision.ops.misc")
    if misc is not None and hasattr(misc, "FrozenBatchNorm2d"):
        types.append(misc.FrozenBatchNorm2d)
    return tuple(types)


def largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of n that is <= limit (at least 1)."""
    for d in range(min(n, max(limit, 1)), 0, -1):
        if n % d == 0:
            return d
    return 1


def resolve_groups(channels: int, num_groups: int | None = 32, group_size: int | None = None, *,
                   strict: bool = False, where: str = "") -> tuple[int, str]:
    """G for a GN layer of ``channels`` channels, and a note ("" when nothing was adjusted).

    group_size (channels per group) wins over num_groups and asks for G = C / group_size. When C is not
    divisible as asked, G becomes the largest divisor of C not above the asked G (for group_size:
    not above C // group_size, so groups hold at least group_size channels); strict=True raises."""
    where = f"{where}: " if where else ""
    if group_size is not None:
        if group_size < 1:
            raise ValueError(f"{where}group_size must be >= 1, got {group_size}")
        if channels % group_size == 0:
            return channels // group_size, ""
        asked, what = max(channels // group_size, 1), f"group_size={group_size}"
    else:
        if num_groups is None or num_groups < 1:
            raise ValueError(f"{where}num_groups must be >= 1, got {num_groups}")
        if channels % num_groups == 0:
            return num_groups, ""
        asked, what = num_groups, f"G={num_groups}"
    groups = largest_divisor_at_most(channels, asked)
    if strict:
        raise ValueError(f"{where}C={channels} channels cannot be split by {what} (C % "
                         f"{group_size or num_groups} = {channels % (group_size or num_groups)}); "
                         f"use strict=False to fall back to G={groups}, or choose another G")
    note = f"C={channels} not divisible by {what}: using G={groups} ({channels // groups} channels/group)"
    return groups, note


def _target(to, num_groups, group_size) -> NormSpec:
    """The target as a NormSpec (read by NormSpec.parse, the one parser of spec strings). Groups
    written in ``to`` ("gn:16", "gn/16" or a NormSpec) win over the num_groups / group_size arguments."""
    if isinstance(to, NormSpec):
        return to
    if not isinstance(to, str):
        raise TypeError(f"convert_norm: to must be a norm spec string or a NormSpec, got {type(to).__name__}")
    return NormSpec.parse(to, num_groups=num_groups, group_size=group_size)


# BatchNorm1d (and its lazy form, before it becomes one) accepts (N, C) features.
_FEATURE_NORMS = (nn.BatchNorm1d, nn.LazyBatchNorm1d)
TINY_GROUP = 2  # channels per group at or below which GN over (N, C) features is broken


def _channels_per_group(C: int, spec: NormSpec, strict: bool, path: str) -> int | None:
    """C / G of the new layer for GN, LN and IN targets; None for the others."""
    if spec.kind == "gn":
        return C // resolve_groups(C, spec.num_groups, spec.group_size, strict=strict, where=path)[0]
    return {"ln": C, "in": 1}.get(spec.kind)


def _tiny_groups(old: nn.Module, spec: NormSpec, strict: bool, path: str) -> str:
    """The reason to keep ``old`` (a BatchNorm1d whose groups would hold <= 2 channels), or ""."""
    if not isinstance(old, _FEATURE_NORMS):
        return ""
    per = _channels_per_group(_channels(old), spec, strict, path)
    if per is None or per > TINY_GROUP:
        return ""
    return (f"kept: {spec} would leave {per} channel(s) per group, and over (N, C) features a group of "
            f"{per} value(s) normalizes to {'beta' if per == 1 else '+-1'}; use groups of >= "
            f"{TINY_GROUP + 1} channels, or allow_tiny_groups=True if this layer sees (N, C, L) inputs")


def _channels(module: nn.Module) -> int:
    c = getattr(module, "num_features", None)
    if isinstance(c, int) and c > 0:
        return c
    for name in ("weight", "running_mean"):
        t = getattr(module, name, None)
        if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() > 0:
            return t.numel()
    raise ValueError(f"cannot tell the number of channels of {type(module).__name__} "
                     "(an uninitialized lazy batch norm? run one forward first)")


def _first_tensor(module: nn.Module) -> torch.Tensor | None:
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t.is_floating_point():
            return t
    return None


def _replacement(old: nn.Module, spec: NormSpec, strict: bool, options: dict, path: str
                 ) -> tuple[nn.Module, int | None, str]:
    """The new layer for ``old``, its G and a note."""
    C = _channels(old)
    notes = []
    kind = spec.kind
    opts = dict(options)
    opts.setdefault("eps", getattr(old, "eps", 1e-5))
    old_weight = getattr(old, "weight", None)
    if kind != "none":
        opts.setdefault("affine", old_weight is not None)
    groups = None
    if kind == "gn":
        groups, note = resolve_groups(C, spec.num_groups, spec.group_size, strict=strict, where=path)
        notes += [note] if note else []
        new = make_norm("gn", C, num_groups=groups, **opts)
    elif kind == "ln":
        groups, new = 1, make_norm("ln", C, **opts)
    elif kind == "in":
        groups, new = C, make_norm("in", C, **opts)
    elif kind == "none":
        new = make_norm("none", C)
    else:  # a batch norm again (e.g. torch's BN -> ours with images_per_worker)
        opts.setdefault("momentum", getattr(old, "momentum", None))  # None: make_norm's default
        if kind != "brn":
            opts.setdefault("track_running_stats", getattr(old, "track_running_stats", None))
        new = make_norm(spec, C, **opts)
    ref = _first_tensor(old)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    _copy_affine(old, new)
    _copy_running_stats(old, new)
    if isinstance(old_weight, torch.Tensor) and not isinstance(old_weight, nn.Parameter) and kind != "none":
        notes.append("frozen batch norm: gamma/beta are now trainable")
    if isinstance(old, _FEATURE_NORMS) and groups is not None and C // groups <= TINY_GROUP:
        notes.append(f"{C // groups} channels per group (allow_tiny_groups): broken over (N, C) features")
    if isinstance(new, gnn.BatchNorm):  # to_torch_native gives back the BatchNorm of this rank
        new.input_rank = getattr(old, "input_rank", None) or _RANKS.get(type(old).__name__)
    if kind == "none":
        notes.append("normalization removed")
    new.train(old.training)
    return new, groups, "; ".join(notes)


_RANKS = {"BatchNorm1d": 3, "BatchNorm2d": 4, "BatchNorm3d": 5, "FrozenBatchNorm2d": 4}


def convert_norm(model: nn.Module, to="gn", num_groups: int = 32, group_size: int | None = None,
                 strict: bool = False, allow_tiny_groups: bool = False, **norm_options) -> ConversionReport:
    """Replace every batch norm of ``model`` (in place) by the ``to`` norm; return the report.

    to: a make_norm spec ("gn", "gn:16", "gn/16", "ln", "in", "bn@4", "brn@4", "none", a NormSpec);
    num_groups / group_size: G or channels per group for "gn" (ignored when ``to`` names them);
    strict: raise when C is not divisible as asked instead of using the largest divisor of C not above G;
    allow_tiny_groups: also convert a BatchNorm1d whose groups would hold <= 2 channels (kept by
    default, and listed in ``report.kept``: broken over (N, C) features; see the module docstring);
    norm_options: passed to make_norm (eps, affine, activation, ...); by default eps and affine follow
    the old layer. A layer used at several places is replaced by one shared new layer.
    """
    spec = _target(to, num_groups, group_size)
    types = batch_norm_types()
    if isinstance(model, types):
        raise TypeError(f"convert_norm replaces the batch norms inside a model, but got a bare "
                        f"{type(model).__name__}; wrap it (e.g. nn.Sequential(layer)) first")
    found = [(path, m) for path, m in model.named_modules(remove_duplicate=False) if isinstance(m, types)]
    # Build every new layer before touching the model, so that an error (strict=True) leaves it intact.
    done: dict[int, tuple[nn.Module | None, Change]] = {}
    plan, kept = [], []
    for path, old in found:
        if id(old) in done:
            new, first = done[id(old)]
            change = first._replace(path=path, note=f"same layer as {first.path}"
                                    + (f"; {first.note}" if new is None else ""))
        else:
            reason = "" if allow_tiny_groups else _tiny_groups(old, spec, strict, path)
            if reason:
                new = None
                change = Change(path, type(old).__name__, type(old).__name__, _channels(old), None, reason)
            else:
                new, groups, note = _replacement(old, spec, strict, norm_options, path)
                change = Change(path, type(old).__name__, type(new).__name__, _channels(old), groups, note)
            done[id(old)] = (new, change)
        if new is None:
            kept.append(change)
        else:
            plan.append((path, new, change))
    for path, new, _ in plan:
        parent_path, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent_path), attr, new)
    return ConversionReport([change for _, _, change in plan], str(spec), kept)


_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}  # nn.GELU(): the exact erf form


def _native_group_norm(m: gnn.GroupNorm) -> nn.Module:
    """torch.nn.GroupNorm with m's G, C, eps, affine and values (+ the activation after it)."""
    ref = _first_tensor(m)
    new = nn.GroupNorm(m.num_groups, m.num_channels, m.eps, m.affine, bias=m.bias is not None or not m.affine,
                       **({} if ref is None else {"device": ref.device, "dtype": ref.dtype}))
    _copy_affine(m, new)
    new.train(m.training)
    if m.activation is None:
        return new
    return nn.Sequential(new, _ACTIVATIONS[m.activation]())


def _native_conv(m: nn.modules.conv._ConvNd) -> nn.Module:
    """The stock convolution of m's class, holding m's *standardized* weight."""
    base = next(c for c in type(m).__mro__ if c in (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    new = base(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
               dilation=m.dilation, groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode,
               device=m.weight.device, dtype=m.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(m.standardized_weight())
        if m.bias is not None:
            new.bias.copy_(m.bias)
    new.weight.requires_grad_(m.weight.requires_grad)
    new.train(m.training)
    return new


_NATIVE_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _native_batch_norm(m: gnn.BatchNorm, default_rank: int, path: str = "") -> nn.Module:
    """torch.nn.BatchNorm1d/2d/3d with m's values and running statistics (equal to m in eval mode):
    the class of the rank of m's inputs (the last forward's, or the layer convert_norm replaced),
    else of ``default_rank``."""
    rank = getattr(m, "input_rank", None) or default_rank
    if rank not in _NATIVE_BN:
        raise ValueError(f"{path or type(m).__name__}: no torch BatchNorm for inputs of rank {rank} "
                         f"(BatchNorm1d/2d/3d take ranks 2 to 5)")
    ref = _first_tensor(m)
    new = _NATIVE_BN[rank](m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                           **({} if ref is None else {"device": ref.device, "dtype": ref.dtype}))
    _copy_affine(m, new)
    _copy_running_stats(m, new)
    new.train(m.training)
    return new


def _copy_affine(src_module: nn.Module, dst_module: nn.Module) -> None:
    """gamma and beta (parameters or, for FrozenBatchNorm2d, buffers) and their requires_grad."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            src, dst = getattr(src_module, name, None), getattr(dst_module, name, None)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor):
                dst.copy_(src)
                if isinstance(src, nn.Parameter):
                    dst.requires_grad_(src.requires_grad)


def _copy_running_stats(src_module: nn.Module, dst_module: nn.Module) -> None:
    """running_mean, running_var, num_batches_tracked where both layers have them."""
    with torch.no_grad():
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            src, dst = getattr(src_module, name, None), getattr(dst_module, name, None)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.shape == dst.shape:
                dst.copy_(src)


_OURS = (gnn.GroupNorm, gnn.WSConv1d, gnn.WSConv2d, gnn.WSConv3d, gnn.BatchNorm)


def _native(module: nn.Module, default_rank: int = 4, path: str = "") -> nn.Module | None:
    """The stock replacement of one of our modules (None for any other module)."""
    if isinstance(module, gnn.GroupNorm):  # LayerNorm and InstanceNorm are GroupNorms
        return _native_group_norm(module)
    if isinstance(module, (gnn.WSConv1d, gnn.WSConv2d, gnn.WSConv3d)):
        return _native_conv(module)
    if isinstance(module, gnn.BatchNorm):  # BatchRenorm is a BatchNorm
        return _native_batch_norm(module, default_rank, path)
    return None


def _conv_rank(model: nn.Module) -> int:
    """The input rank of the model's convolutions when they all agree (Conv1d: 3, Conv2d: 4,
    Conv3d: 5), else 4: the rank assumed for a BatchNorm that never ran."""
    ranks = {len(m.kernel_size) + 2 for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)}
    return ranks.pop() if len(ranks) == 1 else 4


def to_torch_native(model: nn.Module) -> nn.Module:
    """Swap our modules for stock torch ones, in place, so exporters (TorchScript, torch.export, ONNX)
    see only layers they know; returns the model (a new module when ``model`` itself is one of ours).

    * GroupNorm / LayerNorm / InstanceNorm -> ``torch.nn.GroupNorm`` (G, C, eps, affine, values);
      with ``activation`` -> ``nn.Sequential(nn.GroupNorm, nn.ReLU | nn.SiLU | nn.GELU)``, so that
      layer's state_dict keys gain a ``.0``. Same function in train and eval. (A parent that calls the
      layer with ``residual=`` cannot be swapped; our models never do.)
    * WSConv1d/2d/3d -> ``nn.Conv1d/2d/3d`` holding the standardized weight: the same function, but the
      weight is frozen standardized (for inference and export, not for further training).
    * BatchNorm / BatchRenorm -> ``nn.BatchNorm1d/2d/3d`` with the running statistics: the same
      function in eval mode (per-worker statistics and renormalization are training-time behaviour).
      The class follows the rank of the layer's inputs: those of its last forward, else the torch
      layer ``convert_norm`` made it from, else the model's convolutions (all Conv1d: BatchNorm1d,
      all Conv3d: BatchNorm3d), else BatchNorm2d.
    Device, dtype, train/eval mode and requires_grad are kept.
    """
    if isinstance(model, _OURS):
        return _native(model)
    found = [(path, m) for path, m in model.named_modules(remove_duplicate=False) if isinstance(m, _OURS)]
    default_rank = _conv_rank(model)
    done: dict[int, nn.Module] = {}
    for path, old in found:
        if id(old) not in done:
            done[id(old)] = _native(old, default_rank, path)
        parent_path, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent_path), attr, done[id(old)])
    return model
