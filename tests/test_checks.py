"""Every bad input gets a clear error that names the values, at the API boundary."""

import pytest
import torch

from groupnorm import _checks
from groupnorm import functional as GF
from groupnorm import nn as gnn

X = torch.randn(4, 6, 3, 3)


@pytest.mark.parametrize("call,exc,match", [
    # C not divisible by G, at call and at construction
    (lambda: GF.group_norm(X, 4), ValueError, r"num_channels=6 is not divisible by num_groups=4"),
    (lambda: gnn.GroupNorm(4, 6), ValueError, r"num_channels=6 is not divisible by num_groups=4"),
    (lambda: gnn.GroupNorm(num_channels=6, group_size=4), ValueError, r"not divisible by group_size=4"),
    (lambda: GF.group_norm(X, 0), ValueError, r"num_groups must be a positive int, got 0"),
    # both or neither of num_groups and group_size
    (lambda: gnn.GroupNorm(2, 6, group_size=3), ValueError,
     r"exactly one of num_groups and group_size, got num_groups=2, group_size=3"),
    (lambda: gnn.GroupNorm(num_channels=6), ValueError, r"got num_groups=None, group_size=None"),
    (lambda: gnn.GroupNorm(2), TypeError, r"num_channels is required"),
    # rank < 2
    (lambda: GF.group_norm(torch.randn(6), 2), ValueError, r"rank >= 2.*got rank 1 with shape \(6,\)"),
    (lambda: GF.batch_norm(torch.randn(6)), ValueError, r"rank 1"),
    (lambda: gnn.GroupNorm(2, 6)(torch.tensor(1.0)), ValueError, r"rank 0"),
    (lambda: GF.weight_standardize(torch.randn(5)), ValueError, r"rank 1"),
    # channel count not matching the module
    (lambda: gnn.GroupNorm(2, 8)(X), ValueError, r"weight must have shape \(6,\) for an input with 6 "
                                                  r"channels, got \(8,\)"),
    (lambda: gnn.BatchNorm(8)(X), ValueError, r"expected 8 channels \(dim 1\), got 6"),
    (lambda: gnn.LayerNorm(8)(X), ValueError, r"weight must have shape \(6,\)"),
    # weight / bias of the wrong size
    (lambda: GF.group_norm(X, 2, torch.ones(5)), ValueError, r"weight must have shape \(6,\).*got \(5,\)"),
    (lambda: GF.group_norm(X, 2, None, torch.ones(6, 1)), ValueError, r"bias must have shape \(6,\)"),
    (lambda: GF.batch_norm(X, None, None, torch.ones(7)), ValueError, r"weight must have shape \(6,\)"),
    (lambda: GF.batch_norm(X, torch.zeros(5), torch.ones(6)), ValueError,
     r"running_mean must have shape \(6,\), got \(5,\)"),
    # non-floating dtypes
    (lambda: GF.group_norm(torch.ones(2, 4, dtype=torch.int64), 2), TypeError,
     r"float64 input, got dtype torch.int64"),
    (lambda: GF.batch_norm(torch.ones(2, 4, dtype=torch.int32)), TypeError, r"torch.int32"),
    (lambda: GF.group_norm([[1.0, 2.0]], 1), TypeError, r"expected a torch.Tensor, got list"),
    # eps <= 0
    (lambda: GF.group_norm(X, 2, eps=0.0), ValueError, r"eps must be a finite number > 0, got 0.0"),
    (lambda: GF.batch_norm(X, eps=-1e-5), ValueError, r"got -1e-05"),
    (lambda: gnn.GroupNorm(2, 6, eps=float("nan")), ValueError, r"eps must be"),
    (lambda: gnn.BatchNorm(6, eps=0), ValueError, r"eps must be"),
    (lambda: GF.weight_standardize(torch.randn(3, 3), eps=0), ValueError, r"eps must be"),
    # images_per_worker not dividing the batch
    (lambda: GF.batch_norm(X, images_per_worker=3), ValueError,
     r"images_per_worker=3 does not divide the batch size N=4"),
    (lambda: gnn.BatchNorm(6, images_per_worker=3)(X), ValueError, r"images_per_worker=3 does not divide"),
    (lambda: gnn.BatchNorm(6, images_per_worker=0), ValueError, r"positive int or None, got 0"),
    (lambda: gnn.BatchNorm(6, images_per_worker=2, sync=True), ValueError, r"sync=True"),
    # too few values per worker to estimate a variance
    (lambda: GF.batch_norm(torch.randn(4, 3), images_per_worker=1), ValueError,
     r"more than 1 value per channel per worker"),
    # activation, residual, momentum
    (lambda: GF.group_norm(X, 2, activation="tanh"), ValueError, r"activation must be one of.*'tanh'"),
    (lambda: gnn.GroupNorm(2, 6, activation="elu"), ValueError, r"'elu'"),
    (lambda: GF.group_norm(X, 2, residual=torch.randn(4, 6, 3)), ValueError,
     r"residual shape \(4, 6, 3\) must equal input shape \(4, 6, 3, 3\)"),
    (lambda: GF.group_norm(X, 2, residual=X.double()), ValueError, r"dtype and device"),
    (lambda: GF.batch_norm(X, momentum=1.5), ValueError, r"momentum must be in \[0, 1\], got 1.5"),
    (lambda: gnn.BatchNorm(0), ValueError, r"num_channels must be a positive int, got 0"),
    # batch renorm
    (lambda: gnn.BatchRenorm(6, r_max=0.5), ValueError, r"r_max >= 1 and d_max >= 0, got r_max=0.5"),
    (lambda: gnn.BatchRenorm(6, momentum=None), ValueError, r"momentum"),
    (lambda: GF.batch_renorm(X, None, None), ValueError, r"needs running_mean and running_var"),
])
def test_error_names_the_values(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_resolve_groups():
    assert _checks.resolve_groups(64, num_groups=32) == 32
    assert _checks.resolve_groups(64, group_size=16) == 4
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        _checks.resolve_groups(64, group_size=True)


def test_nan_inf_and_empty_are_not_errors():
    x = X.clone()
    x[0, 0, 0, 0] = float("nan")
    assert gnn.GroupNorm(2, 6)(x).isnan().any()
    assert gnn.GroupNorm(2, 6)(torch.randn(0, 6, 3, 3)).shape == (0, 6, 3, 3)
    assert gnn.BatchNorm(6)(torch.randn(0, 6, 3, 3)).shape == (0, 6, 3, 3)
