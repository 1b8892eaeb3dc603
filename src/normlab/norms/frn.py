"""Filter Response Normalization with its TLU (Singh & Krishnan, CVPR 2020, arXiv:1911.09737)."""

from __future__ import annotations

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
    check_num_features,
    register_norm,
    reset_affine,
)


@register_norm("frn", aliases=("filter_response_norm",))
class FilterResponseNorm(NormMixin, nn.Module):
    """FRN + TLU: ``y = max(weight * x * rsqrt(nu2 + |eps|) + bias, tau)``, ``nu2 = mean_{spatial}(x^2)``.

    Per sample and channel, no mean subtraction, identical in training and eval. The TLU
    (thresholded linear unit) ``max(., tau)`` replaces the ReLU that would follow; its per-channel
    ``tau`` (init 0) is a parameter of the activation, kept with ``affine=False``.
    Follows the paper's TensorFlow pseudo-code (``x * rsqrt(nu2 + abs(eps))``): with
    ``learnable_eps=True`` (default) ``eps`` is a learned scalar parameter of shape ``(1,)``, used
    through ``|eps|`` so that it stays a valid offset whatever sign the optimizer gives it; the
    paper recommends a learned ``eps`` where activation maps are ``1x1`` (fully connected
    layers): ``nu2`` is then a single squared value and FRN without a sizeable ``eps`` is
    nearly ``sign(x)``. Choices where the sources differ:

    - ``eps`` init 1e-6, the paper's value; the official code of Lubana et al. 2021
      (``EkdeepSLubana/BeyondBatchNorm:layer_defs.py``, ``FRN_self``) learns it from 1e-5 and
      timm (``FilterResponseNormTlu2d``) keeps it fixed at 1e-5, without ``abs``.
    - BeyondBN applies the TLU as a separate module; here it is fused and ``tlu=False`` drops it
      (then ``y`` is the affine FRN output, as ``FRN_self``).
    - ``learnable_eps=False`` keeps ``eps`` a constant (BeyondBN's flag leaves its parameter
      uninitialized in that case).

    Args:
        num_features: number of channels ``C``.
        eps: the (initial) ``eps``, > 0.
        learnable_eps: learn ``eps`` (a parameter named ``eps``); else a float constant.
        tlu: apply the TLU ``max(y, tau)`` with a learned per-channel ``tau`` (init 0).
        affine: learn per-channel ``weight`` (init 1) and ``bias`` (init 0).

    Shape: ``(N, C, L, ...)`` (at least one spatial dimension) -> same shape and dtype.
    """

    spec = NormSpec(
        paper="Singh & Krishnan 2020, arXiv:1911.09737",
        layout="channel",
        min_ndim=3,
        activation_params=("tau",),
    )
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    tau: nn.Parameter | None
    eps: nn.Parameter | float

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-6,
        learnable_eps: bool = True,
        tlu: bool = True,
        affine: bool = True,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.num_features = check_num_features(owner, num_features)
        self.eps_init = check_eps(owner, eps)
        self.learnable_eps = learnable_eps
        self.affine = affine
        w, b = affine_parameters(num_features, weight=affine, bias=True, device=device, dtype=dtype)
        self.register_parameter("weight", w)
        self.register_parameter("bias", b)
        tau = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype)) if tlu else None
        self.register_parameter("tau", tau)
        if learnable_eps:
            self.eps = nn.Parameter(torch.empty(1, device=device, dtype=dtype))
        else:
            self.eps = self.eps_init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_affine(self.weight, self.bias)
        if self.tau is not None:
            nn.init.zeros_(self.tau)
        if isinstance(self.eps, nn.Parameter):
            nn.init.constant_(self.eps, self.eps_init)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        dtype = NF.compute_dtype(x)
        if self.weight is not None:
            dtype = torch.promote_types(dtype, self.weight.dtype)
        xc = x.to(dtype)
        nu2 = xc.square().mean(dim=tuple(range(2, x.dim())), keepdim=True)
        eps = self.eps.abs().to(dtype) if isinstance(self.eps, Tensor) else self.eps
        y = xc * torch.rsqrt(nu2 + eps)
        if self.weight is not None:
            y = y * NF.channel_view(self.weight.to(dtype), y, 1)
        if self.bias is not None:
            y = y + NF.channel_view(self.bias.to(dtype), y, 1)
        if self.tau is not None:
            y = torch.maximum(y, NF.channel_view(self.tau.to(dtype), y, 1))
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        s = f"{self.num_features}, eps={self.eps_init}, learnable_eps={self.learnable_eps}"
        return s + f", tlu={self.tau is not None}, affine={self.affine}"


__all__ = ["FilterResponseNorm"]
