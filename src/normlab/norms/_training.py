"""What a training loop calls so that every norm gets the procedures its paper prescribes.

Most norms are their forward pass. A few prescribe more, and each says so on its own class (the
hooks of :class:`~normlab.norms._base.NormMixin`), so a loop needs no list of norm classes:

* an auxiliary loss (Batchless, arXiv:2212.14729): ``loss + total_aux_loss(model)``;
* work after each optimizer step: :func:`after_step`;
* work at the end of each epoch (Batch Layer Normalization, arXiv:2209.08898, closes its epoch
  statistics): :func:`on_epoch_end`;
* a second forward of the step's inputs under the updated weights (Memorized BatchNorm with
  ``double_forward=True``, arXiv:2010.04947): :func:`wants_second_forward`, then the forwards
  inside :func:`second_forward`.

:class:`TrainingHooks` calls them in order for one loop: ``normlab.train``'s Trainer uses it for
every task, and a loop of your own can (a model without such norms makes each call a no-op).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol, cast

import torch
from torch import Tensor, nn

from normlab.norms._base import NormMixin

__all__ = [
    "TrainingHooks",
    "after_step",
    "on_epoch_end",
    "second_forward",
    "total_aux_loss",
    "wants_second_forward",
]


class _HasAuxLoss(Protocol):
    def aux_loss(self) -> Tensor: ...


def _norms(model: nn.Module) -> list[NormMixin]:
    return [m for m in model.modules() if isinstance(m, NormMixin)]


def total_aux_loss(model: nn.Module) -> Tensor:
    """The sum of ``aux_loss()`` over every norm in ``model`` that has one (``spec.aux_params``).

    ``loss = task_loss + normlab.total_aux_loss(model)``. A module shared under several names
    counts once. Without such norms (or before any training forward) it is a 0-dim zero tensor
    on the device of the model's first parameter.
    """
    total: Tensor | None = None
    for module in _norms(model):
        if module.spec.aux_params:
            loss = cast(_HasAuxLoss, module).aux_loss()
            total = loss if total is None else total + loss
    if total is not None:
        return total
    first = next(model.parameters(), None)
    return torch.zeros((), device=None if first is None else first.device)


def after_step(model: nn.Module) -> int:
    """Call every norm's :meth:`~normlab.norms._base.NormMixin.after_step`, after an optimizer
    step; returns how many norms did something."""
    return sum(1 for m in _norms(model) if m.after_step())


def on_epoch_end(model: nn.Module) -> int:
    """Call every norm's :meth:`~normlab.norms._base.NormMixin.on_epoch_end`, after the last
    step of an epoch (before evaluating); returns how many norms did something."""
    return sum(1 for m in _norms(model) if m.on_epoch_end())


def wants_second_forward(model: nn.Module) -> bool:
    """Whether a norm of ``model`` asks for a second forward of each step's inputs after the
    optimizer step (run it inside :func:`second_forward`)."""
    return any(m.wants_second_forward for m in _norms(model))


@contextlib.contextmanager
def second_forward(model: nn.Module) -> Iterator[None]:
    """Mark the forwards inside the block as the second pass of the step's inputs::

    with torch.no_grad(), second_forward(model):
        for x in step_inputs:
            model(x)
    """
    layers = [m for m in _norms(model) if m.wants_second_forward]
    for layer in layers:
        layer.set_second_forward(True)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_second_forward(False)


class TrainingHooks:
    """The norms' procedures outside the forward pass, for one model in one training loop.

    ::

        hooks = TrainingHooks(model, steps_per_epoch=len(loader))
        for step, (x, y) in enumerate(batches):
            hooks.record(x)                       # each micro-batch's inputs of the step
            loss = criterion(model(x), y) + total_aux_loss(model)
            loss.backward(); optimizer.step(); optimizer.zero_grad()
            hooks.after_step(model, step + 1)     # second forward, after_step, epoch end

    Inputs are kept only when a norm asks for a second forward (:func:`wants_second_forward`,
    read once here); the second forward runs in train mode without gradients, ``forward(model,
    inputs)`` (default ``model(inputs)``), before the norms' :func:`after_step`; after every
    ``steps_per_epoch`` steps the norms' :func:`on_epoch_end` runs.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        steps_per_epoch: int,
        forward: Callable[[nn.Module, Tensor], object] | None = None,
    ) -> None:
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(f"TrainingHooks: steps_per_epoch must be an int >= 1, got {steps_per_epoch!r}")
        self.steps_per_epoch = steps_per_epoch
        self.second_forward = wants_second_forward(model)
        self._forward = forward if forward is not None else (lambda m, x: m(x))
        self._inputs: list[Tensor] = []

    def record(self, inputs: Tensor) -> None:
        """Keep a micro-batch's inputs for the second forward (a no-op unless a norm asks for one)."""
        if self.second_forward:
            self._inputs.append(inputs.detach())

    def after_step(self, model: nn.Module, done: int) -> None:
        """After the optimizer step that completes ``done`` steps."""
        inputs, self._inputs = self._inputs, []
        if inputs:
            was_training = model.training
            model.train()
            with torch.no_grad(), second_forward(model):
                for x in inputs:
                    self._forward(model, x)
            model.train(was_training)
        after_step(model)
        if done % self.steps_per_epoch == 0:
            on_epoch_end(model)
