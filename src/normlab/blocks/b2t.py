"""B2T connection (Takase et al. 2022, arXiv:2206.00330; Findings of ACL 2023)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor

from normlab.blocks import init as nl_init
from normlab.blocks._base import Block, register_placement


@register_placement("b2t", aliases=("b2t_connection", "bottom_to_top"))
class B2TBlock(Block):
    """Post-LN with a bottom-to-top skip: ``h = LN(x + Attn(x))``, ``x <- LN(FFN(h) + h + x)``.

    The block input ``x`` skips the first norm and joins before the last one, in every block
    (the last included), as the official fairseq code does. No final norm.

    Option (``placement_kwargs``): ``rescale=True``, the official init of May 2023: every linear
    weight of the block is multiplied by ``n_layer ** -0.5`` after the base init (biases untouched).
    """

    NEEDS_FINAL_NORM: ClassVar[bool] = False
    OPTIONS: ClassVar[Mapping[str, Any]] = {"rescale": False}
    LEGACY_OPTION_FIELDS: ClassVar[Mapping[str, str]] = {"rescale": "b2t_rescale"}

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        h = self.norm_attn(x + self.attn(x))
        x = self.norm_mlp(self.mlp(h) + h + x)
        return x

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        if not isinstance(options["rescale"], bool):
            raise ValueError(f"placement 'b2t': rescale must be a bool, got {options['rescale']!r}")

    def init_placement(self) -> None:
        if self.options["rescale"]:
            nl_init.scale_weights_(self.linears(), 1.0 / math.sqrt(self.cfg.n_layer))
