"""Normalization layers. One file per norm; importing it registers it (one line per norm below)."""

from normlab.norms import (  # noqa: F401  (each import registers the norms of one file)
    batch_norm,
    batchless,
    bln,
    cbn,
    compound_bn,
    cross_bn,
    derf,
    dyt,
    evonorm,
    frn,
    group_norm,
    identity,
    instance_norm,
    layer_norm,
    lns,
    mbn,
    rms_norm,
    varnorm,
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
from normlab.norms._parametric import CenteredScaledReLU, ScaledStdConv2d, SkipInit, WNConv2d
from normlab.norms._training import (
    TrainingHooks,
    after_step,
    on_epoch_end,
    second_forward,
    total_aux_loss,
    wants_second_forward,
)
from normlab.norms.batch_norm import BatchNorm
from normlab.norms.batchless import BatchlessNorm, init_batchless
from normlab.norms.bln import BatchLayerNorm, bln_new_epoch
from normlab.norms.cbn import CBNConv, CrossIterationBatchNorm
from normlab.norms.compound_bn import CompoundBatchNorm
from normlab.norms.cross_bn import CrossBatchNorm, convert_sync, revert_sync
from normlab.norms.derf import Derf
from normlab.norms.dyt import DyT, dyt_alpha_init
from normlab.norms.evonorm import EvoNormB0, EvoNormS0
from normlab.norms.frn import FilterResponseNorm
from normlab.norms.group_norm import GroupNorm
from normlab.norms.identity import Identity
from normlab.norms.instance_norm import InstanceNorm
from normlab.norms.layer_norm import LayerNorm
from normlab.norms.lns import LayerNormScaling
from normlab.norms.mbn import MemorizedBatchNorm, double_forward_pass
from normlab.norms.rms_norm import RMSNorm
from normlab.norms.varnorm import VarianceNorm

__all__ = [
    "NORMS",
    "BatchLayerNorm",
    "BatchNorm",
    "BatchlessNorm",
    "CBNConv",
    "CenteredScaledReLU",
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
    "NormMixin",
    "NormSpec",
    "RMSNorm",
    "ScaledStdConv2d",
    "SkipInit",
    "TrainingHooks",
    "VarianceNorm",
    "WNConv2d",
    "after_step",
    "bln_new_epoch",
    "convert_sync",
    "create_norm",
    "double_forward_pass",
    "dyt_alpha_init",
    "get_norm_layer",
    "init_batchless",
    "label_modules",
    "list_norms",
    "on_epoch_end",
    "register_norm",
    "revert_sync",
    "second_forward",
    "total_aux_loss",
    "wants_second_forward",
]
