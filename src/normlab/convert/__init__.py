"""Change the normalization of an existing model: convert, revert, LNS, BatchNorm freeze and folds.

``convert_norms(model, "dyt")`` replaces the norms of a torch, normlab, Hugging Face, timm or
torchvision model, keeping the weights where the maths allows, and returns a summary;
``revert(model, summary)`` undoes it exactly. See :func:`convert_norms` for the details.
"""

import warnings
from typing import Any

from normlab.convert.batchnorm import (
    FoldSummary,
    fold_batchnorm,
    freeze_batchnorm,
    unfreeze,
    unfreeze_batchnorm,
)
from normlab.convert.checkpoint import apply_steps, load_converted
from normlab.convert.convert import ConversionSummary, Replacement, Skipped, convert_norms, revert
from normlab.convert.detect import NormInfo, UnsupportedNormError, read_norm
from normlab.convert.dyt import fold_dyt
from normlab.convert.inspection import BlockPlacement, Inspection, NormSite, inspect
from normlab.convert.lns import apply_layernorm_scaling, pre_norm_names, remove_layernorm_scaling
from normlab.convert.select import compile_where
from normlab.norms.cross_bn import convert_sync, revert_sync
from normlab.structure import find_blocks

__all__ = [
    "BlockPlacement",
    "ConversionSummary",
    "FoldSummary",
    "Inspection",
    "NormInfo",
    "NormSite",
    "Replacement",
    "Skipped",
    "UnsupportedNormError",
    "apply_layernorm_scaling",
    "apply_steps",
    "compile_where",
    "convert_norms",
    "convert_sync",
    "find_blocks",
    "fold_batchnorm",
    "fold_dyt",
    "freeze_batchnorm",
    "inspect",
    "load_converted",
    "pre_norm_names",
    "read_norm",
    "remove_layernorm_scaling",
    "revert",
    "revert_sync",
    "unfreeze",
    "unfreeze_batchnorm",
]


_RENAMED = {"ConversionReport": "ConversionSummary", "FoldReport": "FoldSummary"}


def __getattr__(name: str) -> Any:
    # the names until 0.1; "report" now names a study's report only
    if name in _RENAMED:
        warnings.warn(
            f"normlab.convert.{name} is now normlab.convert.{_RENAMED[name]}; "
            "the old name goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
