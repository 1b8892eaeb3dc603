"""Shared pytest set-up: deterministic seeds, and the tests directory on sys.path for `cases`."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile("normlab", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("normlab")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
