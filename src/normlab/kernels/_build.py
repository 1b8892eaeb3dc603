"""Build the C++ kernels with ``torch.utils.cpp_extension``, cache the library, load it.

Nothing is compiled at ``import normlab``. ``make install`` builds the library ahead
(``normlab kernels build``); otherwise the first fused call builds it (about a minute on 2 cores, once
per machine, torch version and CPU flags) after one line on stderr that says so, and every later
process loads the cached library in milliseconds. The cache lives in ``$NORMLAB_KERNELS_CACHE``,
else ``$TORCH_EXTENSIONS_DIR/normlab``, else ``$XDG_CACHE_HOME/normlab`` (``~/.cache/normlab``),
in a folder ``cpu-<key>`` named by a hash of the sources, the flags, the torch and Python versions
and the machine, so an upgrade rebuilds instead of loading a stale library and a cache shared by
unlike nodes keeps one build per kind of CPU.

Processes that start together (torchrun workers, pytest-xdist) build once: the first takes an
exclusive ``flock`` on ``cpu-<key>/build.lock`` and builds, the others say they are waiting, then
load what it built. ``built.json`` is written last, so a build killed mid-way is redone, never
loaded half-written.

The vector ISA comes from the CPU (:func:`choose_isa`): AVX2+FMA+F16C code where the CPU has all
three and torch runs its own AVX2 (or AVX-512) kernels, else the compiler's portable target, so no
machine gets an op that stops on an illegal instruction. ``NORMLAB_KERNELS_ISA=default`` forces
the portable build (a cache shared by old and new CPUs).

No compiler, no ninja, or a failed build: one warning, then the plain-torch path everywhere.

Why ``pip install`` does not compile: a PEP 517 build runs in an isolated environment, where a
build dependency on torch installs a second torch (from PyPI: the multi-GB CUDA build) and compiles
against it, so the library would not match the torch the user runs unless every user passed
``--no-build-isolation``; and a library keyed to one torch version breaks on the next upgrade,
which the key of the cache folder turns into a rebuild instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("pointwise.cpp", "rownorm.cpp", "groupnorm.cpp", "batchnorm.cpp", "register.cpp")
HEADERS = ("common.h", "ops.h")
LIB_NAME = "normlab_kernels"
LIB_EXT = ".pyd" if sys.platform == "win32" else ".so"
MARKER = "built.json"  # written after a build succeeded: the library next to it is whole
ISA_ENV = "NORMLAB_KERNELS_ISA"
ISA_CHOICES = ("auto", "avx2", "default")
AVX2_FEATURES = ("avx2", "fma", "f16c")
# measured on 2 cores (five sources, compiled in parallel by ninja): 38 s idle, 80 s busy
EXPECTED_BUILD = "about a minute on 2 cores"


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to the ``sys.stderr`` of the moment (pytest's capture, a redirected stream)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _library_logger() -> logging.Logger:
    """normlab's logger: INFO lines on stderr unless the user configured ``normlab`` themselves.

    A build that blocks a process for a minute must be seen even where logging was never set up
    (``logging``'s last-resort handler shows only warnings), so the ``normlab`` logger gets its own
    stderr handler, as ``transformers`` does; ``logging.getLogger("normlab").setLevel("WARNING")``
    silences it, and a handler added to ``normlab`` before the first message replaces it.
    """
    root = logging.getLogger("normlab")
    if not root.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root.addHandler(handler)
        root.propagate = False
        if root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
    return logging.getLogger("normlab.kernels")


@dataclass
class BuildState:
    """What the first build attempt found; ``loaded`` is read (and guarded) by ``torch.compile``."""

    attempted: bool = False
    loaded: bool = False
    reason: str = "not loaded yet (the first fused call loads it, building it if the cache has none)"
    path: str | None = None
    seconds: float | None = None
    source: str | None = None  # "cache" (loaded a finished build) or "build" (compiled here)
    log: str = ""


STATE = BuildState()
_LOCK = threading.Lock()


# ------------------------------------------------------------------------------------------------
# flags


@dataclass(frozen=True)
class Isa:
    """The vector code the library is compiled for, and why that one."""

    name: str  # "avx2" or "default"
    flags: tuple[str, ...]
    why: str


_AVX2_FLAGS = ("-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2")


def choose_isa(
    machine: str, torch_capability: str | None, cpu_features: frozenset[str] | None, requested: str = "auto"
) -> Isa:
    """The ISA to compile for, from the CPU's own features (``None``: unknown, not Linux).

    ATen's ``Vectorized`` picks its AVX2 implementation from ``CPU_CAPABILITY_AVX2``; without it the
    same source compiles to the portable version, correct on any CPU. AVX2 code needs AVX2, FMA and
    F16C (the fp16 conversions); ``torch_capability`` is what torch itself dispatches to, which also
    honours ``ATEN_CPU_CAPABILITY`` and whether the OS saves the AVX registers.
    """
    if requested not in ISA_CHOICES:
        raise ValueError(f"{ISA_ENV} must be one of {', '.join(ISA_CHOICES)}, got {requested!r}")
    if requested == "default":
        return Isa("default", (), f"{ISA_ENV}=default: the compiler's portable target")
    if machine.lower() not in ("x86_64", "amd64"):
        if requested == "avx2":
            raise ValueError(f"{ISA_ENV}=avx2 needs an x86-64 CPU; this machine is {machine}")
        return Isa("default", (), f"{machine}: the compiler's default target for this machine")
    missing = [f for f in AVX2_FEATURES if cpu_features is not None and f not in cpu_features]
    if missing:
        if requested == "avx2":
            raise ValueError(f"{ISA_ENV}=avx2, but this CPU lacks {', '.join(missing)}")
        return Isa("default", (), f"the CPU lacks {', '.join(missing)}: portable x86-64 code")
    if requested == "avx2":
        return Isa("avx2", _AVX2_FLAGS, f"{ISA_ENV}=avx2")
    if torch_capability not in ("AVX2", "AVX512"):
        return Isa("default", (), f"torch runs its {torch_capability or 'unknown'} kernels: portable code")
    seen = "the CPU has avx2, fma, f16c" if cpu_features is not None else "CPU features unread"
    return Isa("avx2", _AVX2_FLAGS, f"{seen}; torch runs its {torch_capability} kernels")


def _cpu_features() -> frozenset[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux); ``None`` where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return None


def _torch_capability() -> str | None:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # pragma: no cover - very old torch
        return None


def isa() -> Isa:
    """The ISA this machine builds for (``NORMLAB_KERNELS_ISA``, else from the CPU)."""
    requested = os.environ.get(ISA_ENV, "auto").strip().lower() or "auto"
    return choose_isa(platform.machine(), _torch_capability(), _cpu_features(), requested)


def _flags(chosen: Isa | None = None) -> tuple[list[str], list[str]]:
    chosen = chosen if chosen is not None else isa()
    cflags = ["-O3", "-DNDEBUG", "-fno-math-errno", *chosen.flags]
    ldflags: list[str] = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an inline OpenMP region: without -fopenmp it runs on one thread.
        # torch ships libgomp.so.1, already loaded, so the extension shares torch's thread pool.
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


# ------------------------------------------------------------------------------------------------
# where


def cache_root() -> Path:
    if os.environ.get("NORMLAB_KERNELS_CACHE"):
        return Path(os.environ["NORMLAB_KERNELS_CACHE"])
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "normlab"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "normlab"


def build_key(chosen: Isa | None = None) -> str:
    cflags, ldflags = _flags(chosen)
    h = hashlib.sha256()
    for name in (*HEADERS, *SOURCES):
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    h.update(" ".join([*cflags, *ldflags, torch.__version__, sys.version, platform.machine()]).encode())
    return h.hexdigest()[:16]


def build_dir(chosen: Isa | None = None) -> Path:
    """The cache folder of this machine's build: ``<cache>/cpu-<key>``."""
    return cache_root() / f"cpu-{build_key(chosen)}"


def _finished(directory: Path) -> bool:
    return (directory / MARKER).is_file() and (directory / f"{LIB_NAME}{LIB_EXT}").is_file()


def cached_builds() -> list[Path]:
    """Every ``cpu-*`` build folder in the cache (this machine's and others')."""
    root = cache_root()
    return sorted(p for p in root.glob("cpu-*") if p.is_dir()) if root.is_dir() else []


def build_record(directory: Path) -> dict[str, Any] | None:
    """What ``directory``'s ``built.json`` says of its build (seconds, ISA, flags, torch, when),
    or ``None`` where there is no readable one."""
    try:
        record = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _expected_time() -> str:
    """The last finished build of this cache, else the usual figure."""
    times = []
    for directory in cached_builds():
        try:
            seconds = float((build_record(directory) or {})["seconds"])
        except (KeyError, TypeError, ValueError):
            continue
        if seconds >= 10:  # shorter: ninja found the objects of an earlier run already compiled
            times.append(seconds)
    return f"about {max(times):.0f} s, as the last build here" if times else EXPECTED_BUILD


# ------------------------------------------------------------------------------------------------
# build and load


def _missing_tool() -> str | None:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not found)"
    if not cpp_extension.is_ninja_available():
        return "ninja not found (pip install ninja)"
    return None


@contextlib.contextmanager
def _exclusive(path: Path, on_wait: Callable[[], None]) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``, calling ``on_wait`` first if another process holds it.

    The kernel drops the lock when its holder dies, so a killed build never blocks a later one.
    Without ``fcntl`` (Windows), cpp_extension's own lock file still serialises the builds.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compile(directory: Path, verbose: bool) -> None:
    """Compile and load the library into ``directory`` (cpp_extension, ninja)."""
    from torch.utils import cpp_extension

    cflags, ldflags = _flags()
    cpp_extension.load(
        name=LIB_NAME,
        sources=[str(CSRC / s) for s in SOURCES],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        extra_include_paths=[str(CSRC)],
        build_directory=str(directory),
        is_python_module=False,
        verbose=verbose,
    )


def _load(directory: Path) -> None:
    ops: Any = torch.ops  # untyped for mypy
    ops.load_library(str(directory / f"{LIB_NAME}{LIB_EXT}"))


def _write_marker(directory: Path, seconds: float) -> None:
    chosen = isa()
    record = {
        "seconds": round(seconds, 1),
        "isa": chosen.name,
        "flags": " ".join(_flags(chosen)[0]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "compiler": os.environ.get("CXX", "c++"),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = directory / f"{MARKER}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(directory / MARKER)


def _load_or_build(verbose: bool) -> None:
    """Load the finished build of this machine's key, else build it (once across processes)."""
    log = _library_logger()
    directory = build_dir()
    start = time.perf_counter()
    if _finished(directory):
        try:
            _load(directory)
        except OSError as err:  # a library that no longer loads (its torch changed in place): rebuild
            log.info("the cached kernels in %s do not load (%s): rebuilding", directory, _summary(err))
            (directory / MARKER).unlink(missing_ok=True)
        else:
            STATE.source, STATE.path, STATE.seconds = "cache", str(directory), time.perf_counter() - start
            return
    missing = _missing_tool()
    if missing is not None:
        raise RuntimeError(missing)
    directory.mkdir(parents=True, exist_ok=True)

    def waiting() -> None:
        log.info("waiting for another process that is building the fused CPU kernels in %s", directory)

    with _exclusive(directory / "build.lock", waiting):
        if _finished(directory):  # the process we waited for built it
            _load(directory)
            STATE.source, STATE.path, STATE.seconds = "cache", str(directory), time.perf_counter() - start
            return
        # Under the flock nobody else is building: a cpp_extension lock file here is left over from
        # a killed build, and cpp_extension would wait on it for ever.
        (directory / "lock").unlink(missing_ok=True)
        log.info(
            "building the fused CPU kernels (C++, %s ISA; %s, once per machine and torch version) in %s",
            isa().name,
            _expected_time(),
            directory,
        )
        start = time.perf_counter()
        _compile(directory, verbose)
        seconds = time.perf_counter() - start
        _write_marker(directory, seconds)
    log.info("built the fused CPU kernels in %.0f s", seconds)
    STATE.source, STATE.path, STATE.seconds = "build", str(directory), seconds


def _summary(err: BaseException) -> str:
    """One short line: the first compiler ``error:`` line if there is one, else the message's first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    errors = [line for line in lines if "error:" in line]
    line = errors[0] if errors else lines[0]
    return line if len(line) <= 200 else line[:197] + "..."


def ensure_built(verbose: bool = False) -> bool:
    """Load (building if needed) the library once per process; ``True`` if the fused CPU ops are usable."""
    if STATE.attempted:
        return STATE.loaded
    with _LOCK:
        if STATE.attempted:
            return STATE.loaded
        try:
            _load_or_build(verbose)
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


def load_cached() -> bool:
    """Load a finished build of this machine's key if the cache has one; never compiles."""
    if STATE.attempted:
        return STATE.loaded
    try:
        finished = _finished(build_dir())
    except ValueError:  # a bad NORMLAB_KERNELS_ISA: the build reports it
        finished = False
    return ensure_built() if finished else False


def clear() -> list[Path]:
    """Delete every build in the cache folder (only its ``cpu-*`` folders); returns what went."""
    removed = []
    for directory in cached_builds():
        shutil.rmtree(directory)
        removed.append(directory)
    return removed


def status() -> dict[str, Any]:
    """What the build did and would do: ``loaded``, ``reason``, the cache, key, ISA and flags."""
    chosen: Isa | None
    try:
        chosen = isa()
        isa_reason = chosen.why
    except ValueError as err:
        chosen, isa_reason = None, str(err)
    directory = build_dir(chosen) if chosen is not None else None
    return {
        "loaded": STATE.loaded,
        "attempted": STATE.attempted,
        "reason": STATE.reason,
        "source": STATE.source,
        "path": STATE.path,
        "seconds": STATE.seconds,
        "log": STATE.log,
        "cache": str(cache_root()),
        "key": directory.name.removeprefix("cpu-") if directory is not None else None,
        "cached": directory is not None and _finished(directory),
        "build": build_record(directory) if directory is not None else None,
        "isa": chosen.name if chosen is not None else None,
        "isa_reason": isa_reason,
        "flags": " ".join(_flags(chosen)[0]) if chosen is not None else None,
    }


def toolchain() -> dict[str, str | None]:
    """The compiler and ninja a build would use, with their versions (runs them: for ``status``)."""

    def first_line(cmd: list[str]) -> str | None:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        lines = (out.stdout or out.stderr).strip().splitlines()
        return lines[0] if lines else None

    compiler = os.environ.get("CXX", "c++")
    compiler_path = shutil.which(compiler)
    ninja = shutil.which("ninja")
    return {
        "compiler": compiler_path,
        "compiler_version": first_line([compiler_path, "--version"]) if compiler_path else None,
        "ninja": ninja,
        "ninja_version": first_line([ninja, "--version"]) if ninja else None,
    }
