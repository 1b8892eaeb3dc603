"""The fused ops on DTensor: sharding rules for tensor and sequence parallelism.

A per-token norm (LayerNorm, RMSNorm, their residual-add forms) computes each row from that row
alone, and DyT/Derf each element from itself (on a feature-sharded input with the per-channel
``weight``/``bias`` sliced alike), so an input sharded on any dimension the op does not reduce
over (the batch, or the sequence as in Megatron/torchtitan sequence parallelism)
computes locally: each rank runs the fused op on its shard, with the parameters replicated. The
rules here (``torch.distributed.tensor.experimental.register_sharding``) say so for the forward
and backward ops; the parameter gradients of a sharded input are partial sums over the ranks
(``Partial()``), which DTensor reduces where they are used, as torch's own LayerNorm rule does.

An input sharded on a normalized dimension (the features, as a tensor-parallel matmul leaves
them) cannot be normalized locally: the layers refuse it (:func:`refuse_sharded_rows`) instead of
letting DTensor gather the whole tensor on every rank behind the user's back.

``torch.distributed.tensor`` is imported at the first DTensor input, never at ``import normlab``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

_REGISTERED: bool | None = None  # None: not tried; False: torch.distributed.tensor missing
_DTENSOR: type | None = None  # the DTensor class, once torch.distributed.tensor is imported


def is_dtensor(x: object) -> bool:
    """Whether ``x`` is a DTensor (without importing ``torch.distributed.tensor`` to find out:
    where nothing imported it, nothing made one)."""
    global _DTENSOR
    if _DTENSOR is None:
        if torch.compiler.is_compiling():  # eager calls found the class before any trace
            return False
        module = sys.modules.get("torch.distributed.tensor")
        if module is None:
            return False
        _DTENSOR = module.DTensor
    return isinstance(x, _DTENSOR)


def _row_dims(ndim: int, shape: Sequence[int], row_size: int, channels_first: bool) -> set[int]:
    """The dimensions a row norm reduces over: the trailing ones whose sizes multiply to
    ``row_size``, or dimension 1 for a channels-first (N, C, *) norm."""
    if channels_first:
        return {1}
    dims: set[int] = set()
    n = 1
    for d in range(ndim - 1, -1, -1):
        if n == row_size:
            break
        n *= int(shape[d])
        dims.add(d)
    return dims


def _rule(
    op: Any,
    *,
    like_x: tuple[str, ...],
    outputs: tuple[str, ...],
    reduced: Callable[[dict[str, Any], Any], set[int]],
    channel: Callable[[dict[str, Any], Any], int] | None = None,
) -> None:
    """Register the strategies of ``op``: everything replicated, or the tensors ``like_x``
    sharded alike on one dimension the op does not reduce over; then the outputs ``"x"`` are
    sharded the same way and the others (parameter gradients) are partial sums.

    ``channel`` (elementwise ops): the dimension of the per-channel ``weight`` and ``bias``; an
    input sharded there computes locally with those parameters sharded alike (``Shard(0)``, a
    local slice of a replicated parameter: no communication), their gradients too.
    """
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec
    from torch.distributed.tensor.experimental import register_sharding

    names = [a.name for a in op._schema.arguments]

    def strategies(*args: Any, **kwargs: Any) -> list[tuple[list[Any], list[Any]]]:
        bound = {**dict(zip(names, args, strict=False)), **kwargs}
        x = bound["x"]

        def inputs(placement: Any, per_channel: Any = None) -> list[Any]:
            def one(n: str, v: Any) -> Any:
                if not isinstance(v, DTensorSpec):
                    return None
                if n in like_x:
                    return placement
                return per_channel if per_channel is not None and n in CHANNEL_PARAMS else Replicate()

            return [one(n, v) for n, v in zip(names, args, strict=False)]

        found: list[tuple[list[Any], list[Any]]] = [([Replicate() for _ in outputs], inputs(Replicate()))]
        for d in sorted(set(range(x.ndim)) - reduced(bound, x)):
            placed = [Shard(d) if o == "x" else Partial() for o in outputs]
            found.append((placed, inputs(Shard(d))))
        if channel is not None:
            d = channel(bound, x)
            placed = [
                Shard(d) if o == "x" else Shard(0) if o in CHANNEL_PARAMS else Partial() for o in outputs
            ]
            found.append((placed, inputs(Shard(d), per_channel=Shard(0))))
        return found

    register_sharding(op)(strategies)


CHANNEL_PARAMS = ("weight", "bias")


def _channel_dim(bound: dict[str, Any], x: Any) -> int:
    return int(bound["channel_dim"]) % int(x.ndim)


def _channel(bound: dict[str, Any], x: Any) -> set[int]:
    return {_channel_dim(bound, x)}


def _rows(bound: dict[str, Any], x: Any) -> set[int]:
    return _row_dims(x.ndim, x.shape, int(bound["row_size"]), bool(bound.get("channels_first", False)))


def register(*, tracing: bool = False) -> bool:
    """Register the sharding rules once; ``False`` where ``torch.distributed.tensor`` is missing.
    ``tracing`` (under ``torch.compile``): only say whether an eager call registered them."""
    global _REGISTERED
    if _REGISTERED is not None or tracing:
        return bool(_REGISTERED)
    try:
        import torch.distributed.tensor  # noqa: F401
    except ImportError:  # a torch built without distributed
        _REGISTERED = False
        return False
    from normlab.kernels._ops import OPS

    pointwise: dict[str, Any] = {"reduced": _channel, "channel": _channel_dim}
    _rule(OPS.dyt.default, like_x=("x",), outputs=("x",), **pointwise)
    grads: tuple[str, ...] = ("x", "alpha", "weight", "bias")
    _rule(OPS.dyt_backward.default, like_x=("grad", "x"), outputs=grads, **pointwise)
    _rule(OPS.derf.default, like_x=("x",), outputs=("x",), **pointwise)
    grads = ("x", "alpha", "shift", "weight", "bias")
    _rule(OPS.derf_backward.default, like_x=("grad", "x"), outputs=grads, **pointwise)
    for name in ("rms_norm", "layer_norm"):
        _rule(getattr(OPS, name).default, like_x=("x",), outputs=("x",), reduced=_rows)
        backward = getattr(OPS, f"{name}_backward").default
        _rule(backward, like_x=("grad", "x", "grad_residual"), outputs=("x", "weight", "bias"), reduced=_rows)
        add = getattr(OPS, f"add_{name}").default
        _rule(add, like_x=("x", "residual"), outputs=("x", "x"), reduced=_rows)
    _REGISTERED = True
    return True


def replicated_params(x: Tensor, params: Sequence[Tensor | None], like_x: Sequence[Tensor] = ()) -> bool:
    """The fused op may take the DTensor ``x``: no partial placement, every parameter a DTensor
    replicated on ``x``'s mesh (a plain one would mix tensor kinds, which DTensor refuses), and
    the tensors ``like_x`` (a residual) placed as ``x`` is."""
    from torch.distributed.tensor import Replicate

    if any(p.is_partial() for p in x.placements):  # type: ignore[attr-defined]
        return False
    for t in like_x:
        if not is_dtensor(t) or t.device_mesh != x.device_mesh or t.placements != x.placements:  # type: ignore[attr-defined]
            return False
    for p in params:
        if p is None:
            continue
        if not is_dtensor(p) or p.device_mesh != x.device_mesh:  # type: ignore[attr-defined]
            return False
        if not all(isinstance(pl, Replicate) for pl in p.placements):  # type: ignore[attr-defined]
            return False
    return True


def refuse_sharded_rows(x: Tensor, normalized_ndim: int, what: str) -> None:
    """Raise if the DTensor ``x`` is sharded on one of its trailing ``normalized_ndim``
    dimensions (those ``what`` normalizes over)."""
    if not is_dtensor(x):
        return
    ndim = x.dim()
    for placement in x.placements:  # type: ignore[attr-defined]
        dim = getattr(placement, "dim", None)
        if placement.is_shard() and dim is not None and dim % ndim >= ndim - normalized_ndim:
            raise ValueError(
                f"{what}: the input DTensor of shape {tuple(x.shape)} is sharded on dim {dim} "
                f"({placement}), a dimension it normalizes over, so no rank can compute its rows "
                "alone; shard the batch or sequence dim (sequence parallel: Shard(1)) or "
                "redistribute to Replicate() before the norm"
            )


__all__ = ["is_dtensor", "refuse_sharded_rows", "register", "replicated_params"]
