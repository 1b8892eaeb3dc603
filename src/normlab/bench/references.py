"""The implementations a benchmark case times beside normlab's: the papers' code and torch's layers.

Written as the papers' repositories write them (eager PyTorch), so the ``paper`` role is what a
user of that code runs; the tests check each against normlab's layer numerically.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from normlab import functional as NF
from normlab import kernels

__all__ = [
    "AddNorm",
    "PaperDerf",
    "PaperDyT",
    "PaperLNS",
    "PaperRMSNorm",
    "Plain",
    "TorchLayerNorm2d",
    "Transposed",
]


class Plain(nn.Module):
    """A normlab layer run with the fused kernels off (forward; its backward is then plain too)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *xs: Tensor) -> Any:
        with kernels.use_kernels(False):
            return self.inner(*xs)


class Transposed(nn.Module):
    """``(N, L, C)`` tokens through a channels-first norm: ``m(x.transpose(1, 2)).transpose(1, 2)``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.transpose(1, 2)).transpose(1, 2)  # type: ignore[no-any-return]


class PaperDyT(nn.Module):
    """DyT as in the paper's repository (facebookresearch/DynamicTanh): eager ``tanh``, then the affine."""

    def __init__(self, c: int, alpha: float = 0.5, channels_last: bool = True) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.alpha = nn.Parameter(torch.full((1,), alpha))
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.alpha * x)
        if self.channels_last:
            return x * self.weight + self.bias
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class PaperDerf(nn.Module):
    """Derf as in the official code (zlab-princeton/Derf): ``erf(alpha x + shift) * w + b``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), 0.5))
        self.shift = nn.Parameter(torch.zeros(1))
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x: Tensor) -> Tensor:
        return torch.erf(self.alpha * x + self.shift) * self.weight + self.bias


class PaperRMSNorm(nn.Module):
    """RMSNorm as the official code (bzhangGo/rmsnorm): ``x / (||x|| d^-1/2 + eps) * scale``."""

    def __init__(self, c: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(c))

    def forward(self, x: Tensor) -> Tensor:
        rms = x.norm(2, dim=-1, keepdim=True) * x.shape[-1] ** -0.5
        out: Tensor = self.scale * (x / (rms + self.eps))
        return out


class PaperLNS(nn.Module):
    """LayerNorm Scaling as the Curse-of-Depth repository: ``LayerNorm(x)`` then ``* 1/sqrt(l)``."""

    def __init__(self, c: int, layer_idx: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.scale = 1.0 / math.sqrt(layer_idx + 1)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.norm(x) * self.scale
        return out


class TorchLayerNorm2d(nn.Module):
    """LayerNorm over the channels of ``(N, C, H, W)`` in torch (timm's ``LayerNorm2d``): permute,
    ``F.layer_norm``, permute back; the layer DyT replaces in ConvNeXt."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(c)

    def forward(self, x: Tensor) -> Tensor:
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # type: ignore[no-any-return]


class AddNorm(nn.Module):
    """``h = x + r; y = norm(h)``, returning ``y`` (the benchmark's loss reads ``y`` only)."""

    def __init__(self, c: int, kind: str, fused: bool) -> None:
        super().__init__()
        self.kind = kind
        self.fused = fused
        self.norm: nn.Module = nn.LayerNorm(c) if kind == "layernorm" else nn.RMSNorm(c, eps=1e-6)

    def forward(self, x: Tensor, r: Tensor) -> Tensor:
        w: Tensor | None = getattr(self.norm, "weight", None)
        b: Tensor | None = getattr(self.norm, "bias", None)
        if not self.fused:  # torch: the add, then torch's own norm
            return self.norm(x + r)  # type: ignore[no-any-return]
        if self.kind == "layernorm":
            return NF.add_layer_norm(x, r, (x.shape[-1],), w, b, 1e-5)[0]
        return NF.add_rms_norm(x, r, (x.shape[-1],), w, b, 1e-6)[0]
