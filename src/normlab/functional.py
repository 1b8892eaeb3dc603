"""Stateless normalization math used by the modules in :mod:`normlab.norms`.

Dtype policy, the same for every function here: reductions and transcendental functions run
in fp32 when the input is fp16 or bf16 (fp64 stays fp64), and the result has the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _compute(x: Tensor, *params: Tensor | None) -> tuple[Tensor, ...]:
    dtype = torch.promote_types(x.dtype, torch.float32)
    return tuple(p if p is None else p.to(dtype) for p in (x, *params))  # type: ignore[misc]


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
    """
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    xc, w, b = _compute(x, weight, bias)
    dims = tuple(range(-len(normalized_shape), 0))
    if p is None:
        ms = xc.pow(2).mean(dim=dims, keepdim=True)
    else:
        d = math.prod(normalized_shape)
        k = max(int(d * p), 1)
        flat = xc.flatten(-len(normalized_shape))[..., :k]
        ms = flat.pow(2).mean(dim=-1).view(*x.shape[: x.dim() - len(normalized_shape)], *[1] * len(dims))
    y = xc * torch.rsqrt(ms + eps) if eps_inside else xc / (ms.sqrt() + eps)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y.to(x.dtype)


def _pointwise_affine(
    u: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, channel_dim: int
) -> Tensor:
    if channel_dim != -1:
        shape = (-1, *([1] * (x.dim() - 2)))
        weight = None if weight is None else weight.view(shape)
        bias = None if bias is None else bias.view(shape)
    if weight is not None:
        u = u * weight
    if bias is not None:
        u = u + bias
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
    """
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
    """
    xc, a, s, w, b = _compute(x, alpha, shift, weight, bias)
    return _pointwise_affine(torch.erf(a * xc + s), x, w, b, channel_dim)
