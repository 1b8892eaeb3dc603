"""Pre-LN (Xiong et al. 2020, arXiv:2002.04745; GPT-2, LLaMA)."""

from __future__ import annotations

from torch import Tensor

from normlab.blocks._base import Block, register_placement


@register_placement("pre", aliases=("pre_ln", "prenorm"))
class PreLNBlock(Block):
    """Pre-LN: ``x <- x + f(LN(x))`` for ``f`` in (attention, MLP).

    The residual stream is never normalized inside the stack, so the model ends with a final
    norm before the output head (``NEEDS_FINAL_NORM``).
    """

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        x = x + self.attn(self.norm_attn(x))
        x = x + self.mlp(self.norm_mlp(x))
        return x
