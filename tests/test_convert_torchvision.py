"""convert_norm on torchvision models: classification ResNets, a detection backbone with
FrozenBatchNorm2d, and a MobileNet whose widths are not multiples of 32.

torchvision is an optional dependency (``pip install groupnorm[vision]``; scripts/setup.sh vision
installs it for CI): without it this module is skipped, precisely (only when torchvision itself cannot
be imported), so that ``pip install -e .[dev] && pytest`` runs everything else."""
import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision", reason="pip install groupnorm[vision] (or torchvision)")
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

import groupnorm.nn as gnn
from groupnorm.convert import batch_norm_types, convert_norm, largest_divisor_at_most
from groupnorm.models import is_norm

pytestmark = pytest.mark.vision


def norm_layers(model):
    return [m for m in model.modules() if is_norm(m)]


def count(model):
    return sum(p.numel() for p in model.parameters())


def check_gradients(model, outputs):
    loss = sum((y * torch.randn_like(y)).sum() for y in outputs)
    loss.backward()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_resnet_to_gn(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    n_norms, n_params = len(norm_layers(model)), count(model)
    report = convert_norm(model, to="gn", num_groups=32)
    assert len(report) == n_norms and not report.notes  # every width is a multiple of 32
    assert not any(isinstance(m, batch_norm_types()) for m in model.modules())
    assert len(norm_layers(model)) == n_norms and count(model) == n_params
    assert all(type(m) is gnn.GroupNorm and m.num_groups == 32 for m in norm_layers(model))
    x = torch.randn(2, 3, 64, 64)
    model.train()
    check_gradients(model, [model(x)])
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 1000)


def test_detection_backbone_with_frozen_batch_norm():
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3)
    frozen = [m for m in backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    with torch.no_grad():  # FrozenBatchNorm2d keeps gamma/beta in buffers: make them visible
        for m in frozen:
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    gammas = {path: m.weight.clone() for path, m in backbone.named_modules()
              if isinstance(m, FrozenBatchNorm2d)}
    n_norms = len(norm_layers(backbone))
    assert n_norms == len(frozen) > 0
    report = convert_norm(backbone, "gn")
    assert len(report) == n_norms and all(c.old_type == "FrozenBatchNorm2d" for c in report)
    assert all("now trainable" in c.note for c in report)
    assert not any(isinstance(m, batch_norm_types()) for m in backbone.modules())
    assert len(norm_layers(backbone)) == n_norms
    for path, gamma in gammas.items():
        torch.testing.assert_close(backbone.get_submodule(path).weight.detach(), gamma)
    x = torch.randn(1, 3, 64, 64)
    backbone.train()
    features = backbone(x)
    assert list(features) == ["0", "1", "2", "3", "pool"]
    check_gradients(backbone, list(features.values()))
    backbone.eval()
    with torch.no_grad():
        assert all(torch.isfinite(f).all() for f in backbone(x).values())


def test_mobilenet_widths_follow_the_divisor_rule():
    """MobileNetV3-small has widths such as 16, 24, 40, 72, 88: G = largest divisor of C not above 32."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None)
    n_norms = len(norm_layers(model))
    report = convert_norm(model, "gn")
    assert len(report) == n_norms and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for change in report:
        layer = model.get_submodule(change.path)
        assert layer.num_groups == change.groups == largest_divisor_at_most(change.channels, 32)
        assert layer.eps == 1e-3  # MobileNetV3's BN eps is carried over
        assert bool(change.note) == (change.channels % 32 != 0)
    assert {c.channels for c in report.notes} >= {16, 24, 40, 72, 88}
    with pytest.raises(ValueError, match="C=16 channels cannot be split by G=32"):
        convert_norm(torchvision.models.mobilenet_v3_small(weights=None), "gn", strict=True)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    check_gradients(model, [model(x)])
