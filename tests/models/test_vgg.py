"""VGG-16: the published parameter count, stable layer names (conv5_3 probe), norms, small inputs."""
import pytest
import torch
from torch import nn

from groupnorm.models import CONV5_3, build_model


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_meta(**kwargs):
    with torch.device("meta"):
        return build_model("vgg16", **kwargs)


def test_param_count_matches_published():
    assert count(build_meta(norm="none")) == 138_357_544  # Simonyan & Zisserman, configuration D


@pytest.mark.parametrize("norm", ["bn", "gn", "gn/16", "ln", "in"])
def test_norm_adds_gamma_and_beta_per_conv_channel(norm):
    channels = 2 * 64 + 2 * 128 + 3 * 256 + 3 * 512 + 3 * 512  # output channels of the 13 convs
    assert channels == 4224
    assert count(build_meta(norm=norm)) == 138_357_544 + 2 * channels
    assert count(build_meta(norm=norm, ws=True)) == 138_357_544 + 2 * channels


def test_layer_names_and_conv5_3_path():
    model = build_meta(norm="gn")
    names = [name for name, _ in model.features.named_children()]
    convs = [n for n in names if n.startswith("conv")]
    assert convs == ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
                     "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3"]
    assert CONV5_3 == "features.conv5_3"
    conv = model.get_submodule(CONV5_3)
    assert isinstance(conv, nn.Conv2d) and conv.out_channels == 512
    i = names.index("conv5_3")
    assert names[i:i + 4] == ["conv5_3", "norm5_3", "relu5_3", "pool5"]
    plain = [name for name, _ in build_meta(norm="none").features.named_children()]
    assert not any(n.startswith("norm") for n in plain)
    assert plain[plain.index("conv5_3"):] == ["conv5_3", "relu5_3", "pool5"]


@pytest.mark.parametrize("norm", ["none", "bn", "gn"])
def test_conv5_3_hook_sees_output_before_norm_and_relu(norm):
    torch.manual_seed(0)
    model = build_model("vgg16", norm=norm, small_input=True, num_classes=10)
    seen = {}
    model.get_submodule(CONV5_3).register_forward_hook(lambda m, i, o: seen.update(inp=i[0], out=o))
    model(torch.randn(2, 3, 32, 32))
    conv = model.get_submodule(CONV5_3)
    with torch.no_grad():
        torch.testing.assert_close(seen["out"], conv(seen["inp"]))
    assert (seen["out"] < 0).any(), "the probed tensor must not have been through a ReLU (in-place)"


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
@pytest.mark.parametrize("norm", ["none", "bn", "gn"])
def test_small_input_forward_backward(size, channels, norm):
    torch.manual_seed(0)
    model = build_model("vgg16", norm=norm, small_input=True, in_channels=channels, num_classes=10)
    assert "pool5" not in dict(model.features.named_children())
    y = model(torch.randn(2, channels, size, size))
    assert y.shape == (2, 10)
    (y * torch.randn_like(y)).sum().backward()
    for name, p in model.named_parameters():  # (a conv bias before BN has a zero gradient)
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_conv_bias_kept_with_norm():
    model = build_meta(norm="gn")
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.vision
def test_same_function_as_torchvision_vgg16():
    """torchvision's vgg16 weights load into ours (same order of tensors) and give the same logits."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ours = build_model("vgg16", norm="none").eval()
    with torch.device("meta"):  # skip torchvision's init: it gets our weights
        ref = tv.models.vgg16(weights=None)
    ref = ref.to_empty(device="cpu").eval()
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    assert [v.shape for v in ref_state.values()] == [v.shape for v in our_state.values()]
    ref.load_state_dict(dict(zip(ref_state, our_state.values())))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)


def test_width_scales_every_stage_and_keeps_the_probe():
    model = build_model("vgg16", width=16, norm="gn:8", small_input=True, num_classes=10, in_channels=1)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 64, 64, 64, 128, 128, 128, 128, 128, 128]
    assert model.get_submodule(CONV5_3).out_channels == 128
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="width"):
        build_model("vgg16", width=0)
