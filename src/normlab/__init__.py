"""normlab: normalization for deep learning, in PyTorch.

Layers share one registry: ``normlab.create_norm("dyt", 512)``, ``normlab.list_norms()``.
"""

from normlab.norms import (
    BatchNorm,
    Derf,
    DyT,
    GroupNorm,
    Identity,
    InstanceNorm,
    LayerNorm,
    LayerNormScaling,
    NormSpec,
    RMSNorm,
    create_norm,
    dyt_alpha_init,
    get_norm_layer,
    label_modules,
    list_norms,
    register_norm,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "Derf",
    "DyT",
    "GroupNorm",
    "Identity",
    "InstanceNorm",
    "LayerNorm",
    "LayerNormScaling",
    "NormSpec",
    "RMSNorm",
    "__version__",
    "create_norm",
    "dyt_alpha_init",
    "get_norm_layer",
    "label_modules",
    "list_norms",
    "register_norm",
]
