"""What every transformer block shares: its config, attention, MLP, norm slots and base init.

No placement logic lives here: a placement is one file with a ``Block`` subclass whose
``forward`` reads as its paper's equation, registered with ``@register_placement("name")``
and imported by one line in ``normlab/blocks/__init__.py``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.blocks import init as nl_init
from normlab.norms import NORMS, create_norm
from normlab.norms._base import Device, DType, NormSpec
from normlab.registry import Registry

Site = Literal["attn", "ffn", "final"]
# BlockConfig fields that carried one placement's option, until 0.1: field -> what replaces it
_DEPRECATED_FIELDS = {
    "b2t_rescale": "placement='b2t' with placement_kwargs={'rescale': ...}",
    "mixln_alpha": "placement='mixln' with placement_kwargs={'alpha': ...}",
    "layernorm_scaling": "placement='lns'",
}
InitScheme = Literal["normal", "scaled", "depth_scaled", "torch"]


@dataclass(frozen=True, kw_only=True)
class BlockConfig:
    """Everything a transformer block needs to build itself.

    Attributes:
        n_embd: model width ``d``.
        n_head: attention heads (must divide ``n_embd``).
        n_layer: depth of the stack; placements read it for their constants (DeepNorm's
            alpha/beta, Sub-LN's gamma, Mix-LN's split, scaled init).
        norm: a registered norm name (any spelling or alias).
        norm_kwargs: extra keyword options for every norm of the block (``eps``, ...).
        mlp: ``"gelu"`` (``fc2(gelu(fc1 x))``) or ``"swiglu"`` (``fc2(silu(gate) * up)``).
        ffn_dim: hidden width of the MLP; default ``4 d`` (gelu) or ``8 d / 3`` rounded up to
            a multiple of 8 (swiglu, as LLaMA).
        bias: biases in the linear layers.
        dropout: dropout on attention weights and on both branch outputs.
        causal: causal self-attention (a decoder); ``False`` gives an encoder.
        qk_norm: a norm name applied per head to queries and keys (over ``head_dim``) before
            the dot product, or ``None``.
        init: base init of the block's linear layers, before the placement's own:
            ``"normal"`` (``N(0, init_std)``, as the LNS paper recommends),
            ``"scaled"`` (``out_proj``/``fc2`` with ``init_std / sqrt(2 n_layer)``, GPT-2),
            ``"depth_scaled"`` (Xavier-uniform bound / ``sqrt(l)``, arXiv:1908.11365),
            ``"torch"`` (keep ``nn.Linear``'s default).
        init_std: the std of ``"normal"`` and ``"scaled"``.
        placement_init: ``"paper"`` (DeepNet/Magneto: ``xavier_normal_(gain)``) or
            ``"torchscale"`` (multiply the existing init) for DeepNorm and Sub-LN.
        placement_kwargs: options of the placement, read by it alone (``Block.OPTIONS`` lists
            each placement's, with defaults): B2T's ``rescale``, Mix-LN's ``alpha``.
        b2t_rescale, mixln_alpha, layernorm_scaling: deprecated (they warn; gone in the next
            release): ``placement_kwargs={"rescale": ...}`` with B2T, ``{"alpha": ...}`` with
            Mix-LN, and ``placement="lns"``.
    """

    n_embd: int
    n_head: int
    n_layer: int
    norm: str = "layernorm"
    norm_kwargs: Mapping[str, Any] = field(default_factory=dict)
    mlp: Literal["gelu", "swiglu"] = "gelu"
    ffn_dim: int | None = None
    bias: bool = True
    dropout: float = 0.0
    causal: bool = True
    qk_norm: str | None = None
    init: InitScheme = "normal"
    init_std: float = 0.02
    placement_init: Literal["paper", "torchscale"] = "paper"
    placement_kwargs: Mapping[str, Any] = field(default_factory=dict)
    b2t_rescale: bool | None = None
    mixln_alpha: float | None = None
    layernorm_scaling: bool | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in ("n_embd", "n_head", "n_layer"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{owner}: {name} must be a positive int, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"{owner}: n_head={self.n_head} must divide n_embd={self.n_embd}")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"{owner}: mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.ffn_dim is not None and (not isinstance(self.ffn_dim, int) or self.ffn_dim < 1):
            raise ValueError(f"{owner}: ffn_dim must be a positive int or None, got {self.ffn_dim!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{owner}: dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("normal", "scaled", "depth_scaled", "torch"):
            raise ValueError(
                f"{owner}: init must be 'normal', 'scaled', 'depth_scaled' or 'torch', got {self.init!r}"
            )
        if not (math.isfinite(self.init_std) and self.init_std > 0):
            raise ValueError(f"{owner}: init_std must be a finite number > 0, got {self.init_std!r}")
        if self.placement_init not in ("paper", "torchscale"):
            raise ValueError(
                f"{owner}: placement_init must be 'paper' or 'torchscale', got {self.placement_init!r}"
            )
        if not isinstance(self.placement_kwargs, Mapping):
            raise ValueError(f"{owner}: placement_kwargs must be a mapping, got {self.placement_kwargs!r}")
        for old, new in _DEPRECATED_FIELDS.items():
            if getattr(self, old) is not None:
                warnings.warn(
                    f"{owner}({old}=...) is deprecated: use {new}; it goes in the next release",
                    DeprecationWarning,
                    stacklevel=3,
                )
        if self.mixln_alpha is not None and not 0.0 <= self.mixln_alpha <= 1.0:
            raise ValueError(f"{owner}: mixln_alpha must be in [0, 1], got {self.mixln_alpha!r}")
        NORMS.resolve(self.norm)  # unknown names fail here, with suggestions
        if self.qk_norm is not None:
            NORMS.resolve(self.qk_norm)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        return 4 * self.n_embd if self.mlp == "gelu" else -(-8 * self.n_embd // 3 // 8) * 8

    @property
    def arch(self) -> Literal["encoder", "decoder"]:
        """Which row of the DeepNorm/Sub-LN tables applies (identical values for the two)."""
        return "decoder" if self.causal else "encoder"


# --------------------------------------------------------------------------------------------
# Norms inside a block


class TokenwiseNorm(nn.Module):
    """Applies a channels-first norm (GroupNorm, ...) to each token of a ``(*, C)`` input.

    The tokens are flattened to a ``(tokens, C)`` batch, so the norm sees one token per sample
    and its statistics never mix positions.
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.norm(x.reshape(-1, x.shape[-1]))
        return y.reshape(x.shape)


def make_block_norm(
    cfg: BlockConfig,
    num_features: int,
    *,
    site: Site,
    layer_idx: int,
    device: Device = None,
    dtype: DType = None,
) -> nn.Module:
    """Build ``cfg.norm`` for one slot of block ``layer_idx`` (``site`` says which slot).

    * Norms that need their depth (LNS) get ``layer_idx``; the final norm gets ``layer_idx=0``,
      i.e. the unscaled base norm, as the Curse-of-Depth paper prescribes.
    * The norm's own per-site recipe comes from its class (``block_kwargs``): DyT/Derf get the
      DyT LLaMA recipe's ``alpha_init``; ``norm_kwargs`` overrides it.
    * Channels-first norms are applied token by token (:class:`TokenwiseNorm`).

    Raises:
        ValueError: a norm that cannot normalize one token: batch statistics in a causal model
            (they would leak later tokens into earlier ones), or a norm that needs spatial
            dimensions (InstanceNorm would normalize over the sequence).
    """
    name = NORMS.resolve(cfg.norm)
    cls = NORMS.get(name)
    spec: NormSpec = cls.spec  # type: ignore[attr-defined]
    where = f"norm {name!r} in a transformer block"
    if spec.batch_stats and cfg.causal:
        raise ValueError(
            f"{where}: it uses batch statistics, which mix the tokens of a sequence and leak later "
            "tokens into earlier ones in a causal model; use it with causal=False (an encoder)"
        )
    if spec.layout == "channel" and spec.min_ndim > 2:
        raise ValueError(
            f"{where}: it normalizes over spatial dimensions (min_ndim={spec.min_ndim}); "
            "on tokens that would be the sequence, so it cannot normalize one token"
        )
    unknown = set(spec.needs) - {"layer_idx"} - set(cfg.norm_kwargs)
    if unknown:
        raise ValueError(
            f"{where}: it needs {sorted(unknown)}, which a block cannot supply; pass it in norm_kwargs"
        )
    kwargs = {**cls.block_kwargs(site=site, d_model=cfg.n_embd), **cfg.norm_kwargs}  # type: ignore[attr-defined]
    if "layer_idx" in spec.needs:  # the block's own depth, whatever norm_kwargs say
        kwargs["layer_idx"] = 0 if site == "final" else layer_idx
    norm = create_norm(name, num_features, device=device, dtype=dtype, **kwargs)
    return TokenwiseNorm(norm) if spec.layout == "channel" else norm


# --------------------------------------------------------------------------------------------
# Sublayers


class Attention(nn.Module):
    """Multi-head self-attention: ``out_proj(inner_norm(softmax(q k^T / sqrt(d_h)) v))``.

    ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` are separate ``nn.Linear`` layers so that
    DeepNorm/Sub-LN can initialise them apart (as torchscale names them). ``inner_norm`` is
    Sub-LN's norm on the concatenated heads before ``out_proj`` (``None`` elsewhere);
    ``q_norm``/``k_norm`` the optional QK-norm over each head's ``head_dim``.
    """

    def __init__(
        self,
        cfg: BlockConfig,
        *,
        layer_idx: int,
        inner_norm: bool = False,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__()
        d, dd = cfg.n_embd, dict[str, Any](device=device, dtype=dtype)
        self.n_head, self.causal, self.dropout = cfg.n_head, cfg.causal, cfg.dropout
        self.q_proj = nn.Linear(d, d, bias=cfg.bias, **dd)
        self.k_proj = nn.Linear(d, d, bias=cfg.bias, **dd)
        self.v_proj = nn.Linear(d, d, bias=cfg.bias, **dd)
        self.out_proj = nn.Linear(d, d, bias=cfg.bias, **dd)
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        if cfg.qk_norm is not None:
            qk = dataclasses.replace(cfg, norm=cfg.qk_norm, norm_kwargs={})
            self.q_norm = make_block_norm(qk, cfg.head_dim, site="attn", layer_idx=layer_idx, **dd)
            self.k_norm = make_block_norm(qk, cfg.head_dim, site="attn", layer_idx=layer_idx, **dd)
        self.inner_norm = (
            make_block_norm(cfg, d, site="attn", layer_idx=layer_idx, **dd) if inner_norm else None
        )
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = (
            p(x).view(b, t, self.n_head, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal)
        a = a.transpose(1, 2).reshape(b, t, c)
        if self.inner_norm is not None:
            a = self.inner_norm(a)
        out: Tensor = self.resid_dropout(self.out_proj(a))
        return out


class MLP(nn.Module):
    """``fc2(inner_norm(act(fc1 x)))``; with SwiGLU ``fc1`` yields gate and up halves.

    ``inner_norm`` is Sub-LN's norm over the hidden width (``None`` elsewhere).
    """

    def __init__(
        self,
        cfg: BlockConfig,
        *,
        layer_idx: int,
        inner_norm: bool = False,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__()
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        h = cfg.hidden_dim
        self.swiglu = cfg.mlp == "swiglu"
        self.fc1 = nn.Linear(cfg.n_embd, 2 * h if self.swiglu else h, bias=cfg.bias, **dd)
        self.fc2 = nn.Linear(h, cfg.n_embd, bias=cfg.bias, **dd)
        self.inner_norm = (
            make_block_norm(cfg, h, site="ffn", layer_idx=layer_idx, **dd) if inner_norm else None
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.swiglu:
            gate, up = self.fc1(x).chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(self.fc1(x))
        if self.inner_norm is not None:
            h = self.inner_norm(h)
        out: Tensor = self.dropout(self.fc2(h))
        return out


# --------------------------------------------------------------------------------------------
# The block base class and the placement registry


class Block(nn.Module):
    """Base of every placement: builds ``attn``, ``mlp`` and the norms named in ``NORM_SLOTS``.

    Subclasses set ``NORM_SLOTS`` (slot attribute -> site), ``NEEDS_FINAL_NORM`` (whether the
    model ends with a norm after the last block), ``SUBLAYER_NORMS`` (Sub-LN's inner norms),
    write ``forward`` as their equation, and override :meth:`init_placement` for an init
    of their own. ``reset_parameters`` re-runs the whole init, so a block built on the meta
    device is initialised by ``to_empty()`` then ``reset_parameters()``.

    Args:
        cfg: the :class:`BlockConfig`.
        layer_idx: 0-based index of the block in its stack, ``< cfg.n_layer``.
    """

    NORM_SLOTS: ClassVar[Mapping[str, Site]] = {"norm_attn": "attn", "norm_mlp": "ffn"}
    NEEDS_FINAL_NORM: ClassVar[bool] = True
    SUBLAYER_NORMS: ClassVar[bool] = False
    # the placement's options (``BlockConfig.placement_kwargs``) and their defaults
    OPTIONS: ClassVar[Mapping[str, Any]] = {}
    # option -> the deprecated BlockConfig field that carried it until 0.1
    LEGACY_OPTION_FIELDS: ClassVar[Mapping[str, str]] = {}
    registry_name: ClassVar[str]
    options: dict[str, Any]
    # the norms of NORM_SLOTS, added by name in __init__
    norm_attn: nn.Module
    norm_mlp: nn.Module

    def __init__(
        self, cfg: BlockConfig, *, layer_idx: int, device: Device = None, dtype: DType = None
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < cfg.n_layer:
            raise ValueError(
                f"{owner}: layer_idx must be an int in [0, n_layer={cfg.n_layer}), got {layer_idx!r}"
            )
        self.cfg, self.layer_idx = cfg, layer_idx
        self.options = self.resolve_options(cfg)
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        inner = self.SUBLAYER_NORMS
        self.attn = Attention(cfg, layer_idx=layer_idx, inner_norm=inner, **dd)
        self.mlp = MLP(cfg, layer_idx=layer_idx, inner_norm=inner, **dd)
        for slot, site in self.NORM_SLOTS.items():
            self.add_module(slot, make_block_norm(cfg, cfg.n_embd, site=site, layer_idx=layer_idx, **dd))
        self.reset_parameters()

    @classmethod
    def resolve_options(cls, cfg: BlockConfig) -> dict[str, Any]:
        """``OPTIONS`` updated by ``cfg.placement_kwargs`` (and a deprecated field that carried one).

        Raises:
            ValueError: an option this placement does not have, naming the ones it has.
        """
        name = getattr(cls, "registry_name", cls.__name__)
        unknown = sorted(set(cfg.placement_kwargs) - set(cls.OPTIONS))
        if unknown:
            known = ", ".join(sorted(cls.OPTIONS)) or "none"
            raise ValueError(f"placement {name!r}: unknown placement_kwargs {unknown}; its options: {known}")
        options = dict(cls.OPTIONS)
        for option, old in cls.LEGACY_OPTION_FIELDS.items():
            if getattr(cfg, old) is not None:
                options[option] = getattr(cfg, old)
        options.update(cfg.placement_kwargs)
        cls.check_options(options)
        return options

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Validate the placement's option values (none to check by default)."""

    def linears(self) -> list[nn.Linear]:
        return [m for m in self.modules() if isinstance(m, nn.Linear)]

    def reset_parameters(self) -> None:
        """Norms to their defaults, then the config's base init, then the placement's init."""
        for m in self.modules():
            reset = getattr(m, "reset_parameters", None)
            if m is not self and not isinstance(m, nn.Linear) and callable(reset):
                reset()
        if self.cfg.init != "torch":
            self._base_init()
        self.init_placement()

    def _base_init(self) -> None:
        cfg = self.cfg
        with torch.no_grad():
            for lin in self.linears():
                if cfg.init == "depth_scaled":
                    nl_init.depth_scaled_uniform_(lin.weight, self.layer_idx + 1)
                else:
                    nn.init.normal_(lin.weight, std=cfg.init_std)
                if lin.bias is not None:
                    lin.bias.zero_()
            if cfg.init == "scaled":
                std = nl_init.scaled_init_std(cfg.init_std, cfg.n_layer)
                for lin in nl_init.linears_named(self, ("out_proj", "fc2")):
                    nn.init.normal_(lin.weight, std=std)

    def init_placement(self) -> None:
        """The init that comes with the placement (none by default)."""

    def check_input(self, x: Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.cfg.n_embd:
            raise ValueError(
                f"{type(self).__name__} (layer_idx={self.layer_idx}): expected input (batch, tokens, "
                f"{self.cfg.n_embd}), got shape {tuple(x.shape)}"
            )

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, n_layer={self.cfg.n_layer}"


PLACEMENTS: Registry[type[Block]] = Registry("placement")


def register_placement(name: str, *, aliases: tuple[str, ...] = ()) -> Any:
    """Class decorator: register a :class:`Block` subclass as placement ``name``."""

    def decorator(cls: type[Block]) -> type[Block]:
        PLACEMENTS.register(name, aliases=aliases)(cls)
        cls.registry_name = name
        return cls

    return decorator


def get_placement(name: str, cfg: BlockConfig | None = None) -> type[Block]:
    """The block class of placement ``name``; ``cfg.layernorm_scaling`` turns ``"pre"`` into ``"lns"``."""
    canonical = PLACEMENTS.resolve(name)
    if cfg is not None and cfg.layernorm_scaling:
        if canonical not in ("pre", "lns"):
            raise ValueError(
                f"layernorm_scaling=True applies to Pre-LN ('pre'), not to placement {canonical!r}"
            )
        canonical = "lns"
    return PLACEMENTS.get(canonical)


def build_block(
    placement: str, config: BlockConfig, layer_idx: int, *, device: Device = None, dtype: DType = None
) -> Block:
    """One transformer block: ``build_block("deepnorm", cfg, layer_idx=3)``."""
    return get_placement(placement, config)(config, layer_idx=layer_idx, device=device, dtype=dtype)


def list_placements() -> list[str]:
    """Canonical names of every registered placement, sorted."""
    return PLACEMENTS.names()
