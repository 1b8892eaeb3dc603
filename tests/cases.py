"""Builds example modules and inputs for any registered norm from its ``NormSpec``.

Every generic test sweeps ``normlab.list_norms()`` through these helpers, so a newly
registered norm is tested without edits here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

import normlab
from normlab.norms import NormSpec

# Feature counts: divisible by the example GroupNorm's 3 groups; 123 is odd (3 x 41).
FEATURES = (6, 123)
# Odd, prime-ish extents for the non-feature dimensions, per input rank (2-D to 5-D).
EXTENTS = {2: (), 3: (7,), 4: (5, 3), 5: (2, 3, 5)}


def spec_of(name: str) -> NormSpec:
    spec: NormSpec = normlab.get_norm_layer(name).spec
    return spec


def make_norm(name: str, num_features: int = 6, **overrides: Any) -> nn.Module:
    """An instance of norm ``name`` built with its spec's example kwargs plus ``overrides``."""
    kwargs = {**spec_of(name).example_kwargs, **overrides}
    return normlab.create_norm(name, num_features, **kwargs)


def ranks(module: nn.Module) -> list[int]:
    """Input ranks (2..5) the module accepts."""
    return [r for r in EXTENTS if r >= module.spec.min_ndim and (r >= 2)]  # type: ignore[union-attr]


def input_shape(module: nn.Module, rank: int, batch: int = 3) -> tuple[int, ...]:
    """An input shape of ``rank`` dims for ``module``, laid out as its ``channel_dim`` says."""
    c = module.num_features  # type: ignore[union-attr]
    rest = EXTENTS[rank]
    if module.channel_dim == 1:  # type: ignore[union-attr]
        return (batch, c, *rest)
    return (batch, *rest, c)


def make_input(
    module: nn.Module,
    rank: int = 3,
    batch: int = 3,
    *,
    dtype: torch.dtype = torch.float32,
    scale: float = 1.0,
    seed: int = 0,
    requires_grad: bool = False,
) -> Tensor:
    """Random input ``N(0.3, 1) * scale`` (a non-zero mean exercises centring)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(input_shape(module, rank, batch), generator=g, dtype=torch.float64) + 0.3) * scale
    return x.to(dtype).requires_grad_(requires_grad)


def randomize_params(module: nn.Module, seed: int = 1) -> nn.Module:
    """Give every floating parameter and running statistic a non-default value.

    Defaults (weight=1, bias=0) hide affine bugs; running_var stays positive.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if name in ("alpha",):
                p.copy_(p + 0.1 * noise)  # keep DyT/Derf alpha near its init (positive)
            else:
                p.copy_(p + 0.5 * noise)
        for name, b in module.named_buffers():
            if name == "running_mean":
                b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64).to(b.dtype))
            elif name == "running_var":
                b.copy_((torch.rand(b.shape, generator=g, dtype=torch.float64) + 0.5).to(b.dtype))
    return module


def all_norms() -> list[str]:
    return normlab.list_norms()
