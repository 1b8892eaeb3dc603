"""Reading a normalization module of any library: its kind, features, eps, affine and statistics.

torch's and normlab's norms are read from their attributes. Hugging Face, timm and torchvision
norms are recognised by class name and duck typing (this core package never imports those
libraries): per-model RMSNorms (``LlamaRMSNorm``, ``Qwen2RMSNorm``, ``MistralRMSNorm``,
``T5LayerNorm``, Gemma's ``GemmaRMSNorm`` with its ``x * (1 + w)`` weight), ConvNeXt's
channels-first ``ConvNextLayerNorm``, timm's ``LayerNorm2d``/``RmsNorm``/``RmsNorm2d`` and the
``FrozenBatchNorm2d`` of torchvision/timm. For such a foreign class the reading is checked by a
*probe*: the module's output on a small fixed input must equal the formula with the parameters
read (in float64, within the module dtype's tolerance); where it does not, the other weight
convention (``w`` vs ``1 + w``) is tried, else the module is refused with the difference found.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.norms._base import NormMixin
from normlab.norms._info import TOKEN_KINDS, Kind, NormInfo, group_norm_info, running_stats_info
from normlab.norms.batch_norm import BatchNorm
from normlab.norms.cross_bn import CrossBatchNorm

__all__ = [
    "TOKEN_KINDS",
    "NormInfo",
    "UnsupportedNormError",
    "extra_inputs",
    "is_batchnorm",
    "probe_input",
    "probe_shape",
    "probe_tolerance",
    "read_norm",
]


class UnsupportedNormError(Exception):
    """A module that looks like a norm but cannot be read; the message says why."""


# --------------------------------------------------------------------------------------------
# Classes known exactly

TORCH_BATCHNORMS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    BatchNorm,
    CrossBatchNorm,
)
# Filled by normlab.convert.batchnorm (its frozen classes compute what their base computes).
EXTRA_BATCHNORMS: list[type[nn.Module]] = []


def is_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm whose eval output is ``(x - running_mean) / sqrt(running_var + eps) * w + b``.

    Exact known classes only (torch's, normlab's, their frozen variants, torchvision/timm's
    ``FrozenBatchNorm2d``): a subclass may compute something else.
    """
    t = type(module)
    return t in TORCH_BATCHNORMS or t in EXTRA_BATCHNORMS or _is_foreign_frozen_bn(module)


def _is_foreign_frozen_bn(module: nn.Module) -> bool:
    return (
        type(module).__name__ in ("FrozenBatchNorm2d", "FrozenBatchNorm1d")
        and not isinstance(module, _BatchNorm)
        and all(
            isinstance(getattr(module, n, None), Tensor)
            for n in ("weight", "bias", "running_mean", "running_var")
        )
    )


def _param(module: nn.Module, name: str) -> Tensor | None:
    t = getattr(module, name, None)
    return t if isinstance(t, Tensor) else None


def _batchnorm_info(module: nn.Module) -> NormInfo:
    if _is_foreign_frozen_bn(module):
        w = _param(module, "weight")
        assert w is not None
        return NormInfo(
            "batchnorm",
            module,
            (w.shape[0],),
            channels_first=True,
            eps=float(getattr(module, "eps", 1e-5)),
            weight=w,
            bias=_param(module, "bias"),
            momentum=None,
            track_running_stats=True,
            running_mean=_param(module, "running_mean"),
            running_var=_param(module, "running_var"),
            foreign=True,
            note="frozen: weight and bias are buffers",
        )
    return running_stats_info("batchnorm", module)


def _shape(value: object) -> tuple[int, ...]:
    return (value,) if isinstance(value, int) else tuple(int(v) for v in value)  # type: ignore[attr-defined]


def _known(module: nn.Module) -> NormInfo | None:
    """Read a torch or normlab norm (a normlab norm reads itself: ``norm_info``); ``None`` if the
    class is not one of them."""
    t = type(module)
    if is_batchnorm(module) and not _is_foreign_frozen_bn(module):
        return _batchnorm_info(module)
    if isinstance(module, NormMixin):
        return module.norm_info()
    if t is nn.LayerNorm:
        ln: nn.LayerNorm = module  # type: ignore[assignment]
        return NormInfo(
            "layernorm", module, tuple(ln.normalized_shape), eps=float(ln.eps), weight=ln.weight, bias=ln.bias
        )
    if t is nn.RMSNorm:
        rms: nn.RMSNorm = module  # type: ignore[assignment]
        return NormInfo("rmsnorm", module, tuple(rms.normalized_shape), eps=rms.eps, weight=rms.weight)
    # a subclass that keeps torch's forward (PoolFormer's, timm's GroupNorm1) computes GroupNorm
    if isinstance(module, nn.GroupNorm) and (t.forward is nn.GroupNorm.forward or t.__name__ == "GroupNorm1"):
        return group_norm_info(module, foreign=t is not nn.GroupNorm)
    if t in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
        # its class fixes the spatial rank, so a (C, H, W) input to InstanceNorm2d is unbatched
        k = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}[t]
        return replace(running_stats_info("instancenorm", module), spatial_dims=k)
    return None


# --------------------------------------------------------------------------------------------
# Foreign classes, by name


def _is_rms_name(name: str) -> bool:
    return "RMSNorm" in name or "RmsNorm" in name or name == "T5LayerNorm"


def _channels_first_name(module: nn.Module) -> bool:
    name = type(module).__name__
    fmt = getattr(module, "data_format", None)
    if isinstance(fmt, str):
        return fmt == "channels_first"
    return name.endswith(("2d", "2dFp32")) or "Norm2d" in name


def _eps_of(module: nn.Module) -> float | None:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        v = getattr(module, attr, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def extra_inputs(module: nn.Module) -> list[str]:
    """The named inputs of ``module.forward`` besides the tensor it normalizes (a gate, a residual,
    a mask): what a one-input normlab norm cannot take. ``*args``/``**kwargs`` are not counted."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return []
    named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return [p.name for p in named[1:]]


def _takes_more(name: str, extra: list[str]) -> UnsupportedNormError:
    return UnsupportedNormError(
        f"{name}: its forward takes {', '.join(repr(e) for e in extra)} besides the input (a gated or "
        "residual-taking norm); a normlab norm takes one input, so it is not replaced"
    )


def _learned(module: nn.Module, name: str) -> Tensor | None:
    """``module.<name>`` if it is a parameter or a persistent buffer (a frozen weight); a
    non-persistent buffer is a placeholder that the module does not save, often unused (Falcon-Mamba's
    weightless RMSNorm keeps one of another size), so it says nothing of the features."""
    t = getattr(module, name, None)
    if isinstance(t, nn.Parameter):
        return t
    if isinstance(t, Tensor) and name in module._buffers and name not in module._non_persistent_buffers_set:
        return t
    return None


def _features(
    module: nn.Module, weight: Tensor | None, input_shape: tuple[int, ...] | None
) -> tuple[int, ...] | None:
    shape_attr = getattr(module, "normalized_shape", None)
    if isinstance(shape_attr, (int, tuple, list, torch.Size)):
        return _shape(shape_attr)
    if weight is not None and weight.numel() > 1:  # a one-element weight is a broadcast scalar
        return tuple(weight.shape)
    if input_shape:
        return (int(input_shape[-1]),)
    return None


def _foreign(module: nn.Module, input_shape: tuple[int, ...] | None = None) -> NormInfo | None:
    t = type(module)
    name = t.__name__
    if name.endswith(("Act", "Act1d", "Act2d", "Act3d")) and "Norm" in name:
        raise UnsupportedNormError(
            f"{name} fuses an activation into the norm; convert the model's plain norms"
        )
    if _is_foreign_frozen_bn(module):
        return _batchnorm_info(module)
    if isinstance(module, _BatchNorm):
        raise UnsupportedNormError(
            f"{name} is a subclass of torch's BatchNorm whose computation normlab does not know"
        )
    row_norm = isinstance(module, nn.LayerNorm) or (
        _ROW_NORM_NAME.search(name) is not None
        and not any(k in name for k in ("Batch", "Group", "Instance"))
        and not list(module.children())
    )
    if not row_norm:
        return None
    extra = extra_inputs(module)
    if extra:
        raise _takes_more(name, extra)
    weight = _learned(module, "weight")
    bias = _learned(module, "bias")
    shape = _features(module, weight, input_shape)
    if shape is None:
        raise UnsupportedNormError(
            f"{name} has no weight and no normalized_shape, so its features show only in a forward; "
            "pass example= (an input of the model) to convert_norms"
        )
    rms_first = _is_rms_name(name) and not isinstance(module, nn.LayerNorm)
    kinds: tuple[Kind, ...] = ("rmsnorm", "layernorm") if rms_first else ("layernorm", "rmsnorm")
    eps = float(module.eps) if isinstance(module, nn.LayerNorm) else _eps_of(module)
    candidates = []
    for kind in kinds:
        for offset in (0.0, 1.0) if weight is not None else (0.0,):
            note = "weight used as 1 + w" if offset else ""
            candidates.append(
                NormInfo(
                    kind,
                    module,
                    shape,
                    channels_first=_channels_first_name(module),
                    eps=eps,
                    weight=weight,
                    bias=bias,
                    weight_offset=offset,
                    foreign=True,
                    note=note,
                )
            )
    return _probe(candidates, input_shape)


# leaf classes read by what they compute: the LayerNorm/RMSNorm names of Hugging Face and timm
_ROW_NORM_NAME = re.compile(
    r"(LayerNorm|RMSNorm|RmsNorm|LayerNorm1P|ScaleNorm)(\d?[dD])?(Fp32)?$|^[A-Z]\w*Norm(2d)?$"
)


def _looks_like_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    if "WeightNorm" in name or "SpectralNorm" in name or list(module.children()):
        return False
    return re.search(r"Norm(?!al)", name) is not None


def read_norm(module: nn.Module, *, input_shape: tuple[int, ...] | None = None) -> NormInfo | None:
    """Read ``module`` as a norm: a :class:`NormInfo`, or ``None`` if it is not a norm.

    A class normlab does not know (a Hugging Face per-model norm, timm's, a user's) is read by what
    it computes: each reading its attributes allow (LayerNorm or RMSNorm, weight ``w`` or ``1 + w``,
    with or without bias) is checked against the module's output on a probe input, and the one
    that matches is taken. ``input_shape``, the shape the model calls it with, gives the features
    of a norm without weight or ``normalized_shape`` (Hugging Face's NanoChat RMSNorm).

    Raises:
        UnsupportedNormError: a module that looks like a norm (a leaf whose class name says Norm)
            but cannot be read: its forward takes more than the input, no reading matches its
            output, or its features cannot be known.
    """
    info = _known(module)
    if info is not None:
        return info
    info = _foreign(module, input_shape)
    if info is not None:
        return info
    if _looks_like_norm(module):
        extra = extra_inputs(module)
        if extra:
            raise _takes_more(type(module).__name__, extra)
        raise UnsupportedNormError(
            f"{type(module).__name__} is not a norm class normlab recognises (torch, normlab, and any leaf "
            "LayerNorm/RMSNorm that computes one of them)"
        )
    return None


# --------------------------------------------------------------------------------------------
# Probe: check a foreign reading against the module's own output


def reference(info: NormInfo, x: Tensor) -> Tensor:
    """What ``info`` says the module computes, in float64."""
    x = x.double()
    if info.channels_first:
        x = x.movedim(1, -1)
    w = info.effective_weight()
    b = info.effective_bias()
    w64 = None if w is None else w.double()
    b64 = None if b is None else b.double()
    dims = tuple(range(-len(info.shape), 0))
    if info.kind == "layernorm":
        y = F.layer_norm(x, info.shape, w64, b64, info.eps if info.eps is not None else 1e-5)
    else:
        eps = info.eps if info.eps is not None else torch.finfo(info.module_dtype()).eps
        y = x * torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)
        y = y if w64 is None else y * w64
        y = y if b64 is None else y + b64
    return y.movedim(-1, 1) if info.channels_first else y


def probe_shape(info: NormInfo) -> tuple[int, ...]:
    """A small input shape the module of ``info`` accepts: ``(2, C, *spatial)`` for channels-first
    norms (the spatial rank of a ``...1d``/``...3d`` class), ``(2, 3, *shape)`` otherwise."""
    if not info.channels_first:
        return (2, 3, *info.shape)
    name = type(info.module).__name__
    k = info.spatial_dims or (1 if name.endswith("1d") else 3 if name.endswith("3d") else 2)
    return (2, info.num_features, *(3,) * k)


def probe_input(info: NormInfo, shape: tuple[int, ...] | None = None) -> Tensor:
    """A fixed random input for ``info``'s module, in its dtype and on its device."""
    gen = torch.Generator().manual_seed(1234)
    # A mean away from 0 and a spread away from 1, so LayerNorm, RMSNorm and a missing
    # normalization all give different outputs.
    # on CPU, with its generator, even under a ``torch.device("meta")`` context
    x = torch.randn(shape or probe_shape(info), generator=gen, dtype=torch.float64, device="cpu") * 1.7 + 0.6
    tensors = [t for t in (*info.module.parameters(), *info.module.buffers()) if t.is_floating_point()]
    device = tensors[0].device if tensors else torch.device("cpu")
    return x.to(device=device, dtype=info.module_dtype())


def probe_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of a probe comparison in ``dtype`` (float32: 1e-5)."""
    return 1e-5 if dtype == torch.float64 or dtype == torch.float32 else 3e-2


# eps values tried when the module does not say its own (OLMo's LayerNorm hard-codes 1e-5)
_EPS_GUESSES = (1e-5, 1e-6, 1e-8, 1e-12, 0.0)


def _probe(candidates: list[NormInfo], input_shape: tuple[int, ...] | None = None) -> NormInfo:
    """The first candidate reading whose formula gives the module's output on a probe input."""
    info = candidates[0]
    if any(t.device.type == "meta" for t in (*info.module.parameters(), *info.module.buffers())):
        return info  # nothing to run; the reading by attributes stands
    dtype = info.module_dtype()
    shape = input_shape if input_shape is not None else probe_shape(info)
    x = probe_input(info, shape)
    try:
        with torch.no_grad():
            out = info.module.forward(x).double()  # forward, not __call__: hooks (LNS) are not the norm
            tiny = info.module.forward(x * 1e-3).double() if info.eps is None else None
    except Exception as e:  # a foreign forward may reject the probe shape; that is a refusal
        raise UnsupportedNormError(
            f"{info.source}: probing its forward failed ({type(e).__name__}: {e})"
        ) from e
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    worst = math.inf
    for cand in candidates:
        if cand.eps is None:  # the eps that fits a small-variance input, where eps shows
            fits = []
            for eps in _EPS_GUESSES:
                try:
                    ref_tiny = reference(replace(cand, eps=eps), x.double() * 1e-3)
                except RuntimeError:
                    break
                if tiny is not None and ref_tiny.shape == tiny.shape:
                    fits.append((float((tiny - ref_tiny).abs().max() / (1 + ref_tiny.abs().max())), eps))
            if fits:
                cand = replace(cand, eps=min(fits)[1])
        try:
            ref = reference(cand, x.double())
        except RuntimeError:  # the reading's shape does not fit the input the model gives
            continue
        if ref.shape != out.shape:
            continue
        diff = float((out - ref).abs().max())
        bound = tol * (1.0 + float(ref.abs().max()))
        if diff <= bound:
            return cand
        worst = min(worst, diff)
    kinds = " / ".join(dict.fromkeys(c.kind for c in candidates))
    raise UnsupportedNormError(
        f"{info.source}: its output on a probe input matches no reading normlab has ({kinds} over the last "
        f"{len(info.shape)} dim(s) of size {info.shape}, weight w or 1 + w, eps={info.eps}, "
        f"channels_first={info.channels_first}; smallest max difference {worst:.3g})"
    )


def forward_example(model: nn.Module, example: Any) -> None:
    """``model(example)`` (a mapping as keywords, a tuple as positional arguments) in eval mode
    without gradients, every module's training mode restored after: what the conversion guard
    and the traced roles watch through their hooks."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(example, Mapping):
                model(**example)
            elif isinstance(example, tuple):
                model(*example)
            else:
                model(example)
    finally:
        for m, mode in modes:
            m.training = mode
