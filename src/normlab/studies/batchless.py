"""The Batchless study: exact gradient accumulation at micro-batch 1, against BatchNorm.

Berger & Uc Cetina 2022, "Batchless Normalization" (arXiv:2212.14729): the per-channel mean and
std are parameters fitted by a Gaussian NLL (``normlab.BatchlessNorm``, its NLL added to the
loss by the training loop, ``aux_loss_weight=1``), so every quantity is per-instance and a
batch can be processed one instance at a time with gradient accumulation: the same gradient
(hence the same training) with the memory of one instance. BatchNorm cannot: at one sample per
micro-batch it normalizes each image by its own spatial statistics in training and by running
averages of those in evaluation.

Images (Fashion-MNIST, or the MNIST-5k fallback): a plain CNN (3 conv layers of widths 16, 32,
32, a norm after each, ReLU), Adam lr 1e-3 with a cosine decay to 0.1x, effective batch 32,
300 steps on a fixed 20,000-image subset, 2 seeds (up to 4 while a claim is inconclusive).
Batchless (its default init ``mean = 0,
std = 1``: the training loop has no data-dependent init step) and BatchNorm each train at
micro-batch 32 (one batch) and 1 (``accum_steps=32``); GroupNorm (8 groups) at batch 32 is a
per-sample reference (at micro-batch 1 it trains the same model, as the pilot showed).
``eval_batch_size`` equals the micro-batch, so that the
end-of-run probes see one micro-batch; evaluation is in eval mode, where none of these norms
depends on the batch.

Probes registered here (run once at the end of training, on the first test micro-batch):

- ``step_memory``: the peak CPU memory allocated by torch during one training forward and
  backward of that micro-batch (``loss = cross-entropy + aux NLL``, gradients from ``None``), above
  what was allocated when it started: :func:`peak_allocated_bytes`. With accumulation a step's
  peak is that of one micro-batch (later micro-batches add into the existing gradients), so this is
  the peak of a training step before the optimizer update, which is the same for every cell.
- ``accum_exactness``: on a batch of ``n >= 2``, ``max |g_batch - g_accum| / max |g_batch|`` over
  all parameters, where ``g_batch`` is the gradient of the batch loss and ``g_accum`` the sum of
  the ``n`` single-sample gradients of ``loss_i / n`` (exact for Batchless); on a batch of 1
  it logs nothing. The labels are the model's own predictions (any labels give an exact identity
  for per-sample losses).

Pilot (one seed, 200 steps, GroupNorm also at micro-batch 1): test accuracy Batchless 0.532 at
batch 32 and 0.532 at 32 x 1 (the same test loss to 4 digits: the same training), BatchNorm
0.451 at batch 32 and 0.095 at 32 x 1 (chance), GroupNorm 0.420 at both. The tiny net is far
from converged at this budget; the claims compare cells at equal steps. The pilot took 75
CPU-seconds; 300 steps keep the full study near 3 CPU-minutes. Every verdict comes from the
rules below, fixed before the full run.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from normlab.norms import total_aux_loss
from normlab.studies.framework import (
    Better,
    Claim,
    Exceeds,
    PlotSpec,
    RunSpec,
    Side,
    Similar,
    Size,
    Study,
    StudyOptions,
    grid,
    register_study,
)
from normlab.train.config import ImageTask, RunConfig, TrainConfig
from normlab.train.probes import register_probe

STEPS = 300
BATCH = 32
MIB = float(1 << 20)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null (C++ code writes there directly, not through sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_allocated_bytes(fn: Callable[[], Any]) -> tuple[int, Any]:
    """``(peak, fn())``: the peak of the bytes torch allocates on the CPU while ``fn`` runs,
    above what was allocated when it started.

    torch has no CPU ``max_memory_allocated``; this records every CPU allocation and free with
    ``torch.profiler`` (``profile_memory=True``) and takes the maximum of their running sum in
    time order. Tensors created before the call and kept are not counted; tensors that ``fn``
    returns are counted while they exist.
    """
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # the profiler's C++ start/stop lines would clutter a study's log
        prof.start()
    try:
        out = fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    results = prof.profiler.kineto_results if prof.profiler is not None else None
    if results is None:  # pragma: no cover - the profiler always records here
        raise RuntimeError("peak_allocated_bytes: the profiler recorded nothing")
    moves = [
        (e.start_ns(), i, int(e.nbytes()))  # type: ignore[attr-defined]  # missing from the stub
        for i, e in enumerate(results.events())
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    ]
    moves.sort()
    level = peak = 0
    for _, _, nbytes in moves:
        level += nbytes
        peak = max(peak, level)
    return peak, out


def _train_copy(model: nn.Module) -> nn.Module:
    """A train-mode copy with no gradients, so that a probe never changes the run's model."""
    clone = copy.deepcopy(model).train()
    for p in clone.parameters():
        p.grad = None
    return clone


def _pseudo_labels(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        logits: Tensor = model(x)
    return logits.argmax(dim=-1)


def _step_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y) + total_aux_loss(model)


@register_probe("step_memory")
def step_memory_probe(model: nn.Module, x: Tensor) -> dict[str, Any]:
    """``step_peak_mib``: peak CPU MiB of one training forward+backward on ``x`` (see the module)."""
    clone = _train_copy(model)
    y = _pseudo_labels(model, x)

    def step() -> None:
        with torch.enable_grad():
            torch.autograd.backward(_step_loss(clone, x, y))

    peak, _ = peak_allocated_bytes(step)
    return {"step_peak_mib": peak / MIB, "step_micro_batch": len(x)}


@register_probe("accum_exactness")
def accum_exactness_probe(model: nn.Module, x: Tensor) -> dict[str, Any]:
    """``accum_grad_rel_err``: ``max |g_batch - g_accum| / max |g_batch|`` on ``x`` (``n >= 2``)."""
    n = len(x)
    if n < 2:
        return {}
    y = _pseudo_labels(model, x)
    whole, accum = _train_copy(model), _train_copy(model)
    with torch.enable_grad():
        torch.autograd.backward(_step_loss(whole, x, y))
        for i in range(n):
            torch.autograd.backward(_step_loss(accum, x[i : i + 1], y[i : i + 1]) / n)
    num = den = 0.0
    for (name, p), q in zip(whole.named_parameters(), accum.parameters(), strict=True):
        if p.grad is None or q.grad is None:
            if (p.grad is None) != (q.grad is None):
                raise ValueError(f"accum_exactness: {name} has a gradient on one path only")
            continue
        num = max(num, float((p.grad.double() - q.grad.double()).abs().max()))
        den = max(den, float(p.grad.double().abs().max()))
    return {"accum_grad_rel_err": num / den if den > 0 else 0.0}


def _probe_metric(key: str) -> Callable[[list[dict[str, Any]], Mapping[str, Any]], float | None]:
    def metric(records: list[dict[str, Any]], summary: Mapping[str, Any]) -> float | None:
        v = summary.get("probe", {}).get(key)
        return float(v) if isinstance(v, (int, float)) else None

    metric.__doc__ = f"The end-of-run probe value ``{key}``."
    return metric


def _make(options: StudyOptions) -> Any:
    def make(*, seed: int, norm: str, micro: int) -> RunConfig:
        if BATCH % micro:
            raise ValueError(f"batchless study: micro must divide {BATCH}, got {micro!r}")
        steps = options.steps(STEPS)
        task = ImageTask(
            dataset=options.images,
            n_train=20000,
            n_test=2000,
            convnet={"arch": "plain", "widths": (16, 32, 32), "depth": 1, "norm": norm},
            eval_batch_size=micro,
            probes=("activations", "step_memory", "accum_exactness"),
        )
        train = TrainConfig(
            steps=steps,
            batch_size=BATCH,
            accum_steps=BATCH // micro,
            lr=1e-3,
            optimizer="adam",
            betas=(0.9, 0.999),
            schedule="cosine",
            min_lr_ratio=0.1,
            seed=seed,
            log_every=10,
            eval_every=0,
            ckpt_every=100,
        )
        return RunConfig(task=task, train=train)

    return make


def _grid(options: StudyOptions) -> list[RunSpec]:
    points = [
        {"norm": "batchless", "micro": BATCH},
        {"norm": "batchless", "micro": 1},
        {"norm": "batchnorm", "micro": BATCH},
        {"norm": "batchnorm", "micro": 1},
        {"norm": "groupnorm", "micro": BATCH},
    ]
    return grid("img", _make(options), seeds=options.seed_list, points=points)


def _side(label: str, norm: str, micro: int) -> Side:
    return Side(label=label, group="img", where={"norm": norm, "micro": micro})


PAPER = "Berger & Uc Cetina 2022 (arXiv:2212.14729)"
CLAIMS = (
    Claim(
        id="batchless-accum-same-acc",
        text=f"Batchless trained with 1 x {BATCH} accumulated micro-batches reaches the test accuracy "
        f"of Batchless at batch {BATCH}, seed for seed (within 1 point)",
        paper=f"{PAPER}, Sec. 3: every quantity is per-instance, so a mini-batch can be processed one "
        "instance at a time with gradient accumulation",
        metric="test_acc",
        a=_side("Batchless 1x32", "batchless", 1),
        b=_side("Batchless 32", "batchless", BATCH),
        # paired: the claim is that the same seed gives the same run; the spread between seeds
        # (2 points here) is not the question, and an unpaired rule could never pass it
        rule=Similar(tol=0.01, relative=False, paired=True),
    ),
    Claim(
        id="batchless-grad-exact",
        text=f"Batchless: the gradient of a batch of {BATCH} equals the sum of its single-sample "
        "gradients / n (max relative error < 1e-4)",
        paper=f"{PAPER}, Sec. 3: every quantity is per instance, so a batch can be processed one "
        "instance at a time with gradient accumulation",
        metric="accum_grad_rel_err",
        a=_side("Batchless 32", "batchless", BATCH),
        rule=Exceeds(value=1e-4, above=False),
    ),
    Claim(
        id="batchnorm-grad-not-exact",
        text=f"BatchNorm: the gradient of a batch of {BATCH} is not the sum of single-sample gradients / n "
        "(max relative error > 1e-2)",
        paper=f"{PAPER}, Sec. 1-3: with batch statistics the samples of a batch interact, which "
        "Batchless removes",
        metric="accum_grad_rel_err",
        a=_side("BatchNorm 32", "batchnorm", BATCH),
        rule=Exceeds(value=1e-2, above=True),
    ),
    Claim(
        id="batchnorm-micro1-worse",
        text=f"BatchNorm at micro-batch 1 (accumulated to {BATCH}) reaches a lower test accuracy than "
        f"BatchNorm at batch {BATCH} (by > 2 points)",
        paper=f"{PAPER}, Sec. 4: BatchNorm degrades at small batch sizes, Batchless does not",
        metric="test_acc",
        a=_side("BatchNorm 32", "batchnorm", BATCH),
        b=_side("BatchNorm 1x32", "batchnorm", 1),
        rule=Better(lower_is_better=False, min_effect=0.02),
    ),
    Claim(
        id="batchless-beats-bn-micro1",
        text="At micro-batch 1, Batchless reaches a higher test accuracy than BatchNorm (by > 1 point)",
        paper=f"{PAPER}, Sec. 4: better stability than BatchNorm at small batch sizes",
        metric="test_acc",
        a=_side("Batchless 1x32", "batchless", 1),
        b=_side("BatchNorm 1x32", "batchnorm", 1),
        rule=Better(lower_is_better=False, min_effect=0.01),
    ),
    Claim(
        id="micro1-less-memory",
        text=f"The peak memory of a Batchless training step at micro-batch 1 is lower than at batch "
        f"{BATCH}, at equal effective batch (by > 0.5 MiB)",
        paper=f"{PAPER}, Sec. 3: processing one instance at a time needs the memory of one instance",
        metric="step_peak_mib",
        a=_side("Batchless 1x32", "batchless", 1),
        b=_side("Batchless 32", "batchless", BATCH),
        rule=Better(lower_is_better=True, min_effect=0.5),
    ),
)

STUDY = register_study(
    Study(
        name="batchless",
        title="Batchless Normalization: exact gradient accumulation at micro-batch 1",
        question=(
            "Does Batchless Normalization train one image at a time (32 accumulated micro-batches "
            "of 1) exactly as at batch 32, with less memory, where BatchNorm degrades? "
            "Berger & Uc Cetina 2022 on Fashion-MNIST, 2 seeds per cell."
        ),
        grid=_grid,
        claims=CLAIMS,
        plots=(PlotSpec(kind="layers", group="img", metric="act_var", title="img: activation variance"),),
        metrics={
            "step_peak_mib": _probe_metric("step_peak_mib"),
            "accum_grad_rel_err": _probe_metric("accum_grad_rel_err"),
        },
        default_seeds=2,
        sizes={
            "small": 1.0,
            "base": Size(
                scale=4.0,
                sets=(("model.widths", [32, 64, 64]),),
                note="CNN widths 32/64/64, 4x the steps; about 1 GPU-hour, estimated, not yet run",
            ),
        },
        max_seeds=4,  # sequential seeding: a claim still inconclusive gets up to 4 seeds a cell
        budget="about 2 min on 2 cores with --jobs 2 (10-11 runs, 2 to 4 seeds a cell)",
    )
)
