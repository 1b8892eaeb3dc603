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

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.norms._base import NormMixin
from normlab.norms._info import TOKEN_KINDS, NormInfo, group_norm_info, running_stats_info
from normlab.norms.batch_norm import BatchNorm
from normlab.norms.cross_bn import CrossBatchNorm

__all__ = ["TOKEN_KINDS", "NormInfo", "UnsupportedNormError", "is_batchnorm", "read_norm"]


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
    if t is nn.GroupNorm or (isinstance(module, nn.GroupNorm) and t.__name__ in ("GroupNorm", "GroupNorm1")):
        return group_norm_info(module, foreign=t is not nn.GroupNorm)  # type: ignore[arg-type]
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


def _foreign(module: nn.Module) -> NormInfo | None:
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
    if isinstance(module, nn.LayerNorm):
        ln: nn.LayerNorm = module
        info = NormInfo(
            "layernorm",
            module,
            tuple(ln.normalized_shape),
            channels_first=_channels_first_name(module),
            eps=float(ln.eps),
            weight=ln.weight,
            bias=ln.bias,
            foreign=True,
        )
        return _probe(info)
    if _is_rms_name(name) and not list(module.children()):
        w = _param(module, "weight")
        shape_attr = getattr(module, "normalized_shape", None)
        if shape_attr is not None:
            shape = _shape(shape_attr)
        elif w is not None:
            shape = tuple(w.shape)
        else:
            raise UnsupportedNormError(
                f"{name}: neither a weight nor a normalized_shape to read the features from"
            )
        eps = _eps_of(module)
        info = NormInfo(
            "rmsnorm",
            module,
            shape,
            channels_first=_channels_first_name(module),
            eps=eps,
            weight=w,
            bias=_param(module, "bias"),
            foreign=True,
        )
        return _probe(info)
    return None


def _looks_like_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    if "Norm" not in name or "WeightNorm" in name or "SpectralNorm" in name or list(module.children()):
        return False
    return _eps_of(module) is not None or isinstance(getattr(module, "weight", None), nn.Parameter)


def read_norm(module: nn.Module) -> NormInfo | None:
    """Read ``module`` as a norm: a :class:`NormInfo`, or ``None`` if it is not a norm.

    Raises:
        UnsupportedNormError: a module that looks like a norm (a leaf whose class name says Norm and
            that has an eps or a weight) but cannot be read, or whose probe output disagrees.
    """
    info = _known(module)
    if info is not None:
        return info
    info = _foreign(module)
    if info is not None:
        return info
    if _looks_like_norm(module):
        raise UnsupportedNormError(
            f"{type(module).__name__} is not a norm class normlab recognises (torch, normlab, Hugging Face "
            "per-model RMSNorm/LayerNorm, timm, torchvision)"
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


def _probe_input(info: NormInfo, dtype: torch.dtype, device: torch.device) -> Tensor:
    gen = torch.Generator().manual_seed(1234)
    shape = (2, info.num_features, 2, 3) if info.channels_first else (2, 3, *info.shape)
    # A mean away from 0 and a spread away from 1, so LayerNorm, RMSNorm and a missing
    # normalization all give different outputs.
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.7 + 0.6
    return x.to(device=device, dtype=dtype)


def _probe(info: NormInfo) -> NormInfo:
    """Check ``info`` against the module's output; try Gemma's ``1 + w`` for an RMSNorm."""
    tensors = [t for t in (*info.module.parameters(), *info.module.buffers()) if t.is_floating_point()]
    device = tensors[0].device if tensors else torch.device("cpu")
    if device.type == "meta":
        return info  # nothing to run; the reading by attributes stands
    dtype = info.module_dtype()
    x = _probe_input(info, dtype, device)
    try:
        with torch.no_grad():
            out = info.module.forward(x).double()  # forward, not __call__: hooks (LNS) are not the norm
    except Exception as e:  # a foreign forward may reject the probe shape; that is a refusal
        raise UnsupportedNormError(
            f"{info.source}: probing its forward failed ({type(e).__name__}: {e})"
        ) from e
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    candidates: list[NormInfo] = [info]
    if info.kind == "rmsnorm" and info.weight is not None:
        candidates.append(replace(info, weight_offset=1.0, note="weight used as 1 + w (Gemma convention)"))
    worst = math.inf
    for cand in candidates:
        ref = reference(cand, x.double())
        if ref.shape != out.shape:
            continue
        diff = float((out - ref).abs().max())
        bound = tol * (1.0 + float(ref.abs().max()))
        if diff <= bound:
            return cand
        worst = min(worst, diff)
    raise UnsupportedNormError(
        f"{info.source}: its output on a probe input does not match {info.kind} with the parameters read "
        f"(eps={info.eps}, channels_first={info.channels_first}; max difference {worst:.3g})"
    )
