"""Every Triton kernel compiles for an H100 (sm_90), without a GPU.

The interpreter tests (tests/test_gpu_*.py) check the kernels' arithmetic; they cannot see code
that does not lower for a GPU (for instance Python annotations on kernel parameters, which the
interpreter ignores and the compiler rejects). ``tests/gpu_aot.py`` runs the op functions with
Triton's real compiler, ptxas included, for compute capability 9.0 and no launch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from normlab.kernels.gpu import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs Triton (pip install triton)")
HERE = Path(__file__).parent


def _kernels() -> set[str]:
    """The names of the jit kernels (``*_kernel``) in normlab.kernels.gpu's sources."""
    import normlab.kernels.gpu as gpu

    names = set()
    for path in Path(gpu.__file__).parent.glob("*.py"):
        source = path.read_text()
        names |= set(re.findall(r"^@jit\n(?:#[^\n]*\n)*def (_\w+_kernel)\(", source, flags=re.M))
    return names


def test_every_kernel_compiles_to_an_sm90_cubin() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "gpu_aot.py")], capture_output=True, text=True, env=env, timeout=600
    )
    if proc.returncode == 3:
        pytest.skip(f"tests/gpu_aot.py does not know this Triton: {proc.stdout.strip()}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    compiled: dict[str, list[int]] = {}
    for line in proc.stdout.splitlines():
        name, size = line.split()
        compiled.setdefault(name, []).append(int(size))
    expected = _kernels()
    assert len(expected) >= 10, expected  # the pattern still finds the kernels
    assert set(compiled) == expected
    assert all(size > 0 for sizes in compiled.values() for size in sizes)
