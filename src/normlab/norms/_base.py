"""What every normlab norm shares: its spec, input checks with clear errors, and the registry.

A norm is one file that defines a class with a ``spec`` and decorates it with
``@register_norm("name")``, plus one import line in ``normlab/norms/__init__.py``. The contract
test-suite reads the spec to build inputs, so a new norm is tested without further edits.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NoReturn, TypeVar, cast, overload

import torch
from torch import Tensor, nn

from normlab.norms._info import NEW, VARIANCE_KINDS, NormInfo, NotConvertibleError
from normlab.registry import Registry

Layout = Literal["last", "channel"]
Device = torch.device | str | int | None
DType = torch.dtype | None


@dataclass(frozen=True, kw_only=True)
class NormSpec:
    """Facts about a norm that tools (the contract suite, the CLI, blocks) rely on.

    Attributes:
        paper: short citation with the arXiv id (or "PyTorch" for plain torch semantics).
        layout: ``"last"``: features are the last dimension, input ``(*, C)``;
            ``"channel"``: features are dimension 1, input ``(N, C, *)``. Norms with a
            ``channels_first`` option switch from ``"last"`` to ``"channel"`` with it.
        batch_stats: the training output of a sample depends on the other samples.
        running_stats: keeps running statistics (``running_var``, and ``running_mean`` where the
            norm centres) used in eval.
        elementwise: no reduction at all: the output of an element depends on that element only.
        min_ndim: the smallest input rank accepted.
        needs: construction context the caller must supply (``"layer_idx"`` for LNS).
        example_kwargs: keyword arguments that make a small working instance (tests, demo).
        activation_params: per-feature parameters of a fused activation, not of the affine
            (FRN's TLU ``tau``, EvoNorm's ``v``): they stay with ``affine=False``.
        aux_params: parameters fitted only by the norm's auxiliary loss (Batchless's ``mean`` and
            ``log_std``/``std``/``inv_std``; the names that exist depend on the options). The norm
            then has ``aux_loss() -> Tensor`` (summed over a model by ``normlab.total_aux_loss``);
            its output does not backpropagate into these parameters (a stop-gradient), so tests
            of output gradients skip them, and they stay with ``affine=False``.
        lazy_buffers: some buffers are empty until the first training input sets their shape
            (BLN's per-position statistics), so a compiled module traces one more graph, per
            dtype, at its first training call.
        normalized_shape: ``num_features`` may be a tuple of trailing sizes (LayerNorm, RMSNorm).
        embed_scale: a transformer built with this norm scales its token embeddings by a learned
            scalar initialised to ``sqrt(d)`` (the DyT LLaMA recipe, also Derf's GPT-2): the
            statistics-free norms, whose output follows the scale of their input.
        fp32_tolerance: factor on the fp32 tolerances of the fp64-reference tests, for a norm
            whose exact output is ill-conditioned in its input (not a loose implementation):
            Compound BN's mixture posteriors at ``|x|`` ~ 50 x the component spread, where one
            fp32 ulp of ``x`` moves the posterior logits by ~1e-4.
    """

    paper: str
    layout: Layout = "last"
    batch_stats: bool = False
    running_stats: bool = False
    elementwise: bool = False
    min_ndim: int = 1
    needs: tuple[str, ...] = ()
    example_kwargs: Mapping[str, Any] = field(default_factory=dict)
    activation_params: tuple[str, ...] = ()
    aux_params: tuple[str, ...] = ()
    lazy_buffers: bool = False
    embed_scale: bool = False
    normalized_shape: bool = False
    fp32_tolerance: float = 1.0


class NormMixin:
    """Shared behaviour of normlab norms: descriptive errors and input validation.

    Mixed into ``nn.Module`` subclasses (first in the MRO, before the torch base class).
    """

    spec: ClassVar[NormSpec]
    num_features: int
    # Set by :func:`label_modules`; used to name the layer in error messages.
    qualified_name: str | None = None

    @property
    def channel_dim(self) -> int:
        """The input dimension that holds the features (1 or -1)."""
        if self.spec.layout == "channel" or getattr(self, "channels_first", False):
            return 1
        return -1

    # ---- Conversion (normlab.convert): reading this norm, and mirroring another ----

    def norm_info(self) -> NormInfo:
        """What this norm computes, for conversion. The generic reading, for a norm whose function is
        its own: features, layout, a float ``eps`` and the ``weight``/``bias`` Parameters."""
        w, b = getattr(self, "weight", None), getattr(self, "bias", None)
        eps = getattr(self, "eps", None)
        return NormInfo(
            "other",
            cast(nn.Module, self),
            (self.num_features,),
            channels_first=self.channel_dim == 1,
            eps=eps if isinstance(eps, float) else None,
            weight=w if isinstance(w, nn.Parameter) else None,
            bias=b if isinstance(b, nn.Parameter) else None,
        )

    @classmethod
    def convert_kwargs(
        cls, info: NormInfo, *, options: Mapping[str, Any]
    ) -> tuple[int | tuple[int, ...], dict[str, Any]]:
        """``(num_features, keyword arguments)`` that build this norm to mirror the norm ``info``
        describes: its layout, eps, affine flags and, for running statistics, momentum and
        ``track_running_stats``; ``options`` are the caller's (they win afterwards, and a norm
        reads them for choices of its own, e.g. ``num_groups``). Read from this class's
        constructor signature; a norm with options of its own extends it.

        Raises:
            NotConvertibleError: the two cannot normalize the same dimensions.
        """
        return cls._mirror_kwargs(info, options)

    @classmethod
    def _mirror_kwargs(
        cls, info: NormInfo, options: Mapping[str, Any], *, default_bias: bool | None = None
    ) -> tuple[int | tuple[int, ...], dict[str, Any]]:
        sig = inspect.signature(cls.__init__).parameters
        kw: dict[str, Any] = {}
        where_src = "dimension 1 of (N, C, *) inputs" if info.channels_first else "the last dimension"
        if cls.spec.layout == "channel":
            if "channels_first" in sig:
                kw["channels_first"] = info.channels_first
            elif not info.channels_first:
                raise NotConvertibleError(
                    f"{cls.__name__} normalizes dimension 1 of (N, C, *) inputs, {info.source} {where_src}"
                )
        elif info.channels_first:
            if "channels_first" not in sig:
                raise NotConvertibleError(
                    f"{cls.__name__} normalizes the last dimension, {info.source} {where_src}"
                )
            kw["channels_first"] = True
        if len(info.shape) > 1 and not cls.spec.normalized_shape:
            raise NotConvertibleError(
                f"{info.source} normalizes over {len(info.shape)} trailing dimensions {info.shape}; "
                f"{cls.__name__} takes a single feature dimension"
            )
        features: int | tuple[int, ...] = info.shape if len(info.shape) > 1 else info.shape[0]
        # eps keeps its meaning across LayerNorm/RMSNorm/BatchNorm/GroupNorm (added to a variance)
        if "eps" in sig and info.kind in VARIANCE_KINDS and info.eps is not None:
            kw["eps"] = info.eps
        has_weight = info.weight is not None or info.kind == "identity"  # identity: nothing to mirror
        affine_key = (
            "elementwise_affine" if "elementwise_affine" in sig else "affine" if "affine" in sig else None
        )
        if affine_key is not None and not has_weight:
            kw[affine_key] = False
        if "bias" in sig and has_weight and info.kind != "identity":
            default = sig["bias"].default if default_bias is None else default_bias
            # mirror the source, but never add a bias the target has none of by default (RMSNorm)
            kw["bias"] = bool(info.bias is not None) if default else False
        if "spatial_dims" in sig and info.spatial_dims is not None and "spatial_dims" not in options:
            kw["spatial_dims"] = info.spatial_dims
        if info.kind in ("batchnorm", "instancenorm") and cls.spec.running_stats:
            if "momentum" in sig:
                kw["momentum"] = info.momentum
            if "track_running_stats" in sig:
                kw["track_running_stats"] = info.track_running_stats
        if "num_groups" in sig and "num_groups" not in options:
            if info.kind == "groupnorm" and info.num_groups is not None:
                kw["num_groups"] = info.num_groups
            else:
                default_groups = sig["num_groups"].default
                if isinstance(default_groups, int) and isinstance(features, int):
                    # the paper's 32 groups where they divide the channels, else the largest divisor below
                    kw["num_groups"] = math.gcd(default_groups, features)
        return features, kw

    @classmethod
    def from_info(cls, info: NormInfo, **options: Any) -> nn.Module:
        """This norm built to mirror ``info`` (:meth:`convert_kwargs`, then ``options``), on the
        source module's device and dtype; its tensors are fresh (``convert_norms`` also carries
        the source's affine and statistics, and records the relation). ``RMSNorm.from_info(
        normlab.convert.read_norm(module))``."""
        features, kwargs = cls.convert_kwargs(info, options=options)
        first = next(
            (t for t in (*info.module.parameters(), *info.module.buffers()) if t.is_floating_point()), None
        )
        place = {} if first is None else {"device": first.device, "dtype": first.dtype}
        return cast(nn.Module, cls(features, **{**kwargs, **options}, **place))  # type: ignore[call-arg]

    @classmethod
    def conversion_relation(cls, info: NormInfo, kwargs: Mapping[str, Any]) -> str:
        """How this norm, built with ``kwargs`` to mirror ``info``, computes relative to it: one
        of ``normlab.norms._info``'s relations. By default a new function."""
        return NEW

    def statistics_from(self, info: NormInfo) -> list[tuple[str, Tensor | None, str, bool]]:
        """The statistics this norm takes from the norm ``info`` describes, whatever the affine:
        ``(tensor name, value, source expression, transformed)``; a ``None`` value was set by the
        norm itself. By default: a BatchNorm's running statistics as they are, and a Batchless
        norm's fitted mean and std as ``running_mean`` and ``running_var`` (equal in eval)."""
        if info.kind == "batchnorm":
            return [
                (name, getattr(info, name), name, False)
                for name in ("running_mean", "running_var", "num_batches_tracked")
            ]
        if info.kind == "batchless" and isinstance(getattr(self, "running_var", None), Tensor):
            eps = float(getattr(self, "eps", 0.0))
            var = (info.extra["std"].detach().double().square() - eps).clamp_min(0.0)
            return [
                ("running_mean", info.extra["mean"].detach(), "mean", True),
                ("running_var", var, "std^2 - eps", True),
            ]
        return []

    # ---- Facts a model builder reads (normlab's transformer blocks) ----

    @classmethod
    def block_kwargs(cls, *, site: str, d_model: int) -> dict[str, Any]:
        """Default options for this norm at ``site`` of a transformer block of width ``d_model``:
        ``"attn"`` (before attention), ``"ffn"`` (before the MLP, or inside a sublayer) or
        ``"final"`` (after the last block). None by default; a norm whose paper gives a per-site
        recipe returns it here. (What the block must supply, ``spec.needs``, is not a default.)
        """
        return {}

    # ---- Training hooks (see normlab.norms._training): nothing by default ----

    def after_step(self) -> bool:
        """Work after an optimizer step; returns whether anything was done."""
        return False

    def on_epoch_end(self) -> bool:
        """Work after the last step of an epoch; returns whether anything was done."""
        return False

    @property
    def wants_second_forward(self) -> bool:
        """Whether this norm needs each step's inputs forwarded again after the optimizer step."""
        return False

    def set_second_forward(self, active: bool) -> None:
        """Enter (``True``) or leave the second forward of a step's inputs."""

    def _where(self) -> str:
        name = type(self).__name__
        return f"{name} {self.qualified_name!r}" if self.qualified_name else name

    def _fail(self, message: str) -> NoReturn:
        raise ValueError(f"{self._where()}: {message}")

    def _check_input(self, x: Tensor) -> None:
        """Reject non-float input, too few dimensions, or the wrong feature size."""
        if not x.is_floating_point():
            self._fail(f"expected a floating-point input, got dtype {x.dtype}")
        trailing = tuple(getattr(self, "normalized_shape", ()))
        if len(trailing) > 1:  # LayerNorm/RMSNorm over several trailing dimensions
            if tuple(x.shape[-len(trailing) :]) != trailing:
                self._fail(f"expected an input ending in {trailing}, got shape {tuple(x.shape)}")
            return
        min_ndim = max(self.spec.min_ndim, 2 if self.channel_dim == 1 else 1)
        if x.dim() < min_ndim:
            self._fail(f"expected an input with at least {min_ndim} dimensions, got shape {tuple(x.shape)}")
        if x.shape[self.channel_dim] != self.num_features:
            where = "dimension 1" if self.channel_dim == 1 else "the last dimension"
            self._fail(
                f"expected {self.num_features} features in {where}, "
                f"got {x.shape[self.channel_dim]} (input shape {tuple(x.shape)})"
            )


def adopt_buffer_shapes(
    module: nn.Module, state_dict: Mapping[str, Any], prefix: str, names: Sequence[str]
) -> None:
    """Reshape ``module``'s buffers ``names`` to the checkpoint's shapes before loading.

    For buffers whose shape is set by the training inputs (lazily shaped statistics), so a
    checkpoint loads into a fresh module. Call it from ``_load_from_state_dict``.
    """
    for name in names:
        incoming = state_dict.get(prefix + name)
        current = module._buffers[name]
        if isinstance(incoming, Tensor) and current is not None and incoming.shape != current.shape:
            module._buffers[name] = torch.empty(incoming.shape, device=current.device, dtype=current.dtype)


def momentum_factor(
    momentum: float | None, num_batches_tracked: Tensor, dtype: torch.dtype
) -> Tensor | float:
    """The weight of the new batch in a running statistic: ``momentum`` (PyTorch's convention),
    or for ``None`` the cumulative average's ``1 / (n + 1)``, a tensor so that
    ``torch.compile`` does not break the graph on it."""
    if momentum is None:
        return 1.0 / (num_batches_tracked + 1).to(dtype)
    return momentum


@torch.no_grad()
def commit_if_finite(module: nn.Module, ok: Tensor, **new: Tensor) -> None:
    """Copy each ``new`` value into ``module``'s buffer of that name where ``ok`` (a 0-d bool
    tensor: the batch's statistics are finite) and count the batch in ``num_batches_tracked``,
    else leave the buffers and count it in ``skipped_updates``: the NaN-safe running update of
    every normlab norm with running statistics, with no host sync."""
    for name, value in new.items():
        buffer = module.get_buffer(name)
        buffer.copy_(torch.where(ok, value, buffer))
    module.get_buffer("num_batches_tracked").add_(ok.long())
    module.get_buffer("skipped_updates").add_((~ok).long())


def check_eps(owner: str, eps: float) -> float:
    """``eps`` must be a finite number > 0: eps=0 turns constant inputs into NaN."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"{owner}: eps must be a finite number > 0, got {eps!r}")
    return float(eps)


@overload
def check_momentum(owner: str, momentum: float, *, allow_none: Literal[False] = False) -> float: ...
@overload
def check_momentum(owner: str, momentum: float | None, *, allow_none: Literal[True]) -> float | None: ...
def check_momentum(owner: str, momentum: float | None, *, allow_none: bool = False) -> float | None:
    """Running-statistics ``momentum`` (weight of the new batch): a number in [0, 1]; ``None``
    (the cumulative average) only where ``allow_none``."""
    if momentum is None and allow_none:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        expected = "in [0, 1] or None" if allow_none else "a number in [0, 1]"
        raise ValueError(f"{owner}: momentum must be {expected}, got {momentum!r}")
    return float(momentum)


def check_num_features(owner: str, num_features: int) -> int:
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
        raise ValueError(f"{owner}: num_features must be a positive int, got {num_features!r}")
    return num_features


def feature_shape(owner: str, num_features: int | Sequence[int], channels_first: bool) -> tuple[int, ...]:
    """Validated ``normalized_shape`` of a LayerNorm-like norm: an int, or a tuple of trailing sizes."""
    shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
    for n in shape:
        check_num_features(owner, n)
    if channels_first and len(shape) != 1:
        raise ValueError(f"{owner}: channels_first needs an int num_features, got {shape}")
    return shape


def affine_parameters(
    num_features: int, *, weight: bool, bias: bool, device: Device, dtype: DType
) -> tuple[nn.Parameter | None, nn.Parameter | None]:
    """Per-feature ``(weight, bias)`` parameters, uninitialized; ``None`` where not learned."""

    def make(learned: bool) -> nn.Parameter | None:
        return nn.Parameter(torch.empty(num_features, device=device, dtype=dtype)) if learned else None

    return make(weight), make(weight and bias)


def reset_affine(weight: Tensor | None, bias: Tensor | None) -> None:
    """The identity affine: ``weight = 1``, ``bias = 0``."""
    if weight is not None:
        nn.init.ones_(weight)
    if bias is not None:
        nn.init.zeros_(bias)


def label_modules(model: nn.Module) -> int:
    """Record each normlab norm's qualified name inside ``model`` for error messages.

    After ``label_modules(model)``, an error raised by ``model.encoder.layers[3].norm`` says
    ``BatchNorm 'encoder.layers.3.norm': ...``. Returns the number of norms labelled.
    """
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, NormMixin):
            module.qualified_name = name or None
            count += 1
    return count


# --------------------------------------------------------------------------------------------
# The registry and the factory

NORMS: Registry[type[nn.Module]] = Registry("norm")
M = TypeVar("M", bound=type[nn.Module])


def register_norm(name: str, *, aliases: tuple[str, ...] = ()) -> Any:
    """Class decorator: register a norm under ``name`` (canonical, snake_case) and ``aliases``."""

    def decorator(cls: M) -> M:
        if not isinstance(getattr(cls, "spec", None), NormSpec):
            raise TypeError(f"{cls.__name__} needs a class attribute `spec = NormSpec(...)` to be registered")
        NORMS.register(name, aliases=aliases)(cls)
        cls.registry_name = name  # type: ignore[attr-defined]
        return cls

    return decorator


NormLayer = str | type[nn.Module] | functools.partial[nn.Module] | None


def get_norm_layer(layer: NormLayer) -> Any:
    """Resolve a norm given by name, class or ``functools.partial`` to something callable.

    Names are case-, ``_``- and ``-``-insensitive and may be aliases; ``None`` gives
    :class:`normlab.norms.identity.Identity`. A class or partial is returned unchanged.

    Raises:
        ValueError: an unknown name (the message lists close matches), or an unsupported type.
    """
    if layer is None:
        return NORMS.get("identity")
    if isinstance(layer, str):
        return NORMS.get(layer)
    if isinstance(layer, functools.partial) or (isinstance(layer, type) and issubclass(layer, nn.Module)):
        return layer
    raise ValueError(f"norm layer must be a name, an nn.Module class or a functools.partial, got {layer!r}")


def create_norm(layer: NormLayer, num_features: int, **kwargs: Any) -> nn.Module:
    """Build a norm: ``create_norm("rmsnorm", 512, eps=1e-6)``.

    Args:
        layer: a registered name, an ``nn.Module`` class or a ``functools.partial`` of one.
        num_features: the feature (channel) count, passed first as every normlab norm expects.
        **kwargs: keyword options of that norm (``eps``, ``num_groups``, ``layer_idx``, ...).
    """
    return get_norm_layer(layer)(num_features, **kwargs)  # type: ignore[no-any-return]


def list_norms() -> list[str]:
    """Canonical names of every registered norm, sorted."""
    return NORMS.names()
