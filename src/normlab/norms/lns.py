"""LayerNorm Scaling, LNS (Sun et al., "The Curse of Depth in Large Language Models", arXiv:2502.05795)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

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
from normlab.norms._info import EXACT, NEW, ZERO_MEAN, NormInfo, NotConvertibleError

_DEFAULT_EPS = {"layernorm": 1e-5, "rmsnorm": 1e-6}


class LNSScale:
    """Forward hook multiplying a norm's output by ``scale = 1/sqrt(layer_idx + 1)``."""

    def __init__(self, layer_idx: int) -> None:
        self.layer_idx = layer_idx
        self.scale = 1.0 / math.sqrt(layer_idx + 1)

    def __call__(self, module: nn.Module, args: object, output: Tensor) -> Tensor:
        return output * self.scale

    def __repr__(self) -> str:
        return f"LNSScale(layer_idx={self.layer_idx}, scale={self.scale:.4f})"


@register_norm("lns", aliases=("layernorm_scaling", "layer_norm_scaling"))
class LayerNormScaling(NormMixin, nn.Module):
    """A LayerNorm or RMSNorm whose output is scaled by ``1 / sqrt(layer_idx + 1)``.

    ``y = base_norm(x) / sqrt(l)`` with ``l = layer_idx + 1`` the 1-based index of the block
    the norm sits in: both pre-norms of block ``l`` use the same factor; the model's final norm
    is not scaled (use a plain norm there), and LNS is meant for Pre-LN with plain (not
    depth-scaled) init. The factor is a Python float, not a buffer, so meta-device init and
    ``to_empty()`` cannot wipe it; it is folded into ``weight``/``bias`` (an op on ``C``
    values), so scaling costs no extra pass over the activations. Parameters and state_dict
    keys are those of the base norm: a LayerNorm/RMSNorm checkpoint loads unchanged.

    Args:
        num_features: size of the last dimension.
        layer_idx: 0-based index of the block (``0`` gives the plain base norm).
        base: ``"layernorm"`` or ``"rmsnorm"`` (LLaMA-style, eps inside the square root).
        eps: > 0; default 1e-5 for LayerNorm and 1e-6 for RMSNorm.
        elementwise_affine: learn ``weight`` (init 1) and, if ``bias``, ``bias`` (init 0).
        bias: learn ``bias``; default True for LayerNorm, False for RMSNorm.

    Shape: ``(*, C)`` -> same shape and dtype.
    """

    spec = NormSpec(
        paper="Sun et al. 2025, arXiv:2502.05795",
        layout="last",
        needs=("layer_idx",),
        example_kwargs={"layer_idx": 3},
    )

    weight: nn.Parameter | None
    bias: nn.Parameter | None

    def __init__(
        self,
        num_features: int,
        *,
        layer_idx: int,
        base: Literal["layernorm", "rmsnorm"] = "layernorm",
        eps: float | None = None,
        elementwise_affine: bool = True,
        bias: bool | None = None,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.num_features = check_num_features(owner, num_features)
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"{owner}: layer_idx must be a 0-based int >= 0, got {layer_idx!r}")
        if base not in _DEFAULT_EPS:
            raise ValueError(f"{owner}: base must be 'layernorm' or 'rmsnorm', got {base!r}")
        self.layer_idx = layer_idx
        self.base = base
        self.scale = 1.0 / math.sqrt(layer_idx + 1)
        self.eps = check_eps(owner, _DEFAULT_EPS[base] if eps is None else eps)
        self.elementwise_affine = elementwise_affine
        with_bias = (base == "layernorm") if bias is None else bias
        w, b = affine_parameters(
            num_features, weight=elementwise_affine, bias=with_bias, device=device, dtype=dtype
        )
        self.register_parameter("weight", w)
        self.register_parameter("bias", b)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_affine(self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        s = self.scale
        shape = (self.num_features,)
        if self.weight is None:  # the scale as a constant weight: still no extra pass over x
            w = torch.full(shape, s, dtype=NF.compute_dtype(x), device=x.device)
        else:
            w = self.weight * s
        b = None if self.bias is None else self.bias * s
        if self.base == "layernorm":
            return NF.layer_norm(x, shape, w, b, self.eps)
        return NF.rms_norm(x, shape, w, b, self.eps)

    def norm_info(self) -> NormInfo:
        return NormInfo(
            "lns",
            self,
            (self.num_features,),
            eps=self.eps,
            weight=self.weight,
            bias=self.bias,
            scale=self.scale,
            base=self.base,
            note=f"base={self.base}, layer_idx={self.layer_idx}",
        )

    @classmethod
    def convert_kwargs(
        cls, info: NormInfo, *, options: Mapping[str, Any]
    ) -> tuple[int | tuple[int, ...], dict[str, Any]]:
        if any(isinstance(h, LNSScale) for h in info.module._forward_hooks.values()):
            raise NotConvertibleError(
                "it is already scaled by apply_layernorm_scaling; call remove_layernorm_scaling first"
            )
        base = options.get("base")
        if base is None:
            base = "rmsnorm" if (info.base if info.kind == "lns" else info.kind) == "rmsnorm" else "layernorm"
        features, kw = cls._mirror_kwargs(info, options, default_bias=base == "layernorm")
        return features, {**kw, "base": base}

    @classmethod
    def conversion_relation(cls, info: NormInfo, kwargs: Mapping[str, Any]) -> str:
        if info.kind not in ("layernorm", "rmsnorm"):
            return NEW
        base = EXACT if kwargs["base"] == info.kind else ZERO_MEAN
        return base if kwargs.get("layer_idx") == 0 else f"{base}, then x 1/sqrt(layer_idx + 1)"

    def extra_repr(self) -> str:
        s = f"{self.num_features}, layer_idx={self.layer_idx}, base={self.base!r}, eps={self.eps}"
        if not self.elementwise_affine:
            s += ", elementwise_affine=False"
        return s + f", scale={self.scale:.4f}"
