"""BatchNorm's training step (Ioffe & Szegedy 2015, arXiv:1502.03167) as Triton kernels:
``normlab::batch_norm_train`` and ``normlab::batch_norm_train_backward`` on CUDA tensors (or on CPU
through Triton's interpreter).

For contiguous ``x`` of shape ``(N, C, S)``, per channel ``c`` over its ``M = N * S`` values::

    mean_c = sum(x) / M,   var_c = sum((x - mean_c)^2) / M   (biased),   rstd = 1 / sqrt(var + eps)
    y = w_c (x - mean_c) rstd + b_c
    dx = w_c rstd (dy - mean(dy) - xhat mean(dy xhat)),   dw_c = sum dy xhat,   db_c = sum dy

The forward returns ``(y, mean, var)`` with the statistics in the accumulation dtype (fp32, fp64
for fp64 input), ``mean`` being the accumulation-dtype rounding of the exact mean. The backward
takes those saved statistics: as in the C++ kernel, it uses ``var`` as given and re-derives the
mean's rounding error from ``x`` (``x - mean_saved`` is summed anyway), so ``xhat`` is exact to
the accumulation dtype even when the mean is large. Without a weight, ``w = 1`` and the full
``(C,)`` ``dw``/``db`` are still returned.

GPU design (memory-bound), the kernels of :mod:`normlab.kernels.gpu.groupnorm` with statistics per
channel over all samples:

- forward: a split reduction, each program summing about 32K values of a block of channels
  (several samples' planes per program when the planes are small) into per-channel
  ``(pivot, sum(x - pivot), sum((x - pivot)^2))``, the pivot being the mean of the program's first
  tile (a large mean does not cancel); a finalize in fp64 torch ops on the small ``(3, programs,
  C)`` buffer, combining chunks with Chan's parallel formula; the elementwise
  ``y = B_c (x - M_c) + C_c`` with ``M`` the mean's fp32 head and its tail folded into ``C``.
  Traffic: 2 reads of ``x``, 1 write of ``y``.
- backward: the same split reduction with ``sum(dy)`` and ``sum(dy (x - pivot))``, a finalize
  (``dw``, ``db`` as torch sums of per-program partials: no atomics, deterministic) and the
  elementwise ``dx = A_c dy + B_c (x - M_c) + C_c``. Traffic: 2 reads of ``x`` and ``dy``, 1 write.

``(N, C, 1)`` inputs (BatchNorm1d on ``(N, C)``) are read as the channels-last ``(1, N, C)``,
so the tiles stay contiguous along the channels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from normlab.kernels.gpu._common import acc_dtype
from normlab.kernels.gpu.groupnorm import (
    channel_apply,
    channel_partials,
    check_input,
    chunk_moments,
    param64,
)


def _dims(x: Tensor, op: str) -> tuple[int, int, int]:
    check_input(x, op)
    if x.dim() != 3:
        raise RuntimeError(f"{op}: expected a 3-D (N, C, S) view, got {x.dim()} dims")
    return int(x.shape[0]), int(x.shape[1]), int(x.shape[2])


def _view(n: int, s: int) -> tuple[int, int, bool]:
    """``(samples, positions, channels_last)`` the kernels see: ``(N, C, 1)`` as ``(1, N, C)``."""
    return (1, n, True) if s == 1 else (n, s, False)


def _channel_mean(part: Tensor, count: Tensor, total: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel fp64 ``(mean, M2)`` over all chunks (Chan's parallel formula), and the chunk
    means ``(chunks, C)``."""
    c = int(part.shape[-1])
    cnt = count.reshape(-1, 1)
    mean_p, m2_p = chunk_moments(part.reshape(part.shape[0], -1, c), cnt)
    mean = (cnt * mean_p).sum(0) / total
    m2 = (m2_p + cnt * (mean_p - mean) ** 2).sum(0)
    return mean, m2, mean_p


def batch_norm_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm training forward (arXiv:1502.03167) on ``(N, C, S)``: ``(y, mean, var)`` with
    ``y = (x - mean_c) / sqrt(var_c + eps) * w_c + b_c`` and the biased per-channel ``var``;
    statistics in the accumulation dtype (NaN when there are no values, as torch's)."""
    n, c, s = _dims(x, "normlab::batch_norm_train")
    x = x.contiguous()
    acc = acc_dtype(x.dtype)
    if x.numel() == 0:
        nan = torch.full((c,), math.nan, dtype=acc, device=x.device)
        return torch.empty_like(x), nan, nan.clone()
    vn, vs, cl = _view(n, s)
    part, count, _, _ = channel_partials(x, None, vn, vs, c, cl, per_sample=False)
    total = float(n * s)
    mean, m2, _ = _channel_mean(part, count, total)
    var = (m2 / total).clamp(min=0.0)
    rstd = torch.rsqrt(var + eps)
    head = mean.to(acc)
    tail = mean - head.double()
    scale = rstd * param64(weight, c, 1.0, x)
    shift = param64(bias, c, 0.0, x) - tail * scale
    coef = torch.stack((head.double(), torch.zeros_like(scale), scale, shift)).to(acc)
    y = channel_apply(x, None, coef.view(4, 1, c), vn, vs, c, cl)
    return y, head, var.to(acc)


def batch_norm_train_backward(
    grad: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm training backward (arXiv:1502.03167): ``(dx, dw, db)`` with
    ``dx = w_c rstd (dy - mean(dy) - xhat mean(dy xhat))``, ``dw_c = sum dy xhat``,
    ``db_c = sum dy``; ``rstd`` from the saved ``var``, ``dw``/``db`` in the accumulation dtype."""
    n, c, s = _dims(x, "normlab::batch_norm_train_backward")
    if grad.shape != x.shape:
        raise RuntimeError("normlab: grad and input shapes differ")
    if mean.numel() != c or var.numel() != c:
        raise RuntimeError(
            f"normlab::batch_norm_train_backward: statistics of {mean.numel()} and {var.numel()}"
            f" channels, expected {c}"
        )
    x = x.contiguous()
    dy = grad.to(x.dtype).contiguous()
    acc = acc_dtype(x.dtype)
    if x.numel() == 0:
        zeros = torch.zeros((c,), dtype=acc, device=x.device)
        return torch.empty_like(x), zeros, zeros.clone()
    vn, vs, cl = _view(n, s)
    part, count, _, _ = channel_partials(x, dy, vn, vs, c, cl, per_sample=False)
    total = float(n * s)
    exact, _, _ = _channel_mean(part, count, total)
    head = mean.reshape(-1).to(device=x.device, dtype=acc)
    # The saved mean is the accumulation-dtype rounding of the mean: its error, re-derived from x,
    # goes into the constant term, so that (x - head) stays exact near the mean.
    tail = exact - head.double()
    rstd = torch.rsqrt(var.reshape(-1).to(device=x.device, dtype=acc).double() + eps)
    pivot = part[0].double().reshape(-1, c)
    g1 = part[3].double().reshape(-1, c)
    g2 = part[4].double().reshape(-1, c)
    sdy = g1.sum(0)
    # sum dy (x - mean) = sum dy (x - pivot) + (pivot - mean) sum dy, per chunk
    sdyxhat = rstd * (g2 + (pivot - exact) * g1).sum(0)
    a = rstd * param64(weight, c, 1.0, x)
    b = -a * rstd * sdyxhat / total
    c0 = -a * sdy / total - b * tail
    coef = torch.stack((head.double(), a, b, c0)).to(acc)
    dx = channel_apply(x, dy, coef.view(4, 1, c), vn, vs, c, cl)
    return dx, sdyxhat.to(acc), sdy.to(acc)


__all__ = ["batch_norm_train", "batch_norm_train_backward"]
