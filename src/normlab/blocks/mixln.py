"""Mix-LN (Li, Yin, Liu 2025, arXiv:2412.13795)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor

from normlab.blocks._base import Block, BlockConfig, register_placement
from normlab.norms._base import Device, DType


@register_placement("mixln", aliases=("mix_ln",))
class MixLNBlock(Block):
    """Mix-LN: Post-LN in the first ``floor(alpha * L)`` blocks, Pre-LN in the rest.

    Post-LN blocks: ``x <- LN(x + f(x))``; Pre-LN blocks: ``x <- x + f(LN(x))``; option
    (``placement_kwargs``) ``alpha``, default 0.25 (3 of 12 blocks, 6 of 24). The model keeps its
    final norm (the official code's ``post_pre`` mode).
    """

    OPTIONS: ClassVar[Mapping[str, Any]] = {"alpha": 0.25}
    LEGACY_OPTION_FIELDS: ClassVar[Mapping[str, str]] = {"alpha": "mixln_alpha"}

    def __init__(
        self, cfg: BlockConfig, *, layer_idx: int, device: Device = None, dtype: DType = None
    ) -> None:
        self.post_ln = layer_idx < math.floor(self.resolve_options(cfg)["alpha"] * cfg.n_layer)
        super().__init__(cfg, layer_idx=layer_idx, device=device, dtype=dtype)

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        alpha = options["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"placement 'mixln': alpha must be a number in [0, 1], got {alpha!r}")

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        if self.post_ln:
            x = self.norm_attn(x + self.attn(x))
            x = self.norm_mlp(x + self.mlp(x))
        else:
            x = x + self.attn(self.norm_attn(x))
            x = x + self.mlp(self.norm_mlp(x))
        return x

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {'post' if self.post_ln else 'pre'}-LN"
