"""EvoNorm-B0 and EvoNorm-S0 (Liu, Brock, Simonyan & Le, NeurIPS 2020, arXiv:2004.02967)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab import functional as NF
from normlab.norms._base import (
    Device,
    DType,
    NormMixin,
    NormSpec,
    affine_parameters,
    check_eps,
    check_num_features,
    register_norm,
    reset_affine,
)
from normlab.norms.varnorm import RunningVarNorm


def _per_channel(p: Tensor, x: Tensor) -> Tensor:
    return NF.channel_view(p.to(x.dtype), x, 1)


def _biased_var(x: Tensor, dims: tuple[int, ...], *, keepdim: bool) -> Tensor:
    # Two-pass, not torch.var: the same accuracy, and no warning on an empty batch.
    return (x - x.mean(dim=dims, keepdim=True)).square().mean(dim=dims, keepdim=keepdim)


def instance_std(x: Tensor, eps: float) -> Tensor:
    """``sqrt(var + eps)`` per sample and channel over the spatial dims (biased), shape ``(N, C, 1, ...)``."""
    return torch.sqrt(_biased_var(x, tuple(range(2, x.dim())), keepdim=True) + eps)


def group_std(x: Tensor, num_groups: int, eps: float) -> Tensor:
    """``sqrt(var + eps)`` per sample over each group of channels and all positions (biased).

    Shape ``(N, C, 1, ...)``: one value per channel, repeated over the channels of a group. The
    statistics use a view of ``x`` (splitting one dimension is always a view), so a
    ``channels_last`` input is not copied.
    """
    n, c = x.shape[:2]
    grouped = x.view(n, num_groups, c // num_groups, *x.shape[2:])
    var = _biased_var(grouped, tuple(range(2, grouped.dim())), keepdim=False)  # (N, G)
    std = torch.sqrt(var + eps).repeat_interleave(c // num_groups, dim=1)  # (N, C)
    return std.reshape(n, c, *([1] * (x.dim() - 2)))


@register_norm("evonorm_b0", aliases=("evonormb0", "evonorm_bo"))
class EvoNormB0(RunningVarNorm):
    """EvoNorm-B0, a batch-dependent normalization-activation layer found by evolution.

    ``y = x / max(sqrt(var_B + eps), v * x + sqrt(var_I(x) + eps)) * weight + bias``, where
    ``var_B`` is the per-channel batch variance over every dimension but 1 (``running_var`` in
    eval) and ``var_I`` the per-sample, per-channel variance over the spatial dimensions. Both
    variances are **biased** and ``eps`` is **inside** both square roots, as in the paper's
    TensorFlow code (``tf.nn.moments``), timm (``EvoNorm2dB0``) and BeyondBN
    (``EkdeepSLubana/BeyondBatchNorm:layer_defs.py``, ``EvoNormBO``, whose batch variance is
    biased too). Choices where the sources differ:

    - ``eps = 1e-5``: the paper's code and BeyondBN; timm uses 1e-3.
    - ``var_I`` is biased (paper, timm); BeyondBN's ``instance_std`` uses ``torch.var``'s default,
      the unbiased variance.
    - Running statistics: PyTorch convention (see :class:`normlab.norms.varnorm.RunningVarNorm`):
      ``momentum=0.1`` weighs the new batch (the paper's ``decay=0.9`` and BeyondBN's
      ``momentum=0.9`` are retention factors), and ``running_var`` stores the unbiased batch
      variance (as timm; the paper's code and BeyondBN store the biased one).
    - The paper's ``nonlinearity=False`` form (timm ``apply_act=False``) is a plain per-channel
      affine without normalization; it is not this class.

    ``v`` (per channel, init 1) is a parameter of the activation: it stays with ``affine=False``.

    Args:
        num_features: number of channels ``C``.
        eps: added to both variances, > 0.
        momentum: weight of the new batch in ``running_var``, in [0, 1].
        affine: learn per-channel ``weight`` (init 1) and ``bias`` (init 0).

    Shape: ``(N, C, L, ...)`` (at least one spatial dimension) -> same shape and dtype.
    """

    spec = NormSpec(
        paper="Liu et al. 2020, arXiv:2004.02967",
        layout="channel",
        batch_stats=True,
        running_stats=True,
        min_ndim=3,
        activation_params=("v",),
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
        self.v = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.ones_(self.v)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        xc = x.to(self._compute_dtype(x))
        batch_std = NF.channel_view(torch.sqrt(self._variance(xc) + self.eps), xc, 1)
        right = _per_channel(self.v, xc) * xc + instance_std(xc, self.eps)
        return self._affine(xc / torch.maximum(batch_std, right)).to(x.dtype)


@register_norm("evonorm_s0", aliases=("evonorms0", "evonorm_so"))
class EvoNormS0(NormMixin, nn.Module):
    """EvoNorm-S0, the batch-independent normalization-activation layer found by evolution.

    ``y = x * sigmoid(v * x) / sqrt(var_G(x) + eps) * weight + bias``, where ``var_G`` is the
    per-sample variance over a group of ``C / num_groups`` channels and all positions (as in
    GroupNorm, but the numerator is not centred). Identical in training and eval; independent
    of the other samples. ``var_G`` is **biased** with ``eps`` inside the square root, as in the
    paper's TensorFlow code and timm (``EvoNorm2dS0``); BeyondBN
    (``EkdeepSLubana/BeyondBatchNorm:layer_defs.py``, ``EvoNormSO``) uses ``torch.var``'s default,
    the unbiased variance. ``v`` (per channel, init 1) is a parameter of the activation: it stays
    with ``affine=False``. The paper's ``nonlinearity=False`` form is a plain affine, not this class.

    Args:
        num_features: number of channels ``C``, divisible by ``num_groups``.
        num_groups: number of groups (the paper's 32).
        eps: added to the group variance, > 0.
        affine: learn per-channel ``weight`` (init 1) and ``bias`` (init 0).

    Shape: ``(N, C, *)`` -> same shape and dtype.
    """

    spec = NormSpec(
        paper="Liu et al. 2020, arXiv:2004.02967",
        layout="channel",
        min_ndim=2,
        example_kwargs={"num_groups": 3},
        activation_params=("v",),
    )
    weight: nn.Parameter | None
    bias: nn.Parameter | None

    def __init__(
        self,
        num_features: int,
        *,
        num_groups: int = 32,
        eps: float = 1e-5,
        affine: bool = True,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.num_features = check_num_features(owner, num_features)
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
            raise ValueError(f"{owner}: num_groups must be a positive int, got {num_groups!r}")
        if num_features % num_groups:
            raise ValueError(
                f"{owner}: num_features ({num_features}) must be divisible by num_groups ({num_groups})"
            )
        self.num_groups = num_groups
        self.eps = check_eps(owner, eps)
        self.affine = affine
        w, b = affine_parameters(num_features, weight=affine, bias=True, device=device, dtype=dtype)
        self.register_parameter("weight", w)
        self.register_parameter("bias", b)
        self.v = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_affine(self.weight, self.bias)
        nn.init.ones_(self.v)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self.num_features // self.num_groups * math.prod(x.shape[2:]) == 1 and x.shape[0] > 0:
            self._fail(
                f"each group holds a single value for input of shape {tuple(x.shape)} "
                f"(num_groups={self.num_groups}), so its variance is undefined; use fewer groups"
            )
        xc = x.to(torch.promote_types(NF.compute_dtype(x), self.v.dtype))
        # sigmoid(z) as exp(logsigmoid(z)): the same value, but autograd's sigmoid'(z) = s * (1 - s)
        # loses all precision in fp32 once z > ~10 (1 - s rounds), while this form's gradient,
        # s * sigmoid(-z), keeps it, which matters for dv when a group has few large values.
        gate = torch.exp(F.logsigmoid(_per_channel(self.v, xc) * xc))
        y = xc * gate / group_std(xc, self.num_groups, self.eps)
        if self.weight is not None:
            y = y * _per_channel(self.weight, y)
        if self.bias is not None:
            y = y + _per_channel(self.bias, y)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, affine={self.affine}"


__all__ = ["EvoNormB0", "EvoNormS0", "group_std", "instance_std"]
