"""What a model is made of: its wrappers, its stack of residual blocks, and every place a module is held.

One reading of a model's structure, shared by conversion (``convert_norms(where="0-5")``, LNS's
layer index) and the diagnostics (per-block residual stream, block removal), so that both number
the blocks of a model the same way. Everything here reads ``nn.Module`` trees by structure and
class name; it imports no model library.

* :func:`unwrap` / :func:`strip_prefixes`: the model inside ``DistributedDataParallel``
  (``module.``) and ``torch.compile`` (``_orig_mod.``) wrappers, and names without them.
* :func:`find_blocks`: the :class:`BlockStack` of a model (normlab's GPT ``blocks``, GPT-2
  ``transformer.h``, LLaMA ``model.layers``, BERT ``encoder.layer``, torchvision/timm ResNet
  blocks, ...).
* :func:`occurrences` / :func:`replace_module`: every ``(parent, attribute)`` slot holding each
  module, so that swapping a shared module updates every parent.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, overload

from torch import nn

__all__ = [
    "BLOCK_LIST_NAMES",
    "RESNET_BLOCK_NAMES",
    "BlockStack",
    "Occurrence",
    "current_module",
    "find_blocks",
    "occurrences",
    "replace_module",
    "strip_prefixes",
    "unwrap",
]

_WRAPPER_ATTRS = ("_orig_mod", "module")
# Class names of the residual blocks of torchvision / timm ResNets (and normlab's ConvNet).
RESNET_BLOCK_NAMES = frozenset(
    {"BasicBlock", "Bottleneck", "PreActBlock", "PreActBottleneck", "ResBottleneckBlock"}
)
# Attribute names of the container that holds a transformer's blocks: normlab ``blocks``, GPT-2
# ``h``, LLaMA/Mistral/Qwen/NeoX ``layers``, BERT/RoBERTa ``layer``, T5 ``block``. Under these
# names a container of one block, or of blocks of several classes (hybrid stacks), still counts.
BLOCK_LIST_NAMES = ("blocks", "h", "layers", "layer", "block")


# --------------------------------------------------------------------------------------------
# Wrappers


def strip_prefixes(name: str) -> str:
    """``"module._orig_mod.blocks.0"`` -> ``"blocks.0"``: drop DDP's leading ``module.`` and
    every ``_orig_mod`` segment that ``torch.compile`` inserts."""
    parts = name.split(".") if name else []
    while parts and parts[0] in _WRAPPER_ATTRS:
        parts.pop(0)
    return ".".join(p for p in parts if p != "_orig_mod")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``torch.compile`` wrappers."""
    seen = 0
    while seen < 8:
        inner = None
        for attr in _WRAPPER_ATTRS:
            cand = model._modules.get(attr)
            if cand is not None and len(model._modules) == 1:
                inner = cand
        if inner is None:
            return model
        model, seen = inner, seen + 1
    return model


# --------------------------------------------------------------------------------------------
# Block stacks: the "depth" of a module


@dataclass(frozen=True)
class BlockStack(Sequence[tuple[str, nn.Module]]):
    """The residual blocks of a model, in forward order: a sequence of ``(qualified name, block)``.

    Attributes:
        blocks: the ``(name, module)`` pairs; names are real attribute paths of the model
            (``model.get_submodule(name)`` works).
        name: where the blocks are held: the container's qualified name (``"model.layers"``,
            ``""`` for the model itself), or the stage containers joined by ``+``
            (``"layer1+layer2"``) when the blocks sit in several.
    """

    blocks: tuple[tuple[str, nn.Module], ...]
    name: str

    @property
    def size(self) -> int:
        return len(self.blocks)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.blocks]

    def depth_of(self, qualified_name: str) -> int | None:
        """The index of the block that is or holds ``qualified_name``, or ``None`` outside the stack."""
        for i, (name, _) in enumerate(self.blocks):
            if qualified_name == name or qualified_name.startswith(name + "."):
                return i
        return None

    @overload
    def __getitem__(self, index: int) -> tuple[str, nn.Module]: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[tuple[str, nn.Module]]: ...
    def __getitem__(self, index: int | slice) -> tuple[str, nn.Module] | Sequence[tuple[str, nn.Module]]:
        return self.blocks[index]

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self) -> Iterator[tuple[str, nn.Module]]:
        return iter(self.blocks)


def _children(module: nn.Module) -> list[nn.Module]:
    # ``_modules`` rather than ``children()``: a module listed twice is two blocks
    return [c for c in module._modules.values() if c is not None]


def _joined_parents(pairs: Sequence[tuple[str, nn.Module]]) -> str:
    parents: list[str] = []
    for name, _ in pairs:
        parent = name.rpartition(".")[0]
        if parent not in parents:
            parents.append(parent)
    return "+".join(parents)


def _unique_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _stack_key(name: str, module: nn.Module) -> tuple[int, int, int] | None:
    """Why a container is a stack of blocks, as a sort key (most parameters, then most blocks,
    then the shallowest), or ``None`` if it is not one."""
    if not isinstance(module, (nn.ModuleList, nn.Sequential)):
        return None
    children = _children(module)
    conventional = bool(name) and name.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES
    if not children or (len(children) < 2 and not conventional):
        return None
    if not conventional and len({type(c) for c in children}) != 1:
        return None
    # a block holds layers of its own: a list of single layers (projections, experts' weights,
    # per-head norms) is not a stack of blocks
    if not all(_children(c) and any(True for _ in c.parameters()) for c in children):
        return None
    depth = name.count(".") + bool(name)
    return _unique_params(module), len(children), -depth


def _encoder_of(name: str) -> str | None:
    """``"model.decoder.layers"`` -> ``"model.encoder.layers"`` (the last ``decoder`` part)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if "decoder" in parts[i]:
            return ".".join([*parts[:i], parts[i].replace("decoder", "encoder"), *parts[i + 1 :]])
    return None


def _parallel_lists(name: str, module: nn.Module, modules: dict[str, nn.Module]) -> bool:
    """Whether ``module`` is one of several same-length lists of one parent that hold the parts of
    each layer side by side (XLM's ``attentions``, ``layer_norm1``, ``ffns``, ``layer_norm2``): its
    items are sublayers, not residual blocks."""
    parent_name = name.rpartition(".")[0]
    parent = modules.get(parent_name)
    if parent is None or not name:
        return False
    n = len(_children(module))
    siblings = [
        c
        for c in _children(parent)
        if c is not module and isinstance(c, nn.ModuleList) and len(_children(c)) == n
    ]
    return bool(siblings)


def _blocks_of(name: str, container: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks of a stack container; a stack of lists (Funnel's ``blocks``, PoolFormer's
    stages) holds its blocks one level down, since a list is never called."""
    pairs = [(f"{name}.{k}" if name else k, c) for k, c in container._modules.items() if c is not None]
    if pairs and all(isinstance(c, nn.ModuleList) for _, c in pairs):
        return [(f"{n}.{k}", c) for n, m in pairs for k, c in m._modules.items() if c is not None]
    return pairs


@overload
def find_blocks(model: nn.Module, *, required: Literal[True] = True) -> BlockStack: ...
@overload
def find_blocks(model: nn.Module, *, required: bool) -> BlockStack | None: ...
def find_blocks(model: nn.Module, *, required: bool = True) -> BlockStack | None:
    """The residual blocks of ``model``, in forward order, as a :class:`BlockStack`.

    Recognised by structure and class name (no transformers/timm/torchvision import):

    1. ResNet residual blocks: modules whose class is named ``BasicBlock``, ``Bottleneck``,
       ``PreActBlock``, ... (torchvision, timm, normlab's ConvNet); else the children of
       ``layer1``, ``layer2``, ... ``nn.Sequential`` stages.
    2. Transformers and other stacks: the ``nn.ModuleList``/``nn.Sequential`` whose children
       are blocks (each holds layers of its own and parameters) of one class, or of any classes
       under a conventional name (``blocks``, ``h``, ``layers``, ``layer``, ``block``); among
       several, the one holding the most parameters, then the longest, then the shallowest.
       A list of projections, experts or per-head norms inside a block is never the stack,
       nor is one of several same-length lists that hold the parts of each layer side by side
       (XLM); a stack of lists holds its blocks one level down (Funnel).
    3. Encoder-decoders (T5, BART, Whisper): the encoder's stack, then the decoder's, one
       stack (``name`` ``"encoder.block+decoder.block"``), numbered in forward order.

    Args:
        required: raise when no stack is found (else return ``None``).

    Raises:
        ValueError: none found and ``required``; pass the blocks explicitly where the caller
            takes them (``blocks=[(name, module), ...]``).
    """
    named = list(model.named_modules())
    resnet = [(n, m) for n, m in named if type(m).__name__ in RESNET_BLOCK_NAMES]
    if resnet:
        # a block class nested in another block (rare) would be counted twice: keep the outer
        outer = [(n, m) for n, m in resnet if not any(n.startswith(o + ".") for o, _ in resnet if o != n)]
        return BlockStack(tuple(outer), _joined_parents(outer))
    stages = [(n, m) for n, m in named if re.fullmatch(r"(.*\.)?layer\d+", strip_prefixes(n) or "-")]
    if stages and all(isinstance(m, nn.Sequential) for _, m in stages):
        pairs = tuple((f"{n}.{k}", c) for n, m in stages for k, c in m._modules.items() if c is not None)
        if pairs:
            return BlockStack(pairs, _joined_parents(pairs))
    modules = dict(named)
    candidates: dict[str, tuple[int, int, int]] = {}
    for name, module in named:
        key = _stack_key(name, module)
        if key is not None and not _parallel_lists(name, module, modules):
            candidates[name] = key
    if candidates:
        best = max(candidates, key=lambda n: candidates[n])
        parts = [best]
        # an encoder-decoder: the encoder's stack runs first, then the decoder's (T5, BART, Whisper)
        encoder = _encoder_of(best)
        if encoder is not None and encoder in candidates:
            parts = [encoder, best]
        pairs = tuple(p for part in parts for p in _blocks_of(part, modules[part]))
        return BlockStack(pairs, "+".join(parts))
    if not required:
        return None
    raise ValueError(
        f"find_blocks: no residual blocks found in {type(model).__name__} (looked for ResNet "
        "BasicBlock/Bottleneck, layerN stages and a ModuleList of blocks); pass "
        "blocks=[(name, module), ...] explicitly"
    )


# --------------------------------------------------------------------------------------------
# Where each module is held


@dataclass
class Occurrence:
    """One module and every ``(parent, attribute)`` slot that holds it, with their qualified names."""

    module: nn.Module
    names: list[str] = field(default_factory=list)
    slots: list[tuple[nn.Module, str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.names[0]


def occurrences(model: nn.Module) -> dict[int, Occurrence]:
    """``id(module) -> Occurrence`` for every module below ``model`` (the root is not included).

    In the order modules are first reached, parents before children, like ``named_modules()``
    (which lists a shared module once; this walk reads ``_modules`` itself to find every slot).
    """
    found: dict[int, Occurrence] = {}

    def visit(parent: nn.Module, prefix: str) -> None:
        for key, child in parent._modules.items():
            if child is None:
                continue
            name = f"{prefix}.{key}" if prefix else key
            occ = found.get(id(child))
            first = occ is None
            if occ is None:
                occ = found[id(child)] = Occurrence(child)
            occ.names.append(name)
            occ.slots.append((parent, key))
            if first:
                visit(child, name)

    visit(model, "")
    return found


def replace_module(occ: Occurrence, new: nn.Module) -> None:
    """Put ``new`` in every slot that holds ``occ.module`` (a shared module stays shared)."""
    for parent, key in occ.slots:
        parent._modules[key] = new


def current_module(occ: Occurrence) -> list[nn.Module | None]:
    """What each slot of ``occ`` holds now."""
    return [parent._modules.get(key) for parent, key in occ.slots]
