"""normlab: normalization for deep learning, in PyTorch.

Layers share one registry: ``normlab.create_norm("dyt", 512)``, ``normlab.list_norms()``.
"""

from typing import Any

from normlab import convert, diagnostics, models
from normlab.blocks import BlockConfig, build_block, list_placements
from normlab.convert import (
    apply_layernorm_scaling,
    convert_norms,
    fold_batchnorm,
    fold_dyt,
    freeze_batchnorm,
    inspect,
    remove_layernorm_scaling,
    unfreeze_batchnorm,
)
from normlab.norms import (
    BatchLayerNorm,
    BatchlessNorm,
    BatchNorm,
    CBNConv,
    CompoundBatchNorm,
    CrossBatchNorm,
    CrossIterationBatchNorm,
    Derf,
    DyT,
    EvoNormB0,
    EvoNormS0,
    FilterResponseNorm,
    GroupNorm,
    Identity,
    InstanceNorm,
    LayerNorm,
    LayerNormScaling,
    MemorizedBatchNorm,
    NormSpec,
    RMSNorm,
    VarianceNorm,
    bln_new_epoch,
    convert_sync,
    create_norm,
    double_forward_pass,
    dyt_alpha_init,
    get_norm_layer,
    init_batchless,
    label_modules,
    list_norms,
    register_norm,
    revert_sync,
    total_aux_loss,
)

__version__ = "0.1.0"

__all__ = [
    "BatchLayerNorm",
    "BatchNorm",
    "BatchlessNorm",
    "BlockConfig",
    "CBNConv",
    "CompoundBatchNorm",
    "CrossBatchNorm",
    "CrossIterationBatchNorm",
    "Derf",
    "DyT",
    "EvoNormB0",
    "EvoNormS0",
    "FilterResponseNorm",
    "GroupNorm",
    "Identity",
    "InstanceNorm",
    "LayerNorm",
    "LayerNormScaling",
    "MemorizedBatchNorm",
    "NormSpec",
    "RMSNorm",
    "VarianceNorm",
    "__version__",
    "apply_layernorm_scaling",
    "bln_new_epoch",
    "build_block",
    "convert",
    "convert_norms",
    "convert_sync",
    "create_norm",
    "diagnostics",
    "double_forward_pass",
    "dyt_alpha_init",
    "fold_batchnorm",
    "fold_dyt",
    "freeze_batchnorm",
    "get_norm_layer",
    "init_batchless",
    "inspect",
    "label_modules",
    "list_norms",
    "list_placements",
    "models",
    "register_norm",
    "remove_layernorm_scaling",
    "revert_sync",
    "total_aux_loss",
    "unfreeze_batchnorm",
]


def __getattr__(name: str) -> Any:
    # normlab.init and normlab.nn moved beside their users (blocks, norms); the old paths warn
    if name in ("init", "nn"):
        import importlib

        return importlib.import_module(f"normlab.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
