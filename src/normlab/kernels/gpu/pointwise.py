"""Triton kernels for DyT and Derf: ``normlab::dyt``, ``dyt_backward``, ``derf``, ``derf_backward``.

DyT (Zhu et al. 2025, arXiv:2503.10622): ``y = weight * tanh(alpha * x) + bias``.
Derf (Chen et al. 2025, arXiv:2512.10938): ``y = weight * erf(alpha * x + shift) + bias``.
``alpha`` and ``shift`` are one-element tensors; ``weight`` and ``bias`` have one value per channel
(``None``: 1 and 0). As in the C++ kernels (``csrc/pointwise.cpp``) the contiguous input is viewed
as ``(outer, C, inner)``: ``inner == 1`` is the channels-last layout ``(*, C)`` (``channel_dim=-1``,
or ``channel_dim=1`` on 2-D input), ``inner > 1`` is ``(N, C, *)`` (``channel_dim=1``). The
backward, with ``u = alpha * x (+ shift)``, ``f' = df/du`` and ``gd = dy * weight * f'``, is
``dx = gd * alpha``, ``dalpha = sum(gd * x)``, ``dshift = sum(gd)``, ``dweight[c] = sum(dy * f)``,
``dbias[c] = sum(dy)``; the parameter grads come in fp32 (fp64 for fp64 input), ``dweight`` and
``dbias`` of shape ``(C,)`` whether or not the parameters exist.

GPU design (both ops are memory-bound: a few flops per element against 4 to 6 bytes):

- One pass each way. Forward reads ``x`` and writes ``y`` (2 element-sizes per element);
  backward reads ``x`` and ``dy`` and writes ``dx`` (3 element-sizes), with ``dalpha``,
  ``dshift``, ``dweight``, ``dbias`` summed on the way. Nothing is transposed or copied for
  contiguous input. A ``dy`` of another dtype than ``x`` is first cast to ``x``'s by torch, as
  the C++ op does (autograd passes it in ``y``'s dtype, so this costs nothing in training; it is
  not done in registers because the interpreter truncates fp32 to bf16 instead of rounding it
  to nearest, which would make the CPU checks disagree with the GPU). ``alpha``/``shift`` are
  loaded by the kernel, not read on the host, so there is no device sync and the launch can be
  captured in a CUDA graph.
- 2-D tiles with no per-element index division: channels-last tiles are ``(rows, channels)``,
  channels-first tiles ``(channels, positions)`` of one sample, so the per-channel parameters are
  one vector (one scalar when a plane fills the tile) per tile, broadcast over the other axis.
  Forward: one tile per program on a 1-D grid (``FWD_TILE`` = 4096 elements, 8 warps).
- Backward: a fixed grid of about ``PROGRAMS_PER_SM`` programs per SM (axis 0: channel blocks,
  axis 1: splits) loops over the tiles of its channel block (``BWD_TILE`` = 2048 elements, 8
  warps), keeping per-channel partial sums in registers; each program writes one row of a small
  ``(splits, C)`` fp32 buffer for ``dweight``/``dbias`` and two scalars for ``dalpha``/``dshift``,
  which torch reduces with ``.sum(0)`` (in fp64, as the C++ op sums its thread partials). No atomics,
  so the grads are deterministic; the buffers are ``O(programs * C)``, negligible next to ``x``.
- tanh is ``sign(u) * (1 - t) / (1 + t)`` with ``t = exp(-2|u|)`` in fp32 (fp64 for fp64 input):
  ``t`` is in ``(0, 1]``, so large ``|u|`` gives exactly +-1 with no overflow, and the absolute
  error is below 1e-7 in fp32. ``libdevice.tanh`` would be as exact on the GPU, but Triton's CPU
  interpreter (3.9) leaves the libdevice stubs unpatched (they return ``None``), and the test-suite
  checks these kernels through the interpreter, so the exp form is used on both.
"""

# Triton's conventions: upper-case pointer and constexpr names; `if CONSTEXPR:` statements rather
# than ternaries, the form that every Triton version resolves at compile time.
# ruff: noqa: N803, N806, SIM108

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from normlab.kernels.gpu._common import acc_dtype, jit

# Elements per forward tile (one tile per program) and per backward tile (looped over).
FWD_TILE = 4096
BWD_TILE = 2048
# Backward programs per SM: enough warps in flight to cover DRAM latency, few enough partial rows.
PROGRAMS_PER_SM = 4
# CUDA's limit on grid axes 1 and 2.
_MAX_GRID_YZ = 65535
# Backward grid size without a GPU (the interpreter): small, so that programs loop over tiles.
_CPU_PROGRAMS = 4

# (a global read by a kernel must be a constexpr)
_TWO_OVER_SQRT_PI = tl.constexpr(1.1283791670955126)


@jit
def _tanh(u):  # type: ignore[no-untyped-def]
    t = tl.exp(-2.0 * tl.abs(u))
    r = (1.0 - t) / (1.0 + t)
    return tl.where(u < 0, -r, r)


@jit
def _act(x, alpha, shift, IS_ERF: tl.constexpr):  # type: ignore[no-untyped-def]
    if IS_ERF:
        return tl.erf(alpha * x + shift)
    else:
        return _tanh(alpha * x)


@jit
def _act_grad(x, alpha, shift, IS_ERF: tl.constexpr):  # type: ignore[no-untyped-def]
    # f(u) and f'(u) for u = alpha * x (+ shift)
    if IS_ERF:
        u = alpha * x + shift
        return tl.erf(u), _TWO_OVER_SQRT_PI * tl.exp(-u * u)
    else:
        f = _tanh(alpha * x)
        return f, 1.0 - f * f


@jit
def _fwd_last_kernel(  # type: ignore[no-untyped-def]
    X,
    Y,
    A,
    S,
    W,
    B,
    R,
    C,
    n_cblk,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    IS_ERF: tl.constexpr,
):
    # (*, C): tile (BLOCK_R rows, BLOCK_C channels); channel blocks vary fastest over programs.
    ACC = A.dtype.element_ty
    pid = tl.program_id(0)
    cb = pid % n_cblk
    rb = pid // n_cblk
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    rows = rb.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs = rows[:, None] * C + cols[None, :]
    mask = (rows < R)[:, None] & cmask[None, :]
    alpha = tl.load(A).to(ACC)
    shift = tl.load(S).to(ACC)
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    y = _act(x, alpha, shift, IS_ERF)
    if HAS_W:
        y = y * tl.load(W + cols, mask=cmask, other=1.0).to(ACC)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@jit
def _fwd_first_kernel(  # type: ignore[no-untyped-def]
    X,
    Y,
    A,
    S,
    W,
    B,
    C,
    inner,
    n_cblk,
    n_iblk,
    BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    IS_ERF: tl.constexpr,
):
    # (N, C, inner): tile (BLOCK_C channels, BLOCK_I positions) of one sample, positions fastest
    # over programs so that neighbouring programs read neighbouring memory.
    ACC = A.dtype.element_ty
    pid = tl.program_id(0)
    ib = pid % n_iblk
    rest = pid // n_iblk
    cb = rest % n_cblk
    n = rest // n_cblk
    chans = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = chans < C
    pos = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    offs = ((n.to(tl.int64) * C + chans) * inner)[:, None] + pos[None, :]
    mask = cmask[:, None] & (pos < inner)[None, :]
    alpha = tl.load(A).to(ACC)
    shift = tl.load(S).to(ACC)
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    y = _act(x, alpha, shift, IS_ERF)
    if HAS_W:
        y = y * tl.load(W + chans, mask=cmask, other=1.0).to(ACC)[:, None]
    if HAS_B:
        y = y + tl.load(B + chans, mask=cmask, other=0.0).to(ACC)[:, None]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@jit
def _bwd_last_kernel(  # type: ignore[no-untyped-def]
    G,
    X,
    DX,
    A,
    S,
    W,
    PW,
    PB,
    PS,
    R,
    C,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_W: tl.constexpr,
    IS_ERF: tl.constexpr,
):
    # (*, C): program (channel block, split) loops over the row blocks split, split + splits, ...
    # Masked lanes load x = dy = 0 and so add nothing to any sum.
    ACC = PW.dtype.element_ty
    cb = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    alpha = tl.load(A).to(ACC)
    shift = tl.load(S).to(ACC)
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=1.0).to(ACC)[None, :]
    else:
        w = 1.0
    acc_a = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    acc_s = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    acc_w = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    acc_b = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    for r0 in range(split * BLOCK_R, R, splits * BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        offs = rows[:, None] * C + cols[None, :]
        mask = (rows < R)[:, None] & cmask[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(G + offs, mask=mask, other=0.0).to(ACC)
        f, fp = _act_grad(x, alpha, shift, IS_ERF)
        gd = g * w * fp
        acc_a += gd * x
        if IS_ERF:
            acc_s += gd
        acc_w += g * f
        acc_b += g
        tl.store(DX + offs, (gd * alpha).to(DX.dtype.element_ty), mask=mask)
    tl.store(PW + split * C + cols, tl.sum(acc_w, axis=0), mask=cmask)
    tl.store(PB + split * C + cols, tl.sum(acc_b, axis=0), mask=cmask)
    slot = (cb * splits + split) * 2
    tl.store(PS + slot, tl.sum(tl.sum(acc_a, axis=1), axis=0))
    tl.store(PS + slot + 1, tl.sum(tl.sum(acc_s, axis=1), axis=0))


@jit
def _bwd_first_kernel(  # type: ignore[no-untyped-def]
    G,
    X,
    DX,
    A,
    S,
    W,
    PW,
    PB,
    PS,
    C,
    inner,
    n_items,
    n_iblk,
    BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
    HAS_W: tl.constexpr,
    IS_ERF: tl.constexpr,
):
    # (N, C, inner): program (channel block, split) loops over the (sample, position block)
    # items split, split + splits, ... of its channels, so the per-channel sums stay in registers
    # however small ``inner`` is.
    ACC = PW.dtype.element_ty
    cb = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    chans = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = chans < C
    alpha = tl.load(A).to(ACC)
    shift = tl.load(S).to(ACC)
    if HAS_W:
        w = tl.load(W + chans, mask=cmask, other=1.0).to(ACC)[:, None]
    else:
        w = 1.0
    acc_a = tl.zeros((BLOCK_C, BLOCK_I), dtype=ACC)
    acc_s = tl.zeros((BLOCK_C, BLOCK_I), dtype=ACC)
    acc_w = tl.zeros((BLOCK_C, BLOCK_I), dtype=ACC)
    acc_b = tl.zeros((BLOCK_C, BLOCK_I), dtype=ACC)
    for item in range(split, n_items, splits):
        n = item // n_iblk
        pos = (item % n_iblk) * BLOCK_I + tl.arange(0, BLOCK_I)
        offs = ((n.to(tl.int64) * C + chans) * inner)[:, None] + pos[None, :]
        mask = cmask[:, None] & (pos < inner)[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(G + offs, mask=mask, other=0.0).to(ACC)
        f, fp = _act_grad(x, alpha, shift, IS_ERF)
        gd = g * w * fp
        acc_a += gd * x
        if IS_ERF:
            acc_s += gd
        acc_w += g * f
        acc_b += g
        tl.store(DX + offs, (gd * alpha).to(DX.dtype.element_ty), mask=mask)
    tl.store(PW + split * C + chans, tl.sum(acc_w, axis=1), mask=cmask)
    tl.store(PB + split * C + chans, tl.sum(acc_b, axis=1), mask=cmask)
    slot = (cb * splits + split) * 2
    tl.store(PS + slot, tl.sum(tl.sum(acc_a, axis=1), axis=0))
    tl.store(PS + slot + 1, tl.sum(tl.sum(acc_s, axis=1), axis=0))


def _geometry(x: Tensor, channel_dim: int) -> tuple[int, int, int]:
    """``(outer, C, inner)`` of ``x`` around ``channel_dim``, as the C++ kernels view it."""
    if x.dim() == 0:
        raise ValueError("normlab pointwise kernels: expected at least one dimension")
    d = channel_dim % x.dim() if -x.dim() <= channel_dim < x.dim() else None
    if d is None:
        raise IndexError(f"channel_dim {channel_dim} out of range for a {x.dim()}-D input")
    outer = 1
    for s in x.shape[:d]:
        outer *= int(s)
    inner = 1
    for s in x.shape[d + 1 :]:
        inner *= int(s)
    return outer, int(x.shape[d]), inner


def _check_input(x: Tensor, op: str) -> None:
    if x.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise TypeError(f"{op}: unsupported dtype {x.dtype}")


def _scalar(p: Tensor, x: Tensor) -> Tensor:
    """A one-element parameter as a 1-element acc-dtype vector on ``x``'s device (no host read)."""
    if p.numel() != 1:
        raise ValueError(f"normlab kernels: expected a one-element scalar parameter, got {p.numel()}")
    return p.reshape(1).to(device=x.device, dtype=acc_dtype(x.dtype))


def _channel_param(p: Tensor | None, channels: int, x: Tensor) -> Tensor:
    """A per-channel parameter as a contiguous vector on ``x``'s device (``x`` itself when absent,
    a pointer the kernel never reads)."""
    if p is None:
        return x
    if p.numel() != channels:
        raise ValueError(f"normlab kernels: parameter has {p.numel()} elements, expected {channels}")
    return p.reshape(-1).to(device=x.device).contiguous()


@functools.cache
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def _programs(x: Tensor) -> int:
    """How many backward programs to launch in all."""
    if x.device.type != "cuda":
        return _CPU_PROGRAMS
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _sm_count(index) * PROGRAMS_PER_SM


def _pow2(n: int, cap: int) -> int:
    return max(1, min(int(triton.next_power_of_2(max(int(n), 1))), cap))


def _warps(tile: int, per_warp: int) -> int:
    return max(1, min(8, tile // per_warp))


def _forward(
    x_: Tensor,
    alpha: Tensor,
    shift: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    channel_dim: int,
    op: str,
) -> Tensor:
    _check_input(x_, op)
    x = x_.contiguous()
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    outer, channels, inner = _geometry(x, channel_dim)
    a = _scalar(alpha, x)
    s = _scalar(shift, x) if shift is not None else a  # DyT: loaded by the kernel, never used
    w = _channel_param(weight, channels, x)
    b = _channel_param(bias, channels, x)
    flags = {"HAS_W": weight is not None, "HAS_B": bias is not None, "IS_ERF": shift is not None}
    if inner == 1:
        block_c = _pow2(channels, FWD_TILE)
        block_r = _pow2(outer, max(1, FWD_TILE // block_c))
        n_cblk = triton.cdiv(channels, block_c)
        grid = (triton.cdiv(outer, block_r) * n_cblk,)
        _fwd_last_kernel[grid](
            x,
            y,
            a,
            s,
            w,
            b,
            outer,
            channels,
            n_cblk,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            num_warps=_warps(block_r * block_c, 512),
            **flags,
        )
    else:
        block_i = _pow2(inner, FWD_TILE)
        block_c = _pow2(channels, max(1, FWD_TILE // block_i))
        n_cblk = triton.cdiv(channels, block_c)
        n_iblk = triton.cdiv(inner, block_i)
        grid = (outer * n_cblk * n_iblk,)
        _fwd_first_kernel[grid](
            x,
            y,
            a,
            s,
            w,
            b,
            channels,
            inner,
            n_cblk,
            n_iblk,
            BLOCK_C=block_c,
            BLOCK_I=block_i,
            num_warps=_warps(block_c * block_i, 512),
            **flags,
        )
    return y


def _backward(
    grad: Tensor,
    x_: Tensor,
    alpha: Tensor,
    shift: Tensor | None,
    weight: Tensor | None,
    channel_dim: int,
    op: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dalpha, dshift, dweight, dbias)``; ``dshift`` is zero for DyT."""
    _check_input(x_, op)
    if grad.shape != x_.shape:
        raise ValueError(f"{op}: grad and input shapes differ")
    x = x_.contiguous()
    g = grad.to(x.dtype).contiguous()
    outer, channels, inner = _geometry(x, channel_dim)
    acc = acc_dtype(x.dtype)
    dx = torch.empty_like(x)
    if x.numel() == 0:
        zeros_c = torch.zeros((channels,), dtype=acc, device=x.device)
        zero = torch.zeros((1,), dtype=acc, device=x.device)
        return dx, zero, zero.clone(), zeros_c, zeros_c.clone()
    a = _scalar(alpha, x)
    s = _scalar(shift, x) if shift is not None else a  # DyT: loaded by the kernel, never used
    w = _channel_param(weight, channels, x)
    flags = {"HAS_W": weight is not None, "IS_ERF": shift is not None}
    programs = _programs(x)
    if inner == 1:
        block_c = _pow2(channels, BWD_TILE)
        block_r = _pow2(outer, max(1, BWD_TILE // block_c))
        n_cblk = triton.cdiv(channels, block_c)
        work = triton.cdiv(outer, block_r)
    else:
        block_i = _pow2(inner, BWD_TILE)
        block_c = _pow2(channels, max(1, BWD_TILE // block_i))
        n_cblk = triton.cdiv(channels, block_c)
        n_iblk = triton.cdiv(inner, block_i)
        work = outer * n_iblk
    splits = max(1, min(work, programs // n_cblk, _MAX_GRID_YZ))
    # fp32 partials (fp64 for fp64): every slot is written, so torch.empty is enough
    pw = torch.empty((splits, channels), dtype=acc, device=x.device)
    pb = torch.empty((splits, channels), dtype=acc, device=x.device)
    ps = torch.empty((n_cblk * splits, 2), dtype=acc, device=x.device)
    grid = (n_cblk, splits)
    if inner == 1:
        _bwd_last_kernel[grid](
            g,
            x,
            dx,
            a,
            s,
            w,
            pw,
            pb,
            ps,
            outer,
            channels,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            num_warps=_warps(block_r * block_c, 256),
            **flags,
        )
    else:
        _bwd_first_kernel[grid](
            g,
            x,
            dx,
            a,
            s,
            w,
            pw,
            pb,
            ps,
            channels,
            inner,
            work,
            n_iblk,
            BLOCK_C=block_c,
            BLOCK_I=block_i,
            num_warps=_warps(block_c * block_i, 256),
            **flags,
        )

    # The C++ op sums its per-thread partials in double; so do we. Separate reductions rather
    # than views of one, since an op's outputs must not alias each other.
    def total(part: Tensor) -> Tensor:
        return part.sum(0, dtype=torch.float64).to(acc)

    return dx, total(ps[:, :1]), total(ps[:, 1:]), total(pw), total(pb)


def dyt(x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None, channel_dim: int) -> Tensor:
    """DyT (arXiv:2503.10622), ``y = weight * tanh(alpha * x) + bias``, in ``x``'s dtype and shape
    (contiguous); the channel is ``x``'s dimension ``channel_dim`` (``-1`` or ``1``)."""
    return _forward(x, alpha, None, weight, bias, channel_dim, "normlab::dyt")


def dyt_backward(
    grad: Tensor, x: Tensor, alpha: Tensor, weight: Tensor | None, channel_dim: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """DyT's backward: ``(dx, dalpha (1,), dweight (C,), dbias (C,))``, the last three in fp32
    (fp64 for fp64 input); with ``f = tanh(alpha * x)`` and ``gd = grad * weight * (1 - f^2)``:
    ``dx = gd * alpha``, ``dalpha = sum(gd * x)``, ``dweight = sum(grad * f)``, ``dbias = sum(grad)``."""
    dx, da, _, dw, db = _backward(grad, x, alpha, None, weight, channel_dim, "normlab::dyt_backward")
    return dx, da, dw, db


def derf(
    x: Tensor, alpha: Tensor, shift: Tensor, weight: Tensor | None, bias: Tensor | None, channel_dim: int
) -> Tensor:
    """Derf (arXiv:2512.10938), ``y = weight * erf(alpha * x + shift) + bias``, in ``x``'s dtype
    and shape (contiguous); the channel is ``x``'s dimension ``channel_dim`` (``-1`` or ``1``)."""
    return _forward(x, alpha, shift, weight, bias, channel_dim, "normlab::derf")


def derf_backward(
    grad: Tensor, x: Tensor, alpha: Tensor, shift: Tensor, weight: Tensor | None, channel_dim: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Derf's backward: ``(dx, dalpha (1,), dshift (1,), dweight (C,), dbias (C,))``, the last four
    in fp32 (fp64 for fp64 input); with ``u = alpha * x + shift``, ``f = erf(u)`` and
    ``gd = grad * weight * 2 / sqrt(pi) * exp(-u^2)``: ``dx = gd * alpha``, ``dalpha = sum(gd * x)``,
    ``dshift = sum(gd)``, ``dweight = sum(grad * f)``, ``dbias = sum(grad)``."""
    return _backward(grad, x, alpha, shift, weight, channel_dim, "normlab::derf_backward")


__all__ = ["derf", "derf_backward", "dyt", "dyt_backward"]
