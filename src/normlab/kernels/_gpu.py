"""The ``normlab::*`` operators on CUDA: Triton kernels and their autograd, registered at first use.

:func:`ensure_registered` imports :mod:`normlab.kernels.gpu` (which imports ``triton``) and
registers its functions as the ops' ``CUDA`` kernels, and the autograd below as their
``AutogradCUDA`` kernels. The C++ library registers autograd for CPU only (``AutogradCPU``), so
CUDA tensors never need the C++ build.

The autograd mirrors the C++ one (``csrc/register.cpp``): the forward op runs below autograd, the
backward calls the fused ``*_backward`` op, or, when the backward itself is differentiated
(``create_graph=True``), the ``*_grad_plain`` op that recomputes through plain torch; parameter
grads come back in each parameter's dtype. The functions are device-agnostic, so the tests check
them on CPU tensors, where the same ops run the C++ kernels.

A kernel that fails to compile on first use (a Triton or driver version this code has not met)
turns that op's GPU path off with one warning; the layers then take the plain-torch path.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from normlab.kernels._ops import _LIB, OPS

# torch.autograd.Function is generic in torch's stubs; mypy's strict mode wants it parametrized.
_Function: Any = torch.autograd.Function


def _below_autograd() -> Any:
    return torch._C._AutoDispatchBelowAutograd()


def _param_grad(g: Tensor | None, p: Tensor | None) -> Tensor | None:
    """A parameter's grad in its dtype and shape; ``None`` where there is no parameter."""
    if p is None or g is None:
        return None
    return g.to(p.dtype).reshape(p.shape)


def _input_grad(ctx: Any, i: int, g: Tensor) -> Tensor | None:
    return g if ctx.needs_input_grad[i] else None


class DytFunction(_Function):
    """``normlab::dyt`` with its fused backward (DyT, arXiv:2503.10622)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None, channel_dim: int
    ) -> Tensor:
        ctx.save_for_backward(x, alpha, weight, bias)
        ctx.channel_dim = channel_dim
        with _below_autograd():
            return OPS.dyt(x, alpha, weight, bias, channel_dim)  # type: ignore[no-any-return]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, alpha, w, b = ctx.saved_tensors
        if torch.is_grad_enabled():
            dx, da, dw, db = OPS.dyt_grad_plain(grad, x, alpha, w, b, ctx.channel_dim)
        else:
            dx, da, dw, db = OPS.dyt_backward(grad, x, alpha, w, ctx.channel_dim)
        return _input_grad(ctx, 0, dx), _param_grad(da, alpha), _param_grad(dw, w), _param_grad(db, b), None


class DerfFunction(_Function):
    """``normlab::derf`` with its fused backward (Derf, arXiv:2512.10938)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        alpha: Tensor,
        shift: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        channel_dim: int,
    ) -> Tensor:
        ctx.save_for_backward(x, alpha, shift, weight, bias)
        ctx.channel_dim = channel_dim
        with _below_autograd():
            return OPS.derf(x, alpha, shift, weight, bias, channel_dim)  # type: ignore[no-any-return]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, alpha, shift, w, b = ctx.saved_tensors
        if torch.is_grad_enabled():
            dx, da, ds, dw, db = OPS.derf_grad_plain(grad, x, alpha, shift, w, b, ctx.channel_dim)
        else:
            dx, da, ds, dw, db = OPS.derf_backward(grad, x, alpha, shift, w, ctx.channel_dim)
        return (
            _input_grad(ctx, 0, dx),
            _param_grad(da, alpha),
            _param_grad(ds, shift),
            _param_grad(dw, w),
            _param_grad(db, b),
            None,
        )


def _row_backward(
    layer: bool,
    grad: Tensor,
    h: Tensor,
    row_size: int,
    w: Tensor | None,
    b: Tensor | None,
    eps: float,
    eps_inside: bool,
    grad_h: Tensor | None,
    channels_first: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of a row norm of the saved input ``h`` (``x``, or ``x + residual``), plus ``grad_h``."""
    if torch.is_grad_enabled():
        dx, dw, db = OPS.row_norm_grad_plain(grad, h, row_size, w, b, eps, eps_inside, layer, channels_first)
        return (dx if grad_h is None else dx + grad_h), dw, db
    if layer:
        return OPS.layer_norm_backward(grad, h, row_size, w, eps, grad_h, channels_first)  # type: ignore[no-any-return]
    return OPS.rms_norm_backward(grad, h, row_size, w, eps, eps_inside, grad_h, channels_first)  # type: ignore[no-any-return]


class RowNormFunction(_Function):
    """``normlab::layer_norm`` (``layer=True``, arXiv:1607.06450) or ``rms_norm`` (arXiv:1910.07467)."""

    @staticmethod
    def forward(
        ctx: Any,
        layer: bool,
        x: Tensor,
        row_size: int,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        eps_inside: bool,
        channels_first: bool,
    ) -> Tensor:
        ctx.save_for_backward(x, weight, bias)
        ctx.args = (layer, row_size, eps, eps_inside, channels_first)
        with _below_autograd():
            if layer:
                return OPS.layer_norm(x, row_size, weight, bias, eps, channels_first)  # type: ignore[no-any-return]
            return OPS.rms_norm(x, row_size, weight, bias, eps, eps_inside, channels_first)  # type: ignore[no-any-return]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w, b = ctx.saved_tensors
        layer, row_size, eps, eps_inside, channels_first = ctx.args
        dx, dw, db = _row_backward(layer, grad, x, row_size, w, b, eps, eps_inside, None, channels_first)
        return None, _input_grad(ctx, 1, dx), None, _param_grad(dw, w), _param_grad(db, b), None, None, None


class AddRowNormFunction(_Function):
    """``normlab::add_layer_norm`` / ``add_rms_norm``: ``h = x + residual``, ``y = norm(h)``; ``(y, h)``."""

    @staticmethod
    def forward(
        ctx: Any,
        layer: bool,
        x: Tensor,
        residual: Tensor,
        row_size: int,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        eps_inside: bool,
    ) -> tuple[Tensor, Tensor]:
        with _below_autograd():
            if layer:
                y, h = OPS.add_layer_norm(x, residual, row_size, weight, bias, eps)
            else:
                y, h = OPS.add_rms_norm(x, residual, row_size, weight, bias, eps, eps_inside)
        ctx.save_for_backward(h, weight, bias)
        ctx.args = (layer, row_size, eps, eps_inside)
        return y, h

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, grad_h: Tensor | None) -> tuple[Tensor | None, ...]:
        h, w, b = ctx.saved_tensors
        layer, row_size, eps, eps_inside = ctx.args
        dh, dw, db = _row_backward(layer, grad_y, h, row_size, w, b, eps, eps_inside, grad_h, False)
        # d(x + residual): the same gradient reaches both summands.
        return (
            None,
            _input_grad(ctx, 1, dh),
            _input_grad(ctx, 2, dh),
            None,
            _param_grad(dw, w),
            _param_grad(db, b),
            None,
            None,
        )


class GroupNormFunction(_Function):
    """``normlab::group_norm`` (GroupNorm, arXiv:1803.08494), ``(N, C, S)`` or channels-last ``(N, S, C)``."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        num_groups: int,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        channels_last: bool,
    ) -> Tensor:
        ctx.save_for_backward(x, weight, bias)
        ctx.args = (num_groups, eps, channels_last)
        with _below_autograd():
            return OPS.group_norm(x, num_groups, weight, bias, eps, channels_last)  # type: ignore[no-any-return]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w, b = ctx.saved_tensors
        groups, eps, channels_last = ctx.args
        if torch.is_grad_enabled():
            dx, dw, db = OPS.group_norm_grad_plain(grad, x, groups, w, b, eps, channels_last)
        else:
            dx, dw, db = OPS.group_norm_backward(grad, x, groups, w, eps, channels_last)
        return _input_grad(ctx, 0, dx), None, _param_grad(dw, w), _param_grad(db, b), None, None


class BatchNormTrainFunction(_Function):
    """``normlab::batch_norm_train`` (arXiv:1502.03167): ``(y, mean, var)``, only ``y`` differentiable."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        with _below_autograd():
            y, mean, var = OPS.batch_norm_train(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, var)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _gm: Tensor | None, _gv: Tensor | None) -> tuple[Tensor | None, ...]:
        x, w, b, mean, var = ctx.saved_tensors
        if torch.is_grad_enabled():
            dx, dw, db = OPS.batch_norm_train_grad_plain(grad, x, w, b, ctx.eps)
        else:
            dx, dw, db = OPS.batch_norm_train_backward(grad, x, mean, var, w, ctx.eps)
        return _input_grad(ctx, 0, dx), _param_grad(dw, w), _param_grad(db, b), None


# ------------------------------------------------------------------------------------------------
# The autograd kernels, with the ops' own signatures


def dyt_autograd(
    x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None, channel_dim: int
) -> Tensor:
    return DytFunction.apply(x, alpha, weight, bias, channel_dim)  # type: ignore[no-any-return]


def derf_autograd(
    x: Tensor, alpha: Tensor, shift: Tensor, weight: Tensor | None, bias: Tensor | None, channel_dim: int
) -> Tensor:
    return DerfFunction.apply(x, alpha, shift, weight, bias, channel_dim)  # type: ignore[no-any-return]


def layer_norm_autograd(
    x: Tensor,
    row_size: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    channels_first: bool = False,
) -> Tensor:
    return RowNormFunction.apply(True, x, row_size, weight, bias, eps, True, channels_first)  # type: ignore[no-any-return]


def rms_norm_autograd(
    x: Tensor,
    row_size: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    eps_inside: bool,
    channels_first: bool = False,
) -> Tensor:
    return RowNormFunction.apply(False, x, row_size, weight, bias, eps, eps_inside, channels_first)  # type: ignore[no-any-return]


def add_layer_norm_autograd(
    x: Tensor, residual: Tensor, row_size: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    return AddRowNormFunction.apply(True, x, residual, row_size, weight, bias, eps, True)  # type: ignore[no-any-return]


def add_rms_norm_autograd(
    x: Tensor,
    residual: Tensor,
    row_size: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    eps_inside: bool,
) -> tuple[Tensor, Tensor]:
    return AddRowNormFunction.apply(False, x, residual, row_size, weight, bias, eps, eps_inside)  # type: ignore[no-any-return]


def group_norm_autograd(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float, channels_last: bool
) -> Tensor:
    return GroupNormFunction.apply(x, num_groups, weight, bias, eps, channels_last)  # type: ignore[no-any-return]


def batch_norm_train_autograd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    return BatchNormTrainFunction.apply(x, weight, bias, eps)  # type: ignore[no-any-return]


AUTOGRAD = {
    "dyt": dyt_autograd,
    "derf": derf_autograd,
    "layer_norm": layer_norm_autograd,
    "rms_norm": rms_norm_autograd,
    "add_layer_norm": add_layer_norm_autograd,
    "add_rms_norm": add_rms_norm_autograd,
    "group_norm": group_norm_autograd,
    "batch_norm_train": batch_norm_train_autograd,
}

# op -> module of normlab.kernels.gpu that defines a function of the op's name
KERNEL_MODULES = {
    "dyt": "pointwise",
    "dyt_backward": "pointwise",
    "derf": "pointwise",
    "derf_backward": "pointwise",
    "layer_norm": "rownorm",
    "layer_norm_backward": "rownorm",
    "rms_norm": "rownorm",
    "rms_norm_backward": "rownorm",
    "add_layer_norm": "rownorm",
    "add_rms_norm": "rownorm",
    "group_norm": "groupnorm",
    "group_norm_backward": "groupnorm",
    "batch_norm_train": "batchnorm",
    "batch_norm_train_backward": "batchnorm",
}


# ------------------------------------------------------------------------------------------------
# Registration


class _State:
    attempted: bool = False
    loaded: bool = False
    reason: str = "not attempted"
    # ops whose Triton kernel failed at its first call: they take the plain path from then on
    failed: dict[str, str] = {}  # noqa: RUF012 (process-wide state)


STATE = _State


def ensure_registered() -> bool:
    """Register the Triton kernels and their autograd for CUDA (once); ``True`` if usable.

    False, with ``STATE.reason``, when CUDA or Triton is missing or the import fails.
    """
    if STATE.attempted:
        return STATE.loaded
    STATE.attempted = True
    from normlab.kernels.gpu import triton_available

    if not torch.cuda.is_available():
        STATE.reason = "CUDA is not available"
        return False
    if not triton_available():
        STATE.reason = "Triton is not installed (pip install triton)"
        return False
    import importlib

    try:
        names = set(KERNEL_MODULES.values())
        modules = {name: importlib.import_module(f"normlab.kernels.gpu.{name}") for name in names}
    except Exception as err:  # an incompatible Triton: say why, keep the plain path
        STATE.reason = f"importing the Triton kernels failed: {type(err).__name__}: {err}"
        warnings.warn(f"normlab.kernels: {STATE.reason}; CUDA tensors take the plain path", stacklevel=2)
        return False
    for op, module in KERNEL_MODULES.items():
        _LIB.impl(op, getattr(modules[module], op), "CUDA")
    for op, fn in AUTOGRAD.items():
        _LIB.impl(op, fn, "AutogradCUDA")
    STATE.loaded = True
    STATE.reason = "registered"
    return True


def op_usable(op: str) -> bool:
    """Whether ``op``'s Triton kernel has not failed in this process."""
    return op not in STATE.failed


def call_guarded(op: str, fn: Any, *args: Any) -> Any:
    """Run a fused call on CUDA; if its Triton kernel fails to compile or launch, warn once, mark
    the op failed (plain path from then on) and return ``None`` so the caller takes the plain path."""
    try:
        return fn(*args)
    except Exception as err:
        if not type(err).__module__.startswith("triton"):
            raise
        STATE.failed[op] = f"{type(err).__name__}: {err}"
        warnings.warn(
            f"normlab.kernels: the Triton kernel of normlab::{op} failed ({STATE.failed[op]}); "
            "this op takes the plain-torch path from now on",
            stacklevel=3,
        )
        return None


def status() -> dict[str, Any]:
    """What the registration did: ``loaded``, ``reason`` and the ops whose kernels ``failed``."""
    return {
        "loaded": STATE.loaded,
        "attempted": STATE.attempted,
        "reason": STATE.reason,
        "failed": dict(STATE.failed),
    }
