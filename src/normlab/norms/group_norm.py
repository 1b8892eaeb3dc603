"""GroupNorm (Wu & He 2018, arXiv:1803.08494)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from normlab import functional as NF
from normlab.norms._base import (
    Device,
    DType,
    NormMixin,
    NormSpec,
    check_eps,
    check_num_features,
    register_norm,
)
from normlab.norms._info import EXACT, NEW, NormInfo, group_norm_info


@register_norm("groupnorm", aliases=("gn", "group_norm"))
class GroupNorm(NormMixin, nn.GroupNorm):
    """GroupNorm: per-sample statistics over groups of ``C / num_groups`` channels and all positions.

    ``y = (x - mean_g) / sqrt(var_g + eps) * weight_c + bias_c``; the affine is per channel.
    ``num_groups=1`` is LayerNorm over ``(C, *)``; ``num_groups=C`` is InstanceNorm. Identical in
    training and eval. A subclass of ``torch.nn.GroupNorm`` with the channel count first:
    ``GroupNorm(64, num_groups=8)`` is ``torch.nn.GroupNorm(8, 64)``.

    Args:
        num_features: number of channels ``C``, divisible by ``num_groups``.
        num_groups: number of groups (the paper's default 32).
        eps: added to the variance, > 0.
        affine: learn per-channel ``weight`` (init 1) and, if ``bias``, ``bias`` (init 0).
        bias: learn ``bias`` (with ``affine``).

    Shape: ``(N, C, *)`` -> same shape and dtype.
    """

    spec = NormSpec(
        paper="Wu & He 2018, arXiv:1803.08494", layout="channel", min_ndim=2, example_kwargs={"num_groups": 3}
    )

    def __init__(
        self,
        num_features: int,
        *,
        num_groups: int = 32,
        eps: float = 1e-5,
        affine: bool = True,
        bias: bool = True,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        owner = type(self).__name__
        check_num_features(owner, num_features)
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
            raise ValueError(f"{owner}: num_groups must be a positive int, got {num_groups!r}")
        if num_features % num_groups:
            raise ValueError(
                f"{owner}: num_features ({num_features}) must be divisible by num_groups ({num_groups})"
            )
        super().__init__(
            num_groups, num_features, check_eps(owner, eps), affine, device=device, dtype=dtype, bias=bias
        )
        self.num_features = num_features

    def norm_info(self) -> NormInfo:
        return group_norm_info(self)

    @classmethod
    def conversion_relation(cls, info: NormInfo, kwargs: Mapping[str, Any]) -> str:
        same_groups = kwargs.get("num_groups", info.num_groups) == info.num_groups
        return EXACT if info.kind == "groupnorm" and same_groups else NEW

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        group_size = self.num_features // self.num_groups * math.prod(x.shape[2:])
        if group_size == 1 and x.shape[0] > 0:
            self._fail(
                f"each group holds a single value for input of shape {tuple(x.shape)} "
                f"(num_groups={self.num_groups}), so its variance is undefined; use fewer groups"
            )
        return NF.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, affine={self.affine}"
