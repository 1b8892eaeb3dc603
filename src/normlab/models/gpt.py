"""A small GPT (nanoGPT-sized) whose norm and placement are chosen by name."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.blocks import Block, BlockConfig, build_block, get_placement, make_block_norm
from normlab.norms import NORMS
from normlab.norms._base import Device, DType, NormSpec


@dataclass(frozen=True, kw_only=True)
class GPTConfig(BlockConfig):
    """A :class:`~normlab.blocks.BlockConfig` plus what the language model adds.

    Attributes:
        vocab_size: number of tokens.
        block_size: the longest sequence (learned position embeddings of that length).
        placement: a registered placement name (``normlab.list_placements()``).
        encoder: bidirectional attention (an encoder-only model, BERT-like); the DeepNorm and
            Sub-LN constants then use their encoder row. Same as ``causal=False``.
        tie_weights: the output head shares the token embedding.
        final_norm: a norm after the last block; ``None`` follows the placement (Pre-LN,
            Peri-LN, Sub-LN, Mix-LN, LNS: yes; Post-LN, DeepNorm, B2T: no).
        embed_scale: a learned scalar multiplying the token embedding, initialised to
            ``sqrt(n_embd)`` (the DyT LLaMA recipe, also Derf's GPT-2): ``None`` enables it
            for the norms whose spec asks for it (``NormSpec.embed_scale``: DyT, Derf).

    Defaults are the nanoGPT "baby" size scaled down: 6 layers, 4 heads, width 128.
    """

    vocab_size: int
    block_size: int
    n_layer: int = 6
    n_head: int = 4
    n_embd: int = 128
    placement: str = "pre"
    encoder: bool = False
    tie_weights: bool = True
    final_norm: bool | None = None
    embed_scale: bool | None = None

    def __post_init__(self) -> None:
        if self.encoder and self.causal:
            object.__setattr__(self, "causal", False)  # encoder=True implies bidirectional attention
        super().__post_init__()
        for name in ("vocab_size", "block_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"GPTConfig: {name} must be a positive int, got {v!r}")
        # unknown placements and placement options fail here, with suggestions
        get_placement(self.placement, self).resolve_options(self)


class GPTOutput(NamedTuple):
    """``logits`` ``(B, T, vocab)``; ``loss`` (``None`` without targets); ``hidden_states``:
    the residual stream, index 0 the (scaled) embeddings plus positions, index ``i`` the output
    of block ``i`` (empty unless ``output_hidden_states=True``)."""

    logits: Tensor
    loss: Tensor | None
    hidden_states: tuple[Tensor, ...]


def _embed_scale_as_vector(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
) -> None:
    """Checkpoints written before ``embed_scale`` became ``(1,)`` hold it 0-dim: reshape on load."""
    key = prefix + "embed_scale"
    value = state_dict.get(key)
    if isinstance(value, Tensor) and value.dim() == 0:
        state_dict[key] = value.reshape(1)


class GPT(nn.Module):
    """Decoder-only transformer: embeddings, ``n_layer`` blocks of one placement, head.

    ``GPT(GPTConfig(vocab_size=65, block_size=64, norm="dyt", placement="pre"))``. Causal
    attention through ``scaled_dot_product_attention``; the placement's own init (DeepNorm's
    beta, Sub-LN's gamma, ...) is applied by its blocks. :meth:`init_weights` re-runs the
    whole init, so a model built under ``torch.device("meta")`` is materialised with
    ``model.to_empty(device=...)`` then ``model.init_weights()`` (weight tying included).
    """

    def __init__(self, config: GPTConfig, *, device: Device = None, dtype: DType = None) -> None:
        super().__init__()
        self.config = cfg = config
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd, **dd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd, **dd)
        norm_spec: NormSpec = NORMS.get(cfg.norm).spec  # type: ignore[attr-defined]
        use_scale = norm_spec.embed_scale if cfg.embed_scale is None else cfg.embed_scale
        # (1,), not 0-dim: FSDP2's fully_shard refuses scalar parameters (as the DyT code keeps alpha)
        self.embed_scale = nn.Parameter(torch.empty(1, **dd)) if use_scale else None
        register: Any = self.register_load_state_dict_pre_hook  # untyped in torch
        register(_embed_scale_as_vector)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(build_block(cfg.placement, cfg, i, **dd) for i in range(cfg.n_layer))
        block_cls = get_placement(cfg.placement, cfg)
        wants_final = block_cls.NEEDS_FINAL_NORM if cfg.final_norm is None else cfg.final_norm
        self.final_norm = (
            make_block_norm(cfg, cfg.n_embd, site="final", layer_idx=0, **dd) if wants_final else None
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False, **dd)
        self.init_weights()

    def tie_weights(self) -> None:
        if self.config.tie_weights:
            self.lm_head.weight = self.wte.weight

    def init_weights(self) -> None:
        """Embeddings and head ``N(0, init_std)``, ``embed_scale = sqrt(d)``, then every block's init."""
        cfg = self.config
        self.tie_weights()
        with torch.no_grad():
            nn.init.normal_(self.wte.weight, std=cfg.init_std)
            nn.init.normal_(self.wpe.weight, std=cfg.init_std)
            if not cfg.tie_weights:
                nn.init.normal_(self.lm_head.weight, std=cfg.init_std)
            if self.embed_scale is not None:
                self.embed_scale.fill_(math.sqrt(cfg.n_embd))
        if self.final_norm is not None:
            for m in self.final_norm.modules():
                reset = getattr(m, "reset_parameters", None)
                if callable(reset):
                    reset()
        for block in self.blocks:
            cast(Block, block).reset_parameters()

    def _check_idx(self, idx: Tensor, targets: Tensor | None) -> None:
        cfg = self.config
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"GPT: expected token ids of shape (batch, tokens) and an integer dtype, "
                f"got shape {tuple(idx.shape)} and {idx.dtype}"
            )
        if idx.shape[1] > cfg.block_size:
            raise ValueError(f"GPT: sequence of {idx.shape[1]} tokens exceeds block_size={cfg.block_size}")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"GPT: targets shape {tuple(targets.shape)} != idx shape {tuple(idx.shape)}")
        if not torch.compiler.is_compiling() and idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"GPT: token ids must be in [0, {cfg.vocab_size}), got range [{lo}, {hi}]")

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, *, output_hidden_states: bool = False
    ) -> GPTOutput:
        """``idx`` ``(B, T)`` token ids; ``targets`` ``(B, T)`` next tokens (``-1`` is ignored)."""
        self._check_idx(idx, targets)
        pos = torch.arange(idx.shape[1], device=idx.device)
        tok = self.wte(idx)
        if self.embed_scale is not None:
            tok = tok * self.embed_scale
        x = self.drop(tok + self.wpe(pos))
        hidden = [x] if output_hidden_states else []
        for block in self.blocks:
            x = block(x)
            if output_hidden_states:
                hidden.append(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return GPTOutput(logits, loss, tuple(hidden))

    def num_params(self, *, non_embedding: bool = True) -> int:
        """Parameter count; without the position embedding (and so the tied head) by default."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n
