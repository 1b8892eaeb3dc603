"""Sub-LN, the Magneto block (Wang et al. 2022, "Foundation Transformers", arXiv:2210.06423)."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from normlab.blocks import init as nl_init
from normlab.blocks._base import Block, register_placement


@register_placement("subln", aliases=("sub_ln", "magneto"))
class SubLNBlock(Block):
    """Sub-LN: Pre-LN whose sublayers hold a second norm inside.

    ``x <- x + W_O LN(Attention(W_Q LN(x), W_K LN(x), W_V LN(x)))`` and
    ``x <- x + fc2(LN(act(fc1(LN(x)))))``: the inner norms (``attn.inner_norm``,
    ``mlp.inner_norm``) sit before ``out_proj`` and on the MLP hidden, as torchscale builds them.

    Init (``init_placement``): ``gamma = sqrt(log 2N)`` (:func:`normlab.blocks.init.subln_gamma`).
    ``placement_init="paper"``: ``xavier_normal_(gain=gamma)`` on ``fc1``, ``fc2``, ``v_proj``,
    ``out_proj`` and ``gain=1`` on ``q_proj``, ``k_proj``; ``"torchscale"``: the existing
    weights of ``fc1``, ``fc2``, ``v_proj``, ``out_proj`` times ``gamma``.
    """

    SUBLAYER_NORMS: ClassVar[bool] = True

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        x = x + self.attn(self.norm_attn(x))
        x = x + self.mlp(self.norm_mlp(x))
        return x

    def init_placement(self) -> None:
        gamma = nl_init.subln_gamma(self.cfg.n_layer, self.cfg.arch)
        scaled = nl_init.linears_named(self, ("fc1", "fc2", "v_proj", "out_proj"))
        if self.cfg.placement_init == "torchscale":
            nl_init.scale_weights_(scaled, gamma)
        else:
            nl_init.xavier_normal_gain_(scaled, gamma)
            nl_init.xavier_normal_gain_(nl_init.linears_named(self, ("q_proj", "k_proj")), 1.0)
