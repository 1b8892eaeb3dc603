"""Change the normalization of an existing model: convert, revert, LNS, BatchNorm freeze and folds.

``convert_norms(model, "dyt")`` replaces the norms of a torch, normlab, Hugging Face, timm or
torchvision model, keeping the weights where the maths allows, and returns a report;
``revert(model, report)`` undoes it exactly. See :func:`convert_norms` for the details.
"""

from normlab.convert.batchnorm import (
    FoldReport,
    fold_batchnorm,
    freeze_batchnorm,
    unfreeze,
    unfreeze_batchnorm,
)
from normlab.convert.checkpoint import apply_steps, load_converted
from normlab.convert.convert import ConversionReport, Replacement, Skipped, convert_norms, revert
from normlab.convert.detect import NormInfo, UnsupportedNormError, read_norm
from normlab.convert.dyt import fold_dyt
from normlab.convert.lns import apply_layernorm_scaling, pre_norm_names, remove_layernorm_scaling
from normlab.convert.select import compile_where
from normlab.norms.cross_bn import convert_sync, revert_sync
from normlab.structure import find_blocks

__all__ = [
    "ConversionReport",
    "FoldReport",
    "NormInfo",
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
    "load_converted",
    "pre_norm_names",
    "read_norm",
    "remove_layernorm_scaling",
    "revert",
    "revert_sync",
    "unfreeze",
    "unfreeze_batchnorm",
]
