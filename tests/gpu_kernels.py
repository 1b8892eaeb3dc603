"""Loading normlab's Triton kernel modules for tests: on CUDA when a GPU is present, else on CPU
tensors through Triton's interpreter (``TRITON_INTERPRET=1``, which conftest.py sets before any
test module imports triton: ``triton.jit`` reads it when a kernel, or one of ``triton.language``'s
own jit built-ins, is defined)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import Tensor

ON_GPU = torch.cuda.is_available()
# Max error allowed, relative to max(1, max |reference|): the output's rounding plus fp32 sums.
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
DTYPES = list(TOL)
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def load(name: str) -> ModuleType:
    """``normlab.kernels.gpu.<name>``, or skip the test module when Triton is not installed."""
    if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py does)")
    pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    return importlib.import_module(f"normlab.kernels.gpu.{name}")


def close(out: Tensor, ref: Tensor, tol: float, what: str) -> None:
    """``max |out - ref| <= tol * max(1, max |ref|)``, ``ref`` in fp64 (an empty pair passes)."""
    assert out.shape == ref.shape, what
    err = (out.double().cpu() - ref.cpu()).abs().max().item() if ref.numel() else 0.0
    bound = tol * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def cpp_ops() -> Any:
    """``torch.ops.normlab`` with the C++ CPU kernels built (about a minute the first time, then
    cached), to compare the Triton kernels with; skips the test where they cannot be built."""
    import normlab.kernels as K

    if not K.build():
        pytest.skip(f"normlab kernels unavailable: {K.status()['reason']}")
    return torch.ops.normlab
