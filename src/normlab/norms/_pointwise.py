"""Base of the statistics-free, elementwise "norms" (DyT, Derf): a squashing function plus an affine."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab.norms._base import Device, DType, NormMixin, check_num_features


class PointwiseNorm(NormMixin, nn.Module):
    """``y = weight * f(x) + bias`` with learned scalars inside ``f``; subclasses define ``f``.

    Holds the per-feature ``weight``/``bias`` and the channel layout; no statistics, so the
    output is identical in training and eval and independent of the other samples.
    """

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
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        if elementwise_affine and bias:
            self.bias = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def scalar(self, value: float, device: Device, dtype: DType) -> nn.Parameter:
        """A learned scalar parameter of shape ``(1,)``, as in the official code."""
        return nn.Parameter(torch.full((1,), value, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _affine_repr(self) -> str:
        s = f"{self.num_features}"
        if not self.elementwise_affine:
            s += ", elementwise_affine=False"
        elif self.bias is None:
            s += ", bias=False"
        return s + (", channels_first=True" if self.channels_first else "")

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - subclasses implement it
        raise NotImplementedError
