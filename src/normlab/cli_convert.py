"""Deprecated: ``normlab.cli_convert.load_converted`` is now :func:`normlab.convert.load_converted`
(:mod:`normlab.convert.checkpoint`); this module goes in the next release."""

import warnings

from normlab.convert.checkpoint import FORMAT, apply_steps, load_converted

warnings.warn(
    "normlab.cli_convert is now normlab.convert.checkpoint (load_converted: normlab.convert.load_converted); "
    "the old module goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["FORMAT", "apply_steps", "load_converted"]
