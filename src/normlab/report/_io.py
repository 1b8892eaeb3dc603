"""Atomic file writes for the reports (the one implementation is :mod:`normlab._atomic`)."""

from normlab._atomic import atomic_write_bytes, atomic_write_text

__all__ = ["atomic_write_bytes", "atomic_write_text"]
