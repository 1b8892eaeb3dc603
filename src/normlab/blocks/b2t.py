"""B2T connection (Takase et al. 2022, arXiv:2206.00330; Findings of ACL 2023)."""

from __future__ import annotations

import math
from typing import ClassVar

from torch import Tensor

from normlab.blocks import init as nl_init
from normlab.blocks._base import Block, register_placement


@register_placement("b2t", aliases=("b2t_connection", "bottom_to_top"))
class B2TBlock(Block):
    """Post-LN with a bottom-to-top skip: ``h = LN(x + Attn(x))``, ``x <- LN(FFN(h) + h + x)``.

    The block input ``x`` skips the first norm and joins before the last one, in every block
    (the last included), as the official fairseq code does. No final norm. With
    ``b2t_rescale=True``, the official init of May 2023: every linear weight of the block is
    multiplied by ``n_layer ** -0.5`` after the base init (biases untouched).
    """

    NEEDS_FINAL_NORM: ClassVar[bool] = False

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        h = self.norm_attn(x + self.attn(x))
        x = self.norm_mlp(self.mlp(h) + h + x)
        return x

    def init_placement(self) -> None:
        if self.cfg.b2t_rescale:
            nl_init.scale_weights_(self.linears(), 1.0 / math.sqrt(self.cfg.n_layer))
