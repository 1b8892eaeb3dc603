"""DeepNorm (Wang et al. 2022, "DeepNet: Scaling Transformers to 1,000 Layers", arXiv:2203.00555)."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from normlab.blocks import init as nl_init
from normlab.blocks._base import Block, BlockConfig, register_placement
from normlab.norms._base import Device, DType


@register_placement("deepnorm", aliases=("deep_norm", "deepnet"))
class DeepNormBlock(Block):
    """DeepNorm: Post-LN with an up-weighted residual, ``x <- LN(alpha * x + f(x))``.

    ``alpha = (2N)^(1/4)`` and the init gain ``beta = (8N)^(-1/4)`` for a stack of N layers
    (:func:`normlab.blocks.init.deepnorm_alpha_beta`). ``alpha`` is a Python float, not a buffer, so
    meta-device construction cannot lose it. Init (``init_placement``), ``placement_init="paper"``:
    ``xavier_normal_(gain=beta)`` on ``fc1``, ``fc2``, ``v_proj``, ``out_proj`` and ``gain=1`` on
    ``q_proj``, ``k_proj``; ``"torchscale"``: the existing weights of those four times ``beta``.
    No final norm, as Post-LN.
    """

    NEEDS_FINAL_NORM: ClassVar[bool] = False

    def __init__(
        self, cfg: BlockConfig, *, layer_idx: int, device: Device = None, dtype: DType = None
    ) -> None:
        self.alpha, self.beta = nl_init.deepnorm_alpha_beta(cfg.n_layer, cfg.arch)
        super().__init__(cfg, layer_idx=layer_idx, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        x = self.norm_attn(self.alpha * x + self.attn(x))
        x = self.norm_mlp(self.alpha * x + self.mlp(x))
        return x

    def init_placement(self) -> None:
        scaled = nl_init.linears_named(self, ("fc1", "fc2", "v_proj", "out_proj"))
        if self.cfg.placement_init == "torchscale":
            nl_init.scale_weights_(scaled, self.beta)
        else:
            nl_init.xavier_normal_gain_(scaled, self.beta)
            nl_init.xavier_normal_gain_(nl_init.linears_named(self, ("q_proj", "k_proj")), 1.0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha:.4f}, beta={self.beta:.4f}"
