"""InstanceNorm (Ulyanov, Vedaldi & Lempitsky 2016, arXiv:1607.08022)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.instancenorm import _InstanceNorm

from normlab import functional as NF
from normlab.norms._base import (
    Device,
    DType,
    NormMixin,
    NormSpec,
    check_eps,
    check_momentum,
    check_num_features,
    register_norm,
)
from normlab.norms._info import EXACT, NEW, NormInfo, running_stats_info


@register_norm("instancenorm", aliases=("in", "instance_norm"))
class InstanceNorm(NormMixin, _InstanceNorm):
    """InstanceNorm: per-sample, per-channel statistics over the spatial dimensions.

    ``y = (x - mean_{n,c}) / sqrt(var_{n,c} + eps) * weight_c + bias_c``; equal to
    ``GroupNorm(C, num_groups=C)``. **Unlike torch, ``affine`` defaults to True**, so that the
    GroupNorm equivalence and the other normlab norms' defaults hold; ``affine=False`` gives
    ``torch.nn.InstanceNorm*d``'s default. Works for any rank >= 3; like torch, the output is
    contiguous even for a ``channels_last`` input. An empty batch returns an empty output.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance, > 0.
        momentum: weight of the new batch in the running statistics (``track_running_stats``).
        affine: learn per-channel ``weight`` (init 1) and, if ``bias``, ``bias`` (init 0).
        track_running_stats: keep running averages of the instance statistics for eval.
        bias: learn ``bias`` (with ``affine``).

    Shape: ``(N, C, L, ...)`` -> same shape and dtype.
    """

    spec = NormSpec(paper="Ulyanov et al. 2016, arXiv:1607.08022", layout="channel", min_ndim=3)

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = False,
        bias: bool = True,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        owner = type(self).__name__
        check_num_features(owner, num_features)
        check_momentum(owner, momentum)
        super().__init__(
            num_features,
            check_eps(owner, eps),
            momentum,
            affine,
            track_running_stats,
            device=device,
            dtype=dtype,
            bias=bias,
        )

    def norm_info(self) -> NormInfo:
        return running_stats_info("instancenorm", self)

    @classmethod
    def conversion_relation(cls, info: NormInfo, kwargs: Mapping[str, Any]) -> str:
        return EXACT if info.kind == "instancenorm" else NEW

    def _check_input_dim(self, input: Tensor) -> None:
        self._check_input(input)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        use_input_stats = self.training or not self.track_running_stats
        if use_input_stats and math.prod(x.shape[2:]) == 1:
            self._fail(
                f"expected more than 1 spatial element per channel when using instance statistics, "
                f"got input of shape {tuple(x.shape)}"
            )
        if x.shape[0] == 0:  # torch's kernel fails on an empty batch; keep the graph to the params
            y = x
            if self.weight is not None:
                y = y * NF.channel_view(self.weight, x, 1)
            if self.bias is not None:
                y = y + NF.channel_view(self.bias, x, 1)
            return y
        return F.instance_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            use_input_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )
