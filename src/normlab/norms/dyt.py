"""DyT, Dynamic Tanh (Zhu, Chen, He, LeCun & Liu, CVPR 2025, arXiv:2503.10622)."""

from __future__ import annotations

import torch
from torch import Tensor

from normlab import functional as NF
from normlab.norms._base import Device, DType, NormSpec, register_norm
from normlab.norms._pointwise import PointwiseNorm, dyt_alpha_init

__all__ = ["DyT", "dyt_alpha_init"]


@register_norm("dyt", aliases=("dynamic_tanh",))
class DyT(PointwiseNorm):
    """Dynamic Tanh: ``y = weight * tanh(alpha * x) + bias`` with one learned scalar ``alpha``.

    No statistics: a drop-in replacement for LayerNorm/RMSNorm in transformers (not for
    BatchNorm in ConvNets, where the paper reports a loss). Init as the official code:
    ``alpha = alpha_init`` (shape ``(1,)``), ``weight = 1``, ``bias = 0``. The LLaMA variant has no
    bias (``bias=False``) and per-site alpha0, see :func:`dyt_alpha_init`.

    Args:
        num_features: number of features ``C``.
        alpha_init: initial ``alpha``; 0.5 for non-LLM models (paper §7).
        elementwise_affine: learn per-feature ``weight`` and ``bias``; if False, ``y = tanh(alpha * x)``.
        bias: learn ``bias`` (with ``elementwise_affine``).
        channels_first: features are dimension 1 of ``(N, C, *)`` (ConvNeXt-style feature maps).
        learnable_alpha: learn ``alpha`` (the paper). If False, ``alpha`` stays at ``alpha_init``:
            a buffer under the same ``state_dict`` key, the "fixed alpha" ablation of the paper's
            Table 8.

    Shape: ``(*, C)``, or ``(N, C, *)`` with ``channels_first`` -> same shape and dtype.
    """

    spec = NormSpec(
        paper="Zhu et al. 2025, arXiv:2503.10622", layout="last", elementwise=True, embed_scale=True
    )

    def __init__(
        self,
        num_features: int,
        *,
        alpha_init: float = 0.5,
        elementwise_affine: bool = True,
        bias: bool = True,
        channels_first: bool = False,
        learnable_alpha: bool = True,
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
        self.learnable_alpha = bool(learnable_alpha)
        self.alpha: Tensor
        if self.learnable_alpha:
            self.alpha = self.scalar(self.alpha_init, device, dtype)
        else:
            # a buffer, not a frozen Parameter: optimizers and weight decay never see it, and
            # `requires_grad_(True)` on the model cannot silently make it learnable again
            self.register_buffer("alpha", torch.full((1,), self.alpha_init, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.alpha.fill_(self.alpha_init)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return NF.dyt(x, self.alpha, self.weight, self.bias, channel_dim=self.channel_dim)

    def extra_repr(self) -> str:
        frozen = "" if self.learnable_alpha else ", learnable_alpha=False"
        return f"{self._affine_repr()}, alpha_init={self.alpha_init}{frozen}"


__all__ = ["DyT", "dyt_alpha_init"]
