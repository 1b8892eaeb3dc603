"""GroupNorm (Wu & He 2018, arXiv:1803.08494) as Triton kernels: ``normlab::group_norm`` and
``normlab::group_norm_backward`` on CUDA tensors (or on CPU through Triton's interpreter).

For sample ``n`` and group ``g`` (``C / G`` channels, all ``S`` positions, ``M = C / G * S``
values)::

    mean = sum(x) / M,   var = sum((x - mean)^2) / M,   xhat = (x - mean) / sqrt(var + eps)
    y = w_c * xhat + b_c
    dx = rstd * (w_c dy - mean_g(w dy) - xhat * mean_g(w dy xhat))
    dw_c = sum_{n, s} dy xhat,   db_c = sum_{n, s} dy

``x`` is ``(N, C, S)`` (``channels_last=False``) or ``(N, S, C)`` (``channels_last=True``, e.g.
channels-last images or ``(N, L, C)`` tokens). Without a weight the kernels use ``w = 1`` and still
return the full ``(C,)`` ``dw``/``db``, as the C++ CPU kernel does.

GPU design (memory-bound; the statistics need a full pass before any output can be written):

- forward: (1) a split reduction, :func:`channel_partials`: each program sums a chunk of about
  32K values of a block of channels of one sample into per-channel partials ``(pivot, sum(x -
  pivot), sum((x - pivot)^2))``, the pivot being the mean of the chunk's first tile (close to the
  chunk mean, so a large mean, e.g. ``1000 + randn``, does not cancel in fp32); (2) a finalize on
  the small ``(3, programs, C)`` buffer in fp64 torch ops, combining the chunks with Chan's
  parallel formula (``M2 = sum(M2_p + n_p (mean_p - mean)^2)``); (3) the elementwise
  :func:`channel_apply`, ``y = B_c (x - M_c) + C_c``, where ``M`` is the fp32 head of the mean and
  its tail is folded into ``C`` (``x - M`` is exact near the mean). Traffic: 2 reads of ``x`` and
  1 write of ``y`` per element.
- backward: the same split reduction also summing ``dy`` and ``dy (x - pivot)`` per (sample,
  channel), a finalize giving the group statistics, ``dw``, ``db`` (per-chunk partials reduced
  by torch sums, no atomics) and per-(sample, channel) coefficients, then the elementwise
  ``dx = A_c dy + B_c (x - M_c) + C_c``. Traffic: 2 reads of ``x`` and of ``dy``, 1 write of ``dx``.

Tiles are ``[BLOCK_S, BLOCK_C]`` (positions x channels), contiguous along positions for the
channels-first layout and along channels for channels-last: about 2K values per reduction tile
(4 warps, 4 accumulators) and 4K per apply tile (8 warps), one flat launch grid (no 65535 limit).
Vector (128-bit) loads need the contiguous extent (``S`` channels-first, ``C`` channels-last) to
be a multiple of 16 (Triton's divisibility specialisation); other sizes still coalesce. The
finalize is about 20 small torch launches, which dominate only for small tensors. BatchNorm
(:mod:`normlab.kernels.gpu.batchnorm`) reuses the two kernels with statistics per channel over
all samples.
"""

from __future__ import annotations

from typing import Any

import torch
import triton as _triton
import triton.language as _tl
from torch import Tensor

from normlab.kernels.gpu._common import acc_dtype, jit

# triton is untyped: reach it through Any.
triton: Any = _triton
tl: Any = _tl

# Values a reduction tile holds (fp32: 8 KiB per tensor per tile), and values one reduction
# program sums in all: enough work to amortise its partial writes, few enough programs to finish
# in a couple of waves on a large GPU. Read at call time, so tests can shrink them.
REDUCE_TILE = 2048
REDUCE_TARGET = 32768
# Values an apply tile holds (one tile per program).
APPLY_TILE = 4096
# Largest extent of the contiguous axis of a tile (longer rows take several tiles).
MAX_CONTIGUOUS = 1024

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@jit
def _partials_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    dy_ptr,
    part_ptr,
    n_dim,
    s_dim,
    c_dim,
    sample,
    n_chunk,
    s_chunk,
    num_cb,
    num_sc,
    plane,
    cl: tl.constexpr,
    has_dy: tl.constexpr,
    block_s: tl.constexpr,
    block_c: tl.constexpr,
):
    # Partial rows p = (sample chunk, position chunk); per channel: pivot, sum(d), sum(d^2) and,
    # with dy, sum(dy), sum(dy d), where d = x - pivot.
    acc_ty = part_ptr.dtype.element_ty
    pid = tl.program_id(0)
    pid_c = pid % num_cb
    rest = pid // num_cb
    pid_s = rest % num_sc
    pid_n = rest // num_sc
    c0 = pid_c * block_c
    s0 = pid_s * s_chunk
    n0 = pid_n * n_chunk
    s_end = tl.minimum(s_dim, s0 + s_chunk)
    n_end = tl.minimum(n_dim, n0 + n_chunk)
    si = tl.arange(0, block_s)
    ci = tl.arange(0, block_c)
    if cl:
        row_stride = c_dim
        ch_stride = 1
    else:
        row_stride = 1
        ch_stride = s_dim
    offs = si[:, None] * row_stride + ci[None, :] * ch_stride
    cmask = (c0 + ci < c_dim)[None, :]
    # int64 bases plus small int32 tile offsets: offsets into large tensors exceed int32.
    c_off = c0.to(tl.int64) * ch_stride
    n0_64 = n0.to(tl.int64)
    s0_64 = s0.to(tl.int64)

    # The pivot: each channel's mean over the chunk's first tile, near the chunk mean, so that
    # d stays of the order of the spread and sum(d^2) does not cancel against sum(d)^2.
    m0 = (s0 + si < s_end)[:, None] & cmask
    first = n0_64 * sample + s0_64 * row_stride + c_off
    v0 = tl.load(x_ptr + first + offs, mask=m0, other=0.0).to(acc_ty)
    pivot = tl.sum(v0, axis=0) / tl.minimum(s_end - s0, block_s).to(acc_ty)

    a1 = tl.zeros([block_s, block_c], dtype=acc_ty)
    a2 = tl.zeros([block_s, block_c], dtype=acc_ty)
    g1 = tl.zeros([block_s, block_c], dtype=acc_ty)
    g2 = tl.zeros([block_s, block_c], dtype=acc_ty)
    for i in range(0, n_end - n0):
        for j in range(0, s_end - s0, block_s):
            m = (s0 + j + si < s_end)[:, None] & cmask
            base = (n0_64 + i) * sample + (s0_64 + j) * row_stride + c_off
            v = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(acc_ty)
            d = tl.where(m, v - pivot[None, :], 0.0)
            a1 += d
            a2 += d * d
            if has_dy:
                g = tl.load(dy_ptr + base + offs, mask=m, other=0.0).to(acc_ty)
                g1 += g
                g2 += g * d

    out = part_ptr + (pid_n * num_sc + pid_s).to(tl.int64) * c_dim + c0 + ci
    cm = c0 + ci < c_dim
    tl.store(out, pivot, mask=cm)
    tl.store(out + plane, tl.sum(a1, axis=0), mask=cm)
    tl.store(out + 2 * plane, tl.sum(a2, axis=0), mask=cm)
    if has_dy:
        tl.store(out + 3 * plane, tl.sum(g1, axis=0), mask=cm)
        tl.store(out + 4 * plane, tl.sum(g2, axis=0), mask=cm)


@jit
def _apply_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    dy_ptr,
    out_ptr,
    coef_ptr,
    s_dim,
    c_dim,
    sample,
    plane,
    coef_n_stride,
    num_cb,
    num_sb,
    cl: tl.constexpr,
    has_dy: tl.constexpr,
    block_s: tl.constexpr,
    block_c: tl.constexpr,
):
    # out = B_c (x - M_c) + C_c [+ A_c dy]; coefficients (4, coef_rows, C) = (M, A, B, C) in the
    # accumulation dtype, row n (coef_n_stride = C) or shared by all samples (0).
    acc_ty = coef_ptr.dtype.element_ty
    pid = tl.program_id(0)
    pid_c = pid % num_cb
    rest = pid // num_cb
    pid_s = rest % num_sb
    n = rest // num_sb
    c0 = pid_c * block_c
    s0 = pid_s * block_s
    si = tl.arange(0, block_s)
    ci = tl.arange(0, block_c)
    if cl:
        row_stride = c_dim
        ch_stride = 1
    else:
        row_stride = 1
        ch_stride = s_dim
    offs = si[:, None] * row_stride + ci[None, :] * ch_stride
    cm = c0 + ci < c_dim
    m = (s0 + si < s_dim)[:, None] & cm[None, :]
    base = n.to(tl.int64) * sample + s0.to(tl.int64) * row_stride + c0.to(tl.int64) * ch_stride

    cp = coef_ptr + n.to(tl.int64) * coef_n_stride + c0 + ci
    mc = tl.load(cp, mask=cm, other=0.0)
    bc = tl.load(cp + 2 * plane, mask=cm, other=0.0)
    cc = tl.load(cp + 3 * plane, mask=cm, other=0.0)
    v = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(acc_ty)
    r = (v - mc[None, :]) * bc[None, :] + cc[None, :]
    if has_dy:
        ac = tl.load(cp + plane, mask=cm, other=0.0)
        g = tl.load(dy_ptr + base + offs, mask=m, other=0.0).to(acc_ty)
        r += g * ac[None, :]
    tl.store(out_ptr + base + offs, r.to(out_ptr.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------------------------
# Launch helpers, shared with batchnorm


def _pow2(n: int) -> int:
    return int(triton.next_power_of_2(max(int(n), 1)))


def _tile(s: int, c: int, tile: int, channels_last: bool) -> tuple[int, int]:
    """``(BLOCK_S, BLOCK_C)`` of about ``tile`` values, the contiguous axis filled first (at most
    MAX_CONTIGUOUS), each at least 2 (a one-wide arange is avoided) and at most the padded extent."""
    if channels_last:
        bc = max(2, min(_pow2(c), MAX_CONTIGUOUS, tile))
        bs = max(2, min(_pow2(s), tile // bc))
    else:
        bs = max(2, min(_pow2(s), MAX_CONTIGUOUS, tile))
        bc = max(2, min(_pow2(c), tile // bs))
    return bs, bc


def _warps(block: int) -> int:
    return max(1, min(8, block // 512))


def channel_partials(
    x: Tensor, dy: Tensor | None, n: int, s: int, c: int, channels_last: bool, per_sample: bool
) -> tuple[Tensor, Tensor, int, int]:
    """Split reduction of contiguous ``x`` (and ``dy``) viewed as ``(n, c, s)`` or, with
    ``channels_last``, ``(n, s, c)``: per chunk and channel ``(pivot, sum(x - pivot),
    sum((x - pivot)^2)[, sum(dy), sum(dy (x - pivot))])``.

    Returns ``(part, count, n_chunks, s_chunks)``: ``part`` is ``(3 or 5, n_chunks, s_chunks, c)``
    in the accumulation dtype, ``count`` the ``(n_chunks, s_chunks)`` values per chunk and channel
    (fp64). With ``per_sample`` each chunk stays within one sample (``n_chunks == n``).
    """
    bs, bc = _tile(s, c, REDUCE_TILE, channels_last)
    iters = max(1, REDUCE_TARGET // (bs * bc))
    it_s = min(triton.cdiv(s, bs), iters)
    s_chunk = it_s * bs
    num_sc = triton.cdiv(s, s_chunk)
    n_chunk = 1 if per_sample else max(1, iters // it_s)
    num_nc = triton.cdiv(n, n_chunk)
    num_cb = triton.cdiv(c, bc)
    q = 3 if dy is None else 5
    part = torch.empty((q, num_nc, num_sc, c), dtype=acc_dtype(x.dtype), device=x.device)
    _partials_kernel[(num_cb * num_sc * num_nc,)](
        x,
        x if dy is None else dy,
        part,
        n,
        s,
        c,
        s * c,
        n_chunk,
        s_chunk,
        num_cb,
        num_sc,
        num_nc * num_sc * c,
        cl=channels_last,
        has_dy=dy is not None,
        block_s=bs,
        block_c=bc,
        num_warps=_warps(bs * bc),
    )
    f64 = torch.float64
    n_len = (n - torch.arange(num_nc, device=x.device, dtype=f64) * n_chunk).clamp(max=n_chunk)
    s_len = (s - torch.arange(num_sc, device=x.device, dtype=f64) * s_chunk).clamp(max=s_chunk)
    return part, n_len[:, None] * s_len[None, :], num_nc, num_sc


def chunk_moments(part: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """Per chunk and channel, fp64 ``(mean, M2)`` from :func:`channel_partials` (``count``
    broadcast against ``part[0]``): ``mean = pivot + S1 / n``, ``M2 = S2 - S1^2 / n``."""
    pivot, s1, s2 = part[0].double(), part[1].double(), part[2].double()
    return pivot + s1 / count, s2 - s1 * s1 / count


def channel_apply(
    x: Tensor,
    dy: Tensor | None,
    coef: Tensor,
    n: int,
    s: int,
    c: int,
    channels_last: bool,
) -> Tensor:
    """``B (x - M) + C [+ A dy]`` elementwise over contiguous ``x`` viewed as ``(n, c, s)`` or
    ``(n, s, c)``; ``coef`` is ``(4, rows, c)`` = ``(M, A, B, C)`` in the accumulation dtype, with
    ``rows == n`` (per sample and channel) or ``1`` (per channel)."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    bs, bc = _tile(s, c, APPLY_TILE, channels_last)
    num_cb = triton.cdiv(c, bc)
    num_sb = triton.cdiv(s, bs)
    rows = int(coef.shape[1])
    _apply_kernel[(num_cb * num_sb * n,)](
        x,
        x if dy is None else dy,
        out,
        coef.contiguous(),
        s,
        c,
        s * c,
        rows * c,
        c if rows > 1 else 0,
        num_cb,
        num_sb,
        cl=channels_last,
        has_dy=dy is not None,
        block_s=bs,
        block_c=bc,
        num_warps=_warps(bs * bc),
    )
    return out


def param64(p: Tensor | None, c: int, fill: float, like: Tensor) -> Tensor:
    """A per-channel parameter as an fp64 ``(c,)`` vector on ``like``'s device (``fill`` where
    absent: ``w = 1``, ``b = 0`` leave the values unchanged)."""
    if p is None:
        return torch.full((c,), fill, dtype=torch.float64, device=like.device)
    if p.numel() != c:
        raise RuntimeError(f"normlab kernels: parameter has {p.numel()} elements, expected {c}")
    return p.reshape(-1).to(device=like.device, dtype=torch.float64)


def check_input(x: Tensor, op: str) -> None:
    if x.dtype not in _DTYPES:
        raise RuntimeError(f"{op}: unsupported dtype {x.dtype}")


# ------------------------------------------------------------------------------------------------
# The ops


def _dims(x: Tensor, num_groups: int, channels_last: bool, op: str) -> tuple[int, int, int]:
    check_input(x, op)
    if x.dim() != 3:
        raise RuntimeError(f"{op}: expected a 3-D (N, C, S) or (N, S, C) view, got {x.dim()} dims")
    n = int(x.shape[0])
    c = int(x.shape[2] if channels_last else x.shape[1])
    s = int(x.shape[1] if channels_last else x.shape[2])
    if num_groups <= 0 or c % num_groups:
        raise RuntimeError(f"{op}: {c} channels are not divisible into {num_groups} groups")
    return n, c, s


def _group_stats(
    part: Tensor, count: Tensor, n: int, c: int, s: int, num_groups: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-chunk ``(n, s_chunks, c)`` partials to per-(sample, group) fp64 ``(mean, rstd)``, and
    the chunk means ``(n, s_chunks, G, C/G)`` (Chan's parallel combination of chunks and channels)."""
    g, cg = num_groups, c // num_groups
    mean_p, m2_p = chunk_moments(part, count[:, :, None])
    cnt = count[:, :, None, None]
    mean_p = mean_p.view(n, -1, g, cg)
    m2_p = m2_p.view(n, -1, g, cg)
    total = float(cg * s)
    mean = (cnt * mean_p).sum((1, 3)) / total
    m2 = (m2_p + cnt * (mean_p - mean[:, None, :, None]) ** 2).sum((1, 3))
    rstd = torch.rsqrt((m2 / total).clamp(min=0.0) + eps)
    return mean, rstd, mean_p


def _layout(x: Tensor, channels_last: bool, s: int) -> bool:
    # (N, C, 1) is the same memory as (N, 1, C): the channels-last tiles read it contiguously.
    return channels_last or s == 1


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    channels_last: bool,
) -> Tensor:
    """GroupNorm forward (arXiv:1803.08494): ``y = (x - mean_g) / sqrt(var_g + eps) * w_c + b_c``
    with the statistics of each (sample, group) over its ``C / G`` channels and ``S`` positions.

    ``x`` is ``(N, C, S)``, or ``(N, S, C)`` with ``channels_last``; returns ``y`` contiguous, in
    ``x``'s shape and dtype.
    """
    n, c, s = _dims(x, num_groups, channels_last, "normlab::group_norm")
    x = x.contiguous()
    if x.numel() == 0:
        return torch.empty_like(x)
    cl = _layout(x, channels_last, s)
    part, count, _, _ = channel_partials(x, None, n, s, c, cl, per_sample=True)
    mean, rstd, _ = _group_stats(part, count, n, c, s, num_groups, eps)
    g, cg = num_groups, c // num_groups
    acc = acc_dtype(x.dtype)
    head = mean.to(acc)
    tail = mean - head.double()
    w = param64(weight, c, 1.0, x).view(1, g, cg)
    b = param64(bias, c, 0.0, x).view(1, g, cg)
    scale = rstd[:, :, None] * w
    shift = b - tail[:, :, None] * scale
    coef = torch.stack(
        (head.double()[:, :, None].expand(n, g, cg), torch.zeros_like(scale), scale, shift)
    ).to(acc)
    return channel_apply(x, None, coef.view(4, n, c), n, s, c, cl)


def group_norm_backward(
    grad: Tensor,
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    eps: float,
    channels_last: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """GroupNorm backward (arXiv:1803.08494): ``(dx, dw, db)`` with
    ``dx = rstd (w_c dy - mean_g(w dy) - xhat mean_g(w dy xhat))``, ``dw_c = sum dy xhat`` and
    ``db_c = sum dy`` over samples and positions, ``dw``/``db`` of shape ``(C,)`` in the
    accumulation dtype (returned, with ``w = 1``, also when there is no weight).
    """
    n, c, s = _dims(x, num_groups, channels_last, "normlab::group_norm_backward")
    if grad.shape != x.shape:
        raise RuntimeError("normlab: grad and input shapes differ")
    x = x.contiguous()
    dy = grad.to(x.dtype).contiguous()
    acc = acc_dtype(x.dtype)
    if x.numel() == 0:
        zeros = torch.zeros((c,), dtype=acc, device=x.device)
        return torch.empty_like(x), zeros, zeros.clone()
    cl = _layout(x, channels_last, s)
    part, count, _, _ = channel_partials(x, dy, n, s, c, cl, per_sample=True)
    mean, rstd, _ = _group_stats(part, count, n, c, s, num_groups, eps)
    g, cg = num_groups, c // num_groups
    pivot = part[0].double().view(n, -1, g, cg)
    g1 = part[3].double().view(n, -1, g, cg)
    g2 = part[4].double().view(n, -1, g, cg)
    # sum dy (x - mean) = sum dy (x - pivot) + (pivot - mean) sum dy, per chunk
    sdy = g1.sum(1)  # (n, g, cg)
    sdyx = (g2 + (pivot - mean[:, None, :, None]) * g1).sum(1)
    dwd = sdyx * rstd[:, :, None]  # sum dy xhat per (sample, channel)
    w = param64(weight, c, 1.0, x).view(1, g, cg)
    total = float(cg * s)
    m1 = (w * sdy).sum(2) / total  # mean_g(w dy)
    m2 = (w * dwd).sum(2) / total  # mean_g(w dy xhat)
    head = mean.to(acc)
    tail = mean - head.double()
    a = rstd[:, :, None] * w
    b = (-rstd * rstd * m2)[:, :, None].expand(n, g, cg)
    c0 = (-rstd * m1)[:, :, None] - b * tail[:, :, None]
    coef = torch.stack((head.double()[:, :, None].expand(n, g, cg), a.expand(n, g, cg), b, c0)).to(acc)
    dx = channel_apply(x, dy, coef.view(4, n, c), n, s, c, cl)
    return dx, dwd.sum(0).reshape(c).to(acc), sdy.sum(0).reshape(c).to(acc)


__all__ = [
    "channel_apply",
    "channel_partials",
    "chunk_moments",
    "group_norm",
    "group_norm_backward",
    "param64",
]
