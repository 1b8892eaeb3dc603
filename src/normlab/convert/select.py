"""``where=`` selectors: which modules of a model a conversion touches.

The block stack a depth selector (``"0-5"``, ``range(6)``) counts in, and the slots that hold
each module, come from :mod:`normlab.structure`, which the diagnostics read too.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TypeAlias

from torch import nn

from normlab.structure import BlockStack

__all__ = ["QK_PART", "SITES", "Where", "compile_where", "is_qk_name"]


# --------------------------------------------------------------------------------------------
# where= selectors

Where: TypeAlias = "str | type | range | Callable[[str, nn.Module], bool] | Sequence[Where] | None"

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
# the attribute names of query/key norms inside attention (QK-norm: OLMo 2, Qwen 3, Gemma 3,
# StableLM's per-head lists, Cohere, Chameleon...): ``q_norm``, ``k_layernorm``, ``query_norm``, ``norm_k``
QK_PART = re.compile(r"^((q|k|query|key)_?(norm|layernorm|layer_norm|ln)|(norm|ln)_?(q|k))$")
SITES = {"qk": "the query/key norms inside attention (a name part q_norm, k_norm, q_layernorm, ...)"}


def is_qk_name(name: str) -> bool:
    """Whether ``name`` is, or lies inside, a query/key norm (:data:`QK_PART` on one of its parts)."""
    return any(QK_PART.match(part) for part in name.split("."))


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
    * ``"qk"``: the query/key norms of attention (QK-norm), whose attribute is named ``q_norm``,
      ``k_norm``, ``q_layernorm``, ``k_layernorm``, ``query_norm``, ``key_norm``, ``norm_q``,
      ``norm_k`` (or ``_ln``), with what they hold (StableLM's per-head lists).
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
    if where == "qk":
        return lambda name, module: is_qk_name(name)
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
