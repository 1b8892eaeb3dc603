"""Stateless normalization math used by the modules in :mod:`normlab.norms`.

Dtype policy, the same for every function here: reductions and transcendental functions run
in fp32 when the input is fp16 or bf16 (fp64 stays fp64), and the result has the input dtype.

Each norm function takes normlab's fused kernel (:mod:`normlab.kernels`) when it applies and the
kernels are on, else its plain-torch definition ``*_torch`` from :mod:`normlab._reference` (the
reference the kernels are tested against, and their double-backward path), re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from normlab._reference import (
    batch_norm_train_torch,
    channel_view,
    compute_dtype,
    derf_torch,
    dyt_torch,
    layer_norm_torch,
    rms_norm_torch,
)
from normlab.kernels import _dispatch as _kernels
from normlab.kernels import _dtensor

__all__ = [
    "add_layer_norm",
    "add_rms_norm",
    "batch_norm_train",
    "batch_norm_train_torch",
    "channel_view",
    "compute_dtype",
    "derf",
    "derf_torch",
    "dyt",
    "dyt_torch",
    "group_norm",
    "layer_norm",
    "layer_norm_torch",
    "rms_norm",
    "rms_norm_torch",
]


def layer_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """LayerNorm (Ba et al. 2016, arXiv:1607.06450): ``(x - mean) / sqrt(var + eps) * w + b``.

    normlab's fused kernel when it applies, else :func:`layer_norm_torch`. A DTensor input
    sharded on a normalized dimension is refused (no rank can compute its rows alone).
    """
    _dtensor.refuse_sharded_rows(x, len(normalized_shape), "layer_norm")
    y = _kernels.layer_norm(x, tuple(normalized_shape), weight, bias, eps)
    if y is not None:
        return y
    return layer_norm_torch(x, normalized_shape, weight, bias, eps)


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
    _dtensor.refuse_sharded_rows(x, len(normalized_shape), "rms_norm")
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    if p is None:
        y = _kernels.rms_norm(x, tuple(normalized_shape), weight, bias, eps, eps_inside)
        if y is not None:
            return y
    return rms_norm_torch(x, normalized_shape, weight, bias, eps, eps_inside=eps_inside, p=p)


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
    _dtensor.refuse_sharded_rows(x, len(normalized_shape), "add_layer_norm")
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
    _dtensor.refuse_sharded_rows(x, len(normalized_shape), "add_rms_norm")
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    fused = _kernels.add_rms_norm(x, residual, tuple(normalized_shape), weight, bias, eps, eps_inside)
    if fused is not None:
        return fused
    h = x + residual
    return rms_norm(h, normalized_shape, weight, bias, eps, eps_inside=eps_inside), h
