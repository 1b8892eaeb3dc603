"""Build the C++ kernels at first use with ``torch.utils.cpp_extension`` and cache the library.

Nothing is compiled at ``import normlab``: the first call of a fused op builds (about a minute on
2 cores, once per machine and torch version) or loads the cached library. The cache lives in
``$NORMLAB_KERNELS_CACHE``, else ``$TORCH_EXTENSIONS_DIR/normlab``, else
``$XDG_CACHE_HOME/normlab`` (``~/.cache/normlab``), in a directory named by a hash of the sources,
the flags and the torch version, so an upgrade rebuilds instead of loading a stale library.
Concurrent builders (pytest-xdist workers) wait on cpp_extension's lock file in that directory.

No compiler, no ninja, or a failed build: one warning, then the plain-torch path everywhere.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("pointwise.cpp", "rownorm.cpp", "groupnorm.cpp", "batchnorm.cpp", "register.cpp")
HEADERS = ("common.h", "ops.h")


@dataclass
class BuildState:
    """What the first build attempt found; ``loaded`` is read (and guarded) by ``torch.compile``."""

    attempted: bool = False
    loaded: bool = False
    reason: str = "not built yet (the first fused call builds it)"
    path: str | None = None
    seconds: float | None = None
    log: str = ""


STATE = BuildState()
_LOCK = threading.Lock()


def _capability_flags() -> list[str]:
    """AVX2+FMA+F16C vector code where torch itself runs its AVX2 (or AVX-512) kernels.

    ATen's ``Vectorized`` picks its implementation from ``CPU_CAPABILITY_AVX2``; without it the
    same source compiles to the portable (slower) version, so other CPUs still get a correct build.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        return []
    if capability in ("AVX2", "AVX512"):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"]
    return []


def _flags() -> tuple[list[str], list[str]]:
    cflags = ["-O3", "-DNDEBUG", "-fno-math-errno", *_capability_flags()]
    ldflags: list[str] = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an inline OpenMP region: without -fopenmp it runs on one thread.
        # torch ships libgomp.so.1, already loaded, so the extension shares torch's thread pool.
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


def cache_root() -> Path:
    if os.environ.get("NORMLAB_KERNELS_CACHE"):
        return Path(os.environ["NORMLAB_KERNELS_CACHE"])
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "normlab"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "normlab"


def build_key() -> str:
    cflags, ldflags = _flags()
    h = hashlib.sha256()
    for name in (*HEADERS, *SOURCES):
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    h.update(" ".join([*cflags, *ldflags, torch.__version__, sys.version, platform.machine()]).encode())
    return h.hexdigest()[:16]


def _missing_tool() -> str | None:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not found)"
    if not cpp_extension.is_ninja_available():
        return "ninja not found (pip install ninja)"
    return None


def _do_build(verbose: bool) -> None:
    from torch.utils import cpp_extension

    cflags, ldflags = _flags()
    directory = cache_root() / f"cpu-{build_key()}"
    directory.mkdir(parents=True, exist_ok=True)
    # cpp_extension waits for as long as its lock file exists: a build killed mid-way (Ctrl-C,
    # a CI timeout) would hang every later process. No build takes 10 minutes: such a lock is stale.
    lock = directory / "lock"
    try:
        if time.time() - lock.stat().st_mtime > 600:
            lock.unlink()
    except FileNotFoundError:
        pass
    start = time.perf_counter()
    cpp_extension.load(
        name="normlab_kernels",
        sources=[str(CSRC / s) for s in SOURCES],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        extra_include_paths=[str(CSRC)],
        build_directory=str(directory),
        is_python_module=False,
        verbose=verbose,
    )
    STATE.seconds = time.perf_counter() - start
    STATE.path = str(directory)


def _summary(err: BaseException) -> str:
    """One short line: the first compiler ``error:`` line if there is one, else the message's first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    errors = [line for line in lines if "error:" in line]
    line = errors[0] if errors else lines[0]
    return line if len(line) <= 200 else line[:197] + "..."


def ensure_built(verbose: bool = False) -> bool:
    """Build or load the library once per process; ``True`` if the fused CPU ops are usable."""
    if STATE.attempted:
        return STATE.loaded
    with _LOCK:
        if STATE.attempted:
            return STATE.loaded
        try:
            missing = _missing_tool()
            if missing is not None:
                raise RuntimeError(missing)
            _do_build(verbose)
        except Exception as err:  # any failure: warn once, fall back to plain torch for good
            STATE.reason = f"build failed: {_summary(err)}"
            STATE.log = str(err)
            warnings.warn(
                f"normlab.kernels: the fused CPU kernels are unavailable ({STATE.reason}); normlab's layers "
                "use the plain-torch path. normlab.kernels.status()['log'] has the details; "
                "NORMLAB_KERNELS=0 skips the build.",
                RuntimeWarning,
                stacklevel=3,
            )
        else:
            STATE.loaded = True
            STATE.reason = "loaded"
        finally:
            STATE.attempted = True
    return STATE.loaded


def status() -> dict[str, Any]:
    """What the build did: ``loaded``, ``reason``, cache ``path`` and build/load ``seconds``."""
    return {
        "loaded": STATE.loaded,
        "attempted": STATE.attempted,
        "reason": STATE.reason,
        "path": STATE.path,
        "seconds": STATE.seconds,
        "log": STATE.log,
        "flags": " ".join(_flags()[0]),
    }
