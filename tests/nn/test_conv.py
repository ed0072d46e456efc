"""Weight-standardized convolutions against the float64 reference of weight standardization."""

import pytest
import torch
import torch.nn.functional as F

from groupnorm import nn as gnn
from groupnorm import reference as R


@pytest.mark.parametrize("cls,base,conv,shape", [
    (gnn.WSConv1d, torch.nn.Conv1d, F.conv1d, (2, 4, 9)),
    (gnn.WSConv2d, torch.nn.Conv2d, F.conv2d, (2, 4, 7, 6)),
    (gnn.WSConv3d, torch.nn.Conv3d, F.conv3d, (2, 4, 5, 4, 4)),
])
def test_ws_conv_forward_backward(cls, base, conv, shape):
    torch.manual_seed(0)
    m = cls(4, 6, 3, padding=1, bias=True).double()
    assert isinstance(m, base)
    x = (torch.randn(shape, dtype=torch.float64) + 0.5).requires_grad_()
    y = m(x)
    w_hat = torch.from_numpy(R.weight_standardize(m.weight, m.ws_eps))
    torch.testing.assert_close(y, conv(x, w_hat, m.bias, padding=1))
    gy = torch.randn_like(y)
    y.backward(gy)
    # dL/dW = WS backward of dL/dW_hat, where dL/dW_hat comes from the plain convolution
    w_hat_leaf = w_hat.clone().requires_grad_()
    conv(x.detach(), w_hat_leaf, m.bias.detach(), padding=1).backward(gy)
    expected = R.weight_standardize_backward(w_hat_leaf.grad, m.weight, m.ws_eps)
    torch.testing.assert_close(m.weight.grad, torch.from_numpy(expected))


def test_standardized_weight_statistics_and_gradcheck():
    m = gnn.WSConv2d(3, 5, 3, groups=1, bias=False, ws_eps=1e-6).double()
    w = m.standardized_weight().reshape(5, -1)
    torch.testing.assert_close(w.mean(1), torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(w.var(1, unbiased=False), torch.ones(5, dtype=torch.float64),
                               atol=1e-3, rtol=0)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), fast_mode=True)
    assert "ws_eps=1e-06" in repr(m)


def test_state_dict_interchange_with_conv2d():
    plain = torch.nn.Conv2d(3, 8, 3, stride=2, groups=1)
    ws = gnn.WSConv2d(3, 8, 3, stride=2)
    ws.load_state_dict(plain.state_dict())
    plain.load_state_dict(ws.state_dict())
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(ws(x), F.conv2d(x, ws.standardized_weight(), plain.bias, stride=2))
    grouped = gnn.WSConv2d(4, 8, 3, groups=2, padding="same", ws_eps=1e-4)
    assert grouped(torch.randn(1, 4, 5, 5)).shape == (1, 8, 5, 5)
    with pytest.raises(ValueError, match="eps"):
        gnn.WSConv2d(3, 8, 3, ws_eps=0)
