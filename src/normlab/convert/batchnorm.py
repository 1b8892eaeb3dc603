"""BatchNorm operations on existing models: a freeze that survives ``.train()``, and folding into convs.

``freeze_batchnorm`` answers pytorch/pytorch#86590 and #66073: ``requires_grad=False`` does not
stop the running statistics from moving, and ``model.train()`` undoes ``bn.eval()``. A frozen
BatchNorm here changes class to a subclass of its own class (``nn.BatchNorm2d`` ->
:class:`FrozenBatchNorm2d`) whose ``train()`` keeps it in eval mode: the object, its
parameters, buffers, hooks and ``isinstance`` checks are unchanged, and the classes are
module-level, so pickling and ``deepcopy`` keep the freeze.

``fold_batchnorm`` folds an eval-mode BatchNorm into the convolution or linear layer whose output
it directly normalizes (``torch.nn.utils.fusion.fuse_conv_bn_eval``'s formula):
``W' = W * gamma / sqrt(var + eps)`` per output channel, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.convert.detect import EXTRA_BATCHNORMS, is_batchnorm
from normlab.convert.select import Where, compile_where
from normlab.norms.batch_norm import BatchNorm
from normlab.norms.cross_bn import CrossBatchNorm
from normlab.structure import find_blocks, occurrences

__all__ = [
    "FoldSummary",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenCrossBatchNorm",
    "FrozenSyncBatchNorm",
    "fold_batchnorm",
    "freeze_batchnorm",
    "unfreeze",
    "unfreeze_batchnorm",
]


class _Frozen:
    """Mixin: the module stays in eval mode whatever ``train(mode)`` asks."""

    def train(self, mode: bool = True) -> Any:
        return super().train(False)  # type: ignore[misc]


class FrozenBatchNorm1d(_Frozen, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` frozen by :func:`freeze_batchnorm`: always in eval mode."""


class FrozenBatchNorm2d(_Frozen, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` frozen by :func:`freeze_batchnorm`: always in eval mode."""


class FrozenBatchNorm3d(_Frozen, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` frozen by :func:`freeze_batchnorm`: always in eval mode."""


class FrozenSyncBatchNorm(_Frozen, nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` frozen by :func:`freeze_batchnorm`: always in eval mode (no sync)."""


class FrozenBatchNorm(_Frozen, BatchNorm):
    """:class:`normlab.BatchNorm` frozen by :func:`freeze_batchnorm`: always in eval mode."""


class FrozenCrossBatchNorm(_Frozen, CrossBatchNorm):
    """:class:`normlab.CrossBatchNorm` frozen by :func:`freeze_batchnorm`: always in eval mode."""


_FROZEN: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: FrozenBatchNorm1d,
    nn.BatchNorm2d: FrozenBatchNorm2d,
    nn.BatchNorm3d: FrozenBatchNorm3d,
    nn.SyncBatchNorm: FrozenSyncBatchNorm,
    BatchNorm: FrozenBatchNorm,
    CrossBatchNorm: FrozenCrossBatchNorm,
}
_THAWED = {v: k for k, v in _FROZEN.items()}
EXTRA_BATCHNORMS.extend(_FROZEN.values())
# Attribute holding the requires_grad flags of (weight, bias) before the freeze.
_GRAD_ATTR = "_normlab_frozen_requires_grad"


def freeze_batchnorm(model: nn.Module, *, where: Where = None, affine: bool = True) -> list[str]:
    """Freeze every BatchNorm of ``model`` (in place): eval mode for good, and no gradient.

    Each selected ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, ``normlab.BatchNorm`` or
    ``normlab.CrossBatchNorm`` becomes its ``Frozen*`` subclass (same object, same state):
    it normalizes with its running statistics, never updates them, and stays in eval mode
    through ``model.train()``. With ``affine`` its ``weight``/``bias`` also get
    ``requires_grad=False`` (their previous flags are kept for :func:`unfreeze_batchnorm`).
    Other BatchNorm subclasses are left alone (their computation may differ); a second call
    changes nothing.

    Args:
        model: the model.
        where: which BatchNorms (a name pattern, depth range, class, callable or list, as in
            :func:`~normlab.convert.convert_norms`); ``None``: all.
        affine: also stop the gradient of ``weight`` and ``bias``.

    Returns:
        The qualified names of the modules frozen by this call.
    """
    select = compile_where(where, find_blocks(model, required=False) if where is not None else None)
    frozen = []
    for occ in occurrences(model).values():
        m = occ.module
        cls = _FROZEN.get(type(m))
        if cls is None or not any(select(n, m) for n in occ.names):
            continue
        flags = tuple(p.requires_grad if isinstance(p, Tensor) else None for p in (m.weight, m.bias))
        setattr(m, _GRAD_ATTR, flags)
        m.__class__ = cls
        m.train(False)
        if affine:
            for p in (m.weight, m.bias):
                if isinstance(p, nn.Parameter):
                    p.requires_grad_(False)
        frozen.append(occ.name)
    return frozen


def unfreeze_batchnorm(model: nn.Module, *, where: Where = None) -> list[str]:
    """Undo :func:`freeze_batchnorm`: the original classes, ``requires_grad`` flags, and the train/eval
    mode of ``model``. Returns the qualified names of the modules unfrozen."""
    select = compile_where(where, find_blocks(model, required=False) if where is not None else None)
    thawed = []
    for occ in occurrences(model).values():
        m = occ.module
        cls = _THAWED.get(type(m))
        if cls is None or not any(select(n, m) for n in occ.names):
            continue
        m.__class__ = cls
        flags = getattr(m, _GRAD_ATTR, (None, None))
        for p, flag in zip((m.weight, m.bias), flags, strict=True):
            if isinstance(p, nn.Parameter) and flag is not None:
                p.requires_grad_(flag)
        if hasattr(m, _GRAD_ATTR):
            delattr(m, _GRAD_ATTR)
        m.train(model.training)
        thawed.append(occ.name)
    return thawed


unfreeze = unfreeze_batchnorm


# --------------------------------------------------------------------------------------------
# Folding


@dataclass
class FoldSummary:
    """What a fold did: ``folded`` maps each folded norm to the layer(s) that absorbed it;
    ``refused`` maps each norm left in place to the reason."""

    folded: dict[str, tuple[str, ...]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"folded": {k: list(v) for k, v in self.folded.items()}, "refused": dict(self.refused)}

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)}, refused {len(self.refused)}"]
        lines += [f"  {k} -> {', '.join(v)}" for k, v in self.folded.items()]
        lines += [f"  {k}: not folded: {r}" for k, r in self.refused.items()]
        return "\n".join(lines)


_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class _LeafTracer(torch.fx.Tracer):
    """Traces one module's forward with every submodule kept as a single call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _traced_producer(parent: nn.Module, child_key: str) -> tuple[str | None, str]:
    """In ``parent.forward``, the child whose output alone feeds child ``child_key``.

    Returns ``(child name or None, reason)``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _LeafTracer().trace(parent)
    except Exception as e:  # any failure of symbolic tracing means "unknown dataflow"
        return (
            None,
            f"the dataflow of {type(parent).__name__}.forward could not be traced ({type(e).__name__})",
        )
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == child_key]
    if len(calls) != 1:
        return None, f"{type(parent).__name__}.forward calls it {len(calls)} times"
    node = calls[0]
    tensor_args = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, torch.fx.Node)]
    if len(tensor_args) != 1 or tensor_args[0].op != "call_module":
        return None, "its input is not the output of a layer"
    producer = tensor_args[0]
    if len(producer.users) != 1:
        return None, f"the output of {producer.target} is also used elsewhere"
    if sum(1 for n in graph.nodes if n.op == "call_module" and n.target == producer.target) != 1:
        return None, f"{producer.target} is called more than once"
    return str(producer.target), ""


def _producer(parent: nn.Module, key: str) -> tuple[str | None, str]:
    """The sibling layer whose output directly and only feeds ``parent.<key>``."""
    if type(parent) is nn.Sequential:  # a subclass may override forward
        keys = list(parent._modules)
        i = keys.index(key)
        if i == 0:
            return None, "it is the first layer of its Sequential"
        return keys[i - 1], ""
    return _traced_producer(parent, key)


def _fold_weights(layer: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """``layer``'s output channel ``c`` becomes ``scale[c] * out + shift[c]`` (computed in float64)."""
    w: nn.Parameter = layer.weight  # type: ignore[assignment]
    shape = (-1,) + (1,) * (w.dim() - 1)
    with torch.no_grad():
        w.copy_((w.double() * scale.view(shape)).to(w.dtype))
        b = layer.bias
        if not isinstance(b, Tensor):
            layer.bias = nn.Parameter(shift.to(device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)
        else:
            b.copy_((b.double() * scale + shift).to(b.dtype))


def fold_batchnorm(model: nn.Module, *, where: Where = None) -> FoldSummary:
    """Fold every eval-mode BatchNorm into the conv or linear layer that directly feeds it (in place).

    For inference. ``W' = W * s``, ``b' = (b - running_mean) * s + beta`` with
    ``s = gamma / sqrt(running_var + eps)`` per output channel (float64 arithmetic); the
    BatchNorm becomes ``nn.Identity``. Works for ``nn.Conv1d/2d/3d`` (grouped and depthwise
    too: the output channel is dimension 0 of the weight either way), with or without bias
    (one is added), and ``nn.Linear``. The feeding layer is the previous module of an
    ``nn.Sequential``, or, elsewhere, is found by tracing the parent's ``forward`` with
    ``torch.fx`` (each submodule a single call): the BatchNorm's only input must be that
    layer's output, used nowhere else. A BatchNorm without such a layer, a layer that is
    shared, called twice, a transposed convolution or a BatchNorm of a class whose
    computation is not known is left in place and listed in ``refused`` with the reason.

    Raises:
        ValueError: a selected BatchNorm in training mode or without running statistics,
            named; nothing is changed then.
    """
    select = compile_where(where, find_blocks(model, required=False) if where is not None else None)
    occ_by_id = occurrences(model)
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    report = FoldSummary()
    plan: list[tuple[Any, nn.Module, str]] = []
    bad: list[str] = []
    for occ in occ_by_id.values():
        bn = occ.module
        if not (isinstance(bn, _BatchNorm) or is_batchnorm(bn)) or not any(select(n, bn) for n in occ.names):
            continue
        if not is_batchnorm(bn):
            report.refused[occ.name] = (
                f"{type(bn).__name__} is a BatchNorm subclass whose computation normlab does not know"
            )
            continue
        if bn.training:
            bad.append(f"{type(bn).__name__} {occ.name!r} is in training mode (call model.eval() first)")
            continue
        if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
            bad.append(
                f"{type(bn).__name__} {occ.name!r} has no running statistics (track_running_stats=False)"
            )
            continue
        if len(occ.slots) != 1:
            report.refused[occ.name] = f"it is shared under {len(occ.slots)} names"
            continue
        parent, key = occ.slots[0]
        producer_key, reason = _producer(parent, key)
        if producer_key is None:
            report.refused[occ.name] = reason
            continue
        layer = parent.get_submodule(producer_key)
        prefix = occ.name.rsplit(".", 1)[0] + "." if "." in occ.name else ""
        layer_name = prefix + producer_key
        why = _unfoldable(layer, bn, occ_by_id, counts)
        if why:
            report.refused[occ.name] = why
            continue
        plan.append((occ, layer, layer_name))
    if bad:
        raise ValueError("fold_batchnorm: " + "; ".join(bad) + "; nothing was folded")
    for occ, layer, layer_name in plan:
        bn = occ.module
        weight, bias = getattr(bn, "weight", None), getattr(bn, "bias", None)
        with torch.no_grad():
            inv = torch.rsqrt(_tensor(bn, "running_var").double() + float(getattr(bn, "eps", 1e-5)))
            gamma = weight.double() if isinstance(weight, Tensor) else torch.ones_like(inv)
            beta = bias.double() if isinstance(bias, Tensor) else torch.zeros_like(inv)
            scale = gamma * inv
            shift = beta - _tensor(bn, "running_mean").double() * scale
        _fold_weights(layer, scale, shift)
        parent, key = occ.slots[0]
        parent._modules[key] = nn.Identity()
        report.folded[occ.name] = (layer_name,)
    return report


def _tensor(module: nn.Module, name: str) -> Tensor:
    t = getattr(module, name)
    assert isinstance(t, Tensor)
    return t


def _unfoldable(layer: nn.Module, bn: nn.Module, occ_by_id: dict[int, Any], counts: dict[int, int]) -> str:
    if type(layer) not in _FOLDABLE:
        if isinstance(layer, nn.modules.conv._ConvTransposeNd):
            return f"{type(layer).__name__} keeps its output channels in weight dimension 1; not folded"
        return f"it is fed by {type(layer).__name__}, not a conv or linear layer"
    out = layer.out_channels if isinstance(layer, nn.modules.conv._ConvNd) else layer.out_features
    features = int(_tensor(bn, "running_mean").shape[0])
    if out != features:
        return f"{type(layer).__name__} has {out} outputs, the BatchNorm {features} channels"
    if len(occ_by_id[id(layer)].slots) != 1:
        return "the feeding layer is shared under several names"
    if any(counts.get(id(p), 0) > 1 for p in layer.parameters()):
        return "the feeding layer's weight is tied to another layer"
    return ""
