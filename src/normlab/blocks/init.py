"""Initialisation constants and schemes that come with the transformer placements.

The constants are the papers', with the variants of the official code (microsoft/torchscale)
as options where its code differs:

* DeepNorm (Wang et al. 2022, arXiv:2203.00555): residual weight ``alpha`` and init gain ``beta``.
* Sub-LN / Magneto (Wang et al. 2022, arXiv:2210.06423): init gain ``gamma``.
* Scaled init (GPT-2 / Megatron): output projections get ``std / sqrt(2L)``.
* Depth-scaled init (Zhang et al. 2019, arXiv:1908.11365): the Xavier-uniform bound of block
  ``l`` divided by ``sqrt(l)``.

Everything here works on tensors in place and under ``torch.no_grad``; nothing is stored, so a
model built on the meta device is initialised by calling these again after ``to_empty()``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "Arch",
    "DeepNormConstants",
    "Part",
    "Variant",
    "deepnorm_alpha_beta",
    "depth_scaled_uniform_",
    "linears_named",
    "scale_weights_",
    "scaled_init_std",
    "subln_gamma",
    "xavier_normal_gain_",
]

Arch = Literal["encoder", "decoder", "encdec"]
Part = Literal["encoder", "decoder"]
Variant = Literal["paper", "torchscale"]


class DeepNormConstants(NamedTuple):
    """DeepNorm's residual weight ``alpha`` (``LN(alpha * x + f(x))``) and init gain ``beta``."""

    alpha: float
    beta: float


def _check_layers(owner: str, name: str, n: int | None) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {n!r}")
    return n


def _encdec_sizes(
    owner: str, arch: str, num_layers: int, num_decoder_layers: int | None, part: str | None
) -> int:
    """Validate the arguments; return M, the decoder depth of an encoder-decoder."""
    _check_layers(owner, "num_layers", num_layers)
    if arch not in ("encoder", "decoder", "encdec"):
        raise ValueError(f"{owner}: arch must be 'encoder', 'decoder' or 'encdec', got {arch!r}")
    if arch != "encdec":
        if num_decoder_layers is not None or part is not None:
            raise ValueError(f"{owner}: num_decoder_layers and part are only for arch='encdec'")
        return 0
    if part not in ("encoder", "decoder"):
        raise ValueError(f"{owner}: arch='encdec' needs part='encoder' or 'decoder', got {part!r}")
    return _check_layers(owner, "num_decoder_layers", num_decoder_layers)


def deepnorm_alpha_beta(
    num_layers: int,
    arch: Arch = "decoder",
    num_decoder_layers: int | None = None,
    *,
    part: Part | None = None,
    variant: Variant = "paper",
) -> DeepNormConstants:
    """DeepNorm's ``(alpha, beta)`` for a stack, from the paper's table (arXiv:2203.00555).

    ======================  ========================  ==========================
    architecture            alpha                     beta
    ======================  ========================  ==========================
    encoder-only (N)        (2N)^(1/4)                (8N)^(-1/4)
    decoder-only (N)        (2N)^(1/4)                (8N)^(-1/4)
    enc-dec, encoder part   0.81 (N^4 M)^(1/16)       0.87 (N^4 M)^(-1/16)
    enc-dec, decoder part   (3M)^(1/4)                (12M)^(-1/4)
    ======================  ========================  ==========================

    Args:
        num_layers: N, the depth of the stack (of the encoder for ``arch="encdec"``).
        arch: ``"encoder"``, ``"decoder"`` or ``"encdec"``.
        num_decoder_layers: M, the decoder depth; only with ``arch="encdec"``.
        part: which stack of an encoder-decoder: ``"encoder"`` or ``"decoder"``.
        variant: ``"paper"``, or ``"torchscale"``, whose encoder of an encoder-decoder divides
            by ``(N^4 M)^(1/16) / 1.15``, i.e. ``beta = 1.15 (N^4 M)^(-1/16)`` against the paper's
            0.87 (1.15 ~ 1/0.87: a reciprocal mix-up in one of the two). Every other entry is the
            same in both.
    """
    owner = "deepnorm_alpha_beta"
    if variant not in ("paper", "torchscale"):
        raise ValueError(f"{owner}: variant must be 'paper' or 'torchscale', got {variant!r}")
    m = _encdec_sizes(owner, arch, num_layers, num_decoder_layers, part)
    n = num_layers
    if arch != "encdec":
        return DeepNormConstants((2 * n) ** 0.25, (8 * n) ** -0.25)
    if part == "decoder":
        return DeepNormConstants((3 * m) ** 0.25, (12 * m) ** -0.25)
    base = (n**4 * m) ** (1 / 16)
    return DeepNormConstants(0.81 * base, (1.15 if variant == "torchscale" else 0.87) / base)


def subln_gamma(
    num_layers: int,
    arch: Arch = "decoder",
    num_decoder_layers: int | None = None,
    *,
    part: Part | None = None,
) -> float:
    """Sub-LN's init gain ``gamma`` (Magneto, arXiv:2210.06423; torchscale's Encoder/Decoder).

    ``sqrt(log(2N))`` for an encoder-only or decoder-only stack of N layers; for an
    encoder-decoder with N encoder and M decoder layers, ``sqrt(log(3M) log(2N) / 3)`` for
    the encoder and ``sqrt(log(3M))`` for the decoder.
    """
    m = _encdec_sizes("subln_gamma", arch, num_layers, num_decoder_layers, part)
    n = num_layers
    if arch != "encdec":
        return math.sqrt(math.log(2 * n))
    if part == "decoder":
        return math.sqrt(math.log(3 * m))
    return math.sqrt(math.log(3 * m) * math.log(2 * n) / 3)


def scaled_init_std(std: float, num_layers: int) -> float:
    """GPT-2/Megatron scaled init of the output projections: ``std / sqrt(2 L)``."""
    _check_layers("scaled_init_std", "num_layers", num_layers)
    return std / math.sqrt(2 * num_layers)


def depth_scaled_uniform_(weight: Tensor, layer: int) -> Tensor:
    """Depth-scaled init (Zhang et al. 2019, arXiv:1908.11365), in place.

    ``U(-r, r)`` with ``r = sqrt(6 / (fan_in + fan_out)) / sqrt(layer)``, the Xavier-uniform
    bound shrunk by the 1-based ``layer`` index of the block.
    """
    _check_layers("depth_scaled_uniform_", "layer", layer)
    fan_out, fan_in = weight.shape[0], weight[0].numel()
    bound = math.sqrt(6.0 / (fan_in + fan_out)) / math.sqrt(layer)
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def linears_named(module: nn.Module, names: Iterable[str]) -> list[nn.Linear]:
    """The ``nn.Linear`` submodules whose own attribute name is one of ``names``.

    Matching the attribute name (not a substring of the path, as torchscale does) keeps a
    module called ``fc1_gate`` or a bias from being caught by accident.
    """
    wanted = set(names)
    return [
        m for n, m in module.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in wanted
    ]


def xavier_normal_gain_(linears: Iterable[nn.Linear], gain: float) -> None:
    """``xavier_normal_(weight, gain)`` and zero bias: the DeepNet/Magneto paper form."""
    with torch.no_grad():
        for lin in linears:
            nn.init.xavier_normal_(lin.weight, gain=gain)
            if lin.bias is not None:
                lin.bias.zero_()


def scale_weights_(linears: Iterable[nn.Linear], factor: float) -> None:
    """Multiply the existing weights by ``factor``, biases untouched (torchscale and B2T form)."""
    with torch.no_grad():
        for lin in linears:
            lin.weight.mul_(factor)
