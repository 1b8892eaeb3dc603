"""Parametric normalization and its signal-propagation remedies (Lubana, Dick & Tanaka 2021).

Weight-space normalizers keep a ConvNet's activations well scaled at initialization only with
help: Weight Normalization needs a centred and rescaled ReLU (:class:`CenteredScaledReLU`),
Scaled Weight Standardization centres the weights and folds the ReLU gain into them, and in
ResNets a zero-initialized residual gain (:class:`SkipInit`) stops the variance from compounding
over blocks ("Beyond BatchNorm: Towards a Unified Understanding of Normalization in Deep
Learning", arXiv:2106.05956; official code ``EkdeepSLubana/BeyondBatchNorm:layer_defs.py``).

The two convolutions subclass ``torch.nn.Conv2d`` (same positional arguments, ``padding_mode``,
``device``/``dtype``), so they drop into existing code; ``effective_weight()`` is the weight the
convolution uses. Their state_dict holds ``weight``, ``bias`` and a per-output-channel ``gain``
of shape ``(out_channels, 1, 1, 1)``, the layout and name of timm's ``ScaledStdConv2d``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.common_types import _size_2_t

from normlab.norms._base import Device, DType, check_eps

# ReLU of a standard normal: mean 1/sqrt(2*pi), variance (pi - 1) / (2*pi). Subtracting the mean
# and dividing by the standard deviation maps N(0, 1) to mean 0, variance 1.
RELU_SHIFT = 1.0 / math.sqrt(2.0 * math.pi)  # 0.398942
RELU_GAIN = math.sqrt(2.0 * math.pi / (math.pi - 1.0))  # 1.712859 = sqrt(2 / (1 - 1/pi))

PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]


def _check_finite(owner: str, name: str, value: float, *, positive: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        kind = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{owner}: {name} must be {kind}, got {value!r}")
    return float(value)


class CenteredScaledReLU(nn.Module):
    """``y = sqrt(2*pi / (pi - 1)) * (relu(x) - 1 / sqrt(2*pi))``: a ReLU whose output has mean 0 and
    variance 1 when its input is ``N(0, 1)``.

    The activation paired with Weight Normalization in BeyondBN (``WN_scaledReLU``, after Arpit
    et al. 2016, arXiv:1603.01431): without the shift and scale, each ReLU halves the second
    moment and adds a mean, so activations shrink geometrically with depth.

    Shape: any -> same shape and dtype.
    """

    def forward(self, x: Tensor) -> Tensor:
        return (F.relu(x) - RELU_SHIFT) * RELU_GAIN


class SkipInit(nn.Module):
    """A learned scalar gain on a residual branch, ``y = gain * x``, ``gain`` init 0.

    SkipInit (De & Smith 2020, arXiv:2002.10444), as ``BasicBlock.skip_gain`` in BeyondBN:
    ``out = shortcut(x) + skip(branch(x))`` makes every residual block the identity at
    initialization, so the activation variance cannot compound over depth. ``gain`` has shape
    ``(1,)`` as in the official code.

    Args:
        init: the initial gain (0 for SkipInit; a small value gives ReZero-like scaling).

    Shape: any -> same shape and dtype (the gain is cast to the input's dtype).
    """

    def __init__(self, init: float = 0.0, *, device: Device = None, dtype: DType = None) -> None:
        super().__init__()
        self.init = _check_finite(type(self).__name__, "init", init)
        self.gain = nn.Parameter(torch.empty(1, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gain, self.init)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain.to(x.dtype)

    def extra_repr(self) -> str:
        return f"init={self.init}"


class _GainConv2d(nn.Conv2d):
    """A ``Conv2d`` whose weight is re-parametrized per output channel with a learned ``gain``.

    Initialization as BeyondBN's ``get_convlayer``: ``kaiming_normal_(fan_in, relu)`` weight (its
    scale does not matter, both re-parametrizations remove it), zero bias, ``gain = gain_init``.
    """

    gain: nn.Parameter

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t,
        stride: _size_2_t = 1,
        padding: _size_2_t | str = 0,
        dilation: _size_2_t = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: PaddingMode = "zeros",
        *,
        eps: float,
        gain_init: float = 1.0,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        owner = type(self).__name__
        eps = check_eps(owner, eps)
        gain_init = _check_finite(owner, "gain_init", gain_init)
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self.eps = eps
        self.gain_init = gain_init
        self.gain = nn.Parameter(torch.empty(out_channels, 1, 1, 1, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        # nn.Conv2d.__init__ calls this before ``gain`` exists; the second call sets it.
        if "gain" in self._parameters:
            nn.init.constant_(self.gain, self.gain_init)

    def _reparametrize(self, w: Tensor) -> Tensor:  # pragma: no cover - subclasses implement it
        raise NotImplementedError

    def effective_weight(self) -> Tensor:
        """The weight the convolution uses, in the weight's dtype (computed in fp32 at least)."""
        w = self.weight
        return self._reparametrize(w.to(torch.promote_types(w.dtype, torch.float32))).to(w.dtype)

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self._conv_forward(x, self.effective_weight(), self.bias)
        return y

    def extra_repr(self) -> str:
        conv: str = super().extra_repr()  # type: ignore[no-untyped-call]
        return f"{conv}, eps={self.eps}, gain_init={self.gain_init}"


class WNConv2d(_GainConv2d):
    """Conv2d with Weight Normalization: ``W_c = gain_c * V_c / (||V_c|| + eps)`` per output channel.

    Weight Normalization (Salimans & Kingma 2016, arXiv:1602.07868) as BeyondBN's ``WN_self``
    (``EkdeepSLubana/BeyondBatchNorm:layer_defs.py``): ``||V_c||`` is the Frobenius norm of
    output channel ``c``'s filter, ``eps = 1e-5`` is added outside it (the paper and
    ``torch.nn.utils.weight_norm`` have none; it keeps an all-zero filter finite), and
    ``gain`` starts at 1, so each filter has unit norm at init. (The paper initializes ``g``
    from data; ``torch.nn.utils.weight_norm`` sets ``g = ||V||``, which keeps the raw weight.)
    A unit-norm filter preserves the second moment of a zero-mean input with uncorrelated
    entries, so pair it with :class:`CenteredScaledReLU`; a plain ReLU halves it per layer.
    The conv ``bias`` is on by default (BeyondBN uses it with WN) and starts at 0.

    Args: those of ``torch.nn.Conv2d``, then (keyword-only)
        eps: added to the filter norm, > 0.
        gain_init: the initial per-output-channel ``gain``.

    Shape: as ``torch.nn.Conv2d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t,
        stride: _size_2_t = 1,
        padding: _size_2_t | str = 0,
        dilation: _size_2_t = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: PaddingMode = "zeros",
        *,
        eps: float = 1e-5,
        gain_init: float = 1.0,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            eps=eps,
            gain_init=gain_init,
            device=device,
            dtype=dtype,
        )

    def _reparametrize(self, w: Tensor) -> Tensor:
        norm: Tensor = torch.linalg.vector_norm(w, dim=(1, 2, 3), keepdim=True)
        return self.gain.to(w.dtype) * w / (norm + self.eps)


class ScaledStdConv2d(_GainConv2d):
    """Conv2d with Scaled Weight Standardization (Brock, De & Smith 2021, arXiv:2101.08692).

    ``W_c = gamma * gain_c * (V_c - mean(V_c)) / sqrt(max(fan_in * var(V_c), eps))`` per output
    channel, with the biased variance and ``fan_in = in_channels / groups * kh * kw``: each
    filter has mean 0 and standard deviation ``gamma * gain_c / sqrt(fan_in)``. ``gamma`` is a
    fixed constant, by default the ReLU gain ``sqrt(2*pi / (pi - 1))`` that BeyondBN hard-codes
    (for a plain ReLU after the conv; timm's default is 1, NF-ResNets set it per activation);
    ``gain`` is learned, init 1. Where the sources differ on ``eps``, this follows the
    official NFNets code (``deepmind-research/nfnets``, ``WSConv2D.standardize_weight``:
    ``rsqrt(max(var * fan_in, 1e-4))``), which is the paper's formula exactly unless a filter
    is nearly constant; BeyondBN (``ScaledStdConv2d``) divides by ``std + 1e-5`` and timm by
    ``sqrt(var + 1e-6)``, both slightly off ``1 / sqrt(fan_in)`` for small weights. The conv
    ``bias`` is on by default (BeyondBN and NFNets use it) and starts at 0.

    Args: those of ``torch.nn.Conv2d``, then (keyword-only)
        gamma: the fixed gain, a finite number > 0.
        eps: lower bound on ``fan_in * var``, > 0.
        gain_init: the initial per-output-channel ``gain``.

    Shape: as ``torch.nn.Conv2d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t,
        stride: _size_2_t = 1,
        padding: _size_2_t | str = 0,
        dilation: _size_2_t = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: PaddingMode = "zeros",
        *,
        gamma: float = RELU_GAIN,
        eps: float = 1e-4,
        gain_init: float = 1.0,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        self_gamma = _check_finite(type(self).__name__, "gamma", gamma, positive=True)
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            eps=eps,
            gain_init=gain_init,
            device=device,
            dtype=dtype,
        )
        self.gamma = self_gamma

    @property
    def fan_in(self) -> int:
        return int(self.weight[0].numel())

    def _reparametrize(self, w: Tensor) -> Tensor:
        var, mean = torch.var_mean(w, dim=(1, 2, 3), correction=0, keepdim=True)
        scale = torch.rsqrt(torch.clamp(var * self.fan_in, min=self.eps))
        return (w - mean) * (scale * self.gain.to(w.dtype) * self.gamma)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}"


__all__ = [
    "RELU_GAIN",
    "RELU_SHIFT",
    "CenteredScaledReLU",
    "ScaledStdConv2d",
    "SkipInit",
    "WNConv2d",
]
