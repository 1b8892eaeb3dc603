"""``diagnose(model, batch)``: every probe in one call, as one JSON-ready report with findings."""

from __future__ import annotations

import math

from torch import Tensor, nn

from normlab.diagnostics.depth import (
    Blocks,
    angular_distances,
    block_influences,
    hidden_from_captures,
    removal_sensitivity,
    residual_capture,
    residual_stats,
)
from normlab.diagnostics.findings import verdicts
from normlab.diagnostics.hooks import ModuleSelector
from normlab.diagnostics.layers import (
    Batch,
    LossFn,
    probe_pass,
)
from normlab.diagnostics.results import Diagnosis, ModelInfo, Thresholds
from normlab.diagnostics.tracking import ModelUpdateHistory
from normlab.structure import find_blocks, strip_prefixes


def diagnose(
    model: nn.Module,
    batch: Batch,
    *,
    layers: ModuleSelector | None = None,
    blocks: Blocks | None = None,
    loss_fn: LossFn | None = None,
    gradients: bool = True,
    removal: bool = True,
    max_n: int | None = None,
    train: bool | None = None,
    model_update: ModelUpdateHistory | None = None,
    thresholds: Thresholds | None = None,
    data: str = "",
    spec: str = "",
) -> Diagnosis:
    """Measure what normalization does in ``model`` on ``batch``; nothing is printed or plotted.

    One forward+gradient pass gives the per-layer statistics, the residual stream, the DyT
    relation and the non-finite check; with ``removal``, one no-grad pass per block gives the
    layer-removal sensitivity. The model (parameters, ``.grad``, buffers, modes, hooks, random
    state) is left as it was.

    Args:
        model: any ``nn.Module``.
        batch: what the model is called with (tensor, tuple or mapping of keyword inputs).
        layers: modules for per-layer statistics (default: the blocks, else conv/linear layers).
        blocks: the residual blocks, as ``(name, module)`` pairs (default: :func:`find_blocks`).
        loss_fn: ``output -> scalar`` loss (default: ``output.loss``, else a mean-square surrogate).
        gradients: measure gradient norms.
        removal: measure the loss change when each block is removed.
        max_n: rows of the angular-distance table (default: all).
        train: mode of the passes (``None``: keep the model's).
        model_update: a :class:`~normlab.diagnostics.tracking.ModelUpdateHistory` to include.
        thresholds: for the findings.
        data, spec: free text recorded in the report (what the batch is, how the model was built).
    """
    notes: list[str] = []
    stack = "given"
    if blocks is None:
        try:
            found = find_blocks(model)
        except ValueError as e:
            blocks = []
            stack = ""
            notes.append(str(e))
        else:
            blocks, stack = list(found), strip_prefixes(found.name) or "<root>"
    blocks = list(blocks)
    captures = residual_capture(model, blocks) if blocks else ()
    passed = probe_pass(
        model,
        batch,
        layers=layers if layers is not None else (blocks or None),
        loss_fn=loss_fn,
        gradients=gradients,
        train=train,
        extra_captures=captures,
    )
    notes += passed.notes
    report = Diagnosis(
        model=ModelInfo(
            model_type=type(model).__name__,
            num_params=sum(p.numel() for p in model.parameters()),
            num_blocks=len(blocks),
            block_names=[strip_prefixes(n) for n, _ in blocks],
            stack=stack,
            spec=spec,
        ),
        data=data,
        loss=passed.loss,
        loss_kind=passed.loss_kind,
        layers=passed.layers,
        dyt=passed.dyt,
        nonfinite=passed.nonfinite,
        model_update=model_update,
        notes=notes,
    )
    hidden: list[Tensor] | None = None
    if blocks:
        try:
            hidden = hidden_from_captures(*captures)
        except ValueError as e:  # blocks the model's forward does not call on this batch
            report.notes.append(
                f"{e} by the model's forward on this batch (blocks found in {stack}): residual "
                "stream, angular distance and block removal not measured"
            )
    if hidden is not None:
        report.residual = residual_stats(hidden, ["input", *report.model.block_names])
        report.angular = angular_distances(hidden, max_n=None if max_n is None else min(max_n, len(blocks)))
        report.block_influence = block_influences(hidden)
        if removal and math.isfinite(passed.loss):
            report.removal = removal_sensitivity(model, batch, blocks=blocks, loss_fn=loss_fn, train=train)
    report.findings = verdicts(report, thresholds)
    return report
