"""Shared pytest set-up: deterministic seeds, and the tests directory on sys.path for `cases`."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))

# pytest -n N runs N workers on N cores: one torch thread each, or OpenMP threads oversubscribe
# the cores and spin against each other
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

settings.register_profile("normlab", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("normlab")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
