"""The on/off switch of the fused kernels: ``NORMLAB_KERNELS=0``, :func:`set_enabled`, :func:`use_kernels`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def _env_default() -> bool:
    value = os.environ.get("NORMLAB_KERNELS", "1").strip().lower()
    return value not in ("0", "false", "no", "off")


class _Switch:
    """Process-wide state (read by ``torch.compile`` as a guarded global: flipping it recompiles)."""

    on: bool = _env_default()


def enabled() -> bool:
    """Whether normlab's layers may use the fused kernels (default: yes, unless ``NORMLAB_KERNELS=0``)."""
    return _Switch.on


def set_enabled(flag: bool) -> bool:
    """Turn the fused kernels on or off for the whole process; returns the previous setting."""
    if not isinstance(flag, bool):
        raise ValueError(f"normlab.kernels.set_enabled: flag must be a bool, got {flag!r}")
    previous = _Switch.on
    _Switch.on = flag
    return previous


@contextlib.contextmanager
def use_kernels(flag: bool = True) -> Iterator[None]:
    """Context manager: the fused kernels on (``True``) or off (``False``) inside the block.

    The setting is process-wide, not per thread: do not toggle it from several threads at once.
    """
    previous = set_enabled(flag)
    try:
        yield
    finally:
        _Switch.on = previous
