"""Transformer blocks, one file per placement; importing a file registers its placement."""

from normlab.blocks import (  # noqa: F401  (each import registers one placement)
    b2t,
    deepnorm,
    lns,
    mixln,
    peri,
    post,
    pre,
    subln,
)
from normlab.blocks._base import (
    MLP,
    PLACEMENTS,
    Attention,
    Block,
    BlockConfig,
    TokenwiseNorm,
    build_block,
    get_placement,
    list_placements,
    make_block_norm,
    register_placement,
)
from normlab.blocks.init import deepnorm_alpha_beta, subln_gamma

__all__ = [
    "MLP",
    "PLACEMENTS",
    "Attention",
    "Block",
    "BlockConfig",
    "TokenwiseNorm",
    "build_block",
    "deepnorm_alpha_beta",
    "get_placement",
    "list_placements",
    "make_block_norm",
    "register_placement",
    "subln_gamma",
]
