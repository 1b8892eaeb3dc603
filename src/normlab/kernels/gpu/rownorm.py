"""Triton kernels for the row norms: RMSNorm, LayerNorm and their residual-add variants.

- RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467): ``y = x * rstd * w + b`` with
  ``rstd = 1 / sqrt(mean(x²) + eps)`` (``eps_inside``) or ``1 / (sqrt(mean(x²)) + eps)``.
- LayerNorm (Ba et al. 2016, arXiv:1607.06450): ``y = (x - mean) / sqrt(var + eps) * w + b``.
- ``add_*``: ``h = x + residual`` (rounded to x's dtype, and the statistics taken from the rounded
  ``h``, so that the backward's recomputation from the stored ``h`` sees the same values), then
  ``y = norm(h)``; returns ``(y, h)``.

A row is ``row_size`` contiguous elements (the trailing dims), or with ``channels_first`` the
``C = row_size`` channels of one position of a contiguous ``(N, C, *)``, normalized over dim 1.
The semantics are those of the C++ CPU kernels (``csrc/rownorm.cpp``): the backward recomputes the
statistics from ``x`` and returns ``dx`` (plus ``grad_residual`` when given: the residual branch of
add + norm) and the parameter grads ``dw = sum(dy * xn)``, ``db = sum(dy)`` in the accumulation
dtype, both always computed (an absent weight counts as ones, an absent bias as zeros).

GPU design (memory-bound: the aim is one read and one write of each tensor):

- Rows of at most ``MAX_FUSED_BLOCK`` elements (backward: at most 8192) live in registers: a
  program takes a ``ROWS x BLOCK`` tile (short rows packed, 4096 elements a tile, 16 warps), takes
  the exact two-pass statistics from registers and writes. DRAM bytes per element: forward 1 read
  + 1 write (add_*: 2 reads + 2 writes), backward 2 reads (x, dy; 3 with grad_residual) + 1 write.
- Longer rows loop over 4096-element blocks, one row per program (backward: a persistent program
  per a few rows): a statistics pass (LayerNorm with sums shifted by the mean of the first block,
  so ``var = mean(d²) - mean(d)²`` does not cancel) and a write pass, whose re-read of the row
  (16 to 160 KiB) mostly hits L2: the same DRAM bytes plus an L2 re-read.
- channels_first: a strided kernel on ``(N, C, S)``, tiles of ``BLOCK_C x BLOCK_S`` with the
  positions along the contiguous axis (coalesced), statistics reduced over the channel axis; more
  than a tile of channels loops over channel blocks in two passes like long rows. No permute
  copies; ``(N, C)`` and ``(N, C, 1...)`` take the row kernels (same layout).
- Backward parameter grads: a persistent grid (programs ~ 2 per SM for 16-warp tiles, grid-stride
  loop over tiles), each accumulating ``dy * xn`` and ``dy`` in registers (looping path: in its own
  row of the buffer, L2-resident), then one fp32 (fp64 for fp64) row per program in a
  ``(programs, row_size)`` buffer reduced by a torch ``.sum(0)``: no atomics, deterministic.

Statistics and arithmetic in fp32 (fp64 for fp64 input); inputs are loaded in their dtype.
"""

from __future__ import annotations

import contextlib
import functools
import struct
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from normlab.kernels.gpu import _common
from normlab.kernels.gpu._common import acc_dtype, block_for, jit, warps_for

# Elements a program holds per tile: short rows are packed into tiles this large so that each
# program moves enough bytes to hide the memory latency.
_TILE = 4096
# Block length of the looping path (rows longer than MAX_FUSED_BLOCK); channels_first tiles
# are fused up to _CF_FUSED elements.
_LOOP_BLOCK = 4096
_CF_FUSED = 8192
# The backward keeps about 6 values per element live (x, dy, w, the dw/db accumulators, dx):
# rows up to 8192 fit the register file of a 16-warp program (ptxas for sm_90: 128 registers, a
# few spilled bytes); 16384 spills over 1 KiB per thread, so longer rows take the looping path.
_BWD_FUSED = 8192


@jit
def _rstd(stat, eps, eps_lo, layer: tl.constexpr, eps_inside: tl.constexpr):  # type: ignore[no-untyped-def]
    # stat: the variance (LayerNorm) or mean(x²) (RMSNorm). Float arguments are fp32: eps comes as
    # eps + eps_lo, exact enough for fp64.
    if layer or eps_inside:  # noqa: SIM108
        r = 1.0 / tl.sqrt(stat + eps + eps_lo)
    else:
        r = 1.0 / (tl.sqrt(stat) + eps + eps_lo)
    return r


@jit
def _load_h(x_ptr, res_ptr, offs, mask, has_res: tl.constexpr, acc: tl.constexpr):  # type: ignore[no-untyped-def]
    # The norm's input in the accumulation dtype: x, or x + residual rounded to x's dtype first.
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc)
    if has_res:
        r = tl.load(res_ptr + offs, mask=mask, other=0.0).to(acc)
        v = (v + r).to(x_ptr.dtype.element_ty).to(acc)
    return v


@jit
def _rms_proj(sgx, ms, rstd, eps_inside: tl.constexpr):  # type: ignore[no-untyped-def]
    # c2 of dx = rstd * (g - xn * c2), from mean(g * x): d rstd / dx is -x rstd³ / n (eps inside)
    # or -x rstd² / (n rms) (eps outside; 0 for a zero row, whose rms has no gradient).
    if eps_inside:
        c2 = sgx * rstd
    else:
        rms = tl.sqrt(ms)
        c2 = tl.where(rms > 0.0, sgx / tl.where(rms > 0.0, rms, 1.0), 0.0)
    return c2


@jit
def _grad_coefs(s1, s2, g1, g2, k, n, eps, eps_lo, layer: tl.constexpr, eps_inside: tl.constexpr):  # type: ignore[no-untyped-def]
    # (mean, rstd, c1, c2) of dx = rstd * (g - c1 - xn * c2), from the sums over n values (a row,
    # or each position's channels) that the looping backward kernels take in one pass:
    # s1 = sum(x - k), s2 = sum((x - k)²), g1 = sum(g), g2 = sum(g * (x - k)). RMSNorm sums
    # unshifted (k = 0, so s2 = sum(x²) and g2 = sum(g * x)) and has no c1: its mean and c1 are k.
    if layer:
        dm = s1 / n
        rstd = _rstd(tl.maximum(s2 / n - dm * dm, 0.0), eps, eps_lo, layer, eps_inside)
        mean = k + dm
        c1 = g1 / n
        # sum(g * xn) = rstd * (sum(g * (x - k)) - (mean - k) * sum(g))
        c2 = rstd * (g2 - dm * g1) / n
    else:
        ms = s2 / n
        rstd = _rstd(ms, eps, eps_lo, layer, eps_inside)
        mean = k
        c1 = k
        c2 = _rms_proj(g2 / n, ms, rstd, eps_inside)
    return mean, rstd, c1, c2


# ---- rows --------------------------------------------------------------------------------------


@jit
def _rows_fwd_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    res_ptr,
    h_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    n_rows,
    n,
    eps,
    eps_lo,
    block: tl.constexpr,
    rows_per: tl.constexpr,
    loop: tl.constexpr,
    layer: tl.constexpr,
    eps_inside: tl.constexpr,
    has_res: tl.constexpr,
    has_w: tl.constexpr,
    has_b: tl.constexpr,
    acc: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, block)
    if not loop:
        rows = pid * rows_per + tl.arange(0, rows_per)
        cmask = cols < n
        mask = (rows < n_rows)[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * n + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc)
        if has_res:
            r = tl.load(res_ptr + offs, mask=mask, other=0.0).to(acc)
            h = (x + r).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + offs, h, mask=mask)
            x = h.to(acc)
        if layer:
            mean = tl.sum(x, axis=1) / n
            d = tl.where(mask, x - mean[:, None], 0.0)
            rstd = _rstd(tl.sum(d * d, axis=1) / n, eps, eps_lo, layer, eps_inside)
            xn = d * rstd[:, None]
        else:
            rstd = _rstd(tl.sum(x * x, axis=1) / n, eps, eps_lo, layer, eps_inside)
            xn = x * rstd[:, None]
        y = xn
        if has_w:
            y = y * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(acc)[None, :]
        if has_b:
            y = y + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(acc)[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        base = pid.to(tl.int64) * n
        k = 0.0
        if layer:
            m0 = cols < n
            k = tl.sum(_load_h(x_ptr, res_ptr, base + cols, m0, has_res, acc), axis=0) / tl.minimum(n, block)
        s1 = tl.zeros([block], dtype=acc)
        s2 = tl.zeros([block], dtype=acc)
        for start in range(0, n, block):
            offs = start + cols
            m = offs < n
            v = _load_h(x_ptr, res_ptr, base + offs, m, has_res, acc)
            if has_res:
                tl.store(h_ptr + base + offs, v.to(h_ptr.dtype.element_ty), mask=m)
            d = tl.where(m, v - k, 0.0)
            s1 += d
            s2 += d * d
        mean = 0.0
        if layer:
            dm = tl.sum(s1, axis=0) / n
            rstd = _rstd(tl.maximum(tl.sum(s2, axis=0) / n - dm * dm, 0.0), eps, eps_lo, layer, eps_inside)
            mean = k + dm
        else:
            rstd = _rstd(tl.sum(s2, axis=0) / n, eps, eps_lo, layer, eps_inside)
        for start in range(0, n, block):
            offs = start + cols
            m = offs < n
            # Recomputes x + residual rather than re-reading h: another thread of this program
            # may have stored that element of h, with no barrier in between.
            v = _load_h(x_ptr, res_ptr, base + offs, m, has_res, acc)
            y = (v - mean) * rstd
            if has_w:
                y = y * tl.load(w_ptr + offs, mask=m, other=0.0).to(acc)
            if has_b:
                y = y + tl.load(b_ptr + offs, mask=m, other=0.0).to(acc)
            tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=m)


@jit
def _rows_bwd_kernel(  # type: ignore[no-untyped-def]
    dy_ptr,
    x_ptr,
    dres_ptr,
    dx_ptr,
    w_ptr,
    dwp_ptr,
    dbp_ptr,
    n_rows,
    n,
    eps,
    eps_lo,
    block: tl.constexpr,
    rows_per: tl.constexpr,
    loop: tl.constexpr,
    layer: tl.constexpr,
    eps_inside: tl.constexpr,
    has_dres: tl.constexpr,
    has_w: tl.constexpr,
    acc: tl.constexpr,
):
    # dx = rstd * (g - c1 - xn * c2) with g = dy * w; LayerNorm: c1 = mean(g), c2 = mean(g * xn);
    # RMSNorm: c1 = 0, c2 from mean(g * x) (see _rms_proj). dw += dy * xn, db += dy.
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    cols = tl.arange(0, block)
    if not loop:
        cmask = cols < n
        w = tl.full([block], 1.0, dtype=acc)
        if has_w:
            w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(acc)
        dw_acc = tl.zeros([rows_per, block], dtype=acc)
        db_acc = tl.zeros([rows_per, block], dtype=acc)
        for t in range(pid, tl.cdiv(n_rows, rows_per), progs):
            rows = t * rows_per + tl.arange(0, rows_per)
            mask = (rows < n_rows)[:, None] & cmask[None, :]
            offs = rows.to(tl.int64)[:, None] * n + cols[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(acc)
            g = dy * w[None, :]
            if layer:
                mean = tl.sum(x, axis=1) / n
                d = tl.where(mask, x - mean[:, None], 0.0)
                rstd = _rstd(tl.sum(d * d, axis=1) / n, eps, eps_lo, layer, eps_inside)
                xn = d * rstd[:, None]
                c1 = tl.sum(g, axis=1) / n
                c2 = tl.sum(g * xn, axis=1) / n
                dx = rstd[:, None] * (g - c1[:, None] - xn * c2[:, None])
            else:
                ms = tl.sum(x * x, axis=1) / n
                rstd = _rstd(ms, eps, eps_lo, layer, eps_inside)
                xn = x * rstd[:, None]
                c2 = _rms_proj(tl.sum(g * x, axis=1) / n, ms, rstd, eps_inside)
                dx = rstd[:, None] * (g - xn * c2[:, None])
            if has_dres:
                dx += tl.load(dres_ptr + offs, mask=mask, other=0.0).to(acc)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            # The where keeps padded rows (rstd = inf when eps = 0) out of the sums.
            dw_acc += tl.where(mask, dy * xn, 0.0)
            db_acc += dy
        prow = pid.to(tl.int64) * n
        tl.store(dwp_ptr + prow + cols, tl.sum(dw_acc, axis=0), mask=cmask)
        tl.store(dbp_ptr + prow + cols, tl.sum(db_acc, axis=0), mask=cmask)
    else:
        prow = pid.to(tl.int64) * n
        for r in range(pid, n_rows, progs):
            base = tl.cast(r, tl.int64) * n
            k = 0.0
            if layer:
                m0 = cols < n
                x0 = tl.load(x_ptr + base + cols, mask=m0, other=0.0).to(acc)
                k = tl.sum(x0, axis=0) / tl.minimum(n, block)
            s1 = tl.zeros([block], dtype=acc)
            s2 = tl.zeros([block], dtype=acc)
            g1 = tl.zeros([block], dtype=acc)
            g2 = tl.zeros([block], dtype=acc)
            for start in range(0, n, block):
                offs = start + cols
                m = offs < n
                x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(acc)
                g = tl.load(dy_ptr + base + offs, mask=m, other=0.0).to(acc)
                if has_w:
                    g = g * tl.load(w_ptr + offs, mask=m, other=0.0).to(acc)
                d = tl.where(m, x - k, 0.0)
                s1 += d
                s2 += d * d
                g1 += g
                g2 += g * d
            mean, rstd, c1, c2 = _grad_coefs(
                tl.sum(s1, axis=0), tl.sum(s2, axis=0), tl.sum(g1, axis=0), tl.sum(g2, axis=0), k, n,
                eps, eps_lo, layer, eps_inside,
            )  # fmt: skip
            for start in range(0, n, block):
                offs = start + cols
                m = offs < n
                x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(acc)
                dy = tl.load(dy_ptr + base + offs, mask=m, other=0.0).to(acc)
                g = dy
                if has_w:
                    g = g * tl.load(w_ptr + offs, mask=m, other=0.0).to(acc)
                xn = (x - mean) * rstd
                dx = rstd * (g - c1 - xn * c2)
                if has_dres:
                    dx += tl.load(dres_ptr + base + offs, mask=m, other=0.0).to(acc)
                tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
                # This program's own row of the buffer: no other program touches it.
                pw = tl.load(dwp_ptr + prow + offs, mask=m, other=0.0)
                tl.store(dwp_ptr + prow + offs, pw + tl.where(m, dy * xn, 0.0), mask=m)
                pb = tl.load(dbp_ptr + prow + offs, mask=m, other=0.0)
                tl.store(dbp_ptr + prow + offs, pb + dy, mask=m)


# ---- channels first: (N, C, S) normalized over C ----------------------------------------------


@jit
def _cf_fwd_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    c,
    s,
    n_sb,
    eps,
    eps_lo,
    block_c: tl.constexpr,
    block_s: tl.constexpr,
    loop: tl.constexpr,
    layer: tl.constexpr,
    eps_inside: tl.constexpr,
    has_w: tl.constexpr,
    has_b: tl.constexpr,
    acc: tl.constexpr,
):
    pid = tl.program_id(0)
    sample = pid // n_sb
    pos = (pid % n_sb) * block_s + tl.arange(0, block_s)
    smask = pos < s
    ch = tl.arange(0, block_c)
    base = tl.cast(sample, tl.int64) * c * s
    if not loop:
        cmask = ch < c
        mask = cmask[:, None] & smask[None, :]
        offs = base + ch.to(tl.int64)[:, None] * s + pos[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc)
        if layer:
            mean = tl.sum(x, axis=0) / c
            d = tl.where(mask, x - mean[None, :], 0.0)
            rstd = _rstd(tl.sum(d * d, axis=0) / c, eps, eps_lo, layer, eps_inside)
            y = d * rstd[None, :]
        else:
            rstd = _rstd(tl.sum(x * x, axis=0) / c, eps, eps_lo, layer, eps_inside)
            y = x * rstd[None, :]
        if has_w:
            y = y * tl.load(w_ptr + ch, mask=cmask, other=0.0).to(acc)[:, None]
        if has_b:
            y = y + tl.load(b_ptr + ch, mask=cmask, other=0.0).to(acc)[:, None]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        k = tl.zeros([block_s], dtype=acc)
        if layer:
            m0 = (ch < c)[:, None] & smask[None, :]
            x0 = tl.load(x_ptr + base + ch.to(tl.int64)[:, None] * s + pos[None, :], mask=m0, other=0.0)
            k = tl.sum(x0.to(acc), axis=0) / tl.minimum(c, block_c)
        s1 = tl.zeros([block_c, block_s], dtype=acc)
        s2 = tl.zeros([block_c, block_s], dtype=acc)
        for c0 in range(0, c, block_c):
            cc = c0 + ch
            mask = (cc < c)[:, None] & smask[None, :]
            x = tl.load(x_ptr + base + cc.to(tl.int64)[:, None] * s + pos[None, :], mask=mask, other=0.0)
            d = tl.where(mask, x.to(acc) - k[None, :], 0.0)
            s1 += d
            s2 += d * d
        mean = tl.zeros([block_s], dtype=acc)
        if layer:
            dm = tl.sum(s1, axis=0) / c
            rstd = _rstd(tl.maximum(tl.sum(s2, axis=0) / c - dm * dm, 0.0), eps, eps_lo, layer, eps_inside)
            mean = k + dm
        else:
            rstd = _rstd(tl.sum(s2, axis=0) / c, eps, eps_lo, layer, eps_inside)
        for c0 in range(0, c, block_c):
            cc = c0 + ch
            cm = cc < c
            mask = cm[:, None] & smask[None, :]
            offs = base + cc.to(tl.int64)[:, None] * s + pos[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc)
            y = (x - mean[None, :]) * rstd[None, :]
            if has_w:
                y = y * tl.load(w_ptr + cc, mask=cm, other=0.0).to(acc)[:, None]
            if has_b:
                y = y + tl.load(b_ptr + cc, mask=cm, other=0.0).to(acc)[:, None]
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@jit
def _cf_bwd_kernel(  # type: ignore[no-untyped-def]
    dy_ptr,
    x_ptr,
    dx_ptr,
    w_ptr,
    dwp_ptr,
    dbp_ptr,
    c,
    s,
    n_sb,
    n_tiles,
    eps,
    eps_lo,
    block_c: tl.constexpr,
    block_s: tl.constexpr,
    loop: tl.constexpr,
    layer: tl.constexpr,
    eps_inside: tl.constexpr,
    has_w: tl.constexpr,
    acc: tl.constexpr,
):
    # As _rows_bwd_kernel, per position over the channel axis (axis 0 of a tile).
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    ch = tl.arange(0, block_c)
    prow = pid.to(tl.int64) * c
    if not loop:
        cmask = ch < c
        w = tl.full([block_c], 1.0, dtype=acc)
        if has_w:
            w = tl.load(w_ptr + ch, mask=cmask, other=0.0).to(acc)
        dw_acc = tl.zeros([block_c, block_s], dtype=acc)
        db_acc = tl.zeros([block_c, block_s], dtype=acc)
        for t in range(pid, n_tiles, progs):
            sample = t // n_sb
            pos = (t % n_sb) * block_s + tl.arange(0, block_s)
            mask = cmask[:, None] & (pos < s)[None, :]
            offs = tl.cast(sample, tl.int64) * c * s + ch.to(tl.int64)[:, None] * s + pos[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(acc)
            g = dy * w[:, None]
            if layer:
                mean = tl.sum(x, axis=0) / c
                d = tl.where(mask, x - mean[None, :], 0.0)
                rstd = _rstd(tl.sum(d * d, axis=0) / c, eps, eps_lo, layer, eps_inside)
                xn = d * rstd[None, :]
                c1 = tl.sum(g, axis=0) / c
                c2 = tl.sum(g * xn, axis=0) / c
                dx = rstd[None, :] * (g - c1[None, :] - xn * c2[None, :])
            else:
                ms = tl.sum(x * x, axis=0) / c
                rstd = _rstd(ms, eps, eps_lo, layer, eps_inside)
                xn = x * rstd[None, :]
                c2 = _rms_proj(tl.sum(g * x, axis=0) / c, ms, rstd, eps_inside)
                dx = rstd[None, :] * (g - xn * c2[None, :])
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw_acc += tl.where(mask, dy * xn, 0.0)
            db_acc += dy
        tl.store(dwp_ptr + prow + ch, tl.sum(dw_acc, axis=1), mask=cmask)
        tl.store(dbp_ptr + prow + ch, tl.sum(db_acc, axis=1), mask=cmask)
    else:
        for t in range(pid, n_tiles, progs):
            sample = t // n_sb
            pos = (t % n_sb) * block_s + tl.arange(0, block_s)
            smask = pos < s
            base = tl.cast(sample, tl.int64) * c * s
            k = tl.zeros([block_s], dtype=acc)
            if layer:
                m0 = (ch < c)[:, None] & smask[None, :]
                x0 = tl.load(x_ptr + base + ch.to(tl.int64)[:, None] * s + pos[None, :], mask=m0, other=0.0)
                k = tl.sum(x0.to(acc), axis=0) / tl.minimum(c, block_c)
            s1 = tl.zeros([block_c, block_s], dtype=acc)
            s2 = tl.zeros([block_c, block_s], dtype=acc)
            g1 = tl.zeros([block_c, block_s], dtype=acc)
            g2 = tl.zeros([block_c, block_s], dtype=acc)
            for c0 in range(0, c, block_c):
                cc = c0 + ch
                cm = cc < c
                mask = cm[:, None] & smask[None, :]
                offs = base + cc.to(tl.int64)[:, None] * s + pos[None, :]
                x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc)
                g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(acc)
                if has_w:
                    g = g * tl.load(w_ptr + cc, mask=cm, other=0.0).to(acc)[:, None]
                d = tl.where(mask, x - k[None, :], 0.0)
                s1 += d
                s2 += d * d
                g1 += g
                g2 += g * d
            mean, rstd, c1, c2 = _grad_coefs(
                tl.sum(s1, axis=0), tl.sum(s2, axis=0), tl.sum(g1, axis=0), tl.sum(g2, axis=0), k, c,
                eps, eps_lo, layer, eps_inside,
            )  # fmt: skip
            for c0 in range(0, c, block_c):
                cc = c0 + ch
                cm = cc < c
                mask = cm[:, None] & smask[None, :]
                offs = base + cc.to(tl.int64)[:, None] * s + pos[None, :]
                x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc)
                dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(acc)
                g = dy
                if has_w:
                    g = g * tl.load(w_ptr + cc, mask=cm, other=0.0).to(acc)[:, None]
                xn = (x - mean[None, :]) * rstd[None, :]
                dx = rstd[None, :] * (g - c1[None, :] - xn * c2[None, :])
                tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
                pw = tl.load(dwp_ptr + prow + cc, mask=cm, other=0.0)
                tl.store(dwp_ptr + prow + cc, pw + tl.sum(tl.where(mask, dy * xn, 0.0), axis=1), mask=cm)
                pb = tl.load(dbp_ptr + prow + cc, mask=cm, other=0.0)
                tl.store(dbp_ptr + prow + cc, pb + tl.sum(dy, axis=1), mask=cm)


# ---- host side ---------------------------------------------------------------------------------


@functools.cache
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def _programs(device: torch.device, tiles: int, num_warps: int) -> int:
    """Persistent backward grid: enough programs to fill the GPU (up to 32 warps an SM), no more,
    since each one adds a row to the parameter-grad buffer."""
    if device.type != "cuda":
        return max(1, min(tiles, 4))  # the interpreter runs programs one after another
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(tiles, sms * max(1, 32 // num_warps)))


def _eps2(eps: float) -> tuple[float, float]:
    """eps as fp32 + fp32 remainder: Triton passes float arguments as fp32."""
    hi: float = struct.unpack("f", struct.pack("f", eps))[0]
    return hi, float(eps) - hi


def _acc_tl(dtype: torch.dtype) -> Any:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _rows_config(
    n_rows: int, n: int, dtype: torch.dtype, backward: bool = False
) -> tuple[int, int, bool, int]:
    """(BLOCK, ROWS per tile, loop, num_warps) for rows of ``n`` elements."""
    wide = 2 if dtype == torch.float64 else 1  # fp64 values take two registers: half the tile
    cap = int(_common.MAX_FUSED_BLOCK)
    if backward:
        cap = min(cap, _BWD_FUSED)
    cap = max(16, cap // wide)
    if n <= cap:
        block = block_for(n, cap)
        rows = max(1, min(_TILE // wide // block, int(triton.next_power_of_2(max(n_rows, 1)))))
        return block, rows, False, warps_for(block * rows * wide)
    block = block_for(n, min(cap, _LOOP_BLOCK // wide))
    return block, 1, True, warps_for(block * wide)


def _cf_config(c: int, s: int, dtype: torch.dtype, backward: bool = False) -> tuple[int, int, bool, int]:
    """(BLOCK_C, BLOCK_S, loop, num_warps) for channels-first tiles: positions along the
    contiguous axis, at least 16 of them (64 B runs of fp32)."""
    wide = 2 if dtype == torch.float64 else 1
    # Backward tiles over 4096 values spill (ptxas, sm_90); its looping path costs little here
    # (the dw/db partials are reduced over the tile's positions before the buffer update).
    cap = max(16, min(int(_common.MAX_FUSED_BLOCK), _TILE if backward else _CF_FUSED) // wide)
    bc = block_for(c, 1 << 30)
    bs = block_for(s, max(16, min(256, _TILE // wide // bc)))
    if bc * bs <= cap:
        return bc, bs, False, warps_for(bc * bs * wide)
    bs = block_for(s, 32)
    bc = max(16, min(cap, _LOOP_BLOCK // wide) // bs)
    return bc, bs, True, warps_for(bc * bs * wide)


def _check(x: Tensor, row_size: int, op: str, channels_first: bool) -> None:
    if row_size <= 0 or x.numel() % row_size != 0:
        raise RuntimeError(f"{op}: row_size {row_size} does not divide the input's {x.numel()} elements")
    if channels_first and (x.dim() < 2 or x.shape[1] != row_size):
        raise RuntimeError(
            f"{op}: channels_first needs (N, C, *) input with C = {row_size}, got shape {tuple(x.shape)}"
        )


def _param(p: Tensor | None, n: int) -> Tensor | None:
    # Loaded in its own dtype and converted in the kernel (the C++ kernels' param_vec).
    if p is None:
        return None
    if p.numel() != n:
        raise RuntimeError(f"normlab kernels: parameter has {p.numel()} elements, expected {n}")
    return p.reshape(-1).contiguous()


def _forward_on_device(
    x_: Tensor,
    residual: Tensor | None,
    row_size: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    eps_inside: bool,
    channels_first: bool,
    layer: bool,
    op: str,
) -> tuple[Tensor, Tensor | None]:
    _check(x_, row_size, op, channels_first)
    x = x_.contiguous()
    # (N, C) or (N, C, 1, ...) channels first is laid out as rows of C: the row kernel's layout.
    channels_first = channels_first and x.numel() != x.shape[0] * row_size
    res = h = None
    if residual is not None:
        if residual.shape != x.shape:
            raise RuntimeError("normlab: residual and input shapes differ")
        res = residual.to(x.dtype).contiguous()
        h = torch.empty_like(x)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y, h
    w = _param(weight, row_size)
    b = _param(bias, row_size)
    flags: dict[str, Any] = {
        "layer": layer,
        "eps_inside": eps_inside,
        "has_w": w is not None,
        "has_b": b is not None,
        "acc": _acc_tl(x.dtype),
    }
    if channels_first:
        c = row_size
        s = x.numel() // (x.shape[0] * c)
        bc, bs, loop, warps = _cf_config(c, s, x.dtype)
        n_sb = triton.cdiv(s, bs)
        _cf_fwd_kernel[(x.shape[0] * n_sb,)](
            x, y, x if w is None else w, x if b is None else b, c, s, n_sb, *_eps2(eps),
            block_c=bc, block_s=bs, loop=loop, num_warps=warps, **flags,
        )  # fmt: skip
        return y, h
    n_rows = x.numel() // row_size
    block, rows, loop, warps = _rows_config(n_rows, row_size, x.dtype)
    grid = (n_rows,) if loop else (triton.cdiv(n_rows, rows),)
    _rows_fwd_kernel[grid](
        x, x if res is None else res, x if h is None else h, y, x if w is None else w, x if b is None else b,
        n_rows, row_size, *_eps2(eps),
        block=block, rows_per=rows, loop=loop, has_res=res is not None, num_warps=warps,
        **flags,
    )  # fmt: skip
    return y, h


def _backward_on_device(
    grad: Tensor,
    x_: Tensor,
    row_size: int,
    weight: Tensor | None,
    eps: float,
    eps_inside: bool,
    grad_residual: Tensor | None,
    channels_first: bool,
    layer: bool,
    op: str,
) -> tuple[Tensor, Tensor, Tensor]:
    _check(x_, row_size, op, channels_first)
    if channels_first and grad_residual is not None:
        raise RuntimeError("normlab: grad_residual is for rows only")
    if grad.shape != x_.shape:
        raise RuntimeError("normlab: grad and input shapes differ")
    x = x_.contiguous()
    # (N, C) or (N, C, 1, ...) channels first is laid out as rows of C: the row kernel's layout.
    channels_first = channels_first and x.numel() != x.shape[0] * row_size
    dy = grad.to(x.dtype).contiguous()
    dres = None
    if grad_residual is not None:
        if grad_residual.shape != x.shape:
            raise RuntimeError("normlab: grad_residual and input shapes differ")
        dres = grad_residual.to(x.dtype).contiguous()
    acc = acc_dtype(x.dtype)
    dx = torch.empty_like(x)
    if x.numel() == 0:
        zeros = torch.zeros((row_size,), dtype=acc, device=x.device)
        return dx, zeros, zeros.clone()
    w = _param(weight, row_size)
    flags: dict[str, Any] = {
        "layer": layer,
        "eps_inside": eps_inside,
        "has_w": w is not None,
        "acc": _acc_tl(x.dtype),
    }
    if channels_first:
        c = row_size
        s = x.numel() // (x.shape[0] * c)
        bc, bs, loop, warps = _cf_config(c, s, x.dtype, backward=True)
        n_sb = triton.cdiv(s, bs)
        tiles = x.shape[0] * n_sb
        progs = _programs(x.device, tiles, warps)
        alloc = torch.zeros if loop else torch.empty
        dwp = alloc((progs, c), dtype=acc, device=x.device)
        dbp = alloc((progs, c), dtype=acc, device=x.device)
        _cf_bwd_kernel[(progs,)](
            dy, x, dx, x if w is None else w, dwp, dbp, c, s, n_sb, tiles, *_eps2(eps),
            block_c=bc, block_s=bs, loop=loop, num_warps=warps, **flags,
        )  # fmt: skip
        return dx, dwp.sum(0), dbp.sum(0)
    n_rows = x.numel() // row_size
    block, rows, loop, warps = _rows_config(n_rows, row_size, x.dtype, backward=True)
    progs = _programs(x.device, triton.cdiv(n_rows, rows), warps)
    alloc = torch.zeros if loop else torch.empty
    dwp = alloc((progs, row_size), dtype=acc, device=x.device)
    dbp = alloc((progs, row_size), dtype=acc, device=x.device)
    _rows_bwd_kernel[(progs,)](
        dy, x, x if dres is None else dres, dx, x if w is None else w, dwp, dbp,
        n_rows, row_size, *_eps2(eps),
        block=block, rows_per=rows, loop=loop, has_dres=dres is not None, num_warps=warps, **flags,
    )  # fmt: skip
    return dx, dwp.sum(0), dbp.sum(0)


def _forward(*args: Any) -> tuple[Tensor, Tensor | None]:
    # Triton launches on the current CUDA device: make it the input's.
    with torch.cuda.device(args[0].device) if args[0].is_cuda else contextlib.nullcontext():
        return _forward_on_device(*args)


def _backward(*args: Any) -> tuple[Tensor, Tensor, Tensor]:
    with torch.cuda.device(args[1].device) if args[1].is_cuda else contextlib.nullcontext():
        return _backward_on_device(*args)


# ---- the ops -----------------------------------------------------------------------------------


def rms_norm(
    x: Tensor,
    row_size: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    eps_inside: bool,
    channels_first: bool = False,
) -> Tensor:
    """RMSNorm (arXiv:1910.07467) over rows of ``row_size``: ``y = x * rstd * w + b``, ``rstd =
    1 / sqrt(mean(x²) + eps)`` (``eps_inside``) or ``1 / (sqrt(mean(x²)) + eps)``; with
    ``channels_first`` over dim 1 of a contiguous ``(N, C, *)`` (strided kernel)."""
    op = "normlab::rms_norm"
    y, _ = _forward(x, None, row_size, weight, bias, eps, eps_inside, channels_first, False, op)
    return y


def layer_norm(
    x: Tensor,
    row_size: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    channels_first: bool = False,
) -> Tensor:
    """LayerNorm (arXiv:1607.06450) over rows of ``row_size``: ``y = (x - mean) / sqrt(var + eps)
    * w + b`` (biased variance); with ``channels_first`` over dim 1 of ``(N, C, *)``."""
    y, _ = _forward(x, None, row_size, weight, bias, eps, True, channels_first, True, "normlab::layer_norm")
    return y


def rms_norm_backward(
    grad: Tensor,
    x: Tensor,
    row_size: int,
    weight: Tensor | None,
    eps: float,
    eps_inside: bool,
    grad_residual: Tensor | None,
    channels_first: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`rms_norm`, statistics recomputed from ``x``: ``(dx, dw, db)`` with
    ``dx = rstd * (g - xn * c2) (+ grad_residual)``, ``g = dy * w``, ``c2 = mean(g * x) * rstd``
    (eps inside) or ``mean(g * x) / rms`` (eps outside); ``dw = sum(dy * xn)``, ``db = sum(dy)``
    over rows, in the accumulation dtype (computed also without weight or bias)."""
    return _backward(
        grad, x, row_size, weight, eps, eps_inside, grad_residual, channels_first, False,
        "normlab::rms_norm_backward",
    )  # fmt: skip


def layer_norm_backward(
    grad: Tensor,
    x: Tensor,
    row_size: int,
    weight: Tensor | None,
    eps: float,
    grad_residual: Tensor | None,
    channels_first: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`layer_norm`, statistics recomputed from ``x``: ``(dx, dw, db)`` with
    ``dx = rstd * (g - mean(g) - xn * mean(g * xn)) (+ grad_residual)``, ``g = dy * w``;
    ``dw = sum(dy * xn)``, ``db = sum(dy)`` in the accumulation dtype."""
    return _backward(
        grad, x, row_size, weight, eps, True, grad_residual, channels_first, True,
        "normlab::layer_norm_backward",
    )  # fmt: skip


def add_rms_norm(
    x: Tensor,
    residual: Tensor,
    row_size: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    eps_inside: bool,
) -> tuple[Tensor, Tensor]:
    """Residual add and RMSNorm (arXiv:1910.07467) in one pass: ``h = x + residual`` (in x's
    dtype), returns ``(rms_norm(h), h)`` with the statistics of the stored ``h``."""
    op = "normlab::add_rms_norm"
    y, h = _forward(x, residual, row_size, weight, bias, eps, eps_inside, False, False, op)
    assert h is not None
    return y, h


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    row_size: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Residual add and LayerNorm (arXiv:1607.06450) in one pass: ``h = x + residual`` (in x's
    dtype), returns ``(layer_norm(h), h)`` with the statistics of the stored ``h``."""
    y, h = _forward(x, residual, row_size, weight, bias, eps, True, False, True, "normlab::add_layer_norm")
    assert h is not None
    return y, h


__all__ = [
    "add_layer_norm",
    "add_rms_norm",
    "layer_norm",
    "layer_norm_backward",
    "rms_norm",
    "rms_norm_backward",
]
