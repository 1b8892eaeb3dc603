"""Triton kernels for the ``normlab::*`` operators on CUDA tensors.

The same operators as the fused CPU library (schemas in :mod:`normlab.kernels._ops`), computed by
Triton kernels: DyT and Derf (``pointwise``), RMSNorm, LayerNorm and their residual-add variants
(``rownorm``), GroupNorm (``groupnorm``) and BatchNorm's training step (``batchnorm``). Each
module's functions take the op's arguments and return its outputs (same shapes and dtypes as the
C++ CPU kernels), so :mod:`normlab.kernels._gpu` registers them as the ops' CUDA kernels.

This package imports ``triton`` at import: import it only after :func:`triton_available` says
yes. With ``TRITON_INTERPRET=1`` set before the import, Triton runs the kernels on CPU tensors
through its interpreter, which is how the test-suite checks them on machines without a GPU.
"""

from __future__ import annotations

import importlib.util
import os


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (does not import it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


__all__ = ["interpreting", "triton_available"]
