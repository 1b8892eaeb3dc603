"""Shared pytest set-up: deterministic seeds, and the tests directory on sys.path for `cases`."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from normlab.kernels import use_kernels

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton kernels' tests run in Triton's CPU interpreter. The switch must be set
# before anything imports triton.language (torch.compile's tests do, through Inductor): its
# built-ins (tl.sum, ...) are jit functions too, interpreted only if decorated with it set.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest -n N runs N workers on N cores: one torch thread each, or OpenMP threads oversubscribe
# the cores and spin against each other
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

settings.register_profile("normlab", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("normlab")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread_plain_torch() -> Iterator[None]:
    """One thread, and no fused kernels (their first use compiles C++ for a minute); for the
    training tests (``pytestmark = pytest.mark.usefixtures("one_thread_plain_torch")``)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with use_kernels(False):
        yield
    torch.set_num_threads(previous)


TINY_TEXT = "".join(f"LINE {i % 7}: the quick brown fox jumps over the lazy dog\n" for i in range(300))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A ``--data-dir`` holding a tiny Shakespeare (``text/shakespeare.txt``)."""
    root = tmp_path / "data"
    (root / "text").mkdir(parents=True)
    (root / "text" / "shakespeare.txt").write_text(TINY_TEXT)
    return root
