"""What a norm computes, as one description for any library's module: :class:`NormInfo`.

:func:`normlab.convert.read_norm` reads a module into a ``NormInfo`` (a normlab norm reads
itself: ``NormMixin.norm_info``); a normlab norm class builds itself to mirror one
(``NormMixin.convert_kwargs``) and says how the two functions relate (``conversion_relation``,
one of :data:`EXACT`, :data:`ZERO_MEAN`, :data:`EVAL`, :data:`NEW`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = [
    "EVAL",
    "EXACT",
    "NEW",
    "TOKEN_KINDS",
    "VARIANCE_KINDS",
    "ZERO_MEAN",
    "Kind",
    "NormInfo",
    "NotConvertibleError",
    "group_norm_info",
    "row_norm_relation",
    "running_stats_info",
]

Kind = Literal[
    "layernorm",
    "rmsnorm",
    "lns",
    "pointwise",
    "batchnorm",
    "groupnorm",
    "instancenorm",
    "batchless",
    "identity",
    "other",
]
# Kinds whose eps is added to a variance (or mean square): it keeps its meaning across them.
VARIANCE_KINDS: frozenset[str] = frozenset(
    {"layernorm", "rmsnorm", "lns", "batchnorm", "groupnorm", "instancenorm"}
)
# Kinds that normalize each token over its features: what LayerNorm-family targets replace.
TOKEN_KINDS: frozenset[str] = frozenset({"layernorm", "rmsnorm", "lns", "pointwise"})


# How a converted norm's function relates to its source's.
EXACT = "exact"
ZERO_MEAN = "exact on zero-mean inputs"
EVAL = "exact in eval"
NEW = "approximate: new function"


class NotConvertibleError(Exception):
    """A norm class that cannot mirror a given source norm; the message says why."""


@dataclass(frozen=True, eq=False)
class NormInfo:
    """What a norm computes, read from a module of any library.

    ``weight``/``bias`` and the statistics are the module's own tensors (Parameters or buffers),
    not copies. The weight the formula uses is :meth:`effective_weight`: ``(weight + offset)``
    (``offset = 1`` for Gemma's ``x * (1 + w)``), times ``scale`` (LNS's ``1/sqrt(l+1)``).
    ``base`` is the norm an LNS module scales (``"layernorm"`` or ``"rmsnorm"``).
    """

    kind: Kind
    module: nn.Module
    shape: tuple[int, ...]
    channels_first: bool = False
    eps: float | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None
    weight_offset: float = 0.0
    scale: float = 1.0
    eps_mode: str = "inside"
    p: float | None = None
    num_groups: int | None = None
    momentum: float | None = 0.1
    track_running_stats: bool = False
    running_mean: Tensor | None = None
    running_var: Tensor | None = None
    num_batches_tracked: Tensor | None = None
    extra: Mapping[str, Tensor] = field(default_factory=dict)
    foreign: bool = False
    base: str | None = None
    note: str = ""
    spatial_dims: int | None = None  # InstanceNorm{k}d's k: a (C, *k) input is unbatched

    @property
    def source(self) -> str:
        return type(self.module).__name__

    @property
    def num_features(self) -> int:
        return math.prod(self.shape)

    @property
    def layout(self) -> str:
        """``"channel"`` (features in dimension 1 of ``(N, C, *)``) or ``"last"``."""
        return "channel" if self.channels_first else "last"

    def module_dtype(self) -> torch.dtype:
        """The dtype of the module's first floating tensor (float32 if it has none)."""
        t = next(
            (t for t in (*self.module.parameters(), *self.module.buffers()) if t.is_floating_point()), None
        )
        return torch.float32 if t is None else t.dtype

    def weight_transform(self) -> str | None:
        """How the stored weight becomes the effective one, or ``None`` when it is used as stored."""
        expr = f"{self.weight_offset:g} + weight" if self.weight_offset else "weight"
        if self.scale != 1.0:
            expr = f"({expr}) x {self.scale:.6g}" if self.weight_offset else f"{expr} x {self.scale:.6g}"
        return None if expr == "weight" else expr

    def effective_weight(self) -> Tensor | None:
        if self.weight is None:
            return None
        w = self.weight.detach()
        if self.weight_offset:
            w = w + self.weight_offset
        return w * self.scale if self.scale != 1.0 else w

    def effective_bias(self) -> Tensor | None:
        if self.bias is None:
            return None
        b = self.bias.detach()
        return b * self.scale if self.scale != 1.0 else b


def running_stats_info(kind: Literal["batchnorm", "instancenorm"], module: nn.Module) -> NormInfo:
    """The reading of a module with torch's ``_NormBase`` fields (BatchNorm and InstanceNorm alike)."""
    m: Any = module
    return NormInfo(
        kind,
        module,
        (int(m.num_features),),
        channels_first=True,
        eps=float(m.eps),
        weight=m.weight,
        bias=m.bias,
        momentum=m.momentum,
        track_running_stats=bool(m.track_running_stats),
        running_mean=m.running_mean,
        running_var=m.running_var,
        num_batches_tracked=m.num_batches_tracked,
    )


def group_norm_info(module: nn.GroupNorm, *, foreign: bool = False) -> NormInfo:
    """The reading of a module with torch's ``nn.GroupNorm`` fields."""
    return NormInfo(
        "groupnorm",
        module,
        (module.num_channels,),
        channels_first=True,
        eps=float(module.eps),
        weight=module.weight,
        bias=module.bias,
        num_groups=module.num_groups,
        foreign=foreign,
    )


def row_norm_relation(info: NormInfo, base: str) -> str:
    """How a LayerNorm (``base="layernorm"``) or RMSNorm built from ``info`` relates to it: the
    same family is exact, the other is equal on zero-mean inputs (an LNS source counts as its
    base with the scale folded into the weight, which needs a weight unless the scale is 1)."""
    source = info.base if info.kind == "lns" else info.kind
    if source not in ("layernorm", "rmsnorm"):
        return NEW
    if info.kind == "lns" and info.weight is None and info.scale != 1.0:
        return NEW
    return EXACT if source == base else ZERO_MEAN
