"""Model-update norm during training (Wang et al. 2022, "DeepNet", arXiv:2203.00555).

DeepNet's analysis tracks how far the function moves from its initialisation,
``||F(x; theta_t) - F(x; theta_0)||`` on a fixed probe batch: for Post-LN it explodes early in
training, DeepNorm keeps it bounded. :class:`ModelUpdateTracker` records ``F(x; theta_0)`` once
and measures the distance whenever called (e.g. every K steps); the measuring passes run
without gradients and leave the model, its buffers and the random state as they were.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from normlab.diagnostics._jsonable import Result
from normlab.diagnostics.hooks import first_tensor, preserved_state, to_cpu_float
from normlab.diagnostics.layers import Batch, call_model

DEEPNET = "Wang et al. 2022, arXiv:2203.00555"


@dataclass
class UpdatePoint(Result):
    """One measurement: ``norm = ||F_t - F_0||_F``, ``relative = norm / ||F_0||_F``, and
    ``rms = norm / sqrt(numel)`` (per-element size of the change)."""

    step: int
    norm: float
    relative: float
    rms: float


@dataclass
class ModelUpdateHistory(Result):
    """The measurements so far."""

    points: list[UpdatePoint] = field(default_factory=list)
    output_norm0: float = math.nan
    paper: str = DEEPNET


class ModelUpdateTracker:
    """``||F(x; theta_t) - F(x; theta_0)||`` on a fixed batch.

    ``tracker = ModelUpdateTracker(model, probe_batch)`` records ``F_0``; call
    ``tracker.measure(step)`` during training; ``tracker.history`` holds the points.

    Args:
        model: the model being trained.
        batch: the fixed probe batch (see :func:`~normlab.diagnostics.layers.call_model`).
        output_fn: ``output -> tensor`` (default: the first tensor, i.e. the logits).
        train: mode of the measuring passes; default ``False`` (eval: dropout off).
    """

    def __init__(
        self,
        model: nn.Module,
        batch: Batch,
        *,
        output_fn: Callable[[Any], Tensor] | None = None,
        train: bool | None = False,
    ) -> None:
        self.model, self.batch, self.train = model, batch, train
        self.output_fn = output_fn
        self.reference = self._output()
        self.history = ModelUpdateHistory(output_norm0=float(self.reference.double().norm()))

    def _output(self) -> Tensor:
        with preserved_state(self.model, train=self.train), torch.no_grad():
            out = call_model(self.model, self.batch)
            t = self.output_fn(out) if self.output_fn is not None else first_tensor(out)
        if t is None:
            raise ValueError(
                f"ModelUpdateTracker: the output of {type(self.model).__name__} holds no tensor; "
                "pass output_fn"
            )
        return to_cpu_float(t)

    def measure(self, step: int | None = None) -> UpdatePoint:
        """Measure now; ``step`` defaults to the number of earlier measurements."""
        now = self._output()
        if now.shape != self.reference.shape:
            raise ValueError(
                f"ModelUpdateTracker: output shape changed from {tuple(self.reference.shape)} "
                f"to {tuple(now.shape)}"
            )
        norm = float((now.double() - self.reference.double()).norm())
        n0 = self.history.output_norm0
        point = UpdatePoint(
            step=len(self.history.points) if step is None else int(step),
            norm=norm,
            relative=norm / n0 if n0 > 0 else math.inf,
            rms=norm / math.sqrt(max(now.numel(), 1)),
        )
        self.history.points.append(point)
        return point
