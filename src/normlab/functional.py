"""Stateless normalization math used by the modules in :mod:`normlab.norms`.

Dtype policy, the same for every function here: reductions and transcendental functions run
in fp32 when the input is fp16 or bf16 (fp64 stays fp64), and the result has the input dtype.

Each norm function takes normlab's fused kernel (:mod:`normlab.kernels`) when it applies and the
kernels are on, else its plain-torch definition, kept as ``*_torch`` (the reference the kernels
are tested against, and their double-backward path).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from normlab.kernels import _dispatch as _kernels


def compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 for half-precision inputs, else the input dtype: statistics never run in fp16/bf16."""
    return torch.promote_types(x.dtype, torch.float32)


def channel_view(p: Tensor, x: Tensor, channel_dim: int) -> Tensor:
    """``p`` of shape ``(C,)`` viewed to broadcast against ``x`` along ``channel_dim`` (1 or -1)."""
    if channel_dim == -1:
        return p
    return p.view(-1, *([1] * (x.dim() - 2)))


def _compute(x: Tensor, *params: Tensor | None) -> tuple[Tensor, ...]:
    dtype = compute_dtype(x)
    return tuple(p if p is None else p.to(dtype) for p in (x, *params))  # type: ignore[misc]


def layer_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """LayerNorm (Ba et al. 2016, arXiv:1607.06450): ``(x - mean) / sqrt(var + eps) * w + b``.

    normlab's fused kernel when it applies, else :func:`layer_norm_torch`.
    """
    y = _kernels.layer_norm(x, tuple(normalized_shape), weight, bias, eps)
    if y is not None:
        return y
    return layer_norm_torch(x, normalized_shape, weight, bias, eps)


def layer_norm_torch(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """LayerNorm in plain torch: torch's fused kernel, except when the parameters are wider than the
    input (bf16/fp16 activations through fp32 parameters): torch's mixed-dtype kernel then returns
    weight and bias grads of bf16 quality (1e-2 relative), so the input is upcast to the parameters'
    dtype.
    """
    if weight is not None and weight.element_size() > x.element_size():
        return F.layer_norm(x.to(weight.dtype), normalized_shape, weight, bias, eps).to(x.dtype)
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


def rms_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float | None = 1e-6,
    *,
    eps_inside: bool = True,
    p: float | None = None,
) -> Tensor:
    """RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467) over the trailing ``normalized_shape``.

    ``eps_inside=True`` (LLaMA, ``torch.nn.RMSNorm``): ``y = x * rsqrt(mean(x²) + eps) * w + b``.
    ``eps_inside=False`` (official ``bzhangGo/rmsnorm``): ``y = x / (sqrt(mean(x²)) + eps) * w + b``.
    ``p`` in (0, 1) gives partial pRMSNorm: the RMS is estimated from the first
    ``int(d * p)`` features of the flattened normalized dimensions only.
    ``eps=None`` uses ``torch.finfo(x.dtype).eps``, as ``torch.nn.RMSNorm`` does.
    normlab's fused kernel when it applies (not pRMSNorm), else :func:`rms_norm_torch`.
    """
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    if p is None:
        y = _kernels.rms_norm(x, tuple(normalized_shape), weight, bias, eps, eps_inside)
        if y is not None:
            return y
    return rms_norm_torch(x, normalized_shape, weight, bias, eps, eps_inside=eps_inside, p=p)


def rms_norm_torch(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float | None = 1e-6,
    *,
    eps_inside: bool = True,
    p: float | None = None,
) -> Tensor:
    """RMSNorm in plain torch; the arguments of :func:`rms_norm`."""
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    xc, w, b = _compute(x, weight, bias)
    k = len(normalized_shape)
    dims = tuple(range(-k, 0))
    sub, count = xc, math.prod(normalized_shape)
    if p is not None:  # pRMSNorm: the RMS of the first int(d * p) features
        count = max(int(count * p), 1)
        sub = xc.flatten(-k)[..., :count].reshape(*xc.shape[: xc.dim() - k], count, *([1] * (k - 1)))
    if eps_inside:
        # x / sqrt(.) rather than x * rsqrt(.): rsqrt's backward forms (ms + eps)^-1.5, which
        # underflows fp32 once mean(x²) > ~1e29 and drops the projection term of dx.
        y = xc / torch.sqrt(sub.pow(2).mean(dim=dims, keepdim=True) + eps)
    else:
        # vector_norm, as the official code: its gradient at an all-zero row is 0, where
        # sqrt(mean(x²))'s is inf * 0 = NaN.
        rms = torch.linalg.vector_norm(sub, dim=dims, keepdim=True) * count**-0.5
        y = xc / (rms + eps)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y.to(x.dtype)


def _pointwise_affine(
    u: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, channel_dim: int
) -> Tensor:
    if weight is not None:
        u = u * channel_view(weight, x, channel_dim)
    if bias is not None:
        u = u + channel_view(bias, x, channel_dim)
    return u.to(x.dtype)


def dyt(
    x: Tensor,
    alpha: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    channel_dim: int = -1,
) -> Tensor:
    """Dynamic Tanh (Zhu et al. 2025, arXiv:2503.10622): ``y = weight * tanh(alpha * x) + bias``.

    ``alpha`` is a scalar (shape ``(1,)``); ``weight`` and ``bias`` are per feature along ``channel_dim``.
    normlab's fused kernel when it applies, else :func:`dyt_torch`.
    """
    y = _kernels.dyt(x, alpha, weight, bias, channel_dim)
    if y is not None:
        return y
    return dyt_torch(x, alpha, weight, bias, channel_dim=channel_dim)


def dyt_torch(
    x: Tensor,
    alpha: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    channel_dim: int = -1,
) -> Tensor:
    """DyT in plain torch, as the paper's code: ``weight * torch.tanh(alpha * x) + bias``."""
    xc, a, w, b = _compute(x, alpha, weight, bias)
    return _pointwise_affine(torch.tanh(a * xc), x, w, b, channel_dim)


def derf(
    x: Tensor,
    alpha: Tensor,
    shift: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    channel_dim: int = -1,
) -> Tensor:
    """Dynamic erf (Chen et al. 2025, arXiv:2512.10938): ``y = weight * erf(alpha * x + shift) + bias``.

    ``alpha`` and ``shift`` are scalars (shape ``(1,)``).
    normlab's fused kernel when it applies, else :func:`derf_torch`.
    """
    y = _kernels.derf(x, alpha, shift, weight, bias, channel_dim)
    if y is not None:
        return y
    return derf_torch(x, alpha, shift, weight, bias, channel_dim=channel_dim)


def derf_torch(
    x: Tensor,
    alpha: Tensor,
    shift: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    channel_dim: int = -1,
) -> Tensor:
    """Derf in plain torch, as the official code: ``weight * torch.erf(alpha * x + shift) + bias``."""
    xc, a, s, w, b = _compute(x, alpha, shift, weight, bias)
    return _pointwise_affine(torch.erf(a * xc + s), x, w, b, channel_dim)


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """GroupNorm (Wu & He 2018, arXiv:1803.08494) of ``(N, C, *)`` input over groups of ``C / num_groups``
    channels and all positions: ``(x - mean_g) / sqrt(var_g + eps) * w_c + b_c``.

    normlab's fused kernel for contiguous and channels-last memory (token input ``(N, L, C)``
    goes in as ``x.transpose(1, 2)`` and comes back in the same layout), else ``F.group_norm``.
    """
    y = _kernels.group_norm(x, num_groups, weight, bias, eps)
    if y is not None:
        return y
    return F.group_norm(x, num_groups, weight, bias, eps)


def batch_norm_train(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm's training step (Ioffe & Szegedy 2015, arXiv:1502.03167) on ``(N, C, *)`` input:
    ``y = (x - mean_c) / sqrt(var_c + eps) * w_c + b_c`` with the batch mean and **biased**
    variance of each channel over ``N`` and the positions; returns ``(y, mean, var)``, the
    statistics (no gradient) in fp32 (fp64 for fp64 input), for the caller's running update.

    normlab's fused kernel for contiguous input with at least 48 positions per channel plane,
    else :func:`batch_norm_train_torch`.
    """
    fused = _kernels.batch_norm_train(x, weight, bias, eps)
    if fused is not None:
        return fused
    return batch_norm_train_torch(x, weight, bias, eps)


def batch_norm_train_torch(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`batch_norm_train` in plain torch: ``F.batch_norm`` and a ``torch.var_mean`` pass."""
    dims = [0, *range(2, x.dim())]
    with torch.no_grad():
        var, mean = torch.var_mean(x.detach().to(compute_dtype(x)), dim=dims, correction=0)
    return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps), mean, var


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """Residual add and LayerNorm in one pass: ``h = x + residual``, returns ``(layer_norm(h), h)``.

    The pre-norm block's ``h = h + f(...); y = LN(h)`` step reads ``x`` and ``residual`` once and
    writes ``h`` and ``y`` once (unfused: 5 tensor passes forward, 6 backward; fused: 4 and 4).
    """
    fused = _kernels.add_layer_norm(x, residual, tuple(normalized_shape), weight, bias, eps)
    if fused is not None:
        return fused
    h = x + residual
    return layer_norm(h, normalized_shape, weight, bias, eps), h


def add_rms_norm(
    x: Tensor,
    residual: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float | None = 1e-6,
    *,
    eps_inside: bool = True,
) -> tuple[Tensor, Tensor]:
    """Residual add and RMSNorm in one pass: ``h = x + residual``, returns ``(rms_norm(h), h)``."""
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    fused = _kernels.add_rms_norm(x, residual, tuple(normalized_shape), weight, bias, eps, eps_inside)
    if fused is not None:
        return fused
    h = x + residual
    return rms_norm(h, normalized_shape, weight, bias, eps, eps_inside=eps_inside), h
