"""Post-LN (Vaswani et al. 2017, arXiv:1706.03762; Xiong et al. 2020, arXiv:2002.04745)."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from normlab.blocks._base import Block, register_placement


@register_placement("post", aliases=("post_ln", "postnorm"))
class PostLNBlock(Block):
    """Post-LN: ``x <- LN(x + f(x))`` for ``f`` in (attention, MLP).

    The block output is already normalized, so the model has no final norm.
    """

    NEEDS_FINAL_NORM: ClassVar[bool] = False

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        x = self.norm_attn(x + self.attn(x))
        x = self.norm_mlp(x + self.mlp(x))
        return x
