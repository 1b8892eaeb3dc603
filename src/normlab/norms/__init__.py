"""Normalization layers. One file per norm; importing it registers it (one line per norm below)."""

from normlab.norms import (  # noqa: F401  (each import registers the norms of one file)
    batch_norm,
    derf,
    dyt,
    group_norm,
    identity,
    instance_norm,
    layer_norm,
    lns,
    rms_norm,
)
from normlab.norms._base import (
    NORMS,
    NormMixin,
    NormSpec,
    create_norm,
    get_norm_layer,
    label_modules,
    list_norms,
    register_norm,
)
from normlab.norms.batch_norm import BatchNorm
from normlab.norms.derf import Derf
from normlab.norms.dyt import DyT, dyt_alpha_init
from normlab.norms.group_norm import GroupNorm
from normlab.norms.identity import Identity
from normlab.norms.instance_norm import InstanceNorm
from normlab.norms.layer_norm import LayerNorm
from normlab.norms.lns import LayerNormScaling
from normlab.norms.rms_norm import RMSNorm

__all__ = [
    "NORMS",
    "BatchNorm",
    "Derf",
    "DyT",
    "GroupNorm",
    "Identity",
    "InstanceNorm",
    "LayerNorm",
    "LayerNormScaling",
    "NormMixin",
    "NormSpec",
    "RMSNorm",
    "create_norm",
    "dyt_alpha_init",
    "get_norm_layer",
    "label_modules",
    "list_norms",
    "register_norm",
]
