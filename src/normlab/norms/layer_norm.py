"""LayerNorm (Ba, Kiros & Hinton 2016, arXiv:1607.06450)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from normlab import functional as NF
from normlab.norms._base import (
    Device,
    DType,
    NormMixin,
    NormSpec,
    check_eps,
    feature_shape,
    register_norm,
)
from normlab.norms._info import NormInfo, row_norm_relation


@register_norm("layernorm", aliases=("ln", "layer_norm"))
class LayerNorm(NormMixin, nn.LayerNorm):
    """LayerNorm: per-sample statistics over the feature dimensions.

    ``y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias``, with the biased variance and
    ``eps`` inside the square root; the same computation in training and eval. A subclass of
    ``torch.nn.LayerNorm``: same parameters, same state_dict keys, same fused kernel.

    Args:
        num_features: size of the last dimension, or a tuple of trailing dimensions
            (``torch``'s ``normalized_shape``).
        eps: added to the variance, > 0.
        elementwise_affine: learn ``weight`` (init 1) and, if ``bias``, ``bias`` (init 0).
        bias: learn an additive ``bias``.
        channels_first: normalize over dimension 1 of ``(N, C, *)`` input (ConvNeXt's
            ``LayerNorm2d``) instead of the last dimension.

    Shape: ``(*, C)``, or ``(N, C, *)`` with ``channels_first``; output has the input shape and dtype.
    """

    spec = NormSpec(paper="Ba et al. 2016, arXiv:1607.06450", layout="last", normalized_shape=True)

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        channels_first: bool = False,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        shape = feature_shape(type(self).__name__, num_features, channels_first)
        super().__init__(
            shape, check_eps(type(self).__name__, eps), elementwise_affine, bias, device=device, dtype=dtype
        )
        self.num_features = math.prod(shape)
        self.channels_first = channels_first

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self.channels_first:
            y = NF.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps)
            return y.movedim(-1, 1)
        return NF.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def norm_info(self) -> NormInfo:
        return NormInfo(
            "layernorm",
            self,
            tuple(self.normalized_shape),
            channels_first=self.channels_first,
            eps=float(self.eps),
            weight=self.weight,
            bias=self.bias,
        )

    @classmethod
    def conversion_relation(cls, info: NormInfo, kwargs: Mapping[str, Any]) -> str:
        return row_norm_relation(info, "layernorm")

    def extra_repr(self) -> str:
        return super().extra_repr() + (", channels_first=True" if self.channels_first else "")
