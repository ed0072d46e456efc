"""The "triton" Group Norm backend: Triton kernels for CUDA tensors (CPU ones under TRITON_INTERPRET=1),
a launch plan cached per call signature, a thin autograd Function in eager mode and a
``torch.library.triton_op`` that ``torch.compile`` sees through.

Math (Wu & He 2018, eqs. 1, 2, 6, 7 + affine). Sample n, group g of D = C / G channels, M = D * HW
elements (HW = prod(spatial)):

    mu = mean(x),  var = mean((x - mu)^2),  rstd = 1 / sqrt(var + eps),  x_hat = (x - mu) * rstd
    z = gamma_c x_hat + beta_c (+ residual),  y = act(z),  act in {identity, relu, silu, gelu (erf)}

    dz = dy * act'(z) (z recomputed from x),  dresidual = dz,  dbeta_c = sum dz,  dgamma_c = sum dz x_hat
    dx = rstd * (gamma dz - mean_group(gamma dz) - x_hat * mean_group(gamma dz x_hat))

Exact statistics. The mean is kept as hi + lo (hi = the mean rounded to the statistics dtype, lo = the
rest): x - hi is exact for every x near the mean (Sterbenz), so (x - hi) - lo loses nothing where |mean|
>> std (float32 at mean 1e6, std 0.1: the mean alone is off by up to 0.03 = 30 % of x_hat). Sums are
taken of x - K, K the group's first element (exact differences again), per tile in two passes over
registers, and tiles and chunks are merged with Chan's formula in a fixed order: no E[x^2] - E[x]^2
cancellation, no atomics, bitwise reproducible.

Work split (the plan, ``_fwd_plan`` / ``_bwd_plan``):

* "single": the group, padded to powers of two, fits one register tile: one program per group reads x
  once and writes y once (backward: reads x and dy once, writes dx once). One launch (backward: + one
  tiny launch that sums the per-sample parameter gradients over the batch).
* "loop": groups too large for one tile but N*G programs enough to fill the GPU: one program per group
  loops over tiles (statistics), then over the same tiles in reverse order (the most recently read ones,
  still in L2, first). One launch.
* "split": too few groups (batch 1 or 2) for large groups: the spatial axis is cut in chunks; a first
  launch writes per-chunk partials, a second merges them in a fixed order and normalizes (backward: dx,
  with the parameter-gradient programs appended to the same launch). Two launches; the second walks the
  programs in reverse order for L2 reuse.

Layouts are handled natively: contiguous (spatial stride 1, channel stride HW) and channels-last-like
(channel stride 1, spatial stride C: channels_last, channels_last_3d, (N, C, L) stored as (N, L, C)),
decided once per plan by ``groupnorm._layout``. A tile is (BLOCK_S spatial rows) x (BLOCK_D channels);
the stride-1 axis is a literal 1 in the index math, so Triton vectorizes along it.

Host path. ``_plan`` keys on (shape, strides, dtypes, device, options, 16-byte alignment of the inputs)
and holds the grid, block sizes and, after the first launch through Triton's JIT, the compiled kernel,
which later calls launch directly (``_Launch``). A call then does one dict lookup, allocates its outputs
and scratch (one buffer) through torch and launches; no host sync, no memset, no layout rediscovery.
Arguments are validated once by the caller (``groupnorm._checks.check_group_norm``).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from groupnorm import _layout

__all__ = ["available", "group_norm", "forward", "backward", "tuning"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_ACT_CODES = {None: 0, "relu": 1, "silu": 2, "gelu": 3}   # index in groupnorm._checks.ACTIVATIONS
_HALF = (torch.float16, torch.bfloat16)


# ==========================================================================================================
# Device code. Few nested jit calls inside loops: under TRITON_INTERPRET each one costs milliseconds.
# ==========================================================================================================
@triton.jit
def _group_base(pid, G, C, HW, D: tl.constexpr, CL: tl.constexpr):
    """(offset of the group's first element, its first channel, its sample) for program pid = n * G + g."""
    pid = pid.to(tl.int64)
    n = pid // G
    c0 = (pid % G) * D
    if CL:
        base = n * C * HW + c0
    else:
        base = n * C * HW + c0 * HW
    return base, c0, n


@triton.jit
def _offsets(s0, d0, C, HW, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, CL: tl.constexpr,
             I64: tl.constexpr):
    """Rows s0 + [0, BLOCK_S), channels d0 + [0, BLOCK_D) of a group: (rows, channels, offsets from the
    group's first element)."""
    s = s0 + tl.arange(0, BLOCK_S)
    d = d0 + tl.arange(0, BLOCK_D)
    if I64:
        s = s.to(tl.int64)
        d = d.to(tl.int64)
    if CL:
        off = s[:, None] * C + d[None, :]
    else:
        off = s[:, None] + d[None, :] * HW
    return s, d, off


@triton.jit
def _tile_from_end(t, nsb, ndb, s_lo, s_hi, C, HW, D: tl.constexpr, BLOCK_S: tl.constexpr,
                   BLOCK_D: tl.constexpr, CL: tl.constexpr, I64: tl.constexpr):
    """Tile t of rows [s_lo, s_hi) x the group's D channels, counted from the last one (the output
    passes walk the tiles in reverse of the statistics pass): (channels, offsets, channel mask, mask)."""
    u = nsb * ndb - 1 - t
    s, d, off = _offsets(s_lo + (u % nsb) * BLOCK_S, (u // nsb) * BLOCK_D, C, HW, BLOCK_S, BLOCK_D, CL, I64)
    dmask = d < D
    return d, off, dmask, (s < s_hi)[:, None] & dmask[None, :]


@triton.jit
def _affine(w_ptr, b_ptr, c, mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr):
    """(gamma, beta) of channels c: 1 and 0 where absent, 0 and 0 outside the group."""
    if HAS_W:
        gamma = tl.load(w_ptr + c, mask=mask, other=0.0).to(ACC)
    else:
        gamma = tl.where(mask, 1.0, 0.0).to(ACC)
    if HAS_B:
        beta = tl.load(b_ptr + c, mask=mask, other=0.0).to(ACC)
    else:
        beta = tl.zeros(c.shape, ACC)
    return gamma, beta


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = z / (1.0 + tl.exp(-z))
    elif ACT == 3:
        z = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    return z


@triton.jit
def _act_grad(z, dy, ACT: tl.constexpr):
    """dy * act'(z); relu'(0) = 0 as in torch."""
    if ACT == 1:
        dz = tl.where(z > 0.0, dy, 0.0)
    elif ACT == 2:
        sig = 1.0 / (1.0 + tl.exp(-z))
        dz = dy * (sig * (1.0 + z * (1.0 - sig)))
    else:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        dz = dy * (cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327)
    return dz


@triton.jit
def _rows_stats(xp, K, s_lo, s_hi, C, HW, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                CL: tl.constexpr, I64: tl.constexpr, ACC: tl.constexpr):
    """(count, mean of x - K, sum of squared deviations) over rows [s_lo, s_hi) of a group: per tile two
    passes over registers, tiles merged with Chan's formula in a fixed order."""
    n = tl.zeros([], ACC)
    mean = tl.zeros([], ACC)
    m2 = tl.zeros([], ACC)
    for d0 in range(0, D, BLOCK_D):
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s, d, off = _offsets(s0, d0, C, HW, BLOCK_S, BLOCK_D, CL, I64)
            mask = (s < s_hi)[:, None] & (d < D)[None, :]
            xd = tl.where(mask, tl.load(xp + off, mask=mask, other=0.0).to(ACC) - K, 0.0)
            cnt = (tl.minimum(s_hi - s0, BLOCK_S) * tl.minimum(D - d0, BLOCK_D)).to(ACC)
            mt = tl.sum(xd) / cnt
            q = tl.where(mask, xd - mt, 0.0)
            tot = n + cnt
            delta = mt - mean
            mean += delta * (cnt / tot)
            m2 += tl.sum(q * q) + delta * delta * (n * (cnt / tot))
            n = tot
    return n, mean, m2


@triton.jit
def _rows_apply(xp, rp, yp, w_ptr, b_ptr, c0, s_lo, s_hi, hi, lo, rstd, C, HW, D: tl.constexpr,
                ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr,
                BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, CL: tl.constexpr, I64: tl.constexpr,
                ACC: tl.constexpr):
    """y = act(((x - hi) - lo) * gamma * rstd + beta + residual) on rows [s_lo, s_hi), tiles in reverse
    order of _rows_stats (the last ones read are the likeliest still in L2)."""
    nsb = tl.cdiv(s_hi - s_lo, BLOCK_S)
    ndb: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
    for t in range(0, nsb * ndb):
        d, off, dmask, mask = _tile_from_end(t, nsb, ndb, s_lo, s_hi, C, HW, D, BLOCK_S, BLOCK_D, CL, I64)
        gamma, beta = _affine(w_ptr, b_ptr, c0 + d, dmask, HAS_W, HAS_B, ACC)
        x = tl.load(xp + off, mask=mask, other=0.0).to(ACC)
        z = ((x - hi) - lo) * (gamma * rstd)[None, :] + beta[None, :]
        if HAS_R:
            z += tl.load(rp + off, mask=mask, other=0.0).to(ACC)
        tl.store(yp + off, _act(z, ACT).to(yp.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, stats_ptr, C, HW, G, eps,
                D: tl.constexpr, ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                HAS_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE: tl.constexpr,
                CL: tl.constexpr, I64: tl.constexpr, F64: tl.constexpr):
    """Grid (N*G,): one program per group; stats -> [hi, lo, rstd] planes of stats_ptr."""
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    ng = tl.num_programs(0)
    base, c0, n_ = _group_base(pid, G, C, HW, D, CL)
    xp = x_ptr + base
    K = tl.load(xp).to(ACC)
    n = tl.cast(HW, ACC) * D
    if SINGLE:  # the whole group in registers: read once, write once
        s, d, off = _offsets(0, 0, C, HW, BLOCK_S, BLOCK_D, CL, I64)
        dmask = d < D
        mask = (s < HW)[:, None] & dmask[None, :]
        x = tl.load(xp + off, mask=mask, other=0.0).to(ACC)
        md = tl.sum(tl.where(mask, x - K, 0.0)) / n
        hi = K + md
        lo = md - (hi - K)
        xc = tl.where(mask, (x - hi) - lo, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc) / n + eps)
        gamma, beta = _affine(w_ptr, b_ptr, c0 + d, dmask, HAS_W, HAS_B, ACC)
        z = xc * (gamma * rstd)[None, :] + beta[None, :]
        if HAS_R:
            z += tl.load(r_ptr + base + off, mask=mask, other=0.0).to(ACC)
        tl.store(y_ptr + base + off, _act(z, ACT).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        n, md, m2 = _rows_stats(xp, K, 0, HW, C, HW, D, BLOCK_S, BLOCK_D, CL, I64, ACC)
        hi = K + md
        lo = md - (hi - K)
        rstd = 1.0 / tl.sqrt(m2 / n + eps)
        _rows_apply(xp, r_ptr + base, y_ptr + base, w_ptr, b_ptr, c0, 0, HW, hi, lo, rstd, C, HW, D, ACT,
                    HAS_W, HAS_B, HAS_R, BLOCK_S, BLOCK_D, CL, I64, ACC)
    tl.store(stats_ptr + pid, hi)
    tl.store(stats_ptr + ng + pid, lo)
    tl.store(stats_ptr + 2 * ng + pid, rstd)


@triton.jit
def _fwd_part_kernel(x_ptr, stats_ptr, C, HW, G, L,
                     D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, CL: tl.constexpr,
                     I64: tl.constexpr, F64: tl.constexpr):
    """Grid (N*G, chunks): (count, mean of x - K, m2) of rows [k L, (k + 1) L) -> the partials planes
    [3, N*G, chunks] after the 3 stats planes."""
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    k = tl.program_id(1)
    ng = tl.num_programs(0)
    nk = tl.num_programs(1)
    base, c0, n_ = _group_base(pid, G, C, HW, D, CL)
    xp = x_ptr + base
    K = tl.load(xp).to(ACC)
    s_lo = k * L
    n, md, m2 = _rows_stats(xp, K, s_lo, tl.minimum(s_lo + L, HW), C, HW, D, BLOCK_S, BLOCK_D, CL, I64, ACC)
    part = stats_ptr + 3 * ng + pid * nk + k
    tl.store(part, n)
    tl.store(part + ng * nk, md)
    tl.store(part + 2 * ng * nk, m2)


@triton.jit
def _fwd_apply_kernel(x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, stats_ptr, C, HW, G, L, eps,
                      D: tl.constexpr, ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                      HAS_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                      CL: tl.constexpr, I64: tl.constexpr, F64: tl.constexpr):
    """Grid (N*G, chunks), walked in reverse: merge the group's chunk partials (same fixed order in every
    program), then normalize one chunk. Chunk 0 stores the statistics."""
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    ng = tl.num_programs(0)
    nk = tl.num_programs(1)
    pid = ng - 1 - tl.program_id(0)
    k = nk - 1 - tl.program_id(1)
    kk = tl.arange(0, BLOCK_K)
    kmask = kk < nk
    part = stats_ptr + 3 * ng + pid * nk + kk
    n_k = tl.load(part, mask=kmask, other=0.0)
    m_k = tl.load(part + ng * nk, mask=kmask, other=0.0)
    q_k = tl.load(part + 2 * ng * nk, mask=kmask, other=0.0)
    n = tl.sum(n_k, axis=0)
    md = tl.sum(n_k * m_k, axis=0) / n
    dev = tl.where(kmask, m_k - md, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(q_k + n_k * dev * dev, axis=0) / n + eps)
    base, c0, n_ = _group_base(pid, G, C, HW, D, CL)
    K = tl.load(x_ptr + base).to(ACC)
    hi = K + md
    lo = md - (hi - K)
    tl.store(stats_ptr + pid, hi, mask=k == 0)
    tl.store(stats_ptr + ng + pid, lo, mask=k == 0)
    tl.store(stats_ptr + 2 * ng + pid, rstd, mask=k == 0)
    s_lo = k * L
    _rows_apply(x_ptr + base, r_ptr + base, y_ptr + base, w_ptr, b_ptr, c0, s_lo, tl.minimum(s_lo + L, HW),
                hi, lo, rstd, C, HW, D, ACT, HAS_W, HAS_B, HAS_R, BLOCK_S, BLOCK_D, CL, I64, ACC)


@triton.jit
def _rows_grad_sums(xp, dyp, rp, drp, w_ptr, b_ptr, sp, KS, NCK, c0, s_lo, s_hi, hi, lo, rstd, C, HW,
                    D: tl.constexpr, ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    HAS_R: tl.constexpr, HAS_DR: tl.constexpr, HAS_SUMS: tl.constexpr, BLOCK_S: tl.constexpr,
                    BLOCK_D: tl.constexpr, CL: tl.constexpr, I64: tl.constexpr, ACC: tl.constexpr):
    """Per-channel sum(dz) -> sp[d KS], sum(dz x_hat) -> sp[NCK + d KS] over rows [s_lo, s_hi) (+ dresidual
    = dz). Returns the group sums of gamma dz and gamma dz x_hat."""
    a = tl.zeros([], ACC)
    b = tl.zeros([], ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        gamma, beta = _affine(w_ptr, b_ptr, c0 + d, dmask, HAS_W, HAS_B, ACC)
        acc_db = tl.zeros([BLOCK_S, BLOCK_D], ACC)
        acc_ds = tl.zeros([BLOCK_S, BLOCK_D], ACC)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s, d_, off = _offsets(s0, d0, C, HW, BLOCK_S, BLOCK_D, CL, I64)
            mask = (s < s_hi)[:, None] & dmask[None, :]
            x = tl.load(xp + off, mask=mask, other=0.0).to(ACC)
            xhat = tl.where(mask, ((x - hi) - lo) * rstd, 0.0)
            dz = tl.load(dyp + off, mask=mask, other=0.0).to(ACC)
            if ACT != 0:
                z = xhat * gamma[None, :] + beta[None, :]
                if HAS_R:
                    z += tl.load(rp + off, mask=mask, other=0.0).to(ACC)
                dz = _act_grad(z, dz, ACT)
            if HAS_DR:
                tl.store(drp + off, dz.to(drp.dtype.element_ty), mask=mask)
            acc_db += dz
            acc_ds += dz * xhat
        db = tl.sum(acc_db, axis=0)
        ds = tl.sum(acc_ds, axis=0)
        if HAS_SUMS:
            tl.store(sp + d * KS, db, mask=dmask)
            tl.store(sp + NCK + d * KS, ds, mask=dmask)
        a += tl.sum(gamma * db, axis=0)
        b += tl.sum(gamma * ds, axis=0)
    return a, b


@triton.jit
def _rows_dx(xp, dyp, rp, dxp, w_ptr, b_ptr, c0, s_lo, s_hi, hi, lo, rstd, ca, cb, C, HW, D: tl.constexpr,
             ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr,
             BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, CL: tl.constexpr, I64: tl.constexpr,
             ACC: tl.constexpr):
    """dx = rstd (gamma dz - ca - x_hat cb) on rows [s_lo, s_hi), tiles in reverse order."""
    nsb = tl.cdiv(s_hi - s_lo, BLOCK_S)
    ndb: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
    for t in range(0, nsb * ndb):
        d, off, dmask, mask = _tile_from_end(t, nsb, ndb, s_lo, s_hi, C, HW, D, BLOCK_S, BLOCK_D, CL, I64)
        gamma, beta = _affine(w_ptr, b_ptr, c0 + d, dmask, HAS_W, HAS_B, ACC)
        x = tl.load(xp + off, mask=mask, other=0.0).to(ACC)
        xhat = ((x - hi) - lo) * rstd
        dz = tl.load(dyp + off, mask=mask, other=0.0).to(ACC)
        if ACT != 0:
            z = xhat * gamma[None, :] + beta[None, :]
            if HAS_R:
                z += tl.load(rp + off, mask=mask, other=0.0).to(ACC)
            dz = _act_grad(z, dz, ACT)
        dx = (gamma[None, :] * dz - ca - xhat * cb) * rstd
        tl.store(dxp + off, dx.to(dxp.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(x_ptr, dy_ptr, w_ptr, b_ptr, r_ptr, dx_ptr, dr_ptr, stats_ptr, sums_ptr, C, HW, G, N,
                D: tl.constexpr, ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                HAS_R: tl.constexpr, HAS_DX: tl.constexpr, HAS_DR: tl.constexpr, HAS_SUMS: tl.constexpr,
                BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE: tl.constexpr, CL: tl.constexpr,
                I64: tl.constexpr, F64: tl.constexpr):
    """Grid (N*G,): one program per group: per-(n, c) sums of dz and dz x_hat -> sums[2, N, C] (for the
    parameter gradients), dresidual, dx."""
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    ng = tl.num_programs(0)
    base, c0, n_ = _group_base(pid, G, C, HW, D, CL)
    hi = tl.load(stats_ptr + pid)
    lo = tl.load(stats_ptr + ng + pid)
    rstd = tl.load(stats_ptr + 2 * ng + pid)
    m = tl.cast(HW, ACC) * D
    nc = tl.cast(N, tl.int64) * C
    sp = sums_ptr + n_ * C + c0
    if SINGLE:  # x and dy in registers: read once, dx written once
        s, d, off = _offsets(0, 0, C, HW, BLOCK_S, BLOCK_D, CL, I64)
        dmask = d < D
        mask = (s < HW)[:, None] & dmask[None, :]
        x = tl.load(x_ptr + base + off, mask=mask, other=0.0).to(ACC)
        xhat = tl.where(mask, ((x - hi) - lo) * rstd, 0.0)
        gamma, beta = _affine(w_ptr, b_ptr, c0 + d, dmask, HAS_W, HAS_B, ACC)
        dz = tl.load(dy_ptr + base + off, mask=mask, other=0.0).to(ACC)
        if ACT != 0:
            z = xhat * gamma[None, :] + beta[None, :]
            if HAS_R:
                z += tl.load(r_ptr + base + off, mask=mask, other=0.0).to(ACC)
            dz = _act_grad(z, dz, ACT)
        if HAS_DR:
            tl.store(dr_ptr + base + off, dz.to(dr_ptr.dtype.element_ty), mask=mask)
        db = tl.sum(dz, axis=0)
        ds = tl.sum(dz * xhat, axis=0)
        if HAS_SUMS:
            tl.store(sp + d, db, mask=dmask)
            tl.store(sp + nc + d, ds, mask=dmask)
        if HAS_DX:
            ca = tl.sum(gamma * db, axis=0) / m
            cb = tl.sum(gamma * ds, axis=0) / m
            dx = (gamma[None, :] * dz - ca - xhat * cb) * rstd
            tl.store(dx_ptr + base + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        a, b = _rows_grad_sums(x_ptr + base, dy_ptr + base, r_ptr + base, dr_ptr + base, w_ptr, b_ptr, sp, 1,
                               nc, c0, 0, HW, hi, lo, rstd, C, HW, D, ACT, HAS_W, HAS_B, HAS_R, HAS_DR,
                               HAS_SUMS, BLOCK_S, BLOCK_D, CL, I64, ACC)
        if HAS_DX:
            _rows_dx(x_ptr + base, dy_ptr + base, r_ptr + base, dx_ptr + base, w_ptr, b_ptr, c0, 0, HW, hi, lo,
                     rstd, a / m, b / m, C, HW, D, ACT, HAS_W, HAS_B, HAS_R, BLOCK_S, BLOCK_D, CL, I64, ACC)


@triton.jit
def _bwd_part_kernel(x_ptr, dy_ptr, w_ptr, b_ptr, r_ptr, dr_ptr, stats_ptr, part_ptr, C, HW, G, L, N,
                     D: tl.constexpr, ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     HAS_R: tl.constexpr, HAS_DR: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                     CL: tl.constexpr, I64: tl.constexpr, F64: tl.constexpr):
    """Grid (N*G, chunks): per-channel partial sums of one chunk -> part[2, N, C, chunks] (+ dresidual)."""
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    k = tl.program_id(1)
    ng = tl.num_programs(0)
    nk = tl.num_programs(1)
    base, c0, n_ = _group_base(pid, G, C, HW, D, CL)
    hi = tl.load(stats_ptr + pid)
    lo = tl.load(stats_ptr + ng + pid)
    rstd = tl.load(stats_ptr + 2 * ng + pid)
    s_lo = k * L
    _rows_grad_sums(x_ptr + base, dy_ptr + base, r_ptr + base, dr_ptr + base, w_ptr, b_ptr,
                    part_ptr + (n_ * C + c0) * nk + k, nk, tl.cast(N, tl.int64) * C * nk, c0, s_lo,
                    tl.minimum(s_lo + L, HW), hi, lo, rstd, C, HW, D, ACT, HAS_W, HAS_B, HAS_R, HAS_DR, True,
                    BLOCK_S, BLOCK_D, CL, I64, ACC)


@triton.jit
def _param_grads(sums_ptr, dw_ptr, db_ptr, blk, N, C, K, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """dbeta_c = sum over n, k of sums[0, n, c, k]; dgamma_c likewise from sums[1], for the channels of
    block blk. [BLOCK_N, BLOCK_C, BLOCK_K] tiles: one load latency per BLOCK_N samples, not per sample; the
    blocks of n in order, the rest by fixed trees."""
    c = blk * BLOCK_C + tl.arange(0, BLOCK_C)
    kk = tl.arange(0, BLOCK_K)
    cmask = c < C
    ck = c[:, None].to(tl.int64) * K + kk[None, :]
    ckmask = cmask[:, None] & (kk < K)[None, :]
    nck = tl.cast(N, tl.int64) * C * K
    acc_b = tl.zeros([BLOCK_C, BLOCK_K], ACC)
    acc_w = tl.zeros([BLOCK_C, BLOCK_K], ACC)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        off = n[:, None, None].to(tl.int64) * C * K + ck[None, :, :]
        mask = (n < N)[:, None, None] & ckmask[None, :, :]
        acc_b += tl.sum(tl.load(sums_ptr + off, mask=mask, other=0.0), axis=0)
        acc_w += tl.sum(tl.load(sums_ptr + nck + off, mask=mask, other=0.0), axis=0)
    if HAS_DB:
        tl.store(db_ptr + c, tl.sum(acc_b, axis=1).to(db_ptr.dtype.element_ty), mask=cmask)
    if HAS_DW:
        tl.store(dw_ptr + c, tl.sum(acc_w, axis=1).to(dw_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _param_grad_kernel(sums_ptr, dw_ptr, db_ptr, N, C,
                       HAS_DW: tl.constexpr, HAS_DB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                       F64: tl.constexpr):
    """Grid (cdiv(C, BLOCK_C),): parameter gradients from _bwd_kernel's sums[2, N, C]."""
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    _param_grads(sums_ptr, dw_ptr, db_ptr, tl.program_id(0), N, C, 1, HAS_DW, HAS_DB, BLOCK_N, BLOCK_C, 1, ACC)


@triton.jit
def _bwd_dx_kernel(x_ptr, dy_ptr, w_ptr, b_ptr, r_ptr, dx_ptr, stats_ptr, part_ptr, dw_ptr, db_ptr,
                   C, HW, G, L, N, n_chunks, n_dx,
                   D: tl.constexpr, ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   HAS_R: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr, BLOCK_S: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DM: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_C: tl.constexpr, CL: tl.constexpr, I64: tl.constexpr, F64: tl.constexpr):
    """Grid (n_dx + parameter blocks,): programs below n_dx (= N*G*chunks, or 0 when dx is not needed)
    compute dx of one chunk, in reverse order of _bwd_part_kernel, after merging the group's chunk sums
    in a fixed order; the rest reduce the partials to the parameter gradients."""
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    q = tl.program_id(0)
    if q < n_dx:
        ng = N * G
        lin = n_dx - 1 - q
        k = lin // ng
        pid = lin % ng
        base, c0, n_ = _group_base(pid, G, C, HW, D, CL)
        hi = tl.load(stats_ptr + pid)
        lo = tl.load(stats_ptr + ng + pid)
        rstd = tl.load(stats_ptr + 2 * ng + pid)
        kk = tl.arange(0, BLOCK_K)
        nck = tl.cast(N, tl.int64) * C * n_chunks
        a = tl.zeros([], ACC)
        b = tl.zeros([], ACC)
        for d0 in range(0, D, BLOCK_DM):
            d = d0 + tl.arange(0, BLOCK_DM)
            dmask = d < D
            mask = dmask[:, None] & (kk < n_chunks)[None, :]
            p = part_ptr + (n_ * C + c0 + d[:, None]) * n_chunks + kk[None, :]
            db = tl.sum(tl.load(p, mask=mask, other=0.0), axis=1)
            ds = tl.sum(tl.load(p + nck, mask=mask, other=0.0), axis=1)
            gamma, beta = _affine(w_ptr, b_ptr, c0 + d, dmask, HAS_W, HAS_B, ACC)
            a += tl.sum(gamma * db, axis=0)
            b += tl.sum(gamma * ds, axis=0)
        m = tl.cast(HW, ACC) * D
        s_lo = k * L
        _rows_dx(x_ptr + base, dy_ptr + base, r_ptr + base, dx_ptr + base, w_ptr, b_ptr, c0, s_lo,
                 tl.minimum(s_lo + L, HW), hi, lo, rstd, a / m, b / m, C, HW, D, ACT, HAS_W, HAS_B, HAS_R,
                 BLOCK_S, BLOCK_D, CL, I64, ACC)
    else:
        _param_grads(part_ptr, dw_ptr, db_ptr, q - n_dx, N, C, n_chunks, HAS_DW, HAS_DB, BLOCK_N, BLOCK_C, BLOCK_K,
                     ACC)


# ==========================================================================================================
# Launching: Triton's JIT for the first launch of a plan, the compiled kernel directly afterwards.
# ==========================================================================================================
def _fast_launch_enabled() -> bool:
    """Direct launches of compiled kernels (GROUPNORM_TRITON_FAST_LAUNCH=0 turns them off): Triton >= 3.3
    passes every argument, constexprs included, to the launcher, which is what _Launch relies on."""
    if _INTERPRET or os.environ.get("GROUPNORM_TRITON_FAST_LAUNCH", "1") == "0":
        return False
    try:
        major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (3, 3)


_FAST = _fast_launch_enabled()
try:
    _RUNTIME_KNOBS = triton.knobs.runtime    # launch hooks (profilers) live here in Triton >= 3.3
except AttributeError:
    _RUNTIME_KNOBS = None

# how each plan launched (JIT / direct / why not direct)
_launch_notes: dict = {}


class _Launch:
    """One kernel launch of a plan: kernel, grid, constexpr values (the kernel's last parameters), warps.

    The first call goes through Triton's JIT (compiling if needed) and keeps the compiled kernel; later
    calls hand the arguments straight to its launcher, skipping the JIT's per-call argument binding,
    specialization and cache lookup. The plan key holds everything the compiled kernel was specialized on
    (shapes, strides, dtypes, 16-byte alignment). If the first direct launch raises (another Triton's
    launcher convention), this launch stays on the JIT path. Launch hooks (profilers) go through the JIT."""

    __slots__ = ("kernel", "grid", "consts", "num_warps", "state", "run", "function", "meta")
    JIT, UNVERIFIED, DIRECT = 0, 1, 2

    def __init__(self, kernel, grid, consts: tuple, num_warps: int):
        self.kernel, self.consts, self.num_warps = kernel, consts, num_warps
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.state = self.JIT
        self.run = self.function = self.meta = None

    def __call__(self, stream, args: tuple):
        if self.state and (_RUNTIME_KNOBS is None or _RUNTIME_KNOBS.launch_enter_hook is None):
            g = self.grid
            if self.state == self.DIRECT:
                self.run(g[0], g[1], g[2], stream, self.function, self.meta, None, None, None, *args, *self.consts)
                return
            try:
                self.run(g[0], g[1], g[2], stream, self.function, self.meta, None, None, None, *args, *self.consts)
            except Exception as exc:  # noqa: BLE001  (any refusal by the launcher: keep the JIT path)
                self.state = self.JIT
                _launch_notes[self.kernel.__name__] = f"jit (direct launch failed: {type(exc).__name__}: {exc})"
            else:
                self.state = self.DIRECT
                _launch_notes[self.kernel.__name__] = "direct"
                return
        compiled = self.kernel[self.grid](*args, *self.consts, num_warps=self.num_warps)
        if _FAST and self.run is None and compiled is not None:
            try:
                self.run = compiled.run           # first: it loads the module (function handle)
                self.function, self.meta = compiled.function, compiled.packed_metadata
                self.state = self.UNVERIFIED
            except AttributeError as exc:
                self.run = False                  # never try again
                _launch_notes[self.kernel.__name__] = f"jit (no direct launch: {exc})"

    def traced(self, args: tuple):
        """The launch as torch.compile must see it: through torch.library.wrap_triton."""
        torch.library.wrap_triton(self.kernel)[self.grid](*args, *self.consts, num_warps=self.num_warps)


def _traced_kernels():
    """Every kernel, named in a wrap_triton call in the source of the ops' bodies (torch reads that source
    to find the kernels of a triton_op, whose source its compile caches hash: an edited kernel must not
    reuse a stale compiled graph). Called at trace time only."""
    return (torch.library.wrap_triton(_fwd_kernel), torch.library.wrap_triton(_fwd_part_kernel),
            torch.library.wrap_triton(_fwd_apply_kernel), torch.library.wrap_triton(_bwd_kernel),
            torch.library.wrap_triton(_bwd_part_kernel), torch.library.wrap_triton(_bwd_dx_kernel),
            torch.library.wrap_triton(_param_grad_kernel))


# ==========================================================================================================
# Launch plans
# ==========================================================================================================
_TUNING: dict = {}
_PLANS: dict = {}


@contextlib.contextmanager
def tuning(**overrides):
    """Override plan choices (tests force small tiles and chunk counts with it): tile (elements of a loop
    tile), fit (largest padded group handled as one tile; 0 = never), chunks (1 = no split; > 1 = split in
    about that many chunks), num_warps, i64 (64-bit offsets), sms (SM count), block_n (samples per step of
    the parameter-gradient sums)."""
    old = dict(_TUNING)
    _TUNING.update({k: v for k, v in overrides.items() if v is not None})
    _PLANS.clear()
    try:
        yield
    finally:
        _TUNING.clear()
        _TUNING.update(old)
        _PLANS.clear()


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device_index: int) -> int:
    if device_index >= 0:
        return _cuda_sm_count(device_index)
    return 4  # the interpreter: small, so that small test shapes take the split path too


def _p2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


def _sizes(itemsize: int):
    """(elements per loop tile, largest single tile forward, largest single tile backward): tiles of 16 KiB
    of input whatever the dtype, so 16-bit data moves as many bytes per load as float32."""
    t = _TUNING
    if _INTERPRET:
        tile, fit_f, fit_b = 256, 1024, 1024
    else:
        tile = 16384 // itemsize                 # 4096 fp32, 8192 fp16/bf16, 2048 fp64
        fit_f = 16384 if itemsize <= 4 else 8192
        fit_b = 8192 if itemsize <= 4 else 4096
    return t.get("tile", tile), t.get("fit", fit_f), t.get("fit_bwd", t.get("fit", fit_b))


def _warps(elements: int) -> int:
    """About 16-32 elements per thread (several 16-byte loads in flight), 1 to 16 warps."""
    return _TUNING.get("num_warps", max(1, min(16, _p2(elements) // 512)))


def _tile_shape(d: int, rows: int, tile: int, cl: bool):
    """(BLOCK_S, BLOCK_D) of a loop tile: the stride-1 axis (channels in channels-last, rows otherwise)
    gets its extent first."""
    if cl:
        bd = min(_p2(d), tile)
        bs = max(1, min(tile // bd, _p2(rows)))
    else:
        bs = min(_p2(rows), tile)
        bd = max(1, min(_p2(d), tile // bs))
    return bs, bd


_MAX_CHUNKS = 64   # partials merged per group: a [.., 64] block at most in the merging programs


def _split(n, g, d, hw, tile, cl, sms):
    """(chunks, rows per chunk, BLOCK_S, BLOCK_D) for the split path, or None when N*G programs suffice or
    the spatial axis is too short to cut. About 2 programs per SM in all; each chunk at least half a tile
    (and, in contiguous layouts, 64 rows: each channel's run stays long enough to coalesce)."""
    forced = _TUNING.get("chunks")
    if forced is not None:
        want = forced
    else:
        if n * g >= 2 * sms:
            return None
        want = triton.cdiv(2 * sms, n * g)
        min_rows = max(triton.cdiv(tile // 2, d), 1 if cl else 64)
        want = min(want, hw // min_rows)
    want = min(want, hw, _MAX_CHUNKS)
    if want < 2:
        return None
    rows = triton.cdiv(hw, want)
    bs, bd = _tile_shape(d, rows, tile, cl)
    length = triton.cdiv(rows, bs) * bs
    chunks = triton.cdiv(hw, length)
    return (chunks, length, bs, bd) if chunks > 1 else None


class _Plan:
    """What one call signature needs: layout decisions, output strides, scratch size and the launches."""

    __slots__ = ("kind", "shape", "y_stride", "device", "cl", "copy_x", "match_r", "match_dy", "scratch",
                 "stat_dtype", "n", "c", "hw", "launches", "dev_index", "extra")


def _common(shape, xstride, dtype, device, dev_index, g, rstride):
    """What forward and backward plans share: layout decisions (``groupnorm._layout`` decides), sizes,
    the statistics' dtype. Returns (plan, x's dense stride, channels per group, itemsize, float64?)."""
    p = _Plan()
    meta = torch.empty_strided(shape, xstride, device="meta")
    dense, cl = _layout.dense(meta)
    p.shape, p.device, p.dev_index = shape, device, dev_index
    p.cl, p.copy_x = cl, dense is not meta
    p.y_stride = _layout.empty_like(meta).stride()
    dense_stride = dense.stride()
    f64 = dtype == torch.float64
    p.stat_dtype = torch.float64 if f64 else torch.float32
    p.n, p.c, p.hw, p.extra = shape[0], shape[1], math.prod(shape[2:]), None
    p.match_r = rstride is not None and tuple(rstride) != tuple(dense_stride)
    itemsize = torch.empty((), dtype=dtype, device="meta").element_size()
    return p, dense_stride, p.c // g, itemsize, f64


def _fwd_plan(shape, xstride, dtype, device, dev_index, g, act, wdt, bdt, rstride) -> _Plan:
    p, _, d, itemsize, f64 = _common(shape, xstride, dtype, device, dev_index, g, rstride)
    n, c, hw = p.n, p.c, p.hw
    p.scratch = 3 * n * g
    if n * g * hw * d == 0:
        p.kind, p.launches = "empty", ()
        return p
    tile, fit, _ = _sizes(itemsize)
    sms = _TUNING.get("sms", _sm_count(dev_index))
    common = dict(D=d, ACT=act, HAS_W=wdt is not None, HAS_B=bdt is not None, HAS_R=rstride is not None)
    single = _p2(hw) * _p2(d)
    split = None if single <= fit and _TUNING.get("chunks", 1) == 1 else _split(n, g, d, hw, tile, p.cl, sms)
    if split is None:
        if single <= fit:
            p.kind, bs, bd, warps = "single", _p2(hw), _p2(d), _warps(single)
        else:
            p.kind, (bs, bd) = "loop", _tile_shape(d, hw, tile, p.cl)
            warps = _warps(bs * bd)
        i64 = _TUNING.get("i64", c * (hw + bs) >= 2**31)
        consts = (d, act, common["HAS_W"], common["HAS_B"], common["HAS_R"], bs, bd, p.kind == "single", p.cl,
                  i64, f64)
        p.launches = (_Launch(_fwd_kernel, (n * g,), consts, warps),)
        return p
    chunks, length, bs, bd = split
    i64 = _TUNING.get("i64", c * (hw + bs) >= 2**31)
    warps = _warps(bs * bd)
    p.kind, p.extra = "split", length
    p.scratch += 3 * n * g * chunks
    part = _Launch(_fwd_part_kernel, (n * g, chunks), (d, bs, bd, p.cl, i64, f64), warps)
    apply = _Launch(_fwd_apply_kernel, (n * g, chunks),
                    (d, act, common["HAS_W"], common["HAS_B"], common["HAS_R"], bs, bd, _p2(chunks), p.cl, i64,
                     f64), warps)
    p.launches = (part, apply)
    return p


def _bwd_plan(shape, xstride, dtype, device, dev_index, g, act, wdt, bdt, rstride, dystride, needs) -> _Plan:
    need_dx, need_dw, need_db, need_dr = needs
    p, dense_stride, d, itemsize, f64 = _common(shape, xstride, dtype, device, dev_index, g, rstride)
    n, c, hw = p.n, p.c, p.hw
    p.match_dy = tuple(dystride) != tuple(dense_stride)
    p.scratch = 0
    if n * g * hw * d == 0 or not any(needs):
        p.kind, p.launches = "empty", ()
        return p
    tile, _, fit = _sizes(itemsize)
    sms = _TUNING.get("sms", _sm_count(dev_index))
    has_w, has_b, has_r = wdt is not None, bdt is not None, rstride is not None
    need_sums = need_dw or need_db
    block_c = min(_p2(c), 128)
    block_n = _TUNING.get("block_n", max(1, min(_p2(n), 4096 // block_c)))   # tiles of <= 4096 partials
    single = _p2(hw) * _p2(d)
    split = None if single <= fit and _TUNING.get("chunks", 1) == 1 else _split(n, g, d, hw, tile, p.cl, sms)
    if split is None:
        if single <= fit:
            p.kind, bs, bd, warps = "single", _p2(hw), _p2(d), _warps(single)
        else:
            p.kind, (bs, bd) = "loop", _tile_shape(d, hw, tile, p.cl)
            warps = _warps(bs * bd)
        i64 = _TUNING.get("i64", c * (hw + bs) >= 2**31)
        consts = (d, act, has_w, has_b, has_r, need_dx, need_dr, need_sums, bs, bd, p.kind == "single", p.cl,
                  i64, f64)
        launches = [_Launch(_bwd_kernel, (n * g,), consts, warps)]
        if need_sums:
            p.scratch = 2 * n * c
            launches.append(_Launch(_param_grad_kernel, (triton.cdiv(c, block_c),),
                                    (need_dw, need_db, block_n, block_c, f64), _warps(block_n * block_c)))
        p.launches = tuple(launches)
        return p
    chunks, length, bs, bd = split
    i64 = _TUNING.get("i64", c * (hw + bs) >= 2**31)
    warps = _warps(bs * bd)
    p.kind = "split"
    p.scratch = 2 * n * c * chunks
    part = _Launch(_bwd_part_kernel, (n * g, chunks), (d, act, has_w, has_b, has_r, need_dr, bs, bd, p.cl, i64, f64),
                   warps)
    n_dx = n * g * chunks if need_dx else 0
    block_k = _p2(chunks)
    block_c = min(_p2(c), max(1, 2048 // block_k))    # merge tiles of at most 2048 partials
    block_n = _TUNING.get("block_n", max(1, min(_p2(n), 4096 // (block_c * block_k))))
    grid = n_dx + (triton.cdiv(c, block_c) if need_sums else 0)
    launches = [part]
    if grid:
        dx = _Launch(_bwd_dx_kernel, (grid,), (d, act, has_w, has_b, has_r, need_dw, need_db, bs, bd, block_k,
                                               min(_p2(d), block_c), block_n, block_c, p.cl, i64, f64), warps)
        launches.append(dx)
    p.launches = tuple(launches)
    p.extra = (length, chunks, n_dx)
    return p


def _ints(values) -> tuple:
    """Plain ints (specializing symbolic ones while torch.compile traces: a plan is per shape anyway)."""
    return tuple(int(v) for v in values)


def _aligned(*tensors) -> int:
    """Bit i set when tensor i's data is 16-byte aligned (the compiled kernels assume what they saw)."""
    bits = 0
    for i, t in enumerate(tensors):
        if t is not None and t.data_ptr() % 16 == 0:
            bits |= 1 << i
    return bits


def _stream(dev_index: int):
    return torch._C._cuda_getCurrentRawStream(dev_index) if dev_index >= 0 else 0


def _device_guard(dev_index: int):
    """Triton launches on the current CUDA device: make it x's when it is not."""
    if dev_index >= 0 and torch._C._cuda_getDevice() != dev_index:
        return torch.cuda.device(dev_index)
    return contextlib.nullcontext()


# ==========================================================================================================
# Forward and backward on validated arguments
# ==========================================================================================================
# Every output and scratch buffer comes from these two (tests swap in NaN-filled ones, so that an element a
# kernel fails to write shows up).
_empty_strided = torch.empty_strided
_empty = torch.empty


def _forward_impl(x, weight, bias, residual, num_groups: int, eps: float, act: int, mode: str = "direct"):
    """(y, stats): stats is the scratch buffer, its first 3 N*G entries the planes hi, lo, rstd.
    mode: "direct" (eager launches), "traced" (wrap_triton, for torch.compile), "none" (shapes only)."""
    traced = mode != "direct"
    if traced:
        shape, xstride = _ints(x.shape), _ints(x.stride())
        rstride = None if residual is None else _ints(residual.stride())
    else:
        shape, xstride = x.shape, x.stride()
        rstride = None if residual is None else residual.stride()
    if weight is not None and not weight.is_contiguous():   # the kernels read parameters at stride 1
        weight = weight.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    wdt = None if weight is None else weight.dtype
    bdt = None if bias is None else bias.dtype
    dev_index = x.get_device()
    key = ("f", shape, xstride, x.dtype, dev_index, num_groups, act, wdt, bdt, rstride,
           0 if traced else _aligned(x, weight, bias, residual))
    p = _PLANS.get(key)
    if p is None:
        p = _PLANS[key] = _fwd_plan(shape, xstride, x.dtype, x.device, dev_index, num_groups, act, wdt, bdt,
                                    None if rstride is None else _ints(rstride))
    if p.copy_x:
        x = x.contiguous()
    if p.match_r:
        residual = _layout.match(residual, p.cl)
    y = _empty_strided(p.shape, p.y_stride, dtype=x.dtype, device=p.device)
    stats = _empty(p.scratch, dtype=p.stat_dtype, device=p.device)
    if p.kind == "empty":
        if p.scratch:
            stats.fill_(float("nan"))
        return y, stats
    if mode == "none":
        return y, stats
    w = x if weight is None else weight
    b = x if bias is None else bias
    r = x if residual is None else residual
    c, hw, g = p.c, p.hw, num_groups
    if p.kind == "split":
        length = p.extra
        args = ((x, stats, c, hw, g, length), (x, w, b, r, y, stats, c, hw, g, length, eps))
    else:
        args = ((x, w, b, r, y, stats, c, hw, g, eps),)
    if traced:
        for launch, a in zip(p.launches, args):
            launch.traced(a)
        return y, stats
    with _device_guard(p.dev_index):
        stream = _stream(p.dev_index)
        for launch, a in zip(p.launches, args):
            launch(stream, a)
    return y, stats


def _backward_impl(dy, x, weight, bias, residual, stats, num_groups: int, act: int, need_dx: bool,
                   need_dw: bool, need_db: bool, need_dr: bool, mode: str = "direct"):
    """(dx, dweight, dbias, dresidual), None where not needed. residual is only read with an activation;
    dresidual (= dz) is only computed when asked (the autograd formulas pass dy on when act is 0)."""
    traced = mode != "direct"
    r_used = residual if act else None
    if traced:
        shape, xstride, dystride = _ints(x.shape), _ints(x.stride()), _ints(dy.stride())
        rstride = None if r_used is None else _ints(r_used.stride())
    else:
        shape, xstride, dystride = x.shape, x.stride(), dy.stride()
        rstride = None if r_used is None else r_used.stride()
    if weight is not None and not weight.is_contiguous():   # the kernels read parameters at stride 1
        weight = weight.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    wdt = None if weight is None else weight.dtype
    bdt = None if bias is None else bias.dtype
    dev_index = x.get_device()
    needs = (need_dx, need_dw, need_db, need_dr)
    key = ("b", shape, xstride, x.dtype, dev_index, num_groups, act, wdt, bdt, rstride, dystride, needs,
           0 if traced else _aligned(x, weight, bias, r_used, dy))
    p = _PLANS.get(key)
    if p is None:
        p = _PLANS[key] = _bwd_plan(shape, xstride, x.dtype, x.device, dev_index, num_groups, act, wdt, bdt,
                                    None if rstride is None else _ints(rstride), _ints(dystride), needs)
    if p.copy_x:
        x = x.contiguous()
    if p.match_dy:
        dy = _layout.match(dy, p.cl)
    if p.match_r:
        r_used = _layout.match(r_used, p.cl)
    dx = _empty_strided(p.shape, p.y_stride, dtype=x.dtype, device=p.device) if need_dx else None
    dr = _empty_strided(p.shape, p.y_stride, dtype=x.dtype, device=p.device) if need_dr else None
    dw = _empty(p.c, dtype=weight.dtype, device=p.device) if need_dw else None
    db = _empty(p.c, dtype=bias.dtype, device=p.device) if need_db else None
    if p.kind == "empty":
        if dw is not None:
            dw.zero_()
        if db is not None:
            db.zero_()
        return dx, dw, db, dr
    if mode == "none":
        return dx, dw, db, dr
    sums = _empty(p.scratch, dtype=p.stat_dtype, device=p.device) if p.scratch else stats
    w = x if weight is None else weight
    b = x if bias is None else bias
    r = x if r_used is None else r_used
    n, c, hw, g = p.n, p.c, p.hw, num_groups
    if p.kind == "split":
        length, chunks, n_dx = p.extra
        args = ((x, dy, w, b, r, x if dr is None else dr, stats, sums, c, hw, g, length, n),
                (x, dy, w, b, r, x if dx is None else dx, stats, sums, sums if dw is None else dw,
                 sums if db is None else db, c, hw, g, length, n, chunks, n_dx))
    else:
        args = ((x, dy, w, b, r, x if dx is None else dx, x if dr is None else dr, stats, sums, c, hw, g, n),
                (sums, sums if dw is None else dw, sums if db is None else db, n, c))
    if traced:
        for launch, a in zip(p.launches, args):
            launch.traced(a)
        return dx, dw, db, dr
    with _device_guard(p.dev_index):
        stream = _stream(p.dev_index)
        for launch, a in zip(p.launches, args):
            launch(stream, a)
    return dx, dw, db, dr


# ==========================================================================================================
# Double backward: a differentiable composite of torch ops, with exact statistics
# ==========================================================================================================
_ACT_FNS = {0: None, 1: torch.relu, 2: torch.nn.functional.silu, 3: torch.nn.functional.gelu}


def _composite(x, weight, bias, residual, hi, num_groups: int, eps: float, act: int):
    """act(GN(x) * weight + bias + residual) from torch ops (differentiable any number of times). The
    saved group mean hi is subtracted first, detached: GN is invariant to a per-group shift, value and
    gradient alike, and x - hi is exact near the mean, so the statistics of the shifted values are too."""
    n, c = x.shape[0], x.shape[1]
    comp = torch.float32 if x.dtype in _HALF else x.dtype
    xs = x.to(comp).reshape(n, num_groups, -1) - hi.detach().to(comp).reshape(n, num_groups, 1)
    var, mu = torch.var_mean(xs, dim=-1, correction=0, keepdim=True)
    z = ((xs - mu) * torch.rsqrt(var + eps)).reshape(x.shape)
    view = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        z = z * weight.to(comp).view(view)
    if bias is not None:
        z = z + bias.to(comp).view(view)
    if residual is not None:
        z = z + residual.to(comp)
    fn = _ACT_FNS[act]
    return (z if fn is None else fn(z)).to(x.dtype)


def _grads_with_graph(dy, x, weight, bias, residual, stats, num_groups, eps, act, needs):
    """The first derivatives as a differentiable graph (backward with create_graph=True). Without an
    activation dresidual is dy itself, and the residual does not enter the other gradients."""
    nx, nw, nb, nr = needs
    if act == 0:
        residual, needs = None, (nx, nw, nb, False)
    inputs = [t for t, need in zip((x, weight, bias, residual), needs) if need]
    grads = []
    if inputs:
        with torch.enable_grad():
            y = _composite(x, weight, bias, residual, stats[: x.shape[0] * num_groups], num_groups, eps, act)
            grads = list(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
    out = []
    for t, need in zip((x, weight, bias, residual), needs):
        g = grads.pop(0) if need else None
        out.append(torch.zeros_like(t) if need and g is None else g)
    if nr and act == 0:
        out[3] = dy
    return out


# ==========================================================================================================
# Eager autograd
# ==========================================================================================================
class _GroupNorm(torch.autograd.Function):
    """Thin autograd wrapper of the eager launches (no custom-op dispatch on the way)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, num_groups, eps, act):
        y, stats = _forward_impl(x, weight, bias, residual, num_groups, eps, act)
        ctx.save_for_backward(x, weight, bias, residual if act else None, stats)
        ctx.cfg = (num_groups, eps, act)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, residual, stats = ctx.saved_tensors
        num_groups, eps, act = ctx.cfg
        nx, nw, nb, nr = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():  # create_graph=True: a graph of torch ops, differentiable again
            return (*_grads_with_graph(dy, x, weight, bias, residual, stats, num_groups, eps, act,
                                       (nx, nw, nb, nr)), None, None, None)
        dx, dw, db, dr = _backward_impl(dy, x, weight, bias, residual, stats, num_groups, act, nx, nw, nb,
                                        nr and act != 0)
        if nr and act == 0:
            dr = dy
        return dx, dw, db, dr, None, None, None


# ==========================================================================================================
# The op torch.compile sees: groupnorm::triton_fwd / groupnorm::triton_bwd
# ==========================================================================================================
def _op_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
            num_groups: int, eps: float, act: int) -> tuple[Tensor, Tensor]:
    """(y, stats); stats: the planes hi, lo, rstd of the group statistics, then scratch."""
    _traced_kernels()   # names every kernel for torch's compile caches (see there)
    return _forward_impl(x, weight, bias, residual, num_groups, eps, act, mode="traced")


def _op_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
            stats: Tensor, num_groups: int, act: int, needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dresidual); an output that is not needed has 0 elements."""
    _traced_kernels()
    out = _backward_impl(dy, x, weight, bias, residual, stats, num_groups, act, *needs, mode="traced")
    return tuple(x.new_empty(0) if t is None else t for t in out)


def _op_fwd_eager(x, weight, bias, residual, num_groups, eps, act):
    return _forward_impl(x, weight, bias, residual, num_groups, eps, act)


def _op_bwd_eager(dy, x, weight, bias, residual, stats, num_groups, act, needs):
    out = _backward_impl(dy, x, weight, bias, residual, stats, num_groups, act, *needs)
    return tuple(x.new_empty(0) if t is None else t for t in out)


def _op_fwd_fake(x, weight, bias, residual, num_groups, eps, act):
    return _forward_impl(x, weight, bias, residual, num_groups, eps, act, mode="none")


def _op_bwd_fake(dy, x, weight, bias, residual, stats, num_groups, act, needs):
    out = _backward_impl(dy, x, weight, bias, residual, stats, num_groups, act, *needs, mode="none")
    return tuple(x.new_empty(0) if t is None else t for t in out)


def _register_ops():
    """triton_op on a GPU: Inductor then launches our kernels from its own code. Under the interpreter
    (CPU tensors, where wrap_triton cannot trace) and on torch without triton_op: a plain custom op with a
    fake implementation, opaque to Inductor."""
    _op_fwd_eager.__annotations__ = _op_fwd.__annotations__
    _op_bwd_eager.__annotations__ = _op_bwd.__annotations__
    triton_op = getattr(torch.library, "triton_op", None)
    if triton_op is not None and not _INTERPRET:
        fwd = triton_op("groupnorm::triton_fwd", _op_fwd, mutates_args=())
        bwd = triton_op("groupnorm::triton_bwd", _op_bwd, mutates_args=())
    else:
        fwd = torch.library.custom_op("groupnorm::triton_fwd", _op_fwd_eager, mutates_args=())
        bwd = torch.library.custom_op("groupnorm::triton_bwd", _op_bwd_eager, mutates_args=())
        fwd.register_fake(_op_fwd_fake)
        bwd.register_fake(_op_bwd_fake)

    def setup_context(ctx, inputs, output):
        x, weight, bias, residual, num_groups, eps, act = inputs
        ctx.save_for_backward(x, weight, bias, residual if act else None, output[1])
        ctx.cfg = (num_groups, act, residual is not None)
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, dy, dstats):
        x, weight, bias, residual, stats = ctx.saved_tensors
        num_groups, act, has_r = ctx.cfg
        nx, nw, nb, nr = ctx.needs_input_grad[:4]
        needs = [nx, nw and weight is not None, nb and bias is not None, nr and has_r and act != 0]
        dx = dw = db = dr = None
        if any(needs):
            dx, dw, db, dr = bwd(dy, x, weight, bias, residual, stats, num_groups, act, needs)
        return (dx if needs[0] else None, dw if needs[1] else None, db if needs[2] else None,
                (dr if needs[3] else dy) if nr and has_r else None, None, None, None)

    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd, bwd


triton_fwd, triton_bwd = _register_ops()


# ==========================================================================================================
# Backend API (groupnorm.backends)
# ==========================================================================================================
def available() -> str | None:
    """None when the kernels can run here, else the reason."""
    if _INTERPRET or torch.cuda.is_available():
        return None
    return "no CUDA GPU (torch.cuda.is_available() is False) and TRITON_INTERPRET is not 1"


def _eager(x, weight, bias, residual) -> bool:
    """True when nothing needs the op itself: no torch.compile, jit tracing, torch-function or dispatch
    mode, functorch transform, or tensor subclass."""
    return (not torch.compiler.is_compiling() and not torch._C._is_torch_function_mode_enabled()
            and torch._C._len_torch_dispatch_stack() == 0 and torch._C._get_tracing_state() is None
            and torch._C._functorch.peek_interpreter_stack() is None
            and type(x) is torch.Tensor and (weight is None or type(weight) in _PLAIN)
            and (bias is None or type(bias) in _PLAIN) and (residual is None or type(residual) is torch.Tensor))


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, residual=None):
    """act(GN(x) * weight + bias + residual), differentiable (twice: create_graph=True runs a composite
    of torch ops). Arguments validated by the caller; output in x's layout (``groupnorm._layout``)."""
    act = _ACT_CODES[activation]
    if _eager(x, weight, bias, residual):
        if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad)
                                        or (residual is not None and residual.requires_grad)):
            return _GroupNorm.apply(x, weight, bias, residual, num_groups, eps, act)
        return _forward_impl(x, weight, bias, residual, num_groups, eps, act)[0]
    return triton_fwd(x, weight, bias, residual, num_groups, float(eps), act)[0]


def forward(x, weight, bias, residual, num_groups: int, eps: float, activation: str | None):
    """Kernel-level forward: (y, mean, rstd); mean, rstd (N, G), float32 (float64 for float64 x); mean is
    the group mean rounded to that dtype (the kernels keep the rest of it for the backward)."""
    y, stats = _forward_impl(x, weight, bias, residual, num_groups, float(eps), _ACT_CODES[activation])
    ng = x.shape[0] * num_groups
    return y, stats[:ng].view(x.shape[0], num_groups), stats[2 * ng: 3 * ng].view(x.shape[0], num_groups)


def backward(grad_y, x, weight, bias, residual, mean, rstd, num_groups: int, activation: str | None,
             needs=(True, True, True, True)):
    """Kernel-level backward: (dx, dweight, dbias, dresidual), None where not needed or the input is None.
    dresidual = grad_y * act'(z). The low part of the mean (x's exact group mean minus ``mean``) is
    recomputed here with torch ops; the autograd path keeps it from the forward instead."""
    n = x.shape[0]
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        if x.numel():
            groups = x.detach().to(torch.float64).reshape(n, num_groups, -1)
            lo = (groups - mean.to(torch.float64).reshape(n, num_groups, 1)).mean(-1)
        else:
            lo = torch.full((n, num_groups), float("nan"), dtype=torch.float64, device=x.device)
        stats = torch.cat([mean.reshape(-1).to(stat_dtype), lo.reshape(-1).to(stat_dtype),
                           rstd.reshape(-1).to(stat_dtype)])
    needs = tuple(bool(v) for v in needs) + (True,) * (4 - len(needs))
    return _backward_impl(grad_y, x, weight, bias, residual, stats, num_groups, _ACT_CODES[activation],
                          needs[0], needs[1] and weight is not None, needs[2] and bias is not None,
                          needs[3] and residual is not None)
