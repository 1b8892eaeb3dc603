"""When a fused op (C++ on CPU, Triton on CUDA) may replace the plain-torch path, and the calls that do it.

Each function returns the fused result, or ``None`` when the plain path must run: kernels off,
library not built (or failed), a device or dtype without a kernel, an empty tensor, a tensor
subclass, fx proxies, ``torch.func`` transforms (vmap/grad wrap tensors: the ops have no batching
rule), forward-mode AD (the ops have no JVP) or autocast (its per-op dtype lists do not name
them). Under ``torch.compile`` the decision reads the build state without building, so tracing
never compiles C++.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from normlab.kernels import _build, _dtensor, _gpu
from normlab.kernels._ops import OPS
from normlab.kernels._switch import _Switch

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_DEVICES = ("cpu", "cuda")
_T = TypeVar("_T")


def usable(x: Tensor, *params: Tensor | None, dtensor: bool = False, like_x: tuple[Tensor, ...] = ()) -> bool:
    """True if fused ops can compute ``x`` with these parameters: the C++ library on CPU (built at
    the first call), the Triton kernels on CUDA (registered at the first call).

    ``dtensor``: the op has sharding rules (:mod:`normlab.kernels._dtensor`), so a DTensor ``x``
    with replicated DTensor parameters (and ``like_x`` tensors placed as ``x``) qualifies too.
    """
    if not _Switch.on:
        return False
    kinds: tuple[type[Tensor], ...] = _PLAIN_TYPES
    if _dtensor.is_dtensor(x):
        ready = dtensor and _dtensor.register(tracing=torch.compiler.is_compiling())
        if not (ready and _dtensor.replicated_params(x, params, like_x)):
            return False
        kinds = (*_PLAIN_TYPES, type(x))
    elif any(type(t) not in _PLAIN_TYPES for t in like_x):
        return False
    if type(x) not in kinds or x.device.type not in _DEVICES:
        return False
    if x.dtype not in _DTYPES or x.numel() == 0:
        return False
    # Parameters as wide as the accumulation at most: a wider parameter (fp64 weights on fp32
    # input) makes the plain path compute in that dtype, which the kernel does not.
    widest = 8 if x.dtype == torch.float64 else 4
    for p in params:
        if p is None:
            continue
        if type(p) not in kinds or p.device != x.device or not p.is_floating_point():
            return False
        if p.element_size() > widest:
            return False
    # Autocast's op lists (LayerNorm in fp32, ...) do not know the fused ops: keep torch's behaviour.
    if torch.is_autocast_enabled(x.device.type):
        return False
    on_cpu = x.device.type == "cpu"
    if torch.compiler.is_compiling():
        return _build.STATE.loaded if on_cpu else _gpu.STATE.loaded
    if _forward_ad._current_level >= 0:
        return False
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    if is_wrapped(x) or any(p is not None and is_wrapped(p) for p in params):
        return False
    return _build.ensure_built() if on_cpu else _gpu.ensure_registered()


def _call(op: str, x: Tensor, fn: Callable[..., _T], *args: Any) -> _T | None:
    """``fn(*args)``, the fused call of ``op``; on CUDA, ``None`` (the plain path) once the op's
    Triton kernel has failed, which :func:`normlab.kernels._gpu.call_guarded` detects."""
    if x.device.type == "cpu" or torch.compiler.is_compiling():
        return fn(*args)
    if not _gpu.op_usable(op):
        return None
    return cast("_T | None", _gpu.call_guarded(op, fn, *args))


def _channels_last_view(x: Tensor, channel_dim: int) -> bool:
    """``x`` is (N, C, *) stored channels-last: moving C to the end gives a contiguous tensor."""
    return channel_dim == 1 and x.dim() > 2 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def dyt(
    x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None, channel_dim: int
) -> Tensor | None:
    if not usable(x, alpha, weight, bias, dtensor=True):
        return None
    if _channels_last_view(x, channel_dim):  # keep the memory format, skip the copy
        y = _call("dyt", x, OPS.dyt, x.movedim(1, -1), alpha, weight, bias, -1)
        return None if y is None else y.movedim(-1, 1)
    return _call("dyt", x, OPS.dyt, x, alpha, weight, bias, channel_dim)


def derf(
    x: Tensor, alpha: Tensor, shift: Tensor, weight: Tensor | None, bias: Tensor | None, channel_dim: int
) -> Tensor | None:
    if not usable(x, alpha, shift, weight, bias, dtensor=True):
        return None
    if _channels_last_view(x, channel_dim):
        y = _call("derf", x, OPS.derf, x.movedim(1, -1), alpha, shift, weight, bias, -1)
        return None if y is None else y.movedim(-1, 1)
    return _call("derf", x, OPS.derf, x, alpha, shift, weight, bias, channel_dim)


def _row_size(x: Tensor, normalized_shape: tuple[int, ...], *params: Tensor | None) -> int | None:
    k = len(normalized_shape)
    if k == 0 or x.dim() < k or tuple(x.shape[x.dim() - k :]) != normalized_shape:
        return None
    n = math.prod(normalized_shape)
    if any(p is not None and p.numel() != n for p in params):
        return None
    return n


def _moved_channels(x: Tensor, normalized_shape: tuple[int, ...]) -> bool:
    """``x`` is ``t.movedim(1, -1)`` of a contiguous ``(N, C, *)`` ``t`` (a channels-first
    LayerNorm/RMSNorm): the kernel normalizes over dimension 1 of ``t`` in place of a copy."""
    return (
        len(normalized_shape) == 1
        and x.dim() > 2
        and not x.is_contiguous()
        and x.movedim(-1, 1).is_contiguous()
    )


def rms_norm(
    x: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    eps_inside: bool,
) -> Tensor | None:
    n = _row_size(x, normalized_shape, weight, bias)
    if n is None or not usable(x, weight, bias, dtensor=True):
        return None
    if _moved_channels(x, normalized_shape):
        y = _call("rms_norm", x, OPS.rms_norm, x.movedim(-1, 1), n, weight, bias, eps, eps_inside, True)
        return None if y is None else y.movedim(1, -1)
    return _call("rms_norm", x, OPS.rms_norm, x, n, weight, bias, eps, eps_inside)


def layer_norm(
    x: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor | None:
    n = _row_size(x, normalized_shape, weight, bias)
    if n is None or not usable(x, weight, bias, dtensor=True):
        return None
    if _moved_channels(x, normalized_shape):
        y = _call("layer_norm", x, OPS.layer_norm, x.movedim(-1, 1), n, weight, bias, eps, True)
        return None if y is None else y.movedim(1, -1)
    return _call("layer_norm", x, OPS.layer_norm, x, n, weight, bias, eps)


def add_rms_norm(
    x: Tensor,
    residual: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    eps_inside: bool,
) -> tuple[Tensor, Tensor] | None:
    n = _residual_row_size(x, residual, normalized_shape, weight, bias)
    if n is None:
        return None
    return _call("add_rms_norm", x, OPS.add_rms_norm, x, residual, n, weight, bias, eps, eps_inside)


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor] | None:
    n = _residual_row_size(x, residual, normalized_shape, weight, bias)
    if n is None:
        return None
    return _call("add_layer_norm", x, OPS.add_layer_norm, x, residual, n, weight, bias, eps)


def _residual_row_size(
    x: Tensor,
    residual: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None,
    bias: Tensor | None,
) -> int | None:
    """The row size of a fused residual-add + norm, or ``None`` where the op does not apply."""
    n = _row_size(x, normalized_shape, weight, bias)
    if n is None or residual.shape != x.shape or residual.dtype != x.dtype:
        return None
    if residual.device != x.device:
        return None
    return n if usable(x, weight, bias, dtensor=True, like_x=(residual,)) else None


def group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor | None:
    """(N, C, *) input, contiguous or channels-last in memory (``(N, L, C)`` tokens passed as
    ``x.transpose(1, 2)`` are channels-last); any other layout takes the plain path."""
    if x.dim() < 2 or x.shape[1] % num_groups or not usable(x, weight, bias):
        return None
    n, c = x.shape[0], x.shape[1]
    if x.is_contiguous():
        y = _call("group_norm", x, OPS.group_norm, x.reshape(n, c, -1), num_groups, weight, bias, eps, False)
        return None if y is None else y.view(x.shape)
    moved = x.movedim(1, -1)
    if moved.is_contiguous():
        tokens = moved.reshape(n, -1, c)
        y = _call("group_norm", x, OPS.group_norm, tokens, num_groups, weight, bias, eps, True)
        return None if y is None else y.view(moved.shape).movedim(-1, 1)
    return None


def batch_norm_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor] | None:
    """BatchNorm's training step on contiguous (N, C, *) input: ``(y, mean, biased var)``, the
    statistics per channel over N and the positions (fp32, fp64 for fp64 input). Channels-last or
    other layouts, and planes of fewer than 48 positions, take the plain path: the kernel sums
    each (sample, channel) plane as a run of vectors, and below 7x7 maps the runs' tails and
    per-run sums made it up to 2.3x slower than torch's (measured 5x5: 1.2-1.3x, 3x3: 2.3x).
    CUDA tensors keep torch's cuDNN kernel: the Triton op is registered
    (``torch.ops.normlab.batch_norm_train`` on CUDA) but the layer does not choose it before a
    GPU measurement shows it faster."""
    if x.device.type != "cpu":
        return None
    if x.dim() < 3 or not x.is_contiguous() or not usable(x, weight, bias):
        return None
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c)
    if s < 48:
        return None
    out = _call("batch_norm_train", x, OPS.batch_norm_train, x.view(n, c, s), weight, bias, eps)
    if out is None:
        return None
    y, mean, var = out
    return y.view(x.shape), mean, var
