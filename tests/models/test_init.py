"""The paper's init (He fan_out, N(0, 0.01) linear, gamma 1 / 0, beta 0) and param_groups."""
import math

import pytest
import torch
from torch import nn

from groupnorm.models import build_model, init_weights, is_norm, param_groups
from groupnorm.models.layers import ResidualBlock


def norms_of(model):
    return [m for m in model.modules() if is_norm(m)]


def test_conv_is_he_normal_fan_out_and_linear_is_normal_001():
    torch.manual_seed(0)
    model = build_model("resnet50", norm="gn")
    conv = model.layer4[0].conv2  # 512 -> 512, 3x3: 2.4M weights, the sample std is exact to < 1%
    fan_out = conv.out_channels * 9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.01)
    assert conv.weight.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert model.fc.weight.std().item() == pytest.approx(0.01, rel=0.01)
    assert (model.fc.bias == 0).all()


def test_vgg_conv_biases_are_zero():
    model = build_model("vgg16", norm="none", small_input=True, num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and all((m.bias == 0).all() for m in convs)


@pytest.mark.parametrize("name,norm", [("resnet18", "bn"), ("resnet50", "gn"), ("resnet20", "gn:8"),
                                       ("resnet20", "bn@2")])
def test_gamma_one_beta_zero_and_zero_for_last_norm_of_each_block(name, norm):
    model = build_model(name, norm=norm, num_classes=10)
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    last = {id(b.last_norm()) for b in blocks}
    assert len(last) == len(blocks) > 0
    for m in norms_of(model):
        assert (m.bias == 0).all()
        assert (m.weight == (0.0 if id(m) in last else 1.0)).all()
    plain = build_model(name, norm=norm, num_classes=10, zero_init_residual=False)
    assert all((m.weight == 1).all() for m in norms_of(plain))


@pytest.mark.parametrize("name,norm,size", [("resnet18", "bn", 64), ("resnet18", "gn", 64),
                                            ("resnet50", "gn", 64), ("resnet50", "bn@2", 64),
                                            ("resnet20", "gn/4", 32), ("resnet20", "ln", 28),
                                            ("resnet56", "bn", 32)])
def test_zero_init_makes_every_block_identity_plus_shortcut(name, norm, size):
    """At init, every block's main path outputs exactly 0, so block(x) == relu(shortcut(x))."""
    torch.manual_seed(0)
    model = build_model(name, norm=norm, num_classes=10)
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    seen = []

    def hook(block, inputs, output):
        x = inputs[0]
        shortcut = x if block.downsample is None else block.downsample(x)
        seen.append((block, output, torch.relu(shortcut)))

    def main_path_hook(norm_layer, inputs, kwargs, output):
        # a norm that fuses the block's add and ReLU returns relu(main path + shortcut)
        residual = kwargs.get("residual")
        expected = torch.zeros_like(output) if residual is None else torch.relu(residual)
        assert torch.equal(output, expected), "main path of a residual block is not zero at init"

    for b in blocks:
        b.register_forward_hook(hook)
        b.last_norm().register_forward_hook(main_path_hook, with_kwargs=True)
    model(torch.randn(4, 3, size, size) + 0.3)
    assert len(seen) == len(blocks)
    for block, output, expected in seen:
        torch.testing.assert_close(output, expected, rtol=0, atol=0)


def test_without_zero_init_blocks_are_not_identity():
    torch.manual_seed(0)
    model = build_model("resnet18", norm="gn", zero_init_residual=False)
    out = {}
    model.layer1[0].norm2.register_forward_hook(lambda m, i, o: out.update(y=o))
    model(torch.randn(2, 3, 64, 64))
    assert out["y"].abs().sum() > 0


def test_init_weights_on_a_torch_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GroupNorm(2, 8), nn.Flatten(),
                          nn.LazyLinear(4))
    with torch.no_grad():
        model[1].weight.fill_(3.0)
        model[2].bias.fill_(3.0)
    model(torch.randn(1, 3, 5, 5))
    init_weights(model)
    assert (model[1].weight == 1).all() and (model[2].bias == 0).all()
    assert (model[0].bias == 0).all()


# --- param_groups ----------------------------------------------------------------------------------

def test_param_groups_split_norm_parameters_by_type():
    model = build_model("vgg16", norm="gn", small_input=True, num_classes=10)
    groups = {g["name"]: g for g in param_groups(model, 1e-4)}
    norm_params = {id(p) for m in norms_of(model) for p in m.parameters()}
    assert len(norm_params) == 2 * 13
    assert {id(p) for p in groups["norm"]["params"]} == norm_params
    conv_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.Conv2d)}
    assert conv_biases <= {id(p) for p in groups["weights"]["params"]}  # biases of convs decay
    assert id(model.classifier.bias) in {id(p) for p in groups["weights"]["params"]}
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_param_groups_paper_and_detection_recipes():
    model = build_model("resnet18", norm="gn")
    paper = {g["name"]: g["weight_decay"] for g in param_groups(model, 1e-4)}
    assert paper == {"weights": 1e-4, "norm": 1e-4}  # the paper decays gamma and beta too
    detection = {g["name"]: g["weight_decay"] for g in param_groups(model, 1e-4, norm_weight_decay=0.0)}
    assert detection == {"weights": 1e-4, "norm": 0.0}
    opt = torch.optim.SGD(param_groups(model, 1e-4, 0.0), lr=0.1, momentum=0.9)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]


@pytest.mark.parametrize("layer", [lambda: nn.BatchNorm2d(4), lambda: nn.SyncBatchNorm(4),
                                   lambda: nn.GroupNorm(2, 4), lambda: nn.LayerNorm(4),
                                   lambda: nn.InstanceNorm2d(4, affine=True)])
def test_param_groups_know_torch_norms(layer):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), layer())
    groups = {g["name"]: g["params"] for g in param_groups(model, 0.1, 0.0)}
    assert [id(p) for p in groups["norm"]] == [id(model[1].weight), id(model[1].bias)]
    assert [id(p) for p in groups["weights"]] == [id(model[0].weight), id(model[0].bias)]


def test_param_groups_skip_frozen_and_dedupe_shared():
    conv = nn.Conv2d(3, 3, 1)
    norm = nn.GroupNorm(1, 3)
    norm.weight.requires_grad_(False)
    model = nn.Sequential(conv, norm, conv)  # conv used twice
    groups = {g["name"]: g["params"] for g in param_groups(model, 0.1)}
    assert len(groups["weights"]) == 2 and len(groups["norm"]) == 1 and groups["norm"][0] is norm.bias
