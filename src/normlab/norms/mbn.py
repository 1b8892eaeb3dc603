"""Memorized BatchNorm, MBN (Guo, Wu, Deng, Chen & Tan, AAAI 2018, arXiv:2010.04947)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from normlab import functional as NF
from normlab.norms._base import (
    Device,
    DType,
    NormMixin,
    NormSpec,
    affine_parameters,
    check_eps,
    check_momentum,
    check_num_features,
    commit_if_finite,
    momentum_factor,
    register_norm,
    reset_affine,
)
from normlab.norms._training import second_forward

EvalStats = Literal["running", "memory"]


@register_norm("mbn", aliases=("memorized_bn", "memorized_batch_norm"))
class MemorizedBatchNorm(NormMixin, nn.Module):
    r"""Memorized BatchNorm: statistics pooled over the ``k`` most recent batches, ``(N, C, *)`` inputs.

    Training, per channel, with the current batch ``t`` and the memory of the ``k - 1`` batches
    before it (age ``j = 0`` is the current batch)::

        w_j   = eta_j / sum_{valid j'} eta_j'            (only ages already in memory count)
        mean  = sum_j w_j * mu_j
        var   = sum_j w_j * (sigma2_j + (mu_j - mean)^2)  # = sum_j w_j * E[x^2]_j - mean^2
        y     = (x - mean) / sqrt(var + eps) * weight + bias

    ``mu_j`` and ``sigma2_j`` (biased) are the per-channel moments of batch ``t - j``. The
    memory is a buffer: **gradients reach the input only through the current batch's
    ``mu_0, sigma2_0``**; the stored moments of earlier batches are constants (their graphs are
    gone). After the step the current moments enter the memory and the oldest leave it.
    ``memory_size=1`` is exactly BatchNorm (outputs, gradients and running statistics).

    Sources and what is verified. No official code is known, and searches of the stored
    public code found none either, only bibliography entries. Only the **abstract** of
    arXiv:2010.04947 could be read (arxiv-vanity / paperswithcode copies); the method
    section could not. Verified from the abstract: statistics from "multiple recent batches",
    "consistent behaviors in both training and inference", and the Double-Forward scheme
    against the "distribution shift before and after the [SGD] update for the considered
    batch". Everything else is a reconstruction from the abstract, with these choices:

    * **Pooled moments.** The variance is that of the weighted union of the batches
      (``sum w E[x^2] - mean^2``), not the mean of the per-batch variances: with
      equal batches and equal weights it is exactly BatchNorm over the concatenated batches.
      It is computed as ``sum w (sigma2 + (mu - mean)^2)``, the same number without the
      cancellation of ``E[x^2] - mean^2``.
    * **Weights** ``eta``: the paper's values could not be read; the default is uniform
      (``eta_j = 1/k``), and ``memory_weights`` (newest first) sets any other. While the
      memory is filling, the weights are renormalized over the batches present.
    * **Default** ``memory_size=4``: the paper's value could not be read; 4 is the window of
      Cross-Iteration BN's official configs (``buffer_num=3`` in
      Howal/Cross-iterationBatchNorm), so the two cross-batch methods compare at equal windows.
    * **Inference** (``eval_stats``): ``"running"`` (default) uses BatchNorm's running
      statistics, as torch users expect; ``"memory"`` is the paper's consistent rule: the
      pooled statistics of the last ``k`` recorded batches, i.e. exactly those the last
      training step used (eval of that batch right after the step reproduces the training
      output). An empty memory falls back to the running statistics.
    * **Running statistics** follow normlab/PyTorch BatchNorm: ``running = (1 - momentum) *
      running + momentum * batch`` (``momentum`` weighs the *new* batch; ``None`` = cumulative
      average), from the **current batch only**, with its unbiased variance. They are kept
      whatever ``eval_stats`` is, so a model can switch inference rule.
    * **Double forward** (``double_forward=True``), as read from the abstract: the first
      forward of a batch normalizes with ``memory + current batch`` but records nothing; after
      the optimizer step, a second forward of the same batch inside
      :func:`double_forward_pass` recomputes its moments with the updated weights, normalizes
      with the memory including them, and records them (memory, running statistics,
      counters). So the memory never holds moments computed with stale weights for the newest
      batch. Without ``double_forward``, every training forward records its batch; with it, a
      model that never runs the second pass records nothing (memory and running statistics
      keep their initial values).
    * A batch whose moments are not finite (NaN/inf input) records nothing: memory, running
      statistics and counters stay as they were; ``skipped_updates`` (not saved) counts it.
      Its output is returned as computed, NaN included.
    * No ``track_running_stats`` option: for inference without running statistics use
      ``eval_stats="memory"``.

    Each choice is pinned by a test in ``tests/test_mbn_compoundbn.py``. Not a subclass of
    torch's ``_BatchNorm`` on purpose: tools that convert or fold every ``_BatchNorm``
    (``SyncBatchNorm.convert_sync_batchnorm``, conv-BN fusion) would silently drop the memory.
    The buffer names ``running_mean``, ``running_var`` and ``num_batches_tracked`` are
    BatchNorm's.

    Args:
        num_features: number of channels ``C``.
        memory_size: ``k``, the number of batches pooled, current one included (>= 1).
        memory_weights: ``k`` weights, newest batch first, each >= 0 and the first > 0;
            normalized to sum 1. ``None``: uniform.
        double_forward: record statistics only in the second forward pass (see above).
        eval_stats: ``"running"`` or ``"memory"`` (see above).
        eps: added to the variance, > 0.
        momentum: weight of the new batch in the running statistics, in [0, 1], or ``None``.
        affine: learn ``weight`` (init 1) and, if ``bias``, ``bias`` (init 0).
        bias: learn ``bias`` (with ``affine``).

    Shape: ``(N, C, *)`` -> same shape and dtype. Statistics run in fp32 for fp16/bf16 input.
    Training needs more than one value per channel, like BatchNorm.
    """

    spec = NormSpec(
        paper="Guo et al. 2018, arXiv:2010.04947",
        layout="channel",
        batch_stats=True,
        running_stats=True,
        min_ndim=2,
    )
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor
    memory_mean: Tensor
    memory_var: Tensor
    memory_count: Tensor
    skipped_updates: Tensor

    def __init__(
        self,
        num_features: int,
        *,
        memory_size: int = 4,
        memory_weights: Sequence[float] | None = None,
        double_forward: bool = False,
        eval_stats: EvalStats = "running",
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        bias: bool = True,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.num_features = check_num_features(owner, num_features)
        if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 1:
            raise ValueError(f"{owner}: memory_size must be an int >= 1, got {memory_size!r}")
        self.memory_size = memory_size
        self.memory_weights = _normalized_weights(owner, memory_size, memory_weights)
        if eval_stats not in ("running", "memory"):
            raise ValueError(f"{owner}: eval_stats must be 'running' or 'memory', got {eval_stats!r}")
        self.eval_stats: EvalStats = eval_stats
        check_momentum(owner, momentum, allow_none=True)
        self.momentum = momentum
        self.eps = check_eps(owner, eps)
        self.affine = affine
        self.double_forward = bool(double_forward)
        # Set by double_forward_pass(): this forward is the second one, which records.
        self._second_pass = False
        self.weight, self.bias = affine_parameters(
            num_features, weight=affine, bias=bias, device=device, dtype=dtype
        )
        self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=dtype))
        self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=dtype))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=device))
        # Newest first: row 0 is the most recently recorded batch.
        self.register_buffer(
            "memory_mean", torch.zeros(memory_size, num_features, device=device, dtype=dtype)
        )
        self.register_buffer("memory_var", torch.ones(memory_size, num_features, device=device, dtype=dtype))
        self.register_buffer("memory_count", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer(
            "skipped_updates", torch.zeros((), dtype=torch.long, device=device), persistent=False
        )
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------
    # State

    def reset_running_stats(self) -> None:
        """Running statistics to 0/1, the memory emptied, every counter to 0."""
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()
        self.memory_mean.zero_()
        self.memory_var.fill_(1)
        self.memory_count.zero_()
        self.skipped_updates.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        reset_affine(self.weight, self.bias)

    def memorized_statistics(self) -> tuple[Tensor, Tensor]:
        """The pooled ``(mean, var)`` of the recorded batches: what ``eval_stats="memory"`` uses.

        Raises:
            ValueError: nothing has been recorded yet.
        """
        if int(self.memory_count) == 0:
            self._fail("the memory is empty: no training batch has been recorded yet")
        with torch.no_grad():
            return self._pool(self.memory_mean, self.memory_var, self.memory_count)

    # ----------------------------------------------------------------------------------------
    # Forward

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        count = math.prod(x.shape) // self.num_features  # values per channel
        if count == 0:  # an empty batch: empty output, zero grads, no state change
            return self._affine(x, x)
        cd = NF.compute_dtype(x)
        xc = x.to(cd)
        view = (1, -1, *([1] * (x.dim() - 2)))
        if self.training:
            if count == 1:
                self._fail(
                    f"expected more than 1 value per channel when training, got input of shape "
                    f"{tuple(x.shape)}; use a batch of >= 2 samples, call .eval(), or use a per-sample "
                    "norm (GroupNorm, LayerNorm)"
                )
            var_t, mean_t = torch.var_mean(xc, dim=[0, *range(2, x.dim())], correction=0)
            k = self.memory_size
            # The current batch (age 0, with its graph) ahead of the k - 1 newest recorded ones.
            means = torch.cat([mean_t[None], self.memory_mean[: k - 1].to(cd)])
            variances = torch.cat([var_t[None], self.memory_var[: k - 1].to(cd)])
            mean, var = self._pool(means, variances, self.memory_count + 1)
            if self._second_pass or not self.double_forward:
                self._record(mean_t.detach(), var_t.detach(), count)
        else:
            mean, var = self.running_mean.to(cd), self.running_var.to(cd)
            if self.eval_stats == "memory":
                mem_mean, mem_var = self._pool(
                    self.memory_mean.to(cd), self.memory_var.to(cd), self.memory_count
                )
                recorded = self.memory_count > 0
                mean = torch.where(recorded, mem_mean, mean)
                var = torch.where(recorded, mem_var, var)
        y = (xc - mean.view(view)) * torch.rsqrt(var + self.eps).view(view)
        return self._affine(y, x).to(x.dtype)

    def _affine(self, y: Tensor, x: Tensor) -> Tensor:
        if self.weight is not None:
            y = y * NF.channel_view(self.weight.to(y.dtype), x, 1)
        if self.bias is not None:
            y = y + NF.channel_view(self.bias.to(y.dtype), x, 1)
        return y

    def _pool(self, means: Tensor, variances: Tensor, n_valid: Tensor) -> tuple[Tensor, Tensor]:
        """Weighted pooled moments of rows ``0 .. n_valid - 1`` of ``(k, C)`` means/variances.

        ``n_valid`` is a tensor (no ``.item()``, so no graph break under ``torch.compile``).
        """
        eta = torch.tensor(self.memory_weights[: means.shape[0]], dtype=means.dtype, device=means.device)
        ages = torch.arange(means.shape[0], device=means.device)
        w = torch.where(ages < n_valid, eta, torch.zeros_like(eta))
        w = (w / w.sum().clamp_min(torch.finfo(w.dtype).tiny))[:, None]
        mean = (w * means).sum(0)
        var = (w * (variances + (means - mean) ** 2)).sum(0)
        return mean, var

    @torch.no_grad()
    def _record(self, mean_t: Tensor, var_t: Tensor, count: int) -> None:
        """Push the current moments into the memory and update the running statistics."""
        ok = torch.isfinite(mean_t).all() & torch.isfinite(var_t).all()
        bdtype = self.memory_mean.dtype
        pushed_mean = torch.cat([mean_t.to(bdtype)[None], self.memory_mean[:-1]])
        pushed_var = torch.cat([var_t.to(bdtype)[None], self.memory_var[:-1]])
        self.memory_count.add_(ok.long())
        factor = momentum_factor(self.momentum, self.num_batches_tracked, mean_t.dtype)
        unbiased = var_t * (count / (count - 1))
        commit_if_finite(
            self,
            ok,
            memory_mean=pushed_mean,
            memory_var=pushed_var,
            running_mean=self.running_mean * (1 - factor) + mean_t.to(bdtype) * factor,
            running_var=self.running_var * (1 - factor) + unbiased.to(bdtype) * factor,
        )

    @property
    def wants_second_forward(self) -> bool:
        """With ``double_forward``, the step's batches are forwarded again after the optimizer
        step, to record their moments under the updated weights."""
        return self.double_forward

    def set_second_forward(self, active: bool) -> None:
        self._second_pass = bool(active)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, memory_size={self.memory_size}, memory_weights={self.memory_weights}, "
            f"double_forward={self.double_forward}, eval_stats={self.eval_stats!r}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}"
        )


def _normalized_weights(owner: str, k: int, weights: Sequence[float] | None) -> tuple[float, ...]:
    """``k`` finite weights >= 0 (the first > 0), scaled to sum 1; ``None`` gives ``1/k`` each."""
    if weights is None:
        return (1.0 / k,) * k
    values = tuple(weights)
    if len(values) != k:
        raise ValueError(
            f"{owner}: memory_weights needs memory_size={k} values (newest first), got {len(values)}"
        )
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{owner}: memory_weights must be finite numbers >= 0, got {values!r}")
    if values[0] <= 0:
        # The current batch carries the gradient; weight 0 would cut the input out of the graph.
        raise ValueError(f"{owner}: memory_weights[0] (the current batch) must be > 0, got {values!r}")
    total = math.fsum(values)
    return tuple(float(v) / total for v in values)


@contextlib.contextmanager
def double_forward_pass(model: nn.Module) -> Iterator[None]:
    """Mark forwards inside the block as MBN's second (recording) pass of the same batch.

    Usage, with every :class:`MemorizedBatchNorm` in ``model`` built with ``double_forward=True``::

        loss = criterion(model(x), target)   # 1st pass: normalizes with the memory, records nothing
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        with torch.no_grad(), double_forward_pass(model):
            model(x)                         # 2nd pass: records x's moments under the new weights

    Raises:
        ValueError: ``model`` holds no MemorizedBatchNorm, or one built without ``double_forward``
            (it records in its first pass already, so a second pass would record the batch twice).
    """
    layers = [m for m in model.modules() if isinstance(m, MemorizedBatchNorm)]
    if not layers:
        raise ValueError(f"double_forward_pass: no MemorizedBatchNorm in {type(model).__name__}")
    for layer in layers:
        if not layer.double_forward:
            layer._fail("double_forward_pass() needs every MemorizedBatchNorm built with double_forward=True")
    with second_forward(model):  # every layer here asks for it: the checks above
        yield
