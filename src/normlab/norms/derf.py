"""Derf, Dynamic erf (Chen, Lu, Zhu, Sun & Liu 2025, arXiv:2512.10938)."""

from __future__ import annotations

import torch
from torch import Tensor

from normlab import functional as NF
from normlab.norms._base import Device, DType, NormSpec, register_norm
from normlab.norms._pointwise import PointwiseNorm


@register_norm("derf", aliases=("dynamic_erf",))
class Derf(PointwiseNorm):
    """Dynamic erf: ``y = weight * erf(alpha * x + shift) + bias`` with learned scalars ``alpha``, ``shift``.

    Init as the official ``zlab-princeton/Derf`` code: ``alpha = 0.5``, ``shift = 0`` (both of
    shape ``(1,)``), ``weight = 1``, ``bias = 0``. Statistics-free, like :class:`DyT`.

    Args:
        num_features: number of features ``C``.
        alpha_init: initial ``alpha``.
        shift_init: initial ``shift``.
        elementwise_affine: learn per-feature ``weight`` and ``bias``.
        bias: learn ``bias`` (with ``elementwise_affine``).
        channels_first: features are dimension 1 of ``(N, C, *)``.

    Shape: ``(*, C)``, or ``(N, C, *)`` with ``channels_first`` -> same shape and dtype.
    """

    spec = NormSpec(
        paper="Chen et al. 2025, arXiv:2512.10938", layout="last", elementwise=True, embed_scale=True
    )

    def __init__(
        self,
        num_features: int,
        *,
        alpha_init: float = 0.5,
        shift_init: float = 0.0,
        elementwise_affine: bool = True,
        bias: bool = True,
        channels_first: bool = False,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__(
            num_features,
            elementwise_affine=elementwise_affine,
            bias=bias,
            channels_first=channels_first,
            device=device,
            dtype=dtype,
        )
        self.alpha_init = float(alpha_init)
        self.shift_init = float(shift_init)
        self.alpha = self.scalar(self.alpha_init, device, dtype)
        self.shift = self.scalar(self.shift_init, device, dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.alpha.fill_(self.alpha_init)
            self.shift.fill_(self.shift_init)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return NF.derf(x, self.alpha, self.shift, self.weight, self.bias, channel_dim=self.channel_dim)

    def extra_repr(self) -> str:
        return f"{self._affine_repr()}, alpha_init={self.alpha_init}, shift_init={self.shift_init}"
