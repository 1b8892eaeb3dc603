"""What ``normlab bench`` times: one :class:`Case` per norm and layout, each with its roles.

A role is one implementation of the case: ``normlab`` (kernels on), ``plain`` (kernels off),
``torch``, ``paper``, and on request ``compile`` and ``liger`` (added by the timing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import normlab
from normlab.bench.references import (
    AddNorm,
    PaperDerf,
    PaperDyT,
    PaperLNS,
    PaperRMSNorm,
    Plain,
    TorchLayerNorm2d,
    Transposed,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROLES = ("normlab", "plain", "torch", "paper", "compile", "liger")
DEVICES = ("cpu", "cuda")
RECOMMENDED_MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"


@dataclass(frozen=True)
class Case:
    """One benchmarked norm on one layout. ``build(dtype)`` returns role -> module; ``make_input``
    builds the input(s) of the layer (a tuple for the residual add)."""

    norm: str
    layout: str
    shape: tuple[int, ...]
    build: Callable[[torch.dtype], dict[str, nn.Module]]
    inputs: int = 1  # tensors the forward reads (2 for the residual add)
    outputs: int = 1  # tensors the forward writes (2 for the residual add: y and h)

    @property
    def passes_fwd(self) -> int:
        return self.inputs + self.outputs

    @property
    def passes_fwdbwd(self) -> int:
        # backward: read x (or h) and dy, write one gradient per input (autograd keeps the two
        # leaves' gradients of the residual add as two tensors)
        return self.passes_fwd + 2 + self.inputs


def _roles(
    normlab_module: nn.Module, torch_module: nn.Module | None, paper: nn.Module | None
) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {"normlab": normlab_module, "plain": Plain(normlab_module)}
    if torch_module is not None:
        out["torch"] = torch_module
    if paper is not None:
        out["paper"] = paper
    return out


def default_cases(tokens: int = 8192, width: int = 768) -> list[Case]:
    """The standard shapes: transformer activations ``(B*T, C)`` and ``(N, L, C)``, and conv feature
    maps ``(N, C, H, W)`` of the same element count (``tokens * width``)."""
    c = width
    rows = (tokens, c)
    seq = min(1024, tokens)
    tok3 = (max(tokens // seq, 1), seq, c)
    hw = 32
    conv_c = max(32, (tokens * c) // (32 * hw * hw) // 32 * 32)
    conv = (max(tokens * c // (conv_c * hw * hw), 1), conv_c, hw, hw)

    def ln(dt: torch.dtype) -> nn.Module:
        return nn.LayerNorm(c)

    cases = [
        Case(
            "layernorm",
            "tokens",
            rows,
            lambda dt: _roles(normlab.LayerNorm(c), ln(dt), None),
        ),
        Case(
            "rmsnorm",
            "tokens",
            rows,
            lambda dt: _roles(normlab.RMSNorm(c), nn.RMSNorm(c, eps=1e-6), PaperRMSNorm(c)),
        ),
        Case(
            "dyt",
            "tokens",
            rows,
            lambda dt: _roles(normlab.DyT(c), ln(dt), PaperDyT(c)),
        ),
        Case(
            "derf",
            "tokens",
            rows,
            lambda dt: _roles(normlab.Derf(c), ln(dt), PaperDerf(c)),
        ),
        Case(
            "lns",
            "tokens",
            rows,
            lambda dt: _roles(normlab.LayerNormScaling(c, layer_idx=3), ln(dt), PaperLNS(c, 3)),
        ),
        Case(
            "add+layernorm",
            "tokens",
            rows,
            lambda dt: _roles(AddNorm(c, "layernorm", True), AddNorm(c, "layernorm", False), None),
            inputs=2,
            outputs=2,
        ),
        Case(
            "add+rmsnorm",
            "tokens",
            rows,
            lambda dt: _roles(AddNorm(c, "rmsnorm", True), AddNorm(c, "rmsnorm", False), None),
            inputs=2,
            outputs=2,
        ),
        Case(
            "groupnorm",
            "tokens (N,L,C)",
            tok3,
            lambda dt: _roles(
                Transposed(normlab.GroupNorm(c, num_groups=32)), Transposed(nn.GroupNorm(32, c)), None
            ),
        ),
        Case(
            "groupnorm",
            "conv (N,C,H,W)",
            conv,
            lambda dt: _roles(normlab.GroupNorm(conv[1], num_groups=32), nn.GroupNorm(32, conv[1]), None),
        ),
        Case(
            "dyt",
            "conv (N,C,H,W)",
            conv,
            lambda dt: _roles(
                normlab.DyT(conv[1], channels_first=True),
                TorchLayerNorm2d(conv[1]),
                PaperDyT(conv[1], channels_last=False),
            ),
        ),
        Case(
            "layernorm",
            "conv (N,C,H,W)",
            conv,
            lambda dt: _roles(
                normlab.LayerNorm(conv[1], channels_first=True), TorchLayerNorm2d(conv[1]), None
            ),
        ),
        Case(
            "batchnorm",
            "conv (N,C,H,W)",
            conv,
            lambda dt: _roles(normlab.BatchNorm(conv[1]), nn.BatchNorm2d(conv[1]), None),
        ),
    ]
    return cases


def liger_module(case: Case, c: int) -> nn.Module | None:
    """Liger-Kernel's layer for the case (its Triton kernels), or ``None`` where it has none or
    the package is missing or its API differs from the one this was written for (0.5-0.6)."""
    try:
        if case.norm == "rmsnorm" and case.layout == "tokens":
            from liger_kernel.transformers.rms_norm import LigerRMSNorm

            return LigerRMSNorm(c, eps=1e-6)  # type: ignore[no-any-return]
        if case.norm == "layernorm" and case.layout == "tokens":
            from liger_kernel.transformers.layer_norm import LigerLayerNorm

            return LigerLayerNorm(c)  # type: ignore[no-any-return]
        if case.norm == "dyt" and case.layout == "tokens":
            from liger_kernel.transformers.dyt import LigerDyT

            return LigerDyT(c)  # type: ignore[no-any-return]
        if case.norm == "groupnorm":
            from liger_kernel.transformers.group_norm import LigerGroupNorm

            groups = 32
            if case.layout.startswith("conv"):
                return LigerGroupNorm(case.shape[1], groups)  # type: ignore[no-any-return]
            return Transposed(LigerGroupNorm(c, groups))
    except Exception:  # not installed, or another API: the role is left out
        return None
    return None


E2E_NORMS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("layernorm", {}),
    ("rmsnorm", {}),
    ("dyt", {}),
    ("derf", {}),
    ("lns", {"norm": "layernorm", "placement": "lns"}),
)
