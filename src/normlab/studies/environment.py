"""The software and machine a study ran on, for its report."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import normlab
from normlab import kernels


def _git(*args: str) -> str | None:
    root = Path(normlab.__file__).resolve().parent
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def environment() -> dict[str, Any]:
    """Versions, CPU, thread count, load and the git commit (with a dirty flag) of normlab."""
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "normlab": normlab.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "normlab_kernels": "on" if kernels.enabled() else "off (NORMLAB_KERNELS=0)",
        "load_average": load,
        "git_commit": commit,
        "git_dirty": bool(dirty) if dirty is not None else None,
        "argv": sys.argv[1:],
    }
