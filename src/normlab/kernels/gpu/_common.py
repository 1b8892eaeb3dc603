"""Helpers shared by the Triton kernel modules: dtypes, block sizes, launch grids."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
from torch import Tensor

from normlab.kernels._ops import acc_dtype

# ``triton.jit``, typed so that mypy accepts the decorated kernels (Triton ships no type
# information; the kernels are untyped objects). An alias, not a wrapper: ``triton.jit`` reads
# ``TRITON_INTERPRET`` when each kernel is defined.
jit: Callable[[Callable[..., Any]], Any] = triton.jit

# One program holds a whole row in registers up to this many elements (fp32: 64 KiB of registers
# spread over its warps); longer rows loop over blocks of this size.
MAX_FUSED_BLOCK = 16384


def block_for(n: int, cap: int = MAX_FUSED_BLOCK) -> int:
    """The power-of-two block that covers ``n`` elements, at most ``cap`` (and at least 16)."""
    return max(16, min(int(triton.next_power_of_2(max(int(n), 1))), cap))


def warps_for(block: int) -> int:
    """Warps per program for a block of ``block`` elements: about 256 elements per warp, 1 to 16."""
    return max(1, min(16, block // 256))


def acc_empty(n: int, like: Tensor) -> Tensor:
    """An empty vector of ``n`` accumulators (fp32, fp64 for fp64 input) on ``like``'s device."""
    return torch.empty((n,), dtype=acc_dtype(like.dtype), device=like.device)


__all__ = ["MAX_FUSED_BLOCK", "acc_dtype", "acc_empty", "block_for", "jit", "warps_for"]
