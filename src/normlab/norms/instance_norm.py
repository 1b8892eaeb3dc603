"""InstanceNorm (Ulyanov, Vedaldi & Lempitsky 2016, arXiv:1607.08022)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
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

    A rank-agnostic layer cannot tell an unbatched ``(C, H, W)`` from a batched ``(N, C, L)``:
    ``spatial_dims=k`` fixes the layout as ``torch.nn.InstanceNorm{k}d`` does (``(N, C, *k)``,
    or unbatched ``(C, *k)``, normalized as a batch of one), and any other rank is an error.
    Conversion from ``InstanceNorm1d/2d/3d`` sets it, so the converted layer computes the same.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance, > 0.
        momentum: weight of the new batch in the running statistics (``track_running_stats``).
        affine: learn per-channel ``weight`` (init 1) and, if ``bias``, ``bias`` (init 0).
        track_running_stats: keep running averages of the instance statistics for eval.
        bias: learn ``bias`` (with ``affine``).
        spatial_dims: the number of spatial dimensions, as ``InstanceNorm{1,2,3}d``; ``None``
            (default): any rank >= 3, always batched.

    Shape: ``(N, C, L, ...)`` -> same shape and dtype; with ``spatial_dims``, also ``(C, *spatial)``.
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
        spatial_dims: int | None = None,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        owner = type(self).__name__
        check_num_features(owner, num_features)
        check_momentum(owner, momentum)
        if spatial_dims is not None and (
            isinstance(spatial_dims, bool) or not isinstance(spatial_dims, int) or spatial_dims < 1
        ):
            raise ValueError(f"{owner}: spatial_dims must be an int >= 1 or None, got {spatial_dims!r}")
        self.spatial_dims = spatial_dims
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
        return replace(running_stats_info("instancenorm", self), spatial_dims=self.spatial_dims)

    def extra_repr(self) -> str:
        base: Any = super().extra_repr  # untyped in torch
        s = str(base())
        return s + (f", spatial_dims={self.spatial_dims}" if self.spatial_dims is not None else "")

    @classmethod
    def conversion_relation(cls, info: NormInfo, kwargs: Mapping[str, Any]) -> str:
        return EXACT if info.kind == "instancenorm" else NEW

    def _check_input_dim(self, input: Tensor) -> None:
        self._check_input(input)

    def forward(self, x: Tensor) -> Tensor:
        k = self.spatial_dims
        if k is not None and x.dim() != k + 2:
            if x.dim() != k + 1:
                self._fail(
                    f"expected (N, C) + {k} spatial dims, or unbatched (C) + {k} spatial dims "
                    f"(spatial_dims={k}), got shape {tuple(x.shape)}"
                )
            return self._forward_batched(x.unsqueeze(0)).squeeze(0)  # unbatched, as torch's
        return self._forward_batched(x)

    def _forward_batched(self, x: Tensor) -> Tensor:
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
