"""ResNets: published parameter counts, the v1.5 layout, every norm spec, small-input variants."""
import pytest
import torch
from torch import nn

from groupnorm.models import BasicBlock, Bottleneck, build_model, list_models
from groupnorm.models.small_resnet import PadShortcut


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_meta(name, **kwargs):
    """Build on the meta device: parameter counts without spending time on the init."""
    with torch.device("meta"):
        return build_model(name, **kwargs)


# Published counts (He et al. 2016 / torchvision's model cards) for 1000 classes.
IMAGENET_COUNTS = {"resnet18": 11_689_512, "resnet34": 21_797_672,
                   "resnet50": 25_557_032, "resnet101": 44_549_160}


@pytest.mark.parametrize("name", sorted(IMAGENET_COUNTS))
def test_imagenet_param_counts_match_published(name):
    assert count(build_meta(name, norm="bn")) == IMAGENET_COUNTS[name]


@pytest.mark.parametrize("norm", ["gn", "gn/16", "ln", "in", "bn@4", "brn@4", "syncbn"])
def test_resnet50_count_same_for_every_affine_norm_and_ws(norm):
    assert count(build_meta("resnet50", norm=norm)) == 25_557_032
    assert count(build_meta("resnet50", norm=norm, ws=True)) == 25_557_032


def test_resnet50_without_norm_drops_exactly_gamma_and_beta():
    model = build_meta("resnet50", norm="bn")
    norm_params = sum(m.weight.numel() + m.bias.numel() for m in model.modules()
                      if type(m).__name__ == "BatchNorm")
    assert count(build_meta("resnet50", norm="none")) == 25_557_032 - norm_params


def test_bottleneck_strides_on_the_3x3_conv():
    model = build_meta("resnet50")
    for stage, stride in (("layer1", 1), ("layer2", 2), ("layer3", 2), ("layer4", 2)):
        first = getattr(model, stage)[0]
        assert isinstance(first, Bottleneck)
        assert first.conv1.stride == (1, 1) and first.conv1.kernel_size == (1, 1)
        assert first.conv2.stride == (stride, stride) and first.conv2.kernel_size == (3, 3)
        assert first.downsample[0].stride == (stride, stride)
    assert isinstance(build_meta("resnet18").layer1[0], BasicBlock)


def test_norm_spec_objects_are_accepted():
    from groupnorm.nn import GroupNorm, NormSpec
    model = build_meta("resnet50", norm=NormSpec("gn", group_size=16))
    norms = [m for m in model.modules() if isinstance(m, GroupNorm)]
    assert len(norms) == 53 and all(m.num_channels // m.num_groups == 16 for m in norms)


def test_ws_uses_weight_standardized_convs_everywhere():
    from groupnorm.nn import WSConv2d
    model = build_meta("resnet18", norm="gn", ws=True)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, WSConv2d) for m in convs)
    assert not any(isinstance(m, WSConv2d) for m in build_meta("resnet18").modules())


@pytest.mark.parametrize("norm", ["bn", "bn@2", "brn@2", "gn", "gn:16", "gn/16", "ln", "in", "none"])
def test_resnet18_forward_backward_with_every_norm(norm):
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=7, norm=norm, zero_init_residual=False)
    x = torch.randn(4, 3, 64, 64) + 0.5
    y = model(x)
    assert y.shape == (4, 7) and torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x[:1])).all()


def test_in_channels_and_num_classes():
    model = build_model("resnet50", in_channels=1, num_classes=5, norm="gn")
    assert model.conv1.in_channels == 1 and model.fc.out_features == 5
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 5)


@pytest.mark.vision
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_same_function_as_torchvision(name):
    """Our weights load into torchvision's model (norm* -> bn*) and give the same logits: the layout
    (strides, shortcuts, order of layers) is the same, not just the parameter count."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ours = build_model(name, norm="bn", zero_init_residual=False).eval()
    with torch.no_grad():  # non-trivial statistics and affine parameters in every norm
        for m in ours.modules():
            if hasattr(m, "running_var"):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    with torch.device("meta"):  # skip torchvision's init: it gets our weights
        ref = getattr(tv.models, name)(weights=None)
    ref = ref.to_empty(device="cpu").eval()
    state = {k.replace(".norm", ".bn").replace("norm1.", "bn1."): v for k, v in ours.state_dict().items()}
    ref.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)


# --- small-input ResNets --------------------------------------------------------------------------

def test_resnet20_has_the_published_count():
    # conv1 432 + bn 32; stage 1: 3 x (2 x 2304 + 2 x 32); stage 2: 4608 + 9216 + 128 + 2 x (2 x 9216
    # + 128); stage 3: 18432 + 36864 + 256 + 2 x (2 x 36864 + 256); fc 650  ->  269,722 (He et al.: 0.27M)
    assert count(build_meta("resnet20", num_classes=10)) == 269_722


@pytest.mark.parametrize("name,millions", [("resnet20", 0.27), ("resnet32", 0.46), ("resnet56", 0.85)])
def test_cifar_family_matches_published_sizes(name, millions):
    assert round(count(build_meta(name, num_classes=10)) / 1e6, 2) == millions


def test_small_resnet_depth_and_width():
    model = build_meta("small_resnet", depth=14, width=32, num_classes=10)
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [2, 2, 2]
    assert model.fc.in_features == 128
    with pytest.raises(ValueError, match="6n \\+ 2"):
        build_model("small_resnet", depth=21)
    with pytest.raises(ValueError, match="shortcut"):
        build_model("resnet20", shortcut="bogus")


def test_pad_shortcut_has_no_parameters_and_conv_shortcut_projects():
    pad = build_meta("resnet20", num_classes=10)
    assert isinstance(pad.layer2[0].downsample, PadShortcut)
    conv = build_meta("resnet20", num_classes=10, shortcut="conv")
    assert isinstance(conv.layer2[0].downsample[0], nn.Conv2d)
    assert count(conv) > count(pad)


def test_pad_shortcut_subsamples_and_appends_zero_channels():
    x = torch.randn(2, 3, 7, 7)
    y = PadShortcut(3, 5, 2)(x)
    assert y.shape == (2, 5, 4, 4)
    torch.testing.assert_close(y[:, :3], x[:, :, ::2, ::2])
    assert (y[:, 3:] == 0).all()


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
@pytest.mark.parametrize("shortcut", ["pad", "conv"])
def test_small_resnet_on_28_and_32_pixels(size, channels, shortcut):
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=channels, norm="gn:8",
                        shortcut=shortcut, zero_init_residual=False)
    y = model(torch.randn(3, channels, size, size))
    assert y.shape == (3, 10)
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gn_groups_that_do_not_divide_a_width_get_a_hint():
    with pytest.raises(ValueError, match="16-channel layers.*norm='gn:16'"):
        build_model("resnet20", norm="gn")
    with pytest.raises(ValueError, match="16-channel layers.*norm='gn:8'"):
        build_model("resnet20", norm="gn:24")


def test_registry():
    names = list_models()
    for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet20", "resnet32", "resnet56",
                 "small_resnet", "vgg16"):
        assert name in names
    with pytest.raises(ValueError, match="unknown model 'resnet19'.*resnet18"):
        build_model("resnet19")


def test_small_resnet_stem_stride_halves_every_stage():
    model = build_model("small_resnet", depth=8, width=8, stem_stride=2, in_channels=1, num_classes=10)
    seen = {}
    for name in ("layer1", "layer2", "layer3"):
        model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, tuple(o.shape[2:])))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert seen == {"layer1": (14, 14), "layer2": (7, 7), "layer3": (4, 4)}
    with pytest.raises(ValueError, match="stem_stride"):
        build_model("small_resnet", depth=8, stem_stride=3)
