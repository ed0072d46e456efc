"""Float64 NumPy oracle of the paper's normalization family (Wu & He, 2018, Sec. 3).

Every layer and kernel of this package is tested against this module. It is written for clarity,
not speed: plain NumPy in float64, one code path for the four methods.

The family is one formula with different sets S_i (the paper's eqs. 1, 2, 6, 7)::

    x_hat_i = (x_i - mu_i) / sigma_i                                   (1)
    mu_i = 1/m * sum_{k in S_i} x_k,  sigma_i = sqrt(1/m * sum_{k in S_i} (x_k - mu_i)^2 + eps)   (2)
    y_i = gamma_c * x_hat_i + beta_c          (per-channel affine, c = i_C)      (6)

with, for an input of shape (N, C, *spatial):

    "bn"  S_i = {k | k_C = i_C}                               (over N and spatial, per channel)
    "ln"  S_i = {k | k_N = i_N}                               (over C and spatial, per sample)
    "in"  S_i = {k | k_N = i_N, k_C = i_C}                    (over spatial, per sample and channel)
    "gn"  S_i = {k | k_N = i_N, floor(k_C / (C/G)) = floor(i_C / (C/G))}      (7)

For "bn", ``images_per_worker=n`` splits the batch into consecutive chunks of n samples, each
normalized with its own statistics (unsynchronized workers): S_i = {k | k_C = i_C, k_N // n = i_N // n}.

The fused-kernel contract (docs/DESIGN.md) extends the affine output with an optional residual and
activation, in this order::

    z = gamma * x_hat + beta + residual,      y = act(z),   act in {None, "relu", "silu", "gelu"}

("gelu" is the exact form z * Phi(z) with the Gaussian CDF Phi, not the tanh approximation.)

Shapes of the returned statistics (``mean`` and ``var``, the biased variance of eq. 2 without eps):
``"gn"`` (N, G), ``"ln"`` (N, 1), ``"in"`` (N, C), ``"bn"`` (C,), or (N // n, C) with
``images_per_worker=n``.
"""

from __future__ import annotations

import math

import numpy as np

KINDS = ("bn", "ln", "in", "gn")
ACTIVATIONS = (None, "relu", "silu", "gelu")

__all__ = [
    "KINDS",
    "ACTIVATIONS",
    "normalize",
    "normalize_backward",
    "apply_activation",
    "activation_grad",
    "weight_standardize",
    "weight_standardize_backward",
]

_erf = np.frompyfunc(math.erf, 1, 1)


def _as64(a):
    """Any array-like (NumPy array, torch tensor, list) as a float64 NumPy array."""
    if a is None:
        return None
    if hasattr(a, "detach"):  # a torch tensor, without importing torch here
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------

def _phi_cdf(z):
    return 0.5 * (1.0 + _erf(z / math.sqrt(2.0)).astype(np.float64))


def apply_activation(z, name):
    """act(z) for name in {None, "relu", "silu", "gelu"} (gelu exact: z * Phi(z))."""
    z = _as64(z)
    if name is None:
        return z.copy()
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "silu":
        return z / (1.0 + np.exp(-z))
    if name == "gelu":
        return z * _phi_cdf(z)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def activation_grad(z, name):
    """d act(z) / dz. relu'(0) is taken as 0, as in torch."""
    z = _as64(z)
    if name is None:
        return np.ones_like(z)
    if name == "relu":
        return (z > 0).astype(np.float64)
    if name == "silu":
        s = 1.0 / (1.0 + np.exp(-z))
        return s * (1.0 + z * (1.0 - s))
    if name == "gelu":
        pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        return _phi_cdf(z) + z * pdf
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


# ---------------------------------------------------------------------------------------------
# Grouping: every method becomes "normalize the last axis of a 3-D array (A, B, M)"
# ---------------------------------------------------------------------------------------------

def _num_sets(kind, x_shape, num_groups, images_per_worker):
    """Validate (kind, G, n) and return the number of groups G used for the (N, G, ...) view."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if len(x_shape) < 2:
        raise ValueError(f"input must have rank >= 2 (N, C, *spatial), got shape {tuple(x_shape)}")
    n_batch, channels = x_shape[0], x_shape[1]
    if kind == "gn":
        if num_groups is None or num_groups <= 0 or channels % num_groups:
            raise ValueError(f"gn needs num_groups dividing C={channels}, got {num_groups}")
        return num_groups
    if num_groups is not None:
        raise ValueError(f"num_groups applies to 'gn' only, got num_groups={num_groups} for {kind!r}")
    if images_per_worker is not None:
        if kind != "bn":
            raise ValueError(f"images_per_worker applies to 'bn' only, got kind {kind!r}")
        if images_per_worker <= 0 or n_batch % images_per_worker:
            raise ValueError(f"images_per_worker={images_per_worker} must divide the batch N={n_batch}")
    return {"ln": 1, "in": channels, "bn": channels}[kind]


def _to_sets(x, kind, groups, images_per_worker):
    """View x (N, C, *spatial) as (A, B, M): the statistics are taken over the last axis M.

    gn/ln/in: (N, G, C/G * S).  bn: (W, C, n * S) with W workers of n images (W = 1 by default).
    """
    n_batch, channels = x.shape[0], x.shape[1]
    spatial = int(np.prod(x.shape[2:], dtype=np.int64))
    if kind != "bn":
        return x.reshape(n_batch, groups, (channels // groups) * spatial)
    per = images_per_worker or n_batch
    workers = n_batch // per if per else 0
    return (x.reshape(workers, per, channels, spatial)
             .transpose(0, 2, 1, 3)
             .reshape(workers, channels, per * spatial))


def _from_sets(a, kind, shape, images_per_worker):
    """Inverse of _to_sets."""
    if kind != "bn":
        return a.reshape(shape)
    n_batch, channels = shape[0], shape[1]
    spatial = int(np.prod(shape[2:], dtype=np.int64))
    per = images_per_worker or n_batch
    workers = n_batch // per if per else 0
    return (a.reshape(workers, channels, per, spatial)
             .transpose(0, 2, 1, 3)
             .reshape(shape))


def _channel_shape(ndim):
    """Broadcast shape of a per-channel vector against (N, C, *spatial)."""
    return (1, -1) + (1,) * (ndim - 2)


def _stats_out(a, kind, images_per_worker):
    """Statistics array (A, B) in the documented shape."""
    if kind == "bn" and images_per_worker is None:
        return a.reshape(-1) if a.shape[0] else np.full(a.shape[1], np.nan)
    return a


def _x_hat(x, kind, num_groups, eps, images_per_worker):
    groups = _num_sets(kind, x.shape, num_groups, images_per_worker)
    xs = _to_sets(x, kind, groups, images_per_worker)
    if xs.shape[-1] == 0 or xs.size == 0:
        mean = np.full(xs.shape[:2], np.nan)
        var = np.full(xs.shape[:2], np.nan)
    else:
        mean = xs.mean(axis=-1)
        var = ((xs - mean[..., None]) ** 2).mean(axis=-1)   # two-pass: no cancellation
    rstd = 1.0 / np.sqrt(var + eps)
    xhat_s = (xs - mean[..., None]) * rstd[..., None]
    return xs, xhat_s, mean, var, rstd


# ---------------------------------------------------------------------------------------------
# Forward and analytic backward
# ---------------------------------------------------------------------------------------------

def normalize(x, kind, num_groups=None, weight=None, bias=None, eps=1e-5, activation=None,
              residual=None, images_per_worker=None):
    """The paper's normalization of x over the sets S_i of ``kind``, in float64.

    Args:
        x: array (N, C, *spatial), rank >= 2 (a torch tensor is accepted and converted).
        kind: "bn", "ln", "in" or "gn".
        num_groups: G for "gn" (must divide C); must be None for the other kinds.
        weight, bias: per-channel gamma, beta of shape (C,), or None (gamma = 1, beta = 0).
        eps: added to the variance, eq. (2).
        activation: None, "relu", "silu" or "gelu" (exact), applied last.
        residual: array of x's shape added before the activation, or None.
        images_per_worker: "bn" only: normalize consecutive chunks of this many samples separately.

    Returns:
        (y, mean, var): y = act(gamma * x_hat + beta + residual) of x's shape; mean and var (biased,
        without eps) in the shapes given in the module docstring.
    """
    x = _as64(x)
    _, xhat_s, mean, var, _ = _x_hat(x, kind, num_groups, eps, images_per_worker)
    x_hat = _from_sets(xhat_s, kind, x.shape, images_per_worker)
    cshape = _channel_shape(x.ndim)
    z = x_hat
    if weight is not None:
        z = z * _as64(weight).reshape(cshape)
    if bias is not None:
        z = z + _as64(bias).reshape(cshape)
    if residual is not None:
        z = z + _as64(residual)
    y = apply_activation(z, activation)
    return y, _stats_out(mean, kind, images_per_worker), _stats_out(var, kind, images_per_worker)


def normalize_backward(grad_y, x, kind, num_groups=None, weight=None, bias=None, eps=1e-5,
                       activation=None, residual=None, images_per_worker=None):
    """Analytic gradients of ``normalize`` (same arguments) for the upstream gradient grad_y.

    With z = gamma * x_hat + beta + residual and y = act(z), per set S of m elements:

        dz        = grad_y * act'(z)
        dresidual = dz
        dbeta_c   = sum over (N, spatial) of dz
        dgamma_c  = sum over (N, spatial) of dz * x_hat
        g         = dz * gamma                                           (dL / dx_hat)
        dx        = rstd * (g - mean_S(g) - x_hat * mean_S(g * x_hat))   (rstd = 1 / sigma)

    Returns a dict with "x", "weight", "bias", "residual" (None where the input was None).
    """
    x = _as64(x)
    grad_y = _as64(grad_y)
    if grad_y.shape != x.shape:
        raise ValueError(f"grad_y shape {grad_y.shape} must equal x shape {x.shape}")
    groups = _num_sets(kind, x.shape, num_groups, images_per_worker)
    _, xhat_s, _, _, rstd = _x_hat(x, kind, num_groups, eps, images_per_worker)
    x_hat = _from_sets(xhat_s, kind, x.shape, images_per_worker)
    cshape = _channel_shape(x.ndim)
    gamma = np.ones(x.shape[1]) if weight is None else _as64(weight)
    z = x_hat * gamma.reshape(cshape)
    if bias is not None:
        z = z + _as64(bias).reshape(cshape)
    if residual is not None:
        z = z + _as64(residual)
    dz = grad_y * activation_grad(z, activation)
    reduce_axes = (0,) + tuple(range(2, x.ndim))
    g_s = _to_sets(dz * gamma.reshape(cshape), kind, groups, images_per_worker)
    if g_s.size:
        mean_g = g_s.mean(axis=-1, keepdims=True)
        mean_gx = (g_s * xhat_s).mean(axis=-1, keepdims=True)
        dx_s = rstd[..., None] * (g_s - mean_g - xhat_s * mean_gx)
    else:
        dx_s = g_s
    return {
        "x": _from_sets(dx_s, kind, x.shape, images_per_worker),
        "weight": None if weight is None else (dz * x_hat).sum(axis=reduce_axes),
        "bias": None if bias is None else dz.sum(axis=reduce_axes),
        "residual": None if residual is None else dz,
    }


# ---------------------------------------------------------------------------------------------
# Weight standardization (Qiao et al., 2019), used with GN as "GN+WS"
# ---------------------------------------------------------------------------------------------

def weight_standardize(weight, eps=1e-5):
    """Per output filter o: W_hat[o] = (W[o] - mean(W[o])) / sqrt(var(W[o]) + eps).

    weight: (O, *rest) with rank >= 2 (conv or linear weight); mean and biased var over *rest.
    It is LN without affine applied to the weight viewed as (O, 1, prod(rest)).
    """
    w = _as64(weight)
    if w.ndim < 2:
        raise ValueError(f"weight must have rank >= 2 (out, in, ...), got shape {w.shape}")
    y, _, _ = normalize(w.reshape(w.shape[0], 1, -1), "ln", eps=eps)
    return y.reshape(w.shape)


def weight_standardize_backward(grad_w_hat, weight, eps=1e-5):
    """Gradient of ``weight_standardize`` with respect to the raw weight."""
    w = _as64(weight)
    g = _as64(grad_w_hat).reshape(w.shape[0], 1, -1)
    grads = normalize_backward(g, w.reshape(w.shape[0], 1, -1), "ln", eps=eps)
    return grads["x"].reshape(w.shape)
