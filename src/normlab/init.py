"""Deprecated: ``normlab.init`` is now :mod:`normlab.blocks.init`, beside the placements that use
it; this module goes in the next release."""

import warnings

from normlab.blocks.init import *  # noqa: F403
from normlab.blocks.init import __all__  # noqa: F401

warnings.warn(
    "normlab.init is now normlab.blocks.init; the old module goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
