"""Numba task kernels behind ``groupnorm.kernels.cpu`` (see its docstring for the math and layouts).

Every parallel kernel here is a *serial*, GIL-free function over a range of tasks [t0, t1);
``cpu._run`` hands the ranges to threads. Why not ``prange``: each parfor is compiled into a gufunc that
relinks and re-optimizes every helper it calls, which made the first call take ~10 s per kernel and
dtype on our (shared) 2-core machine; serial task functions compile once each (and are cached on
disk).

Array conventions (x's dtype unless noted):
    "cf" x, r, y, dy, dx, dr: (N, C*S);  "cl": (N, S, C).
    r is x itself when there is no residual, with rc = 0 (adding rc * r is then exactly + 0).
    coef (N, 8, C): per (n, c) [hi, lo, gamma*rstd, beta, dx_dz, dx_xc, dx_const, unused], where
        x - mean = (x - hi) - lo (hi the stored mean, lo its float64 remainder or 0) and
        dx = dx_dz * dz + dx_xc * ((x - hi) - lo) + dx_const.
    part: float64 per-task partial sums; ab (N, 2, C) float64: per (n, c) sum(dz), sum(dz * (x - mean)).

Everything compiled lives in this one file on purpose: Numba's disk cache is keyed on the file that
defines a function, not on the files whose functions it inlines, so a helper kept in another module
could be edited without invalidating the cached kernels that inline it.

Activations and their derivatives (first section), float32 and float64:

        relu(z) = max(z, 0)                     relu'(z) = 1 if z > 0 else 0   (as torch)
        silu(z) = z * s,  s = 1 / (1 + e^-z)    silu'(z) = s * (1 + z * (1 - s)),  1 - s = e^-z s
        gelu(z) = z * Phi(z)                    gelu'(z) = Phi(z) + z * phi(z)   (exact, erf form)

    Why our own float32 exp and erf: LLVM vectorizes a loop only when it can see through its body, and
    libm's expf/erf are opaque calls (with libm's erf, float32 GELU cost ~26 ns per element against ~1
    ns here). The float32 versions here are branch-free straight-line code that vectorizes to 8 lanes:

    * exp(x) = 2^k e^r, k = round(x / ln 2), r = x - k ln 2 (ln 2 split in two, Cody-Waite, so k * _LN2_HI
      is exact), e^r by its Taylor series to r^7 (|r| <= 0.347: truncation < 1e-8), 2^k from exponent bits.
    * Phi(z) = 0.5 + 0.5 erf(t) for |t| < 1 and from erfc(|t|) beyond (t = z / sqrt 2), so that Phi keeps
      its relative accuracy in the left tail, where 1 + erf(t) would cancel:
      erf(t) = t P(t^2) and erfc(a) = e^(-a^2) Q(2/a - 1) / a, with P (degree 6) and Q (degree 10) our own
      Chebyshev least-squares fits (float64, 4000 and 6000 nodes) of erf(t)/t on [0, 1] and of
      erfc(a) e^(a^2) a on 1/a in [1/26, 1]; max relative error 1.4e-9 and 2e-7 before float32 rounding.

    They are accurate to a few float32 ulps (tests/kernels/test_cpu.py checks them against float64). Multiply-adds may fuse (fastmath "contract" here only: the statistics never use it).
    Float64 uses ``math`` (exact to the last bit or two); it is not a performance target.

    Each helper dispatches on its argument's type at compile time (``numba.extending.overload``).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

OPTS = dict(cache=True, nogil=True, error_model="numpy")   # fastmath off: exact, fixed-order sums
DOT_BLK = 256      # "cf" sums (_sums, _dots): blocks summed in x's dtype, then in float64
R = 16             # "cl" rows summed in x's dtype before a float64 flush
BLK = 2048         # longest run of one channel handled at once ("cf" backward scratch)
LO_THRESHOLD = 4.0
SHORT = 128        # "cf" backward: channels up to this long are summed 4 at a time (_dots4)


# -------------------------------------------------------------------------------------------------
# Activations
# -------------------------------------------------------------------------------------------------

_MATH_OPTS = dict(OPTS, fastmath={"contract"})   # activations only; sums never contract

f32 = np.float32
_LOG2E = f32(1.4426950408889634)
_LN2_HI = f32(0.693359375)
_LN2_LO = f32(-2.12194440054690583e-4)
_E0, _E1, _E2, _E3, _E4, _E5, _E6, _E7 = (f32(1.0 / math.factorial(k)) for k in range(8))
_EXP_LO = f32(-87.0)       # e^-87 is still a normal float32
_EXP_HI = f32(88.0)        # k <= 127: the exponent bits do not overflow
_BIAS = f32(127.0)
_MANT = f32(8388608.0)     # 2^23: (k + 127) * 2^23 is the bit pattern of 2^k
_HALF = f32(0.5)
_ONE = f32(1.0)
_TWO = f32(2.0)
_ZERO = f32(0.0)
_SQRT1_2 = f32(0.7071067811865476)
_INV_SQRT_2PI = f32(0.3989422804014327)
_P = [f32(c) for c in (1.128379165883329, -0.3761262690789193, 0.11283597491556897,
                       -0.026854329538184476, 0.005189312812450873, -0.0008018859013996837,
                       7.8825004462037e-05)]
_P0, _P1, _P2, _P3, _P4, _P5, _P6 = _P
_Q = [f32(c) for c in (0.5107913388581031, -0.08360487646915386, -0.009157608292073929,
                       0.014856387072623226, -0.006801423114657222, 0.0014145240671239747,
                       0.0006315104384716734, -0.0010320847056149933, 0.0005337079144870706,
                       6.177422249595213e-05, -0.00010971751800330879)]
_Q0, _Q1, _Q2, _Q3, _Q4, _Q5, _Q6, _Q7, _Q8, _Q9, _Q10 = _Q
_INV_SQRT2_64 = 0.7071067811865476
_INV_SQRT_2PI_64 = 0.3989422804014327


@intrinsic
def _f32_from_bits(typingctx, bits):
    """Reinterpret an int32 bit pattern as float32 (no instruction; vectorizable)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(**_MATH_OPTS)
def exp_f32(x):
    """e^x for float32 x, relative error < 2e-7 (x clamped to [-87, 88])."""
    x = min(max(x, _EXP_LO), _EXP_HI)
    k = np.floor(x * _LOG2E + _HALF)
    r = (x - k * _LN2_HI) - k * _LN2_LO
    p = _E0 + r * (_E1 + r * (_E2 + r * (_E3 + r * (_E4 + r * (_E5 + r * (_E6 + r * _E7))))))
    return p * _f32_from_bits(np.int32((k + _BIAS) * _MANT))


@njit(**_MATH_OPTS)
def phi_f32(z):
    """(Phi(z), e^(-z^2/2)) for float32 z: the Gaussian CDF and the unnormalized density."""
    a = abs(z * _SQRT1_2)
    u = a * a
    e = exp_f32(-u)
    small = _HALF + _HALF * (z * _SQRT1_2) * (
        _P0 + u * (_P1 + u * (_P2 + u * (_P3 + u * (_P4 + u * (_P5 + u * _P6))))))
    s = _TWO / a - _ONE
    q = _Q0 + s * (_Q1 + s * (_Q2 + s * (_Q3 + s * (_Q4 + s * (_Q5 + s * (_Q6 + s * (
        _Q7 + s * (_Q8 + s * (_Q9 + s * _Q10)))))))))
    half_erfc = _HALF * e * q / a
    large = _ONE - half_erfc if z > _ZERO else half_erfc
    return (small if a < _ONE else large), e


# Python stubs; the compiled versions come from the overloads below.
def relu(z): raise NotImplementedError      # noqa: E704
def drelu(z): raise NotImplementedError     # noqa: E704
def silu(z): raise NotImplementedError      # noqa: E704
def dsilu(z): raise NotImplementedError     # noqa: E704
def gelu(z): raise NotImplementedError      # noqa: E704
def dgelu(z): raise NotImplementedError     # noqa: E704


def _is32(z):
    return z == types.float32


@overload(relu, jit_options=OPTS)
def _ov_relu(z):
    zero = _ZERO if _is32(z) else 0.0
    return lambda z: zero if z <= zero else z      # NaN stays NaN, as in torch


@overload(drelu, jit_options=OPTS)
def _ov_drelu(z):
    zero, one = (_ZERO, _ONE) if _is32(z) else (0.0, 1.0)
    return lambda z: one if z > zero else zero


@overload(silu, jit_options=_MATH_OPTS)
def _ov_silu(z):
    if _is32(z):
        return lambda z: z / (_ONE + exp_f32(-z))
    return lambda z: z / (1.0 + math.exp(-z))


@overload(dsilu, jit_options=_MATH_OPTS)
def _ov_dsilu(z):
    # 1 - s is computed as e * s (e = e^-z): no cancellation when s -> 1.
    if _is32(z):
        def impl(z):
            e = exp_f32(-z)
            s = _ONE / (_ONE + e)
            return s * (_ONE + z * (e * s))
        return impl

    def impl64(z):
        e = math.exp(-z)
        s = 1.0 / (1.0 + e)
        return s * (1.0 + z * (e * s))
    return impl64


@overload(gelu, jit_options=_MATH_OPTS)
def _ov_gelu(z):
    if _is32(z):
        return lambda z: z * phi_f32(z)[0]
    return lambda z: 0.5 * z * math.erfc(-z * _INV_SQRT2_64)


@overload(dgelu, jit_options=_MATH_OPTS)
def _ov_dgelu(z):
    if _is32(z):
        def impl(z):
            p, e = phi_f32(z)
            return p + z * _INV_SQRT_2PI * e
        return impl

    def impl64(z):
        return (0.5 * math.erfc(-z * _INV_SQRT2_64)
                + z * _INV_SQRT_2PI_64 * math.exp(-0.5 * z * z))
    return impl64



# -------------------------------------------------------------------------------------------------
# Sums. Two levels: blocks of DOT_BLK elements summed in x's dtype (values shifted by a data sample,
# so small and centred: no cancellation), the block sums added in float64. A reduction vectorizes
# only when the compiler may reorder it (fastmath "reassoc"), so that is allowed inside a block and
# nowhere else: the order depends on the shape and the machine's vector width, never on the run.
#
# Views cost: each slice adds and drops a reference on its array with atomic instructions. So hot
# loops slice inside the function that loops (a fresh view passed to a non-inlined call costs two
# more updates per call), the channels_last kernels index their 3-D arrays instead of slicing rows,
# and the threaded entry points hand the kernels borrowed arrays (``_borrowed``), whose views skip
# the counting: two threads updating one count made the kernels slower on two threads than on one.
# -------------------------------------------------------------------------------------------------

def _zero(a):
    raise NotImplementedError


@overload(_zero, jit_options=OPTS)
def _ov_zero(a):
    zero = _ZERO if a.dtype == types.float32 else 0.0
    return lambda a: zero


_DOT_OPTS = dict(OPTS, fastmath={"reassoc"})   # blocked sums only (_dots, _sums, _dots4)


@njit(**_DOT_OPTS)
def _dots(dz, dzo, x, xo, L, hi):
    """(sum(dz), sum(dz * (x - hi))) over dz[dzo:dzo+L] and x[xo:xo+L], in float64.

    Blocks of DOT_BLK elements are summed in x's dtype, and their sums added in float64. Within a
    block the compiler may reorder the sum ("reassoc", this function only), which is what lets it
    vectorize a reduction: ~2x faster on 7x7 to 28x28 channels than fixed lanes, whose clearing and
    folding cost more than such a run. The order then depends on the shape and on the machine's
    vector width, never on the run. x - hi stays exact: nothing in it can be reassociated (callers
    apply the float64 remainder lo of the mean as sum(dz * (x - hi)) - lo * sum(dz), outside)."""
    s1 = 0.0
    s2 = 0.0
    for b in range(0, L, DOT_BLK):
        m = min(DOT_BLK, L - b)
        ds = dz[dzo + b:dzo + b + m]
        xs = x[xo + b:xo + b + m]
        a1 = _zero(dz)
        a2 = _zero(dz)
        for i in range(m):
            d = ds[i]
            a1 += d
            a2 += d * (xs[i] - hi)
        s1 += np.float64(a1)
        s2 += np.float64(a2)
    return s1, s2


@njit(**_DOT_OPTS)
def _sums(v, i0, i1, K):
    """(sum(v - K), sum((v - K)^2)) over v[i0:i1], in float64; K has v's dtype (a data sample, so
    the terms are small and centred). Blocks of DOT_BLK summed in v's dtype, reordered within the
    block only, then added in float64 (as in ``_dots``, and for the same reason: ~1.5x faster than
    fixed lanes). Measured exact to ~1e-9 of the variance at mean 1e4, std 1 in float32."""
    s1 = 0.0
    s2 = 0.0
    for b in range(i0, i1, DOT_BLK):
        m = min(DOT_BLK, i1 - b)
        vs = v[b:b + m]
        a1 = _zero(v)
        a2 = _zero(v)
        for i in range(m):
            d = vs[i] - K
            a1 += d
            a2 += d * d
        s1 += np.float64(a1)
        s2 += np.float64(a2)
    return s1, s2


@njit(**_DOT_OPTS)
def _dots4(dz, dzo, x, xo, S, hi):
    """_dots of 4 adjacent channels of S <= SHORT elements each (dz from dzo, x from xo), in one
    loop. Why: the compiler's vector loop takes 32 elements a turn and leaves the rest of a short
    channel to scalar code (17 of 49 at 7x7); with four channels' sums in the loop it takes 8 a
    turn. Backward sums over 7x7 channels: 1.8-3x faster than one channel at a time, 1.1-1.7x at
    10x10 to 11x11; the same for dx or the forward's normalize was slower (measured)."""
    d0 = dz[dzo:dzo + S]
    d1 = dz[dzo + S:dzo + 2 * S]
    d2 = dz[dzo + 2 * S:dzo + 3 * S]
    d3 = dz[dzo + 3 * S:dzo + 4 * S]
    x0 = x[xo:xo + S]
    x1 = x[xo + S:xo + 2 * S]
    x2 = x[xo + 2 * S:xo + 3 * S]
    x3 = x[xo + 3 * S:xo + 4 * S]
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = _zero(dz)
    for i in range(S):
        a0 += d0[i]
        a1 += d1[i]
        a2 += d2[i]
        a3 += d3[i]
        b0 += d0[i] * (x0[i] - hi)
        b1 += d1[i] * (x1[i] - hi)
        b2 += d2[i] * (x2[i] - hi)
        b3 += d3[i] * (x3[i] - hi)
    return ((np.float64(a0), np.float64(a1), np.float64(a2), np.float64(a3)),
            (np.float64(b0), np.float64(b1), np.float64(b2), np.float64(b3)))


@njit(**OPTS)
def _finish_group(n, g, Cg, mean64, var, eps, gamma, beta, mean, rstd, coef):
    """Store mean and rstd (x's dtype) and coef[n, :4, c] of the group's channels, built from the
    *stored* (rounded) mean and rstd so that the backward rebuilds the same z."""
    mean[n, g] = mean64
    rstd[n, g] = 1.0 / math.sqrt(max(var, 0.0) + eps)
    hi = np.float64(mean[n, g])
    rs = np.float64(rstd[n, g])
    lo = mean64 - hi if abs(hi) * rs > LO_THRESHOLD else 0.0
    for c in range(g * Cg, (g + 1) * Cg):
        coef[n, 0, c] = hi
        coef[n, 1, c] = lo
        coef[n, 2, c] = gamma[c] * rs
        coef[n, 3, c] = beta[c]


@njit(**OPTS)
def _dx_coefs(n, g, Cg, D, rs, gamma, ab, coef):
    """dx coefficients of group (n, g) from its per-channel sums ab[n] (see module docstring)."""
    s1 = 0.0
    s2 = 0.0
    for c in range(g * Cg, (g + 1) * Cg):
        s1 += gamma[c] * ab[n, 0, c]
        s2 += gamma[c] * ab[n, 1, c]
    m1 = s1 / D              # mean over the group of gamma * dz
    m2 = rs * s2 / D         # mean over the group of gamma * dz * x_hat
    for c in range(g * Cg, (g + 1) * Cg):
        coef[n, 4, c] = rs * gamma[c]
        coef[n, 5, c] = -rs * rs * m2
        coef[n, 6, c] = -rs * m1


@njit(**OPTS)
def setup_backward(mean, rstd, gamma, beta, coef):
    """coef[:, :4] as the forward built it, with lo = 0; returns whether some group needs lo (then
    ``cf_set_lo``/``cl_set_lo`` fill it in from a fresh sum over x)."""
    N, G = mean.shape
    C = gamma.shape[0]
    Cg = C // G
    any_lo = False
    for n in range(N):
        for g in range(G):
            hi = np.float64(mean[n, g])
            rs = np.float64(rstd[n, g])
            any_lo = any_lo or abs(hi) * rs > LO_THRESHOLD
            for c in range(g * Cg, (g + 1) * Cg):
                coef[n, 0, c] = hi
                coef[n, 1, c] = 0.0
                coef[n, 2, c] = gamma[c] * rs
                coef[n, 3, c] = beta[c]
    return any_lo


@njit(**OPTS)
def param_grads(ab, rstd, dgamma, dbeta):
    """dgamma_c = sum_n rstd[n, g] * ab[n, 1, c], dbeta_c = sum_n ab[n, 0, c] (float64, n in order),
    stored in the outputs' dtype (the parameters')."""
    N, G = rstd.shape
    C = dgamma.shape[0]
    Cg = C // G
    for c in range(C):
        sg = 0.0
        sb = 0.0
        for n in range(N):
            sg += np.float64(rstd[n, c // Cg]) * ab[n, 1, c]
            sb += ab[n, 0, c]
        dgamma[c] = sg
        dbeta[c] = sb


@njit(**OPTS)
def all_dx_coefs(ab, gamma, rstd, D, coef):
    """coef[:, 4:7] of every group from ab (D elements per group)."""
    N, G = rstd.shape
    Cg = gamma.shape[0] // G
    for n in range(N):
        for g in range(G):
            _dx_coefs(n, g, Cg, D, np.float64(rstd[n, g]), gamma, ab, coef)


# -------------------------------------------------------------------------------------------------
# "cf": (N, C*S); a group is the contiguous run [g*D, (g+1)*D), D = C/G * S; task t = (n, g, q)
# -------------------------------------------------------------------------------------------------

@njit(**OPTS)
def _cf_range(t, G, Q, D):
    """(n, g, i0, i1): sample, group and element range of task t (chunk q of Q of the group)."""
    n = t // (G * Q)
    k = t - n * G * Q
    g = k // Q
    q = k - g * Q
    L = (D + Q - 1) // Q
    return n, g, g * D + min(D, q * L), g * D + min(D, q * L + L)


@njit(**OPTS)
def _cf_normalize(y, x, r, rc, act, cn, n, S, i0, i1):
    """y = act(((x - hi) - lo) * a + b + rc * r) over the elements [i0, i1) of sample n, channel by
    channel. One loop per activation (each vectorizes); y is never x: an in-place select would
    become a masked store."""
    yn = y[n]
    xn = x[n]
    rn = r[n]
    for c in range(i0 // S, (i1 - 1) // S + 1):
        pos = max(i0, c * S)
        end = min(i1, (c + 1) * S)
        hi, lo, a, b = cn[0, c], cn[1, c], cn[2, c], cn[3, c]
        ys = yn[pos:end]
        xs = xn[pos:end]
        rs = rn[pos:end]
        if act == 0:
            for i in range(end - pos):
                ys[i] = ((xs[i] - hi) - lo) * a + b + rc * rs[i]
        elif act == 1:
            for i in range(end - pos):
                ys[i] = relu(((xs[i] - hi) - lo) * a + b + rc * rs[i])
        elif act == 2:
            for i in range(end - pos):
                ys[i] = silu(((xs[i] - hi) - lo) * a + b + rc * rs[i])
        else:
            for i in range(end - pos):
                ys[i] = gelu(((xs[i] - hi) - lo) * a + b + rc * rs[i])


@njit(**OPTS)
def cf_forward_tasks(t0, t1, mode, x, r, rc, gamma, beta, G, eps, act, Q, y, mean, rstd, part,
                     coef):
    """mode 0 (Q == 1): sum a group, finish it, normalize it while it is in cache.
    mode 1: part[t] = shifted sums of chunk t.  mode 2: normalize chunk t (after cf_combine)."""
    C = gamma.shape[0]
    S = x.shape[1] // C
    Cg = C // G
    D = Cg * S
    for t in range(t0, t1):
        n, g, i0, i1 = _cf_range(t, G, Q, D)
        if mode == 2:
            _cf_normalize(y, x, r, rc, act, coef[n], n, S, i0, i1)
            continue
        K = x[n, g * D]
        s1, s2 = _sums(x[n], i0, i1, K)
        if mode == 1:
            part[t, 0] = s1
            part[t, 1] = s2
            continue
        m = s1 / D
        _finish_group(n, g, Cg, np.float64(K) + m, s2 / D - m * m, eps, gamma, beta, mean, rstd, coef)
        _cf_normalize(y, x, r, rc, act, coef[n], n, S, i0, i1)


@njit(**OPTS)
def cf_combine(x, part, G, eps, gamma, beta, mean, rstd, coef):
    """Merge the Q chunk sums of every group (fixed order) and finish the groups."""
    N = x.shape[0]
    C = gamma.shape[0]
    Cg = C // G
    D = x.shape[1] // G
    Q = part.shape[0] // (N * G)
    for n in range(N):
        for g in range(G):
            s1 = 0.0
            s2 = 0.0
            for q in range(Q):
                t = (n * G + g) * Q + q
                s1 += part[t, 0]
                s2 += part[t, 1]
            m = s1 / D
            _finish_group(n, g, Cg, np.float64(x[n, g * D]) + m, s2 / D - m * m, eps, gamma, beta,
                          mean, rstd, coef)


@njit(**OPTS)
def cf_set_lo(x, part, G, coef):
    """lo = mean - hi of every group, from mode-1 sums (shift K = the group's first element)."""
    N = x.shape[0]
    C = coef.shape[2]
    Cg = C // G
    D = x.shape[1] // G
    Q = part.shape[0] // (N * G)
    for n in range(N):
        for g in range(G):
            s1 = 0.0
            for q in range(Q):
                s1 += part[(n * G + g) * Q + q, 0]
            lo = (s1 / D + np.float64(x[n, g * D])) - np.float64(coef[n, 0, g * Cg])
            for c in range(g * Cg, (g + 1) * Cg):
                coef[n, 1, c] = lo


@njit(**OPTS)
def _cf_bwd_sums(t, n, g, i0, i1, S, dy, x, r, rc, act, cn, dr, store_dr, keep, zb, part):
    """part[t, k, c - g*Cg] for k = 0, 1: sum(dz), sum(dz * (x - mean)) over [i0, i1), per channel.
    With an activation dz = dy * act'(z) is written to dr (an output), or to zb (whole range when
    keep, for _cf_bwd_dx; else one run of <= BLK elements at a time)."""
    Cg = part.shape[2]
    for k in range(Cg):
        part[t, 0, k] = 0.0
        part[t, 1, k] = 0.0
    dyn = dy[n]
    xn = x[n]
    rn = r[n]
    src = dyn if act == 0 else (dr[n] if store_dr else zb)
    run = BLK if act != 0 and not store_dr and not keep else S
    c0 = i0 // S
    if act == 0 and S <= SHORT and i0 % S == 0:
        # Whole short channels, 4 at a time (the rest below); hi and lo are the group's.
        hi, lo = cn[0, c0], cn[1, c0]
        while c0 + 4 <= i1 // S:
            sa, sb = _dots4(dyn, c0 * S, xn, c0 * S, S, hi)
            for j in range(4):
                part[t, 0, c0 + j - g * Cg] = sa[j]
                part[t, 1, c0 + j - g * Cg] = sb[j] - np.float64(lo) * sa[j]
            c0 += 4
    for c in range(c0, (i1 - 1) // S + 1):
        hi, lo, a, b = cn[0, c], cn[1, c], cn[2, c], cn[3, c]
        pos = max(i0, c * S)
        cend = min(i1, (c + 1) * S)
        while pos < cend:
            end = min(cend, pos + run)
            L = end - pos
            if act == 0 or store_dr:
                so = pos
            else:
                so = pos - i0 if keep else 0
            if act != 0:
                zs = src[so:so + L]
                dys = dyn[pos:end]
                xs = xn[pos:end]
                rs = rn[pos:end]
                if act == 1:
                    for i in range(L):
                        zs[i] = dys[i] * drelu(((xs[i] - hi) - lo) * a + b + rc * rs[i])
                elif act == 2:
                    for i in range(L):
                        zs[i] = dys[i] * dsilu(((xs[i] - hi) - lo) * a + b + rc * rs[i])
                else:
                    for i in range(L):
                        zs[i] = dys[i] * dgelu(((xs[i] - hi) - lo) * a + b + rc * rs[i])
            sa, sb = _dots(src, so, xn, pos, L, hi)
            sb -= np.float64(lo) * sa
            part[t, 0, c - g * Cg] += sa
            part[t, 1, c - g * Cg] += sb
            pos = end


@njit(**OPTS)
def _cf_bwd_dx(n, i0, i1, S, dy, x, r, rc, act, cn, dr, store_dr, keep, zb, dx):
    """dx = p * dz + q * ((x - hi) - lo) + k0 over [i0, i1) of sample n; dz from dy (no activation),
    dr, zb (kept), or rebuilt in the loop."""
    dyn = dy[n]
    xn = x[n]
    rn = r[n]
    dxn = dx[n]
    known = act == 0 or store_dr or keep
    src = dyn if act == 0 else (dr[n] if store_dr else zb)
    shift = i0 if (act != 0 and keep and not store_dr) else 0
    for c in range(i0 // S, (i1 - 1) // S + 1):
        pos = max(i0, c * S)
        end = min(i1, (c + 1) * S)
        L = end - pos
        hi, lo, a, b = cn[0, c], cn[1, c], cn[2, c], cn[3, c]
        p, q, k0 = cn[4, c], cn[5, c], cn[6, c]
        xs = xn[pos:end]
        dxs = dxn[pos:end]
        if known:
            ds = src[pos - shift:end - shift]
            for i in range(L):
                dxs[i] = p * ds[i] + q * ((xs[i] - hi) - lo) + k0
        else:
            dys = dyn[pos:end]
            rs = rn[pos:end]
            if act == 1:
                for i in range(L):
                    xc = (xs[i] - hi) - lo
                    dxs[i] = p * (dys[i] * drelu(xc * a + b + rc * rs[i])) + q * xc + k0
            elif act == 2:
                for i in range(L):
                    xc = (xs[i] - hi) - lo
                    dxs[i] = p * (dys[i] * dsilu(xc * a + b + rc * rs[i])) + q * xc + k0
            else:
                for i in range(L):
                    xc = (xs[i] - hi) - lo
                    dxs[i] = p * (dys[i] * dgelu(xc * a + b + rc * rs[i])) + q * xc + k0


@njit(**OPTS)
def cf_backward_tasks(t0, t1, mode, dy, x, r, rc, gamma, rstd, G, act, Q, dx, need_dx, dr,
                      store_dr, part, ab, coef):
    """mode 0 (Q == 1): per-channel sums of a group, its dx coefficients, then its dx, all while the
    group is in cache (dz kept in scratch between the two passes when the group is <= 256 KiB).
    mode 1: per-channel partial sums of chunk t.  mode 2: dx of chunk t (after the combine)."""
    C = gamma.shape[0]
    S = x.shape[1] // C
    Cg = C // G
    D = Cg * S
    keep = mode == 0 and need_dx and act != 0 and not store_dr and D * x.itemsize <= 262144
    zb = np.empty(D if keep else (min(BLK, D) if act != 0 and not store_dr else 0), x.dtype)
    for t in range(t0, t1):
        n, g, i0, i1 = _cf_range(t, G, Q, D)
        cn = coef[n]
        if mode != 2:
            _cf_bwd_sums(t, n, g, i0, i1, S, dy, x, r, rc, act, cn, dr, store_dr, keep, zb, part)
            if mode == 1:
                continue
            for k in range(Cg):
                ab[n, 0, g * Cg + k] = part[t, 0, k]
                ab[n, 1, g * Cg + k] = part[t, 1, k]
            _dx_coefs(n, g, Cg, D, np.float64(rstd[n, g]), gamma, ab, coef)
        if need_dx:
            _cf_bwd_dx(n, i0, i1, S, dy, x, r, rc, act, cn, dr, store_dr, keep, zb, dx)


@njit(**OPTS)
def cf_backward_combine(part, ab, gamma, rstd, D, coef, dgamma, dbeta):
    """ab[n, k, c] from the chunk sums part[(n, g, q), k, c - g*Cg], q in order; then the dx
    coefficients and the parameter gradients (one call: each call from Python costs ~5 us)."""
    _cf_merge_chunks(part, ab)
    all_dx_coefs(ab, gamma, rstd, D, coef)
    param_grads(ab, rstd, dgamma, dbeta)


@njit(**OPTS)
def _cf_merge_chunks(part, ab):
    N = ab.shape[0]
    C = ab.shape[2]
    Cg = part.shape[2]
    G = C // Cg
    Q = part.shape[0] // (N * G)
    for n in range(N):
        for g in range(G):
            for k in range(Cg):
                s1 = 0.0
                s2 = 0.0
                for q in range(Q):
                    t = (n * G + g) * Q + q
                    s1 += part[t, 0, k]
                    s2 += part[t, 1, k]
                ab[n, 0, g * Cg + k] = s1
                ab[n, 1, g * Cg + k] = s2


# -------------------------------------------------------------------------------------------------
# "cl": (N, S, C); a group is C/G adjacent channels of every row; task t = (n, p), rows chunk p of P.
# Per-channel sums run along the contiguous C axis, R rows in x's dtype, then flushed to float64.
# -------------------------------------------------------------------------------------------------

@njit(**OPTS)
def _cl_rows(t, P, S):
    n = t // P
    p = t - n * P
    L = (S + P - 1) // P
    return n, p, min(S, p * L), min(S, p * L + L)


@njit(**OPTS)
def cl_forward_tasks(t0, t1, phase, x, r, rc, act, P, y, part, coef):
    """phase 0: part[n, p] = per-channel sums of x - x[n, 0, c] (and squares) over rows chunk p.
    phase 1: normalize rows chunk p (after cl_combine).

    The row loops index the 3-D arrays directly instead of taking a view per row: a view costs an
    atomic reference-count update on its array, and with two threads updating the same count (x's,
    also r's without a residual) that cache line bounced between the cores and the kernels ran
    slower on two threads than on one."""
    S = x.shape[1]
    C = x.shape[2]
    f1 = np.empty(C, x.dtype)
    f2 = np.empty(C, x.dtype)
    for t in range(t0, t1):
        n, p, s0, s1 = _cl_rows(t, P, S)
        if phase == 0:
            for c in range(C):
                part[n, p, 0, c] = 0.0
                part[n, p, 1, c] = 0.0
            s = s0
            while s < s1:
                e = min(s1, s + R)
                for c in range(C):
                    f1[c] = 0.0
                    f2[c] = 0.0
                for ss in range(s, e):
                    for c in range(C):
                        d = x[n, ss, c] - x[n, 0, c]
                        f1[c] += d
                        f2[c] += d * d
                for c in range(C):
                    part[n, p, 0, c] += f1[c]
                    part[n, p, 1, c] += f2[c]
                s = e
            continue
        for s in range(s0, s1):
            if act == 0:
                for c in range(C):
                    y[n, s, c] = (((x[n, s, c] - coef[n, 0, c]) - coef[n, 1, c]) * coef[n, 2, c]
                                  + coef[n, 3, c] + rc * r[n, s, c])
            elif act == 1:
                for c in range(C):
                    y[n, s, c] = relu(((x[n, s, c] - coef[n, 0, c]) - coef[n, 1, c]) * coef[n, 2, c]
                                      + coef[n, 3, c] + rc * r[n, s, c])
            elif act == 2:
                for c in range(C):
                    y[n, s, c] = silu(((x[n, s, c] - coef[n, 0, c]) - coef[n, 1, c]) * coef[n, 2, c]
                                      + coef[n, 3, c] + rc * r[n, s, c])
            else:
                for c in range(C):
                    y[n, s, c] = gelu(((x[n, s, c] - coef[n, 0, c]) - coef[n, 1, c]) * coef[n, 2, c]
                                      + coef[n, 3, c] + rc * r[n, s, c])


@njit(**OPTS)
def _sum_chunks(part, n, out):
    """out[k, c] = sum over chunks p (in order) of part[n, p, k, c]; chunk by chunk, so that the
    reads are sequential (a channel's chunks lie 2 C values apart)."""
    P = part.shape[1]
    C = part.shape[3]
    for c in range(C):
        out[0, c] = 0.0
        out[1, c] = 0.0
    for p in range(P):
        for c in range(C):
            out[0, c] += part[n, p, 0, c]
            out[1, c] += part[n, p, 1, c]


@njit(**OPTS)
def _cl_channel_stats(x, part, n, chan):
    """chan[0, c] = channel mean, chan[1, c] = its sum of squared deviations (chunks in order)."""
    S = x.shape[1]
    C = x.shape[2]
    _sum_chunks(part, n, chan)
    for c in range(C):
        t1 = chan[0, c]
        m = t1 / S
        chan[0, c] = np.float64(x[n, 0, c]) + m
        chan[1, c] = max(chan[1, c] - t1 * m, 0.0)


@njit(**OPTS)
def cl_combine(x, part, chan, G, eps, gamma, beta, mean, rstd, coef):
    """Chunks -> channels -> groups with the exact parallel-variance merge, fixed order."""
    N, S, C = x.shape
    Cg = C // G
    for n in range(N):
        _cl_channel_stats(x, part, n, chan)
        for g in range(G):
            mg = 0.0
            for c in range(g * Cg, (g + 1) * Cg):
                mg += chan[0, c]
            mg /= Cg
            m2 = 0.0
            for c in range(g * Cg, (g + 1) * Cg):
                d = chan[0, c] - mg
                m2 += chan[1, c] + S * d * d
            _finish_group(n, g, Cg, mg, m2 / (S * Cg), eps, gamma, beta, mean, rstd, coef)


@njit(**OPTS)
def cl_set_lo(x, part, chan, G, coef):
    """lo = mean - hi of every group, from phase-0 sums."""
    N, S, C = x.shape
    Cg = C // G
    for n in range(N):
        _cl_channel_stats(x, part, n, chan)
        for g in range(G):
            mg = 0.0
            for c in range(g * Cg, (g + 1) * Cg):
                mg += chan[0, c]
            lo = mg / Cg - np.float64(coef[n, 0, g * Cg])
            for c in range(g * Cg, (g + 1) * Cg):
                coef[n, 1, c] = lo


@njit(**OPTS)
def _cl_row_dz(dy, x, r, rc, act, coef, n, s, buf):
    """buf[c] = dz = dy * act'(z) along row s of sample n, z rebuilt bit for bit as in the forward;
    one loop per activation (each vectorizes)."""
    C = x.shape[2]
    if act == 1:
        for c in range(C):
            buf[c] = dy[n, s, c] * drelu(((x[n, s, c] - coef[n, 0, c]) - coef[n, 1, c]) * coef[n, 2, c]
                                         + coef[n, 3, c] + rc * r[n, s, c])
    elif act == 2:
        for c in range(C):
            buf[c] = dy[n, s, c] * dsilu(((x[n, s, c] - coef[n, 0, c]) - coef[n, 1, c]) * coef[n, 2, c]
                                         + coef[n, 3, c] + rc * r[n, s, c])
    else:
        for c in range(C):
            buf[c] = dy[n, s, c] * dgelu(((x[n, s, c] - coef[n, 0, c]) - coef[n, 1, c]) * coef[n, 2, c]
                                         + coef[n, 3, c] + rc * r[n, s, c])


@njit(**OPTS)
def cl_backward_tasks(t0, t1, phase, dy, x, r, rc, act, P, dx, dr, store_dr, part, coef):
    """phase 0: part[n, p, k, c] = sum(dz), sum(dz * (x - mean)) over rows chunk p (dz into dr when
    it is an output).  phase 1: dx of rows chunk p (after cl_backward_combine).
    No views in the row loops (see cl_forward_tasks)."""
    S = x.shape[1]
    C = x.shape[2]
    buf = np.empty(C, x.dtype)
    f1 = np.empty(C, x.dtype)
    f2 = np.empty(C, x.dtype)
    for t in range(t0, t1):
        n, p, s0, s1 = _cl_rows(t, P, S)
        if phase == 0:
            for c in range(C):
                part[n, p, 0, c] = 0.0
                part[n, p, 1, c] = 0.0
            s = s0
            while s < s1:
                e = min(s1, s + R)
                for c in range(C):
                    f1[c] = 0.0
                    f2[c] = 0.0
                for ss in range(s, e):
                    if act == 0:
                        for c in range(C):
                            d = dy[n, ss, c]
                            f1[c] += d
                            f2[c] += d * ((x[n, ss, c] - coef[n, 0, c]) - coef[n, 1, c])
                        continue
                    _cl_row_dz(dy, x, r, rc, act, coef, n, ss, buf)
                    for c in range(C):
                        d = buf[c]
                        f1[c] += d
                        f2[c] += d * ((x[n, ss, c] - coef[n, 0, c]) - coef[n, 1, c])
                    if store_dr:
                        for c in range(C):
                            dr[n, ss, c] = buf[c]
                for c in range(C):
                    part[n, p, 0, c] += f1[c]
                    part[n, p, 1, c] += f2[c]
                s = e
            continue
        for s in range(s0, s1):
            if act == 0:
                for c in range(C):
                    dx[n, s, c] = (coef[n, 4, c] * dy[n, s, c]
                                   + coef[n, 5, c] * ((x[n, s, c] - coef[n, 0, c]) - coef[n, 1, c])
                                   + coef[n, 6, c])
                continue
            if store_dr:
                for c in range(C):
                    buf[c] = dr[n, s, c]
            else:
                _cl_row_dz(dy, x, r, rc, act, coef, n, s, buf)
            for c in range(C):
                dx[n, s, c] = (coef[n, 4, c] * buf[c]
                               + coef[n, 5, c] * ((x[n, s, c] - coef[n, 0, c]) - coef[n, 1, c])
                               + coef[n, 6, c])


@njit(**OPTS)
def cl_backward_combine(part, ab, gamma, rstd, D, coef, dgamma, dbeta):
    """ab[n] from the chunk sums, then the dx coefficients and the parameter gradients."""
    for n in range(part.shape[0]):
        _sum_chunks(part, n, ab[n])
    all_dx_coefs(ab, gamma, rstd, D, coef)
    param_grads(ab, rstd, dgamma, dbeta)


# -------------------------------------------------------------------------------------------------
# Threads: torch's own OpenMP team runs the task kernels (``cpu._run``). ``launch`` calls the runtime's
# GOMP_parallel(fn, data, threads, 0) with fn a C entry point made by ``entry`` and data the address of
# (ntasks, pieces, counter, args) on launch's stack; each thread of the team takes pieces of the task
# range off the counter (an atomic add) until none is left, and calls the kernel on them. No Python and
# no GIL in the team, and the team's threads are the ones torch's ops just used (still spinning):
# a launch costs ~3 us, against ~30 us (and ~100 us right after a torch op) for Python threads.
# The runtime's function address is an argument, not a ctypes global: that keeps launch cacheable.
# -------------------------------------------------------------------------------------------------

@intrinsic
def _address_of(typingctx, value):
    """void* to a stack copy of value, in its data representation (what a CPointer load reads:
    booleans are bytes there), alive until the calling function returns."""
    def codegen(context, builder, signature, args):
        data = context.get_value_as_data(builder, value, args[0])
        return builder.bitcast(cgutils.alloca_once_value(builder, data), cgutils.voidptr_t)
    return types.voidptr(value), codegen


@intrinsic
def _load(typingctx, ptr):
    """*ptr for a CPointer to what _address_of stored (Numba's own ptr[0] mistypes booleans in
    tuples). A borrowed reference: the caller of launch keeps the arrays alive."""
    if not isinstance(ptr, types.CPointer):
        return None
    ty = ptr.dtype

    def codegen(context, builder, signature, args):
        value = context.get_data_as_value(builder, ty, builder.load(args[0]))
        context.nrt.incref(builder, ty, value)
        return value
    return ty(ptr), codegen


@intrinsic
def _borrowed(typingctx, tup):
    """tup with every array's meminfo and parent set to NULL: views of such an array skip the
    reference counting (NRT's incref/decref do nothing on NULL). Why: every view (a row, a channel's
    run) otherwise adds and drops a reference on its array's meminfo with atomic instructions, and
    with two threads doing that on the same arrays the cache line bounced between the cores: the
    kernels ran slower on two threads than on one. Safe because the caller of ``launch`` holds the
    arrays until every thread is done."""
    if not isinstance(tup, types.BaseTuple):
        return None

    def codegen(context, builder, signature, args):
        values = []
        for ty, value in zip(tup.types, cgutils.unpack_tuple(builder, args[0])):
            if isinstance(ty, types.Array):
                ary = context.make_array(ty)(context, builder, value)
                ary.meminfo = cgutils.get_null_value(ary.meminfo.type)
                ary.parent = cgutils.get_null_value(ary.parent.type)
                value = ary._getvalue()
            values.append(value)
        return context.make_tuple(builder, tup, values)
    return tup(tup), codegen


@intrinsic
def _gomp_parallel(typingctx, fn_address, entry_address, data, threads):
    """GOMP_parallel(entry, data, threads, 0), the runtime's function given by its address."""
    def codegen(context, builder, signature, args):
        fn_address, entry_address, data, threads = args
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [cgutils.voidptr_t, cgutils.voidptr_t, i32, i32])
        fn = builder.inttoptr(fn_address, fnty.as_pointer())
        builder.call(fn, [builder.inttoptr(entry_address, cgutils.voidptr_t), data,
                          builder.trunc(threads, i32), ir.Constant(i32, 0)])
        return context.get_dummy_value()
    return types.void(types.int64, types.int64, types.voidptr, types.int64), codegen


@intrinsic
def _next_piece(typingctx, counter):
    """counter[0]++ (atomic), returning the old value."""
    if counter != types.Array(types.int64, 1, "C"):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.atomic_rmw("add", data, ir.Constant(ir.IntType(64), 1), "monotonic")
    return types.int64(counter), codegen


@njit(**OPTS)
def launch(gomp_parallel, entry_address, threads, packed):
    """Run the C entry point on ``threads`` OpenMP threads over ``packed`` (see ``entry``)."""
    _gomp_parallel(gomp_parallel, entry_address, _address_of(packed), threads)


# The task kernels that run threaded, told apart by the number of arguments after (t0, t1).
_THREADED = {15: cf_forward_tasks, 17: cf_backward_tasks, 9: cl_forward_tasks, 12: cl_backward_tasks}


def _call_task_kernel(t0, t1, args):
    raise NotImplementedError


@overload(_call_task_kernel, jit_options=OPTS)
def _ov_call_task_kernel(t0, t1, args):
    kernel = _THREADED[len(args.types)]
    return lambda t0, t1, args: kernel(t0, t1, *args)


def _entry_body(p):
    ntasks, pieces, counter, args = _load(p)
    i = _next_piece(counter)
    while i < pieces:
        _call_task_kernel(ntasks * i // pieces, ntasks * (i + 1) // pieces, _borrowed(args))
        i = _next_piece(counter)


def entry(kernel, packed_type):
    """The C entry point (a cached ``cfunc``) that runs ``kernel``'s pieces from a packed tuple
    (ntasks, pieces, counter, args) of type ``packed_type``. One body for all kernels, with no
    closure variables (Numba's cache keys a cfunc by its code and signature): the kernel is chosen
    at compile time from the arguments' count."""
    if _THREADED.get(len(packed_type.types[3].types)) is not kernel:
        raise ValueError(f"no threaded entry point for {kernel} with arguments {packed_type}")
    sig = types.void(types.CPointer(packed_type))
    return cfunc(sig, cache=True, error_model="numpy")(_entry_body)
