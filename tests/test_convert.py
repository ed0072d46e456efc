"""convert_norm (BN -> GN and friends) on our models and on plain torch modules; to_torch_native + export."""
import pytest
import torch
from torch import nn

import groupnorm.nn as gnn
from groupnorm.convert import (ConversionReport, batch_norm_types, convert_norm, largest_divisor_at_most,
                               resolve_groups, to_torch_native)
from groupnorm.models import build_model, is_norm


def count(model):
    return sum(p.numel() for p in model.parameters())


def norm_layers(model):
    return [m for m in model.modules() if is_norm(m)]


def batch_norms(model):
    return [m for m in model.modules() if isinstance(m, batch_norm_types())]


def randomize_affine(model):
    """Non-trivial gamma/beta, so that copying them is visible."""
    with torch.no_grad():
        for m in norm_layers(model):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)


def assert_trains(model, x):
    """Forward in train and eval; every parameter gets a finite, non-zero gradient."""
    model.train()
    y = model(x)
    assert torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("resnet50", 64), ("resnet20", 32)])
def test_our_bn_models_become_gn(name, size):
    torch.manual_seed(0)
    model = build_model(name, norm="bn", num_classes=10, zero_init_residual=False)
    randomize_affine(model)
    before_count, before_norms = count(model), len(norm_layers(model))
    gammas = {path: m.weight.detach().clone() for path, m in model.named_modules() if is_norm(m)}
    report = convert_norm(model, to="gn")
    assert isinstance(report, ConversionReport) and len(report) == before_norms
    assert not batch_norms(model)
    assert len(norm_layers(model)) == before_norms and count(model) == before_count
    for path, gamma in gammas.items():
        new = model.get_submodule(path)
        assert type(new) is gnn.GroupNorm
        assert new.num_groups == min(32, new.num_channels)  # 16-channel layers of resnet20: G = 16
        torch.testing.assert_close(new.weight.detach(), gamma)
    assert_trains(model, torch.randn(2, 3, size, size) + 0.5)


def test_small_widths_follow_the_divisor_rule_and_say_so():
    model = build_model("resnet20", norm="bn", num_classes=10)
    report = convert_norm(model, to="gn")
    by_path = {c.path: c for c in report}
    first = by_path["layer1.0.norm1"]
    assert first.groups == 16 and "C=16 not divisible by G=32" in first.note
    assert by_path["layer3.0.norm1"].groups == 32 and by_path["layer3.0.norm1"].note == ""
    assert len(report.notes) == sum(1 for c in report if c.channels < 32)


def test_vgg_bn_to_gn():
    torch.manual_seed(0)
    model = build_model("vgg16", norm="bn", small_input=True, num_classes=10)
    n = len(norm_layers(model))
    report = convert_norm(model, "gn:16")
    assert len(report) == n == 13 and not batch_norms(model)
    assert all(m.num_groups == 16 for m in norm_layers(model))
    assert_trains(model, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("channels,G,expected", [(24, 32, 24), (40, 32, 20), (48, 32, 24), (96, 32, 32),
                                                 (7, 32, 7), (7, 4, 1), (100, 32, 25)])
def test_largest_divisor_not_above_g(channels, G, expected):
    assert largest_divisor_at_most(channels, G) == expected
    groups, note = resolve_groups(channels, G)
    assert groups == expected and (note == "") == (channels % G == 0)


def test_group_size_rule():
    assert resolve_groups(48, group_size=16) == (3, "")
    groups, note = resolve_groups(40, group_size=16)  # asks G = 40 // 16 = 2 -> 20 channels per group
    assert groups == 2 and "group_size=16" in note
    assert resolve_groups(24, group_size=16)[0] == 1
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        resolve_groups(24, group_size=0)


def small_net(C1=24, C2=40):
    # convs without bias, as before any norm: a bias before IN or BN has a zero gradient
    return nn.Sequential(nn.Conv2d(3, C1, 3, padding=1, bias=False), nn.BatchNorm2d(C1), nn.ReLU(),
                         nn.Conv2d(C1, C2, 3, padding=1, bias=False), nn.BatchNorm2d(C2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(C2, 5))


def test_non_multiples_of_32():
    model = small_net()
    report = convert_norm(model)
    assert [(c.channels, c.groups) for c in report] == [(24, 24), (40, 20)]
    assert model[1].num_groups == 24 and model[4].num_groups == 20
    text = str(report)
    assert "C=24 not divisible by G=32: using G=24" in text
    assert "C=40 not divisible by G=32: using G=20 (2 channels/group)" in text
    assert_trains(model, torch.randn(2, 3, 8, 8))


def test_strict_raises_and_leaves_the_model_intact():
    model = small_net(64, 40)
    with pytest.raises(ValueError, match=r"^4: C=40 channels cannot be split by G=32.*G=20"):
        convert_norm(model, strict=True)
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[4], nn.BatchNorm2d)
    convert_norm(model, "gn:8", strict=True)  # divisible: no error
    assert model[4].num_groups == 8


def test_every_batch_norm_type_is_replaced():
    model = nn.ModuleDict({
        "bn1d": nn.BatchNorm1d(32), "bn2d": nn.BatchNorm2d(32), "bn3d": nn.BatchNorm3d(32),
        "sync": nn.SyncBatchNorm(32), "ours": gnn.BatchNorm(32, images_per_worker=2),
        "renorm": gnn.BatchRenorm(32), "inner": nn.Sequential(nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32)),
        "gn": nn.GroupNorm(4, 32), "ln": nn.LayerNorm(32),  # already not batch norms: untouched
    })
    report = convert_norm(model, "gn:8")  # 4 channels per group: BatchNorm1d is converted too (see below)
    assert sorted(c.path for c in report) == ["bn1d", "bn2d", "bn3d", "inner.1", "ours", "renorm", "sync"]
    assert not batch_norms(model)
    assert type(model["gn"]) is nn.GroupNorm and type(model["ln"]) is nn.LayerNorm
    x = torch.randn(4, 32, 3) + 1
    assert model["bn1d"](x).shape == x.shape and model["bn1d"](x[:, :, 0]).shape == (4, 32)
    assert model["bn3d"](torch.randn(2, 32, 2, 3, 3)).shape == (2, 32, 2, 3, 3)


@pytest.mark.parametrize("to,kind,groups", [("ln", gnn.LayerNorm, 1), ("in", gnn.InstanceNorm, 64),
                                            ("gn/16", gnn.GroupNorm, 4), ("bn@2", gnn.BatchNorm, None),
                                            ("brn@2", gnn.BatchRenorm, None)])
def test_other_targets(to, kind, groups):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(3))
    model(torch.randn(2, 3, 6, 6))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    report = convert_norm(model, to)
    assert type(model[1]) is kind and report[0].groups == groups
    if kind in (gnn.BatchNorm, gnn.BatchRenorm):  # a batch norm target keeps the running statistics
        assert model[1].images_per_worker == 2
        assert (model[1].running_mean != 0).all()
    assert_trains(model, torch.randn(4, 3, 6, 6))


def test_none_target_removes_norms():
    model = small_net()
    report = convert_norm(model, "none")
    assert isinstance(model[1], nn.Identity) and all("removed" in c.note for c in report)


def test_keeps_eps_affine_mode_dtype_device_and_requires_grad():
    model = nn.Sequential(nn.BatchNorm2d(32, eps=1e-3), nn.BatchNorm2d(32, affine=False),
                          nn.BatchNorm2d(64)).double()
    model[1].eval()
    model[2].weight.requires_grad_(False)
    convert_norm(model)
    assert model[0].eps == 1e-3 and model[0].weight.dtype == torch.float64
    assert model[1].weight is None and not model[1].training and model[0].training
    assert not model[2].weight.requires_grad and model[2].bias.requires_grad
    with torch.device("meta"):
        meta = small_net()
    convert_norm(meta)
    assert meta[1].weight.device.type == "meta"


def test_channels_last_stays_channels_last():
    model = small_net(32, 64).to(memory_format=torch.channels_last)
    convert_norm(model)
    seen = {}
    model[4].register_forward_hook(lambda m, i, o: seen.update(y=o))
    model(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last))
    assert model[3].weight.is_contiguous(memory_format=torch.channels_last)
    assert seen["y"].is_contiguous(memory_format=torch.channels_last)


def test_shared_layer_stays_shared_and_root_bn_is_refused():
    bn = nn.BatchNorm2d(32)
    model = nn.Sequential(bn, nn.ReLU(), bn)
    report = convert_norm(model)
    assert model[0] is model[2] and len(report) == 2 and "same layer as 0" in report[1].note
    with pytest.raises(TypeError, match="bare BatchNorm2d"):
        convert_norm(nn.BatchNorm2d(8))


def test_report_is_readable():
    report = convert_norm(small_net())
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == "convert_norm -> gn:32: 2 layer(s) replaced, 2 with notes"
    assert lines[1].split()[:6] == ["module", "old", "new", "C", "G", "note"]
    assert lines[2].split()[:5] == ["1", "BatchNorm2d", "GroupNorm", "24", "24"]
    assert repr(report) == "ConversionReport(target='gn:32', changes=2, notes=2)"


# --- to_torch_native and exporters --------------------------------------------------------------

def converted_resnet():
    torch.manual_seed(0)
    model = build_model("resnet20", norm="bn", num_classes=10, zero_init_residual=False)
    convert_norm(model, "gn:8")
    randomize_affine(model)
    return model.eval()


def test_to_torch_native_keeps_the_function():
    model = converted_resnet()
    model.layer2[0].norm1.activation = "relu"  # also a fused activation (relu twice is still relu)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    native = to_torch_native(model)
    assert native is model
    assert not any(isinstance(m, (gnn.GroupNorm, gnn.BatchNorm, gnn.WSConv2d)) for m in model.modules())
    assert all(type(m) is nn.GroupNorm for m in norm_layers(model))
    assert isinstance(model.layer2[0].norm1, nn.Sequential) and isinstance(model.layer2[0].norm1[1], nn.ReLU)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_to_torch_native_ws_and_bn():
    torch.manual_seed(0)
    model = build_model("resnet20", norm="bn@2", ws=True, num_classes=10, zero_init_residual=False)
    model.train()
    model(torch.randn(4, 3, 32, 32))  # non-trivial running statistics
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    to_torch_native(model)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is nn.Conv2d for m in convs)
    assert all(type(m) is nn.BatchNorm2d for m in norm_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    assert type(to_torch_native(gnn.GroupNorm(2, 4))) is nn.GroupNorm  # a bare layer is returned swapped


def test_torch_export_of_converted_resnet_matches_eager():
    model = converted_resnet()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    to_torch_native(model)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("groupnorm" in t for t in targets)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)
        other = torch.randn(2, 3, 32, 32) + 1
        torch.testing.assert_close(program.module()(other), model(other), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchscript_trace_and_script_of_converted_resnet():
    model = converted_resnet()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    to_torch_native(model)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,))
        torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-5)
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), expected, rtol=1e-5, atol=1e-5)


# --- BatchNorm1d over (N, C) features (issue 15, item 3) -------------------------------------------------

def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
                         nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))


def test_gn_of_one_or_two_channels_per_group_over_features_is_broken():
    """Why the rule exists: over (N, C) each group holds C/G values only; with 1 every output is the
    bias, with 2 every value becomes -1 or +1 (times gamma, plus beta)."""
    x = torch.randn(8, 64) * 3 + 1
    assert torch.equal(gnn.GroupNorm(64, 64, affine=False)(x), torch.zeros_like(x))
    y = gnn.GroupNorm(32, 64, affine=False)(x).abs()
    assert (y <= 1).all() and (y - 1).abs().median() < 1e-3  # +-1 up to eps, for pairs far apart


@pytest.mark.parametrize("to, kept", [("gn", 2), ("gn:32", 2), ("gn/2", 2), ("gn/1", 2), ("in", 2),
                                      ("gn:16", 1), ("gn:8", 0), ("ln", 0), ("bn@2", 0), ("none", 0)])
def test_batch_norm_1d_is_kept_where_groups_would_hold_two_channels_or_fewer(to, kept):
    model = mlp()
    report = convert_norm(model, to)
    assert len(report.kept) == kept and len(report) == 2 - kept
    assert sum(type(m) is nn.BatchNorm1d for m in model) == kept
    for change in report.kept:
        assert change.new_type == "BatchNorm1d" and "kept" in change.note and "allow_tiny_groups" in change.note
    if kept:
        text = str(report)
        assert f", {kept} kept" in text.splitlines()[0] and "(kept)" in text
    assert_trains(model, torch.randn(8, 10))


def test_allow_tiny_groups_forces_the_conversion_with_a_note():
    model = mlp()
    report = convert_norm(model, "gn", allow_tiny_groups=True)
    assert not report.kept and len(report) == 2
    assert type(model[1]) is gnn.GroupNorm and model[1].num_groups == 32
    assert all("channels per group" in c.note for c in report)


def test_batch_norm_1d_over_sequences_with_large_groups_is_converted():
    model = nn.Sequential(nn.Conv1d(3, 64, 3), nn.BatchNorm1d(64))
    report = convert_norm(model, "gn:16")
    assert len(report) == 1 and not report.kept and model[1].num_groups == 16
    assert model(torch.randn(2, 3, 9)).shape == (2, 64, 7)


# --- to_torch_native picks the BatchNorm of the input's rank (issue 15, item 14) -------------------------

@pytest.mark.parametrize("conv, bn, shape", [(nn.Conv1d, nn.BatchNorm1d, (4, 3, 10)),
                                             (nn.Conv2d, nn.BatchNorm2d, (4, 3, 6, 6)),
                                             (nn.Conv3d, nn.BatchNorm3d, (4, 3, 4, 4, 4))])
@pytest.mark.parametrize("run_first", [False, True])
def test_to_torch_native_batch_norm_of_the_right_rank(conv, bn, shape, run_first):
    torch.manual_seed(0)
    model = nn.Sequential(conv(3, 8, 3, padding=1), bn(8), nn.ReLU())
    convert_norm(model, "bn@2")
    assert type(model[1]) is gnn.BatchNorm
    x = torch.randn(shape)
    if run_first:
        model.train()
        model(x)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    to_torch_native(model)
    assert type(model[1]) is bn
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_to_torch_native_batch_norm_rank_from_the_inputs_seen():
    """Our BatchNorm built directly (no torch layer to take the rank from): the rank of its inputs."""
    torch.manual_seed(0)
    for shape, bn in (((6, 8), nn.BatchNorm1d), ((6, 8, 5), nn.BatchNorm1d), ((2, 8, 3, 3, 3), nn.BatchNorm3d)):
        model = nn.Sequential(nn.Identity(), gnn.BatchNorm(8))
        x = torch.randn(shape)
        model(x)
        model.eval()
        with torch.no_grad():
            expected = model(x)
        to_torch_native(model)
        assert type(model[1]) is bn
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected)
    never_run = nn.Sequential(nn.Conv1d(2, 8, 1), gnn.BatchNorm(8))
    to_torch_native(never_run)  # the model's convolutions say 1-D
    assert type(never_run[1]) is nn.BatchNorm1d
    with pytest.raises(ValueError, match=r"1: no torch BatchNorm for inputs of rank 6"):
        model = nn.Sequential(nn.Identity(), gnn.BatchNorm(2))
        model(torch.randn(2, 2, 2, 2, 2, 2))
        to_torch_native(model)


# --- one parser of norm specs (issue 15, item 15) ---------------------------------------------------------

def test_convert_reads_specs_with_the_factory_parser():
    for to, groups in (("gn : 8", 8), (" GN / 16 ", 4), ("gn", 16)):
        model = small_net(64, 64)
        convert_norm(model, to, num_groups=16)
        assert model[1].num_groups == groups, to
    model = small_net(64, 64)
    convert_norm(model, "bn @ 4")
    assert model[1].images_per_worker == 4
    with pytest.raises(ValueError, match="num_groups must be >= 1"):
        convert_norm(small_net(), "gn:0")
