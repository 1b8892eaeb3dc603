"""Measure what normalization does to any PyTorch model; measuring never prints or plots.

``diagnosis = normlab.diagnostics.diagnose(model, batch)`` gives, per layer and per block, the
probes of Beyond BatchNorm (Lubana et al. 2021, arXiv:2106.05956: ``act_var``, ``act_corr``,
stable rank, gradient norms) and of the Curse of Depth (Sun et al. 2025, arXiv:2502.05795:
residual variance, angular distance, block influence, layer-removal sensitivity), the DyT
``alpha`` against ``1/std`` of its input, the first non-finite activation, and findings
(:func:`verdicts`). ``ModelUpdateTracker`` follows DeepNet's ``||F(x; theta_t) - F(x; theta_0)||``
during training. Each probe is also a function of its own; the console table, ``summary.md`` and
the plots are drawn by ``normlab.summary``.
"""

import warnings
from typing import Any

from normlab.diagnostics import metrics
from normlab.diagnostics.depth import (
    AngularDistances,
    Removal,
    ResidualStream,
    angular_distances,
    block_influences,
    removal_sensitivity,
    removed_block,
    residual_stats,
    residual_stream,
)
from normlab.diagnostics.diagnose import diagnose
from normlab.diagnostics.findings import verdicts
from normlab.diagnostics.hooks import Capture, count_hooks, preserved_state, select_modules
from normlab.diagnostics.layers import (
    DyTRelation,
    DyTStats,
    LayerStats,
    NonFiniteReport,
    NonFiniteWatch,
    call_model,
    dyt_alpha_relation,
    find_nonfinite,
    layer_stats,
    lm_inputs,
    model_loss,
    probe_pass,
)
from normlab.diagnostics.results import Diagnosis, Finding, ModelInfo, Thresholds
from normlab.diagnostics.tracking import ModelUpdateHistory, ModelUpdateTracker, UpdatePoint
from normlab.structure import find_blocks, strip_prefixes

__all__ = [
    "AngularDistances",
    "Capture",
    "Diagnosis",
    "DyTRelation",
    "DyTStats",
    "Finding",
    "LayerStats",
    "ModelInfo",
    "ModelUpdateHistory",
    "ModelUpdateTracker",
    "NonFiniteReport",
    "NonFiniteWatch",
    "Removal",
    "ResidualStream",
    "Thresholds",
    "UpdatePoint",
    "angular_distances",
    "block_influences",
    "call_model",
    "count_hooks",
    "diagnose",
    "dyt_alpha_relation",
    "find_blocks",
    "find_nonfinite",
    "layer_stats",
    "lm_inputs",
    "metrics",
    "model_loss",
    "preserved_state",
    "probe_pass",
    "removal_sensitivity",
    "removed_block",
    "residual_stats",
    "residual_stream",
    "select_modules",
    "strip_prefixes",
    "verdicts",
]


def __getattr__(name: str) -> Any:
    if name == "DiagnosticsReport":  # the name until 0.1; "report" now names a study's report only
        warnings.warn(
            "normlab.diagnostics.DiagnosticsReport is now normlab.diagnostics.Diagnosis; "
            "the old name goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return Diagnosis
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
