"""RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467), both eps placements and pRMSNorm."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
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
from normlab.norms._info import VARIANCE_KINDS, NormInfo, row_norm_relation


@register_norm("rmsnorm", aliases=("rms", "rms_norm"))
class RMSNorm(NormMixin, nn.RMSNorm):
    """RMSNorm: rescale by the root mean square, without centring.

    ``eps_mode="inside"`` (default; LLaMA and ``torch.nn.RMSNorm``):
    ``y = x * rsqrt(mean(x²) + eps) * weight (+ bias)``.
    ``eps_mode="outside"`` (the official ``bzhangGo/rmsnorm`` code, whose eps is 1e-8):
    ``y = x / (sqrt(mean(x²)) + eps) * weight (+ bias)``.
    A subclass of ``torch.nn.RMSNorm``: a torch checkpoint (``weight``) loads unchanged.

    Args:
        num_features: size of the last dimension, or a tuple of trailing dimensions.
        eps: > 0; ``None`` means ``torch.finfo(input.dtype).eps`` (torch's default). normlab's
            default is 1e-6, the value timm, torchtune and HF LLaMA use.
        eps_mode: ``"inside"`` or ``"outside"`` the square root, see above.
        p: partial RMSNorm (pRMSNorm): estimate the RMS from the first ``int(d * p)`` features
            only; the paper uses ``p=0.0625``. ``None`` uses all features.
        elementwise_affine: learn ``weight`` (init 1).
        bias: learn an additive ``bias`` (init 0; the official code's ``offset``). Off by default.
        channels_first: normalize over dimension 1 of ``(N, C, *)`` input.

    Shape: ``(*, C)``, or ``(N, C, *)`` with ``channels_first``; output has the input shape and dtype.
    """

    spec = NormSpec(paper="Zhang & Sennrich 2019, arXiv:1910.07467", layout="last", normalized_shape=True)

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        eps: float | None = 1e-6,
        eps_mode: Literal["inside", "outside"] = "inside",
        p: float | None = None,
        elementwise_affine: bool = True,
        bias: bool = False,
        channels_first: bool = False,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        owner = type(self).__name__
        shape = feature_shape(owner, num_features, channels_first)
        if eps is not None:
            eps = check_eps(owner, eps)
        if eps_mode not in ("inside", "outside"):
            raise ValueError(f"{owner}: eps_mode must be 'inside' or 'outside', got {eps_mode!r}")
        if p is not None and not 0.0 < p <= 1.0:
            raise ValueError(f"{owner}: p (partial fraction) must be in (0, 1], got {p!r}")
        super().__init__(shape, eps, elementwise_affine, device=device, dtype=dtype)
        self.num_features = math.prod(shape)
        self.eps_mode = eps_mode
        self.p = p
        self.channels_first = channels_first
        if elementwise_affine and bias:
            self.bias = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "bias", None) is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        h = x.movedim(1, -1) if self.channels_first else x
        y = NF.rms_norm(
            h,
            self.normalized_shape,
            self.weight,
            self.bias,
            self.eps,
            eps_inside=self.eps_mode == "inside",
            p=self.p,
        )
        return y.movedim(-1, 1) if self.channels_first else y

    def norm_info(self) -> NormInfo:
        return NormInfo(
            "rmsnorm",
            self,
            tuple(self.normalized_shape),
            channels_first=self.channels_first,
            eps=self.eps,
            weight=self.weight,
            bias=self.bias,
            eps_mode=self.eps_mode,
            p=self.p,
        )

    @classmethod
    def convert_kwargs(
        cls, info: NormInfo, *, options: Mapping[str, Any]
    ) -> tuple[int | tuple[int, ...], dict[str, Any]]:
        features, kw = cls._mirror_kwargs(info, options)
        if info.kind in VARIANCE_KINDS and info.eps is None:
            kw["eps"] = None  # torch.nn.RMSNorm's default: finfo(dtype).eps at run time
        if info.kind == "rmsnorm":
            if info.eps_mode != "inside":
                kw["eps_mode"] = info.eps_mode
            if info.p is not None:
                kw["p"] = info.p
        return features, kw

    @classmethod
    def conversion_relation(cls, info: NormInfo, kwargs: Mapping[str, Any]) -> str:
        return row_norm_relation(info, "rmsnorm")

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.eps_mode != "inside":
            s += f", eps_mode={self.eps_mode!r}"
        if self.p is not None:
            s += f", p={self.p}"
        if self.bias is not None:
            s += ", bias=True"
        if self.channels_first:
            s += ", channels_first=True"
        return s
