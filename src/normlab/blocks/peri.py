"""Peri-LN (Kim et al. 2025, arXiv:2502.02732), also CogView's Sandwich-LN (Ding et al. 2021)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from torch import Tensor, nn

from normlab.blocks._base import Block, Site, register_placement


@register_placement("peri", aliases=("sandwich", "peri_ln", "sandwich_ln"))
class PeriLNBlock(Block):
    """Peri-LN: ``x <- x + LN_out(f(LN_in(x)))`` for ``f`` in (attention, MLP).

    The norm wraps the sublayer on both sides; the residual stream itself stays
    unnormalized, so the model keeps its final norm.
    """

    NORM_SLOTS: ClassVar[Mapping[str, Site]] = {
        "norm_attn": "attn",
        "norm_attn_out": "ffn",
        "norm_mlp": "ffn",
        "norm_mlp_out": "ffn",
    }
    norm_attn_out: nn.Module
    norm_mlp_out: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        x = x + self.norm_attn_out(self.attn(self.norm_attn(x)))
        x = x + self.norm_mlp_out(self.mlp(self.norm_mlp(x)))
        return x
