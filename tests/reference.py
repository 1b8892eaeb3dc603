"""Independent float64 reference implementations of every registered norm, written from the spec.

Each function takes ``(x, module)``: ``x`` is a float64 tensor and ``module`` only supplies
parameters and options, read as attributes (``weight``, ``eps``, ``training``, ...); the
module's ``forward`` is never called. The math is plain torch ops on float64 (no
``torch.nn.functional`` norm kernel, nothing imported from normlab), transcribed from
``/work/shared/spec/methods.md`` sections 1.1-1.5, 2, 3 and 11, so a shared bug between a
layer and this file would have to be written twice.

Parameters are upcast to float64 here, so a reference built from a half-precision module
uses exactly that module's (rounded) parameters. Tests that need parameter gradients pass
a float64 copy of the module: its parameters are then leaves of the reference graph.

``input_dtype`` (keyword, default ``x.dtype``) is the dtype of the input the layer under test
received; only RMSNorm's ``eps=None`` (meaning ``torch.finfo(input dtype).eps``) depends on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

F64 = torch.float64


class Reference(Protocol):
    def __call__(self, x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor: ...


def _f64(t: Tensor | None) -> Tensor | None:
    """``t`` as float64 (a differentiable cast; a float64 tensor is returned unchanged)."""
    return None if t is None else t.to(F64)


def _check(x: Tensor) -> None:
    if x.dtype != F64:
        raise TypeError(f"reference implementations take float64 input, got {x.dtype}")


def _channel_view(p: Tensor | None, ndim: int) -> Tensor | None:
    """A per-channel ``(C,)`` tensor viewed as ``(C, 1, ..., 1)`` for an ``(N, C, *)`` input."""
    return None if p is None else p.reshape(-1, *([1] * (ndim - 2)))


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


# ------------------------------------------------------------------------------------------------
# Core formulas (trailing feature dimensions)


def layer_norm_core(x: Tensor, ndim: int, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Spec 1.1: ``(x - mean) * rsqrt(var_biased + eps) * weight + bias`` over the last ``ndim`` dims."""
    dims = tuple(range(-ndim, 0))
    mu = x.mean(dim=dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=dims, keepdim=True)  # biased: divide by the element count
    return _affine((x - mu) / torch.sqrt(var + eps), weight, bias)


def rms_norm_core(
    x: Tensor,
    ndim: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    eps_inside: bool = True,
    p: float | None = None,
) -> Tensor:
    """Spec 1.2, both eps placements, over the last ``ndim`` dims.

    Inside (LLaMA / ``torch.nn.RMSNorm``): ``x * rsqrt(mean(x^2) + eps)``.
    Outside (official ``bzhangGo/rmsnorm``): ``x / (||x_p||_2 * d_p^-1/2 + eps)``, where ``x_p`` is
    the first ``int(d * p)`` features of the flattened normalized dims (all of them without ``p``).
    The norm is ``torch.linalg.vector_norm`` as in the official code (``x.norm(2)``): its gradient
    at an all-zero row is the subgradient 0, so the layer is differentiable there (``y ~ x / eps``).
    """
    d = math.prod(x.shape[x.dim() - ndim :])
    flat = x.flatten(x.dim() - ndim)  # (..., d)
    # Fewer than one feature is undefined in the official code (0/0); use at least one.
    k = d if p is None else max(int(d * p), 1)
    part = flat[..., :k]
    stat_shape = (*x.shape[: x.dim() - ndim], *([1] * ndim))
    if eps_inside:
        ms = (part * part).mean(dim=-1)
        y = x * torch.rsqrt(ms.reshape(stat_shape) + eps)
    else:
        rms = torch.linalg.vector_norm(part, ord=2, dim=-1) * k**-0.5
        y = x / (rms.reshape(stat_shape) + eps)
    return _affine(y, weight, bias)


def _per_channel_stats_norm(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * w_c + b_c`` with mean/var already broadcastable to ``x``."""
    y = (x - mean) / torch.sqrt(var + eps)
    return _affine(y, _channel_view(weight, x.dim()), _channel_view(bias, x.dim()))


# ------------------------------------------------------------------------------------------------
# One reference per registered norm


def layer_norm(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """LayerNorm (spec 1.1); ``channels_first`` normalizes dim 1 of ``(N, C, *)`` (ConvNeXt LN2d)."""
    _check(x)
    shape: Sequence[int] = tuple(module.normalized_shape)
    w, b = _f64(module.weight), _f64(module.bias)
    if getattr(module, "channels_first", False):
        return layer_norm_core(x.movedim(1, -1), len(shape), w, b, module.eps).movedim(-1, 1)
    return layer_norm_core(x, len(shape), w, b, module.eps)


def rms_norm(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """RMSNorm (spec 1.2): ``eps_mode``, partial ``p``, optional ``bias``, ``eps=None`` = finfo(input).eps."""
    _check(x)
    shape: Sequence[int] = tuple(module.normalized_shape)
    eps = module.eps if module.eps is not None else torch.finfo(input_dtype or x.dtype).eps
    w, b = _f64(module.weight), _f64(getattr(module, "bias", None))
    eps_inside = getattr(module, "eps_mode", "inside") == "inside"
    p = getattr(module, "p", None)
    channels_first = getattr(module, "channels_first", False)
    h = x.movedim(1, -1) if channels_first else x
    y = rms_norm_core(h, len(shape), w, b, eps, eps_inside=eps_inside, p=p)
    return y.movedim(-1, 1) if channels_first else y


def batch_norm(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """BatchNorm (spec 1.3): batch stats (biased var) over every dim but 1, or the running stats in eval."""
    _check(x)
    use_batch = module.training or not module.track_running_stats or module.running_mean is None
    view = (1, -1, *([1] * (x.dim() - 2)))
    if use_batch:
        dims = (0, *range(2, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    else:
        mean = module.running_mean.to(F64).reshape(view)
        var = module.running_var.to(F64).reshape(view)
    return _per_channel_stats_norm(x, mean, var, _f64(module.weight), _f64(module.bias), module.eps)


def group_norm(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """GroupNorm (spec 1.4): per-sample stats over the ``C / G`` channels of a group and all positions."""
    _check(x)
    n, c = x.shape[:2]
    g = module.num_groups
    xg = x.reshape(n, g, c // g, *x.shape[2:])
    dims = tuple(range(2, xg.dim()))
    mean = xg.mean(dim=dims, keepdim=True)
    var = ((xg - mean) ** 2).mean(dim=dims, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + module.eps)).reshape(x.shape)
    return _affine(y, _channel_view(_f64(module.weight), x.dim()), _channel_view(_f64(module.bias), x.dim()))


def instance_norm(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """InstanceNorm (spec 1.5): stats per sample and channel over the spatial dims (running stats in eval)."""
    _check(x)
    use_input = module.training or not module.track_running_stats or module.running_mean is None
    if use_input:
        dims = tuple(range(2, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    else:
        view = (1, -1, *([1] * (x.dim() - 2)))
        mean = module.running_mean.to(F64).reshape(view)
        var = module.running_var.to(F64).reshape(view)
    return _per_channel_stats_norm(x, mean, var, _f64(module.weight), _f64(module.bias), module.eps)


def _pointwise(x: Tensor, module: Any, u: Tensor) -> Tensor:
    """``weight * u + bias`` with per-feature params on the last dim, or dim 1 with ``channels_first``."""
    w, b = _f64(module.weight), _f64(module.bias)
    if getattr(module, "channels_first", False):
        w, b = _channel_view(w, x.dim()), _channel_view(b, x.dim())
    return _affine(u, w, b)


def dyt(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """DyT (spec 2): ``weight * tanh(alpha * x) + bias`` with one scalar ``alpha``."""
    _check(x)
    return _pointwise(x, module, torch.tanh(_f64(module.alpha) * x))  # type: ignore[operator]


def derf(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """Derf (spec 11): ``weight * erf(alpha * x + shift) + bias`` with scalars ``alpha`` and ``shift``."""
    _check(x)
    return _pointwise(x, module, torch.erf(_f64(module.alpha) * x + _f64(module.shift)))  # type: ignore[operator]


def layer_norm_scaling(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """LNS (spec 3): the base norm's output (after its affine) times ``1 / sqrt(layer_idx + 1)``."""
    _check(x)
    scale = 1.0 / math.sqrt(module.layer_idx + 1)
    w, b = _f64(module.weight), _f64(module.bias)
    if module.base == "layernorm":
        y = layer_norm_core(x, 1, w, b, module.eps)
    elif module.base == "rmsnorm":
        y = rms_norm_core(x, 1, w, b, module.eps, eps_inside=True)  # LLaMA-style base
    else:
        raise ValueError(f"unknown LNS base {module.base!r}")
    return y * scale


def identity(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """The no-norm baseline: ``y = x``."""
    _check(x)
    return x


REFERENCES: dict[str, Reference] = {
    "batchnorm": batch_norm,
    "derf": derf,
    "dyt": dyt,
    "groupnorm": group_norm,
    "identity": identity,
    "instancenorm": instance_norm,
    "layernorm": layer_norm,
    "lns": layer_norm_scaling,
    "rmsnorm": rms_norm,
}
