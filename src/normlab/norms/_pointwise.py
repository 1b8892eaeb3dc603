"""Base of the statistics-free, elementwise "norms" (DyT, Derf): a squashing function plus an affine."""

from __future__ import annotations

import bisect
from typing import Any, Literal

import torch
from torch import Tensor, nn

from normlab.norms._base import Device, DType, NormMixin, affine_parameters, check_num_features, reset_affine
from normlab.norms._info import NormInfo

# Paper Table 11 (widths 1024..8192, identical for depths 8-64) and Table 10 (13B, width 5120):
# width -> (alpha0 of the attention DyT, alpha0 of the other DyTs: pre-FFN and final).
_LLM_ALPHA_TABLE: tuple[tuple[int, float, float], ...] = (
    (1024, 1.0, 1.0),
    (2048, 1.0, 0.5),
    (4096, 0.8, 0.2),
    (5120, 0.6, 0.15),
    (8192, 0.2, 0.05),
)


def dyt_alpha_init(width: int, site: Literal["attn", "other"] = "attn") -> float:
    """alpha0 for a DyT in an LLM of model width ``width`` (paper Tables 10-11).

    Width, not depth, sets alpha0. ``site="attn"`` is the DyT before attention; ``"other"`` the
    one before the FFN and the final one. Between tabulated widths the next larger width's row
    is used (wider needs smaller alpha0, so rounding up is the safe side); beyond 8192 the
    8192 row. Non-LLM models use the default 0.5.
    """
    if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
        raise ValueError(f"dyt_alpha_init: width must be a positive int, got {width!r}")
    if site not in ("attn", "other"):
        raise ValueError(f"dyt_alpha_init: site must be 'attn' or 'other', got {site!r}")
    widths = [row[0] for row in _LLM_ALPHA_TABLE]
    row = _LLM_ALPHA_TABLE[min(bisect.bisect_left(widths, width), len(widths) - 1)]
    return row[1] if site == "attn" else row[2]


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

    @classmethod
    def block_kwargs(cls, *, site: str, d_model: int) -> dict[str, Any]:
        """The DyT LLaMA recipe's per-site ``alpha_init`` (:func:`dyt_alpha_init`): the attention
        row before attention, the other row before the MLP and at the end."""
        return {"alpha_init": dyt_alpha_init(d_model, "attn" if site == "attn" else "other")}

    def norm_info(self) -> NormInfo:
        """A statistics-free norm: the affine, and its scalars (``alpha``, ...) as ``extra``."""
        extra = {n: p for n, p in self.named_parameters(recurse=False) if n not in ("weight", "bias")}
        return NormInfo(
            "pointwise",
            self,
            (self.num_features,),
            channels_first=self.channels_first,
            weight=self.weight,
            bias=self.bias,
            extra=extra,
        )

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
