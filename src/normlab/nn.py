"""Deprecated: the classes of ``normlab.nn`` are now in :mod:`normlab.norms` (``WNConv2d``,
``ScaledStdConv2d``, ``CenteredScaledReLU``, ``SkipInit``); this module goes in the next release."""

import warnings

from normlab.norms._parametric import *  # noqa: F403
from normlab.norms._parametric import __all__  # noqa: F401

warnings.warn(
    "normlab.nn is deprecated: its classes are in normlab.norms; the old module goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
