"""Depth probes of the Curse of Depth (Sun et al. 2025, arXiv:2502.05795): what each block does
to the residual stream, and what the loss loses without it.

With ``x_0`` the input of the first block and ``x_l`` the output of block ``l - 1`` (blocks
are 0-based, as ``layer_idx``; ``x_L`` is the output of the last block):

* residual-stream variance ``var_l = x_l.float().var()`` over every element, ``l = 0..L``;
* angular distance ``d(l, l + n) = arccos(cos(x_l, x_{l+n})) / pi`` averaged over samples,
  on the **last token** of each sequence (ShortGPT's convention, arXiv:2403.17887, used by
  the paper's heatmaps) or over **all tokens**; ``d(l, l + 1)`` is what block ``l`` changes;
* block influence ``BI_l = 1 - cos(x_l, x_{l+1})`` over all tokens (ShortGPT, arXiv:2403.03853);
* layer-removal sensitivity ``dL(l) = L(without block l) - L`` (> 0: the loss gets worse),
  the loss-based form of the paper's performance drop.

Hidden states of shape ``(B, T, d)`` are token sequences; any other shape (ResNet feature
maps) is one row per sample for both angular variants, and pairs of different shapes (a
stride or width change) get NaN.

Removal follows the paper's ``layer_remove.py``, which deletes ``model.model.layers[l]`` and
decrements ``num_hidden_layers``: the block is taken out of its container, so the later blocks
move down one index; Hugging Face KV-cache indices (``layer_idx`` of modules defined in
``transformers``), ``config.num_hidden_layers`` and ``config.layer_types`` follow; each block
keeps its own depth-dependent constants (normlab's ``layer_idx``, the LNS scale), as the paper's
``layer_index`` stays with its layer. The model is restored afterwards, also on error.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from normlab.diagnostics import metrics
from normlab.diagnostics._jsonable import Result
from normlab.diagnostics.hooks import Capture, preserved_state
from normlab.diagnostics.layers import Batch, LossFn, call_model, model_loss
from normlab.structure import find_blocks, strip_prefixes, unwrap

CURSE_OF_DEPTH = "Sun et al. 2025, arXiv:2502.05795"

Blocks = Sequence[tuple[str, nn.Module]]


@dataclass
class ResidualStream(Result):
    """Statistics of the residual stream ``x_0 .. x_L`` (index 0: the input of block 0).

    Attributes:
        names: ``"input"`` then the block names.
        variance: ``x_l.float().var()`` over every element.
        mean_square: ``mean(x_l ** 2)`` (``E||x||^2 / d`` per token for ``(B, T, d)``).
        shapes: shape of each ``x_l``.
    """

    names: list[str]
    variance: list[float]
    mean_square: list[float]
    shapes: list[list[int]]
    paper: str = CURSE_OF_DEPTH


@dataclass
class AngularDistances(Result):
    """``d(l, l + n)`` for ``n = 1..max_n``: row ``n - 1``, column ``l`` (NaN where ``l + n > L``).

    ``last_token``: on the last token of each sequence (the paper's heatmaps); ``all_tokens``:
    averaged over every token. ``rows``: what a row is (``"tokens"`` or ``"samples"``).
    """

    max_n: int
    num_blocks: int
    last_token: list[list[float]]
    all_tokens: list[list[float]]
    rows: str
    paper: str = CURSE_OF_DEPTH

    def adjacent(self, variant: str = "last_token") -> list[float]:
        """``d(l, l + 1)`` for every block ``l``."""
        if variant not in ("last_token", "all_tokens"):
            raise ValueError(f"adjacent: variant must be 'last_token' or 'all_tokens', got {variant!r}")
        table: list[list[float]] = getattr(self, variant)
        return list(table[0]) if table else []


@dataclass
class Removal(Result):
    """Loss change when each block is removed: ``delta[l] = L(without block l) - base_loss``."""

    base_loss: float
    loss_kind: str
    delta: list[float]
    errors: list[str | None] = field(default_factory=list)
    paper: str = CURSE_OF_DEPTH


# --------------------------------------------------------------------------------------------
# The residual stream


def _blocks(model: nn.Module, blocks: Blocks | None) -> list[tuple[str, nn.Module]]:
    pairs = list(find_blocks(model)) if blocks is None else list(blocks)
    if not pairs:
        raise ValueError(f"{type(model).__name__}: no blocks to probe")
    return pairs


def residual_capture(model: nn.Module, blocks: Blocks | None = None) -> tuple[Capture, Capture]:
    """Two captures that together record ``x_0`` (input of the first block) and every block
    output; attach them for a pass and read them with :func:`hidden_from_captures`."""
    pairs = _blocks(model, blocks)
    return Capture(model, pairs[:1], inputs=True, outputs=False), Capture(model, pairs)


def hidden_from_captures(first: Capture, outs: Capture) -> list[Tensor]:
    """``[x_0, x_1, ..., x_L]`` from the captures of :func:`residual_capture` (first call of each)."""
    name0 = first.modules[0][0]
    if not first.inputs[name0]:
        raise ValueError(f"the first block {name0!r} was not called")
    hidden = [first.inputs[name0][0]]
    for name, _ in outs.modules:
        if not outs.outputs[name]:
            raise ValueError(f"block {name!r} was not called")
        hidden.append(outs.outputs[name][0])
    return hidden


def residual_stream(
    model: nn.Module, batch: Batch, *, blocks: Blocks | None = None, train: bool | None = None
) -> list[Tensor]:
    """The hidden states ``[x_0, ..., x_L]`` of one no-grad forward pass, as CPU floats.

    Taken with hooks on the blocks, so they are the residual stream itself (a Hugging Face
    ``output_hidden_states`` ends with the final norm applied instead).
    """
    first, outs = residual_capture(model, blocks)
    with preserved_state(model, train=train), torch.no_grad(), first, outs:
        call_model(model, batch)
    return hidden_from_captures(first, outs)


def residual_stats(hidden: Sequence[Tensor], names: Sequence[str] | None = None) -> ResidualStream:
    """Variance and mean square of each hidden state."""
    labels = list(names) if names is not None else ["input"] + [f"block {i}" for i in range(len(hidden) - 1)]
    return ResidualStream(
        names=labels,
        variance=[metrics.residual_variance(h) for h in hidden],
        mean_square=[float(h.double().pow(2).mean()) for h in hidden],
        shapes=[list(h.shape) for h in hidden],
    )


def _token_rows(h: Tensor, *, last: bool) -> Tensor:
    if h.dim() == 3:
        return h[:, -1] if last else h.reshape(-1, h.shape[-1])
    return h.reshape(h.shape[0], -1)


def angular_distances(hidden: Sequence[Tensor], *, max_n: int | None = None) -> AngularDistances:
    """The ``d(l, l + n)`` table for ``n = 1..max_n`` (default: every ``n`` up to ``L``)."""
    num_blocks = len(hidden) - 1
    if num_blocks < 1:
        raise ValueError(f"angular_distances: need at least 2 hidden states, got {len(hidden)}")
    top = num_blocks if max_n is None else max_n
    if not 1 <= top <= num_blocks:
        raise ValueError(f"angular_distances: max_n must be in [1, {num_blocks}], got {max_n}")
    tables: dict[bool, list[list[float]]] = {True: [], False: []}
    for last in (True, False):
        rows = [_token_rows(h, last=last) for h in hidden]
        for n in range(1, top + 1):
            row = []
            for lo in range(num_blocks):
                hi = lo + n
                if hi > num_blocks or rows[lo].shape != rows[hi].shape:
                    row.append(math.nan)
                else:
                    row.append(metrics.mean_angular_distance(rows[lo], rows[hi]))
            tables[last].append(row)
    kind = "tokens" if hidden[0].dim() == 3 else "samples"
    return AngularDistances(top, num_blocks, tables[True], tables[False], kind)


def block_influences(hidden: Sequence[Tensor]) -> list[float]:
    """``BI_l = 1 - cos(x_l, x_{l+1})`` over all tokens (NaN where the shapes differ)."""
    out = []
    for a, b in itertools.pairwise(hidden):
        ra, rb = _token_rows(a, last=False), _token_rows(b, last=False)
        out.append(metrics.block_influence(ra, rb) if ra.shape == rb.shape else math.nan)
    return out


# --------------------------------------------------------------------------------------------
# Removing a block


def _hf_config(model: nn.Module) -> Any:
    cfg = getattr(unwrap(model), "config", None)
    return cfg if isinstance(getattr(cfg, "num_hidden_layers", None), int) else None


@contextlib.contextmanager
def removed_block(model: nn.Module, index: int, *, blocks: Blocks | None = None) -> Iterator[None]:
    """Inside the ``with``, block ``index`` is deleted from its container (see the module
    docstring for the re-indexing); everything is put back on exit, also after an error.

    Raises:
        ValueError: ``index`` out of range, or the block's parent is not a ``ModuleList`` /
            ``Sequential``.
    """
    pairs = _blocks(model, blocks)
    if not -len(pairs) <= index < len(pairs):
        raise ValueError(f"removed_block: index {index} out of range for {len(pairs)} blocks")
    name, _ = pairs[index]
    parent_name, _, key = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, (nn.ModuleList, nn.Sequential)) or key not in parent._modules:
        raise ValueError(
            f"removed_block: block {strip_prefixes(name)!r} is not an entry of a ModuleList or "
            f"Sequential (parent: {type(parent).__name__})"
        )
    saved_modules = parent._modules
    position = list(saved_modules).index(key)
    kept = [(k, m) for k, m in saved_modules.items() if k != key]
    if isinstance(parent, nn.ModuleList):  # ModuleList indexes by "0".."n-1"
        new_modules: dict[str, nn.Module] = OrderedDict((str(i), m) for i, (_, m) in enumerate(kept))
    else:
        new_modules = OrderedDict(kept)
    renumbered: list[tuple[nn.Module, int]] = []
    config = _hf_config(model)
    config_saved: dict[str, Any] = {}
    try:
        for pos, (_, block) in enumerate(kept):
            if block is None:
                continue
            for sub in block.modules():
                idx = getattr(sub, "layer_idx", None)
                if type(sub).__module__.startswith("transformers") and isinstance(idx, int):
                    renumbered.append((sub, idx))
                    setattr(sub, "layer_idx", pos)  # noqa: B010 (an attribute of a foreign class)
        if config is not None and config.num_hidden_layers == len(saved_modules):
            config_saved["num_hidden_layers"] = config.num_hidden_layers
            config.num_hidden_layers = len(kept)
            layer_types = getattr(config, "layer_types", None)
            if isinstance(layer_types, list) and len(layer_types) == len(saved_modules):
                config_saved["layer_types"] = layer_types
                config.layer_types = layer_types[:position] + layer_types[position + 1 :]
        parent._modules = new_modules
        yield
    finally:
        parent._modules = saved_modules
        for sub, idx in renumbered:
            setattr(sub, "layer_idx", idx)  # noqa: B010
        for attr, value in config_saved.items():
            setattr(config, attr, value)


def removal_sensitivity(
    model: nn.Module,
    batch: Batch,
    *,
    blocks: Blocks | None = None,
    loss_fn: LossFn | None = None,
    train: bool | None = None,
) -> Removal:
    """``L(without block l) - L`` for every block ``l`` (no-grad forward passes).

    Every pass starts from the same random state, so dropout masks agree between the full
    and the pruned model. A removal that cannot be measured (a ResNet block that changes the
    width, a block whose output the next one reads by attribute, a T5 block whose caller unpacks
    its outputs) gets NaN and its error message in ``errors``: it is not measurable, never a crash.
    """
    pairs = _blocks(model, blocks)

    def loss_now() -> tuple[float, str]:
        with preserved_state(model, train=train), torch.no_grad():
            loss, kind = model_loss(call_model(model, batch), loss_fn)
            return float(loss), kind

    base, kind = loss_now()
    delta: list[float] = []
    errors: list[str | None] = []
    for i in range(len(pairs)):
        try:
            with removed_block(model, i, blocks=pairs):
                pruned, _ = loss_now()
            delta.append(pruned - base)
            errors.append(None)
        except Exception as e:  # any failure of the pruned model is that entry's, not the report's
            delta.append(math.nan)
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return Removal(base_loss=base, loss_kind=kind, delta=delta, errors=errors)
