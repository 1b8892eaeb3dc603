"""Pre-LN with LayerNorm Scaling (Sun et al. 2025, "The Curse of Depth in LLMs", arXiv:2502.05795)."""

from __future__ import annotations

import math

from torch import Tensor

from normlab.blocks._base import BlockConfig, register_placement
from normlab.blocks.pre import PreLNBlock
from normlab.norms._base import Device, DType


@register_placement("lns", aliases=("layernorm_scaling", "pre_lns"))
class LNSBlock(PreLNBlock):
    """Pre-LN whose two norm outputs are scaled by ``1/sqrt(l)``, ``l = layer_idx + 1``.

    ``x <- x + Attn(LN(x) / sqrt(l))``, ``x <- x + MLP(LN(x) / sqrt(l))``. The final norm is
    not scaled, the embeddings neither; no new parameter. Works with any norm. The paper pairs
    it with plain ``N(0, 0.02)`` init (``init="normal"``), not scaled init. (``norm="lns"`` in
    placement ``"pre"`` gives the same function with the scale folded into the norm's weight.)
    """

    def __init__(
        self, cfg: BlockConfig, *, layer_idx: int, device: Device = None, dtype: DType = None
    ) -> None:
        self.scale = 1.0 / math.sqrt(layer_idx + 1)
        super().__init__(cfg, layer_idx=layer_idx, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        x = x + self.attn(self.norm_attn(x) * self.scale)
        x = x + self.mlp(self.norm_mlp(x) * self.scale)
        return x

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale:.4f}"
