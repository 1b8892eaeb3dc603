"""Variance Normalization: BatchNorm without mean subtraction (Daneshmand et al. 2020, arXiv:2003.01652).

Also the running-variance machinery shared with EvoNorm-B0 (:mod:`normlab.norms.evonorm`).
"""

from __future__ import annotations

import math

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
    register_norm,
    reset_affine,
)


class RunningVarNorm(NormMixin, nn.Module):
    """Base of the norms that divide by a batch standard deviation and keep only ``running_var``.

    Running statistics follow **PyTorch's BatchNorm convention**, like :class:`normlab.BatchNorm`:
    ``running_var = (1 - momentum) * running_var + momentum * var_B * n / (n - 1)``, i.e.
    ``momentum`` weighs the *new* batch (the official BeyondBN/TF code's "momentum 0.9" is a
    retention factor and equals 0.1 here), and the stored variance is the unbiased one while
    training normalizes with the biased one. ``running_var`` starts at 1. A batch whose variance
    is not finite leaves ``running_var`` untouched and is counted in ``skipped_updates`` (not
    saved in the state_dict); the update uses tensor operations only, so
    ``torch.compile(fullgraph=True)`` traces it.
    """

    running_var: Tensor
    skipped_updates: Tensor
    weight: nn.Parameter | None
    bias: nn.Parameter | None

    def __init__(
        self, num_features: int, *, eps: float, momentum: float, affine: bool, device: Device, dtype: DType
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.num_features = check_num_features(owner, num_features)
        self.eps = check_eps(owner, eps)
        self.momentum = check_momentum(owner, momentum)
        self.affine = affine
        w, b = affine_parameters(num_features, weight=affine, bias=True, device=device, dtype=dtype)
        self.register_parameter("weight", w)
        self.register_parameter("bias", b)
        self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=dtype))
        self.register_buffer(
            "skipped_updates", torch.zeros((), dtype=torch.long, device=device), persistent=False
        )

    def reset_running_stats(self) -> None:
        self.running_var.fill_(1.0)
        self.skipped_updates.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        reset_affine(self.weight, self.bias)

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        """fp32 at least, and at least the parameters' precision (bf16 input, fp32 parameters)."""
        dtype = NF.compute_dtype(x)
        return dtype if self.weight is None else torch.promote_types(dtype, self.weight.dtype)

    def _variance(self, xc: Tensor) -> Tensor:
        """The ``(C,)`` variance used to normalize ``xc`` (already in the compute dtype).

        Training: the biased batch variance over every dimension but 1, and one update of
        ``running_var``; eval: ``running_var``.
        """
        if not self.training:
            return self.running_var.to(xc.dtype)
        count = math.prod(xc.shape) // self.num_features  # values per channel
        if count == 1:
            self._fail(
                f"expected more than 1 value per channel when using batch statistics, got input of shape "
                f"{tuple(xc.shape)}; use a batch of >= 2 samples or call .eval()"
            )
        dims = [0, *range(2, xc.dim())]
        var = xc.var(dim=dims, correction=0) if count > 0 else xc.new_ones(self.num_features)
        if count > 1:
            self._update_running_var(var.detach(), count)
        return var

    @torch.no_grad()
    def _update_running_var(self, var: Tensor, count: int) -> None:
        unbiased = var * (count / (count - 1))
        ok = torch.isfinite(unbiased).all()
        new = self.running_var * (1 - self.momentum) + unbiased.to(self.running_var.dtype) * self.momentum
        self.running_var.copy_(torch.where(ok, new, self.running_var))
        self.skipped_updates.add_((~ok).long())

    def _affine(self, y: Tensor) -> Tensor:
        if self.weight is not None:
            y = y * NF.channel_view(self.weight.to(y.dtype), y, 1)
        if self.bias is not None:
            y = y + NF.channel_view(self.bias.to(y.dtype), y, 1)
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"


@register_norm("varnorm", aliases=("variance_norm", "vn"))
class VarianceNorm(RunningVarNorm):
    """Variance Normalization: ``y = x / sqrt(var_B + eps) * weight + bias``, no mean subtraction.

    As in the official code of Lubana et al. 2021 (arXiv:2106.05956), ``EkdeepSLubana/BeyondBatchNorm:
    layer_defs.py``, ``VN_self``, which introduces it as the BatchNorm ablation of Daneshmand et
    al. 2020 (arXiv:2003.01652): the divisor is the **centred** batch variance ``var_B`` (biased,
    over every dimension but the channel dimension 1), but ``x`` itself is not centred, so a
    channel's mean is scaled, not removed. (A "second moment" variant ``x / sqrt(E_B[x^2] + eps)``
    is a different layer; the official code does not compute it.) Eval divides by ``running_var``.

    Running statistics: see :class:`RunningVarNorm` (PyTorch convention, ``momentum=0.1`` = the
    official code's retention 0.9). Unlike the official code, ``running_var`` stores the unbiased
    batch variance, as ``torch.nn.BatchNorm*d`` and :class:`normlab.BatchNorm` do.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance, > 0.
        momentum: weight of the new batch in ``running_var``, in [0, 1].
        affine: learn per-channel ``weight`` (init 1) and ``bias`` (init 0).

    Shape: ``(N, C, *)`` -> same shape and dtype.
    """

    spec = NormSpec(
        paper="Daneshmand et al. 2020, arXiv:2003.01652 (as in Lubana et al. 2021, arXiv:2106.05956)",
        layout="channel",
        batch_stats=True,
        running_stats=True,
        min_ndim=2,
    )

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, device=device, dtype=dtype)
        self.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        xc = x.to(self._compute_dtype(x))
        var = self._variance(xc)
        y = xc * NF.channel_view(torch.rsqrt(var + self.eps), xc, 1)
        return self._affine(y).to(x.dtype)


__all__ = ["RunningVarNorm", "VarianceNorm"]
