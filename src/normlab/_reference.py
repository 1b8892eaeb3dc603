"""The plain-torch definition of every fused norm: what the kernels compute and are tested against.

A leaf of the package (it imports torch only): :mod:`normlab.functional` falls back to these
functions when no fused kernel applies, and :mod:`normlab.kernels` differentiates them for
double backward. Dtype policy, the same for every function here: reductions and transcendental
functions run in fp32 when the input is fp16 or bf16 (fp64 stays fp64), and the result has the
input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "batch_norm_train_torch",
    "channel_view",
    "compute_dtype",
    "derf_torch",
    "dyt_torch",
    "layer_norm_torch",
    "rms_norm_torch",
]


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
