"""Finding modules inside a model: every place a module is held, block stacks and ``where`` selectors.

A module can be held under several names (a shared module); swapping it must update every
parent that holds it, or the model ends up with two diverging copies. ``named_modules()``
lists a shared module once, so the walk here reads ``_modules`` itself.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

from torch import nn

__all__ = [
    "BlockStack",
    "Occurrence",
    "Where",
    "compile_where",
    "find_blocks",
    "occurrences",
    "replace_module",
]


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

    In the order modules are first reached, parents before children, like ``named_modules()``.
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


# --------------------------------------------------------------------------------------------
# Block stacks: the "depth" of a module


@dataclass(frozen=True)
class BlockStack:
    """The repeated blocks of a model: ``name`` is the container (``"model.layers"``), ``size`` its length."""

    name: str
    size: int

    def depth_of(self, qualified_name: str) -> int | None:
        """The index of the block that holds ``qualified_name``, or ``None`` outside the stack."""
        prefix = f"{self.name}." if self.name else ""
        if not qualified_name.startswith(prefix):
            return None
        head = qualified_name[len(prefix) :].split(".", 1)[0]
        return int(head) if head.isdigit() else None


def find_blocks(model: nn.Module) -> BlockStack | None:
    """The model's main stack of blocks: the longest ``ModuleList``/``Sequential`` of >= 2 modules of
    one class that each hold parameters (GPT-2's ``transformer.h``, LLaMA's ``model.layers``,
    BERT's ``encoder.layer``, normlab's ``blocks``); the shallowest wins a tie.
    """
    best: tuple[int, int, str] | None = None  # (-size, depth, name): min() picks the longest, then shallowest
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        children = list(module)
        if len({type(c) for c in children}) != 1 or not all(
            any(True for _ in c.parameters()) for c in children
        ):
            continue
        if isinstance(children[0], (nn.Linear, nn.modules.conv._ConvNd)):
            continue  # a list of projections (heads, experts) is not a stack of blocks
        key = (-len(children), name.count(".") + bool(name), name)
        if best is None or key < best:
            best = key
    return None if best is None else BlockStack(best[2], -best[0])


# --------------------------------------------------------------------------------------------
# where= selectors

Where: TypeAlias = "str | type | range | Callable[[str, nn.Module], bool] | Sequence[Where] | None"

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _part_matcher(part: str, where: str) -> Callable[[str], bool]:
    m = _RANGE.match(part)
    if m:
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"where={where!r}: empty range {part!r} (expected low-high with low <= high)")
        return lambda comp: comp.isdigit() and lo <= int(comp) <= hi
    return lambda comp: fnmatch.fnmatchcase(comp, part)


def _pattern(pattern: str) -> Callable[[str], bool]:
    """A name pattern: its dot-separated parts match consecutive parts of a qualified name."""
    if not pattern or any(not p for p in pattern.split(".")):
        raise ValueError(f"where={pattern!r}: a pattern needs non-empty dot-separated parts")
    parts: list[Callable[[str], bool] | None] = [
        None if p == "**" else _part_matcher(p, pattern) for p in pattern.split(".")
    ]

    def anchored(i: int, comps: list[str], j: int) -> bool:
        if i == len(parts):
            return True
        matcher = parts[i]
        if matcher is None:  # "**": any number of parts
            return any(anchored(i + 1, comps, k) for k in range(j, len(comps) + 1))
        return j < len(comps) and matcher(comps[j]) and anchored(i + 1, comps, j + 1)

    def match(name: str) -> bool:
        comps = name.split(".")
        return any(anchored(0, comps, j) for j in range(len(comps)))

    return match


def compile_where(where: Where, stack: BlockStack | None) -> Callable[[str, nn.Module], bool]:
    """Turn a ``where`` selector into ``(qualified_name, module) -> bool``.

    * ``None``: everything.
    * a pattern string, e.g. ``"layers.0-5"``, ``"h.*.ln_1"``, ``"**.norm"``: its dot-separated parts
      match consecutive parts of a module's qualified name (so a block's pattern selects what is
      inside it). A part is a glob (``*``, ``?``, ``[...]``), an integer or inclusive range ``a-b``,
      or ``**`` (any number of parts).
    * a string that is only an integer or a range (``"0-5"``), or a ``range`` object
      (``range(0, 6)``): block depths in the model's block stack (:func:`find_blocks`); without
      a stack, such a string is a name pattern (``"1"``: the child named ``1``).
    * a class, or a tuple/list of classes: ``isinstance``.
    * a callable ``(qualified_name, module) -> bool``.
    * a list or tuple of any of these: their union.
    """
    if where is None:
        return lambda name, module: True
    if isinstance(where, range) or (isinstance(where, str) and _RANGE.match(where) and stack is not None):
        if stack is None:
            raise ValueError(
                f"where={where!r} selects block depths, but no stack of blocks (a ModuleList of "
                "repeated blocks) was found in the model; use a name pattern instead"
            )
        if isinstance(where, str):
            m = _RANGE.match(where)
            assert m is not None
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            depths: Iterable[int] = range(lo, hi + 1)
        else:
            depths = where
        wanted = set(depths)
        return lambda name, module: stack.depth_of(name) in wanted
    if isinstance(where, str):
        match = _pattern(where)
        return lambda name, module: match(name)
    if isinstance(where, type):
        cls = where
        return lambda name, module: isinstance(module, cls)
    if isinstance(where, (list, tuple)):
        selectors = [compile_where(w, stack) for w in where]
        return lambda name, module: any(s(name, module) for s in selectors)
    if callable(where):
        fn = where
        return lambda name, module: bool(fn(name, module))
    raise ValueError(
        f"where must be a name pattern, a depth range, a class, a callable or a list of these, got {where!r}"
    )
