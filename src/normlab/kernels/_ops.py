"""The ``normlab::*`` operators: schemas and fake (meta) kernels, for torch.compile and opcheck.

Schemas are defined here at import (cheap: no compilation); the CPU implementations and the
autograd kernels come from the C++ library (``csrc/``) once
:func:`normlab.kernels._build.ensure_built` has loaded it. Each forward op has a ``*_backward`` op
that computes every gradient in one pass, the parameter grads in the accumulation dtype (fp32, or
fp64 for fp64 input; the autograd kernel casts them to each parameter's dtype). Double backward
(``create_graph=True``) goes through the ``*_grad_plain`` ops defined here: they recompute the
forward with the plain-torch functions of :mod:`normlab.functional` and differentiate that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from normlab._reference import derf_torch, dyt_torch, layer_norm_torch, rms_norm_torch

# torch.library is untyped for mypy: reach it through Any. A FRAGMENT: other normlab ops may join.
_library: Any = torch.library
_LIB: Any = _library.Library("normlab", "FRAGMENT")
_F = TypeVar("_F", bound=Callable[..., Any])


def _register_fake(name: str) -> Callable[[_F], _F]:
    def register(fn: _F) -> _F:
        _library.register_fake(name)(fn)
        return fn

    return register


_SCHEMAS = {
    "dyt": "dyt(Tensor x, Tensor alpha, Tensor? weight, Tensor? bias, int channel_dim) -> Tensor",
    "dyt_backward": (
        "dyt_backward(Tensor grad, Tensor x, Tensor alpha, Tensor? weight, int channel_dim)"
        " -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    "derf": (
        "derf(Tensor x, Tensor alpha, Tensor shift, Tensor? weight, Tensor? bias, int channel_dim) -> Tensor"
    ),
    "derf_backward": (
        "derf_backward(Tensor grad, Tensor x, Tensor alpha, Tensor shift, Tensor? weight, int channel_dim)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "rms_norm": (
        "rms_norm(Tensor x, int row_size, Tensor? weight, Tensor? bias, float eps, bool eps_inside,"
        " bool channels_first=False) -> Tensor"
    ),
    "rms_norm_backward": (
        "rms_norm_backward(Tensor grad, Tensor x, int row_size, Tensor? weight, float eps, bool eps_inside,"
        " Tensor? grad_residual, bool channels_first=False) -> (Tensor, Tensor, Tensor)"
    ),
    "layer_norm": (
        "layer_norm(Tensor x, int row_size, Tensor? weight, Tensor? bias, float eps,"
        " bool channels_first=False) -> Tensor"
    ),
    "layer_norm_backward": (
        "layer_norm_backward(Tensor grad, Tensor x, int row_size, Tensor? weight, float eps,"
        " Tensor? grad_residual, bool channels_first=False) -> (Tensor, Tensor, Tensor)"
    ),
    "add_rms_norm": (
        "add_rms_norm(Tensor x, Tensor residual, int row_size, Tensor? weight, Tensor? bias, float eps,"
        " bool eps_inside) -> (Tensor, Tensor)"
    ),
    "add_layer_norm": (
        "add_layer_norm(Tensor x, Tensor residual, int row_size, Tensor? weight, Tensor? bias, float eps)"
        " -> (Tensor, Tensor)"
    ),
    "group_norm": (
        "group_norm(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, bool channels_last)"
        " -> Tensor"
    ),
    "group_norm_backward": (
        "group_norm_backward(Tensor grad, Tensor x, int num_groups, Tensor? weight, float eps,"
        " bool channels_last) -> (Tensor, Tensor, Tensor)"
    ),
    # BatchNorm training on (N, C, S): (y, mean, biased var), the statistics in the accumulation dtype.
    "batch_norm_train": (
        "batch_norm_train(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)"
    ),
    "batch_norm_train_backward": (
        "batch_norm_train_backward(Tensor grad, Tensor x, Tensor mean, Tensor var, Tensor? weight, float eps)"
        " -> (Tensor, Tensor, Tensor)"
    ),
}
for _schema in _SCHEMAS.values():
    _LIB.define(_schema)

OPS = torch.ops.normlab


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and parameter grads are accumulated in: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# Fake kernels: shapes, dtypes and (contiguous) strides of the real outputs


def _like(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _acc(x: Tensor, n: int) -> Tensor:
    return torch.empty((n,), dtype=acc_dtype(x.dtype), device=x.device)


def _channels(x: Tensor, channel_dim: int) -> int:
    return int(x.shape[channel_dim])


@_register_fake("normlab::dyt")
def _dyt_fake(
    x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None, channel_dim: int
) -> Tensor:
    return _like(x)


@_register_fake("normlab::dyt_backward")
def _dyt_backward_fake(
    grad: Tensor, x: Tensor, alpha: Tensor, weight: Tensor | None, channel_dim: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    c = _channels(x, channel_dim)
    return _like(x), _acc(x, 1), _acc(x, c), _acc(x, c)


@_register_fake("normlab::derf")
def _derf_fake(
    x: Tensor, alpha: Tensor, shift: Tensor, weight: Tensor | None, bias: Tensor | None, channel_dim: int
) -> Tensor:
    return _like(x)


@_register_fake("normlab::derf_backward")
def _derf_backward_fake(
    grad: Tensor, x: Tensor, alpha: Tensor, shift: Tensor, weight: Tensor | None, channel_dim: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    c = _channels(x, channel_dim)
    return _like(x), _acc(x, 1), _acc(x, 1), _acc(x, c), _acc(x, c)


@_register_fake("normlab::rms_norm")
def _rms_fake(
    x: Tensor,
    row_size: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    eps_inside: bool,
    channels_first: bool = False,
) -> Tensor:
    return _like(x)


@_register_fake("normlab::layer_norm")
def _ln_fake(
    x: Tensor,
    row_size: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    channels_first: bool = False,
) -> Tensor:
    return _like(x)


@_register_fake("normlab::rms_norm_backward")
def _rms_backward_fake(
    grad: Tensor,
    x: Tensor,
    row_size: int,
    weight: Tensor | None,
    eps: float,
    eps_inside: bool,
    grad_residual: Tensor | None,
    channels_first: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    return _like(x), _acc(x, row_size), _acc(x, row_size)


@_register_fake("normlab::layer_norm_backward")
def _ln_backward_fake(
    grad: Tensor,
    x: Tensor,
    row_size: int,
    weight: Tensor | None,
    eps: float,
    grad_residual: Tensor | None,
    channels_first: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    return _like(x), _acc(x, row_size), _acc(x, row_size)


@_register_fake("normlab::add_rms_norm")
def _add_rms_fake(
    x: Tensor,
    residual: Tensor,
    row_size: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    eps_inside: bool,
) -> tuple[Tensor, Tensor]:
    return _like(x), _like(x)


@_register_fake("normlab::add_layer_norm")
def _add_ln_fake(
    x: Tensor, residual: Tensor, row_size: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    return _like(x), _like(x)


@_register_fake("normlab::group_norm")
def _gn_fake(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float, channels_last: bool
) -> Tensor:
    return _like(x)


@_register_fake("normlab::group_norm_backward")
def _gn_backward_fake(
    grad: Tensor, x: Tensor, num_groups: int, weight: Tensor | None, eps: float, channels_last: bool
) -> tuple[Tensor, Tensor, Tensor]:
    c = int(x.shape[2] if channels_last else x.shape[1])
    return _like(x), _acc(x, c), _acc(x, c)


@_register_fake("normlab::batch_norm_train")
def _bn_fake(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    c = int(x.shape[1])
    return _like(x), _acc(x, c), _acc(x, c)


@_register_fake("normlab::batch_norm_train_backward")
def _bn_backward_fake(
    grad: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    c = int(x.shape[1])
    return _like(x), _acc(x, c), _acc(x, c)


# ------------------------------------------------------------------------------------------------
# Plain-torch definitions of each op (the double-backward path), from normlab._reference


def _plain_dyt(x: Tensor, alpha: Tensor, w: Tensor | None, b: Tensor | None, channel_dim: int) -> Tensor:
    return dyt_torch(x, alpha, w, b, channel_dim=channel_dim)


def _plain_derf(
    x: Tensor, alpha: Tensor, shift: Tensor, w: Tensor | None, b: Tensor | None, channel_dim: int
) -> Tensor:
    return derf_torch(x, alpha, shift, w, b, channel_dim=channel_dim)


def _rows(x: Tensor, row_size: int) -> Tensor:
    return x.reshape(-1, row_size)


def _flat(p: Tensor | None) -> Tensor | None:
    return None if p is None else p.reshape(-1)


def _plain_rms(
    x: Tensor,
    row_size: int,
    w: Tensor | None,
    b: Tensor | None,
    eps: float,
    eps_inside: bool,
    channels_first: bool = False,
) -> Tensor:
    if channels_first:
        y = rms_norm_torch(x.movedim(1, -1), (row_size,), _flat(w), _flat(b), eps, eps_inside=eps_inside)
        return y.movedim(-1, 1)
    y = rms_norm_torch(_rows(x, row_size), (row_size,), _flat(w), _flat(b), eps, eps_inside=eps_inside)
    return y.reshape(x.shape)


def _plain_ln(
    x: Tensor, row_size: int, w: Tensor | None, b: Tensor | None, eps: float, channels_first: bool = False
) -> Tensor:
    if channels_first:
        return layer_norm_torch(x.movedim(1, -1), (row_size,), _flat(w), _flat(b), eps).movedim(-1, 1)
    return layer_norm_torch(_rows(x, row_size), (row_size,), _flat(w), _flat(b), eps).reshape(x.shape)


def _plain_gn(
    x: Tensor, num_groups: int, w: Tensor | None, b: Tensor | None, eps: float, channels_last: bool
) -> Tensor:
    if channels_last:
        return F.group_norm(x.transpose(1, 2), num_groups, w, b, eps).transpose(1, 2)
    return F.group_norm(x, num_groups, w, b, eps)


def _plain_bn(x: Tensor, w: Tensor | None, b: Tensor | None, eps: float) -> Tensor:
    return F.batch_norm(x, None, None, w, b, True, 0.0, eps)


def _grads_plain(
    fn: Callable[..., Tensor], tensors: Sequence[Tensor | None], args: Sequence[Any], grad: Tensor
) -> tuple[Tensor, ...]:
    """Gradients of ``fn(*tensors, *args)`` w.r.t. every tensor, with a graph (double backward).

    Saved tensors that require grad enter through an alias (``view_as``), so the returned gradients
    stay connected to them; the others are detached leaves (their gradients are dropped by the
    C++ backward). The alias matters for a saved *output* such as the ``h`` of the residual-add
    ops: its grad_fn is the op's own node, which also leads to the weight; asked for the weight
    itself, the engine would walk through that node, whose backward lands here again, forever.
    Asked for aliases, it stops at them. Absent (``None``) tensors get an empty tensor, as an op
    cannot return ``None``.
    """
    leaves = [
        t if t is None else t.view_as(t) if t.requires_grad else t.detach().requires_grad_(True)
        for t in tensors
    ]
    present = [t for t in leaves if t is not None]
    with torch.enable_grad():
        y = fn(*leaves, *args)
    grads = iter(torch.autograd.grad(y, present, grad, create_graph=True, allow_unused=True))
    out = []
    for t in leaves:
        if t is None:
            out.append(grad.new_empty(0))
        else:
            g = next(grads)
            out.append(torch.zeros_like(t) if g is None else g)
    return tuple(out)


_PLAIN_SCHEMAS = {
    "dyt_grad_plain": (
        "dyt_grad_plain(Tensor grad, Tensor x, Tensor alpha, Tensor? weight, Tensor? bias, int channel_dim)"
        " -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    "derf_grad_plain": (
        "derf_grad_plain(Tensor grad, Tensor x, Tensor alpha, Tensor shift, Tensor? weight, Tensor? bias,"
        " int channel_dim) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "row_norm_grad_plain": (
        "row_norm_grad_plain(Tensor grad, Tensor x, int row_size, Tensor? weight, Tensor? bias, float eps,"
        " bool eps_inside, bool layer, bool channels_first) -> (Tensor, Tensor, Tensor)"
    ),
    "group_norm_grad_plain": (
        "group_norm_grad_plain(Tensor grad, Tensor x, int num_groups, Tensor? weight, Tensor? bias,"
        " float eps, bool channels_last) -> (Tensor, Tensor, Tensor)"
    ),
    "batch_norm_train_grad_plain": (
        "batch_norm_train_grad_plain(Tensor grad, Tensor x, Tensor? weight, Tensor? bias, float eps)"
        " -> (Tensor, Tensor, Tensor)"
    ),
}
for _schema in _PLAIN_SCHEMAS.values():
    _LIB.define(_schema)


def _dyt_grad_plain(
    grad: Tensor, x: Tensor, alpha: Tensor, w: Tensor | None, b: Tensor | None, channel_dim: int
) -> tuple[Tensor, ...]:
    return _grads_plain(_plain_dyt, (x, alpha, w, b), (channel_dim,), grad)


def _derf_grad_plain(
    grad: Tensor,
    x: Tensor,
    alpha: Tensor,
    shift: Tensor,
    w: Tensor | None,
    b: Tensor | None,
    channel_dim: int,
) -> tuple[Tensor, ...]:
    return _grads_plain(_plain_derf, (x, alpha, shift, w, b), (channel_dim,), grad)


def _row_norm_grad_plain(
    grad: Tensor,
    x: Tensor,
    row_size: int,
    w: Tensor | None,
    b: Tensor | None,
    eps: float,
    eps_inside: bool,
    layer: bool,
    channels_first: bool,
) -> tuple[Tensor, ...]:
    if layer:
        return _grads_plain(
            lambda x_, w_, b_: _plain_ln(x_, row_size, w_, b_, eps, channels_first), (x, w, b), (), grad
        )
    return _grads_plain(
        lambda x_, w_, b_: _plain_rms(x_, row_size, w_, b_, eps, eps_inside, channels_first),
        (x, w, b),
        (),
        grad,
    )


def _group_norm_grad_plain(
    grad: Tensor,
    x: Tensor,
    num_groups: int,
    w: Tensor | None,
    b: Tensor | None,
    eps: float,
    channels_last: bool,
) -> tuple[Tensor, ...]:
    return _grads_plain(
        lambda x_, w_, b_: _plain_gn(x_, num_groups, w_, b_, eps, channels_last), (x, w, b), (), grad
    )


def _batch_norm_train_grad_plain(
    grad: Tensor, x: Tensor, w: Tensor | None, b: Tensor | None, eps: float
) -> tuple[Tensor, ...]:
    return _grads_plain(lambda x_, w_, b_: _plain_bn(x_, w_, b_, eps), (x, w, b), (), grad)


# CompositeImplicitAutograd: they run above autograd, so what they compute is differentiable.
_LIB.impl("dyt_grad_plain", _dyt_grad_plain, "CompositeImplicitAutograd")
_LIB.impl("derf_grad_plain", _derf_grad_plain, "CompositeImplicitAutograd")
_LIB.impl("row_norm_grad_plain", _row_norm_grad_plain, "CompositeImplicitAutograd")
_LIB.impl("group_norm_grad_plain", _group_norm_grad_plain, "CompositeImplicitAutograd")
_LIB.impl("batch_norm_train_grad_plain", _batch_norm_train_grad_plain, "CompositeImplicitAutograd")
