"""Loading normlab's Triton kernel modules for tests: on CUDA when a GPU is present, else on CPU
tensors through Triton's interpreter (``TRITON_INTERPRET=1``, which conftest.py sets before any
test module imports triton: ``triton.jit`` reads it when a kernel, or one of ``triton.language``'s
own jit built-ins, is defined)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def load(name: str) -> ModuleType:
    """``normlab.kernels.gpu.<name>``, or skip the test module when Triton is not installed."""
    if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py does)")
    pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    return importlib.import_module(f"normlab.kernels.gpu.{name}")
