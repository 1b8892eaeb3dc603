"""Base of the statistics-free, elementwise "norms" (DyT, Derf): a squashing function plus an affine."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab.norms._base import Device, DType, NormMixin, affine_parameters, check_num_features, reset_affine


class PointwiseNorm(NormMixin, nn.Module):
    """``y = weight * f(x) + bias`` with learned scalars inside ``f``; subclasses define ``f``.

    Holds the per-feature ``weight``/``bias`` and the channel layout; no statistics, so the
    output is identical in training and eval and independent of the other samples.
    """

    weight: nn.Parameter | None
    bias: nn.Parameter | None

    def __init__(
        self,
        num_features: int,
        *,
        elementwise_affine: bool,
        bias: bool,
        channels_first: bool,
        device: Device,
        dtype: DType,
    ) -> None:
        super().__init__()
        self.num_features = check_num_features(type(self).__name__, num_features)
        self.elementwise_affine = elementwise_affine
        self.channels_first = channels_first
        w, b = affine_parameters(
            num_features, weight=elementwise_affine, bias=bias, device=device, dtype=dtype
        )
        self.register_parameter("weight", w)
        self.register_parameter("bias", b)

    def scalar(self, value: float, device: Device, dtype: DType) -> nn.Parameter:
        """A learned scalar parameter of shape ``(1,)``, as in the official code."""
        return nn.Parameter(torch.full((1,), value, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        reset_affine(self.weight, self.bias)

    def _affine_repr(self) -> str:
        s = f"{self.num_features}"
        if not self.elementwise_affine:
            s += ", elementwise_affine=False"
        elif self.bias is None:
            s += ", bias=False"
        return s + (", channels_first=True" if self.channels_first else "")

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - subclasses implement it
        raise NotImplementedError
