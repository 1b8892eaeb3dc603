"""BatchNorm (Ioffe & Szegedy 2015, arXiv:1502.03167) for inputs of any rank."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab import functional as NF
from normlab.kernels import _dispatch as _kernels
from normlab.norms._base import (
    Device,
    DType,
    NormMixin,
    NormSpec,
    check_eps,
    check_momentum,
    check_num_features,
    commit_if_finite,
    momentum_factor,
    register_norm,
)
from normlab.norms._info import EVAL, EXACT, NEW, NormInfo, running_stats_info


@register_norm("batchnorm", aliases=("bn", "batch_norm"))
class BatchNorm(NormMixin, _BatchNorm):
    """BatchNorm over every dimension but the channel dimension 1, for ``(N, C, *)`` inputs.

    Training: ``y = (x - mean_B) / sqrt(var_B + eps) * weight + bias`` with the biased batch
    variance; eval: the running statistics replace the batch ones. Running statistics follow
    **PyTorch's momentum convention**: ``running = (1 - momentum) * running + momentum * batch``
    (``momentum`` weighs the *new* batch; Keras/flax's 0.99 corresponds to 0.01 here), and
    ``running_var`` stores the unbiased batch variance (``var_B * n / (n - 1)``).
    ``momentum=None`` gives the cumulative average over ``num_batches_tracked`` batches.

    Unlike ``torch.nn.BatchNorm*d``, a batch whose statistics are not finite (a NaN or inf in
    the input) leaves the running statistics and ``num_batches_tracked`` untouched; the
    ``skipped_updates`` buffer (not saved in the state_dict) counts such batches. The update is
    written with tensor operations only, so ``torch.compile(fullgraph=True)`` works with
    ``momentum=None`` too. A subclass of torch's ``_BatchNorm``: the state_dict keys are
    torch's, checkpoints load both ways, ``isinstance(m, nn.modules.batchnorm._BatchNorm)`` holds.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance, > 0.
        momentum: weight of the new batch in the running statistics, in [0, 1], or ``None``.
        affine: learn ``weight`` (init 1) and, if ``bias``, ``bias`` (init 0).
        track_running_stats: keep running statistics; if False, batch statistics are used in
            eval too.
        bias: learn ``bias`` (with ``affine``).

    Shape: ``(N, C, *)`` -> same shape and dtype.
    """

    spec = NormSpec(
        paper="Ioffe & Szegedy 2015, arXiv:1502.03167",
        layout="channel",
        batch_stats=True,
        running_stats=True,
        min_ndim=2,
    )
    skipped_updates: Tensor

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        bias: bool = True,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        owner = type(self).__name__
        check_num_features(owner, num_features)
        check_momentum(owner, momentum, allow_none=True)
        super().__init__(
            num_features,
            check_eps(owner, eps),
            momentum,
            affine,
            track_running_stats,
            device=device,
            dtype=dtype,
            bias=bias,
        )
        self.register_buffer(
            "skipped_updates",
            torch.zeros((), dtype=torch.long, device=device),
            persistent=False,
        )

    def norm_info(self) -> NormInfo:
        return running_stats_info("batchnorm", self)

    @classmethod
    def conversion_relation(cls, info: NormInfo, kwargs: Mapping[str, Any]) -> str:
        # the same function; from Batchless, whose fitted mean and std become the running statistics
        return {"batchnorm": EXACT, "batchless": EVAL}.get(info.kind, NEW)

    def _check_input_dim(self, input: Tensor) -> None:
        self._check_input(input)

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if hasattr(self, "skipped_updates"):
            self.skipped_updates.zero_()

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        use_batch_stats = self.training or not self.track_running_stats
        count = math.prod(x.shape) // self.num_features  # values per channel
        if use_batch_stats and count == 1:
            self._fail(
                f"expected more than 1 value per channel when using batch statistics, got input of shape "
                f"{tuple(x.shape)}; use a batch of >= 2 samples, call .eval(), or use a per-sample "
                "norm (GroupNorm, LayerNorm)"
            )
        if self.training and self.track_running_stats and count > 1:
            if self.momentum is not None:
                return self._train_and_update(x)
            self._update_running_stats(x)
        elif self.training and not self.track_running_stats:  # eval keeps torch's kernel
            fused = _kernels.batch_norm_train(x, self.weight, self.bias, self.eps)
            if fused is not None:
                return fused[0]
        return F.batch_norm(
            x,
            None if use_batch_stats else self.running_mean,
            None if use_batch_stats else self.running_var,
            self.weight,
            self.bias,
            use_batch_stats,
            0.0,
            self.eps,
        )

    def _train_and_update(self, x: Tensor) -> Tensor:
        """Training with running statistics and a momentum, without an extra statistics pass
        over ``x`` (it would cost a third of the layer's time): normlab's fused kernel returns
        the batch statistics with the output, or else torch's kernel updates copies of the
        running buffers in its own pass."""
        assert self.running_mean is not None and self.running_var is not None
        assert self.momentum is not None
        fused = _kernels.batch_norm_train(x, self.weight, self.bias, self.eps)
        if fused is not None:
            y, batch_mean, batch_var = fused
            count = math.prod(x.shape) // self.num_features
            m = self.momentum
            with torch.no_grad():  # in fp64, rounded once into the buffers, as torch's CPU kernel
                mean = batch_mean.double()
                unbiased = batch_var.double() * (count / (count - 1))
                commit_if_finite(
                    self,
                    torch.isfinite(mean).all() & torch.isfinite(unbiased).all(),
                    running_mean=self.running_mean.double() * (1 - m) + mean * m,
                    running_var=self.running_var.double() * (1 - m) + unbiased * m,
                )
            return y
        mean, var = self.running_mean.clone(), self.running_var.clone()
        out = F.batch_norm(x, mean, var, self.weight, self.bias, True, self.momentum, self.eps)
        ok = torch.isfinite(mean).all() & torch.isfinite(var).all()
        commit_if_finite(self, ok, running_mean=mean, running_var=var)
        return out

    @torch.no_grad()
    def _update_running_stats(self, x: Tensor) -> None:
        update_running_stats(self, x, self.momentum)


@torch.no_grad()
def update_running_stats(module: nn.Module, x: Tensor, momentum: float | None) -> None:
    """BatchNorm's running update of ``module`` from the mean and unbiased variance of ``x``
    over every dimension but 1, by ``momentum`` (``None``: the cumulative average), kept only if
    finite (:func:`~normlab.norms._base.commit_if_finite`). Also CBN's."""
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x.detach().to(NF.compute_dtype(x)), dim=dims, correction=1)
    running_mean, running_var = module.get_buffer("running_mean"), module.get_buffer("running_var")
    factor = momentum_factor(momentum, module.get_buffer("num_batches_tracked"), mean.dtype)
    commit_if_finite(
        module,
        torch.isfinite(mean).all() & torch.isfinite(var).all(),
        running_mean=running_mean * (1 - factor) + mean.to(running_mean.dtype) * factor,
        running_var=running_var * (1 - factor) + var.to(running_var.dtype) * factor,
    )
