"""A small name -> object registry: norms, placements, studies, probes, corpora, image sets, models.

Lookup is forgiving about spelling: case, ``_`` and ``-`` are ignored, so ``"LayerNorm"``,
``"layer_norm"`` and ``"layernorm"`` name the same entry. Registration is strict: a name or
alias that collides with an existing one raises, so two files can never silently shadow
each other. The one exception is the same definition registered again (the same module and
qualified name, as when ``importlib.reload`` re-runs a file): it replaces the old entry.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


def canonical_key(name: str) -> str:
    """The lookup key of ``name``: lower case with ``_``, ``-`` and spaces removed."""
    return "".join(ch for ch in name.lower() if ch not in "_- ")


class Registry(Generic[T]):
    """Maps canonical names and aliases to registered objects.

    Args:
        kind: what the registry holds, used in error messages (``"norm"``, ``"placement"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}  # canonical name -> object
        self._keys: dict[str, str] = {}  # lookup key (names and aliases) -> canonical name
        self._aliases: dict[str, tuple[str, ...]] = {}

    def register(self, name: str, *, aliases: Iterable[str] = ()) -> Callable[[T], T]:
        """Decorator registering an object under ``name`` and ``aliases``."""
        aliases = tuple(aliases)

        def decorator(obj: T) -> T:
            if name in self._entries and _reloaded(self._entries[name], obj):
                self.unregister(name)  # a reloaded module registers its definitions again
            for spelled in (name, *aliases):
                key = canonical_key(spelled)
                if not key:
                    raise ValueError(f"{self.kind} registry: empty name {spelled!r}")
                if key in self._keys:
                    raise ValueError(
                        f"{self.kind} registry: {spelled!r} is already registered (as {self._keys[key]!r})"
                    )
            for spelled in (name, *aliases):
                self._keys[canonical_key(spelled)] = name
            self._entries[name] = obj
            self._aliases[name] = aliases
            return obj

        return decorator

    def resolve(self, name: str) -> str:
        """The canonical name for ``name`` or one of its aliases.

        Raises:
            ValueError: unknown name; the message lists the closest registered names.
        """
        key = canonical_key(name)
        if key in self._keys:
            return self._keys[key]
        # canonical names last, so they win over an alias with the same key ('rms_norm')
        candidates = {canonical_key(s): s for s in (*self.all_aliases(), *self._entries)}
        close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.5)
        hint = (
            f"; did you mean {', '.join(repr(candidates[c]) for c in close)}?"
            if close
            else f"; known: {', '.join(self.names())}"
        )
        raise ValueError(f"unknown {self.kind} {name!r}{hint}")

    def unregister(self, name: str) -> T:
        """Remove ``name`` (any spelling) and its aliases; returns the object it held."""
        canonical = self.resolve(name)
        for key in [k for k, v in self._keys.items() if v == canonical]:
            del self._keys[key]
        del self._aliases[canonical]
        return self._entries.pop(canonical)

    def get(self, name: str) -> T:
        """The object registered under ``name`` (any spelling, or an alias)."""
        return self._entries[self.resolve(name)]

    def names(self) -> list[str]:
        """Canonical names, sorted."""
        return sorted(self._entries)

    def aliases(self, name: str) -> tuple[str, ...]:
        """Aliases registered with canonical ``name``."""
        return self._aliases[self.resolve(name)]

    def all_aliases(self) -> list[str]:
        return [a for aliases in self._aliases.values() for a in aliases]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and canonical_key(name) in self._keys

    def __len__(self) -> int:
        return len(self._entries)


def _reloaded(old: object, new: object) -> bool:
    """Whether ``new`` is ``old`` defined again (another object, a class or function of the same
    module and qualified name): what a reloaded module registers."""
    key = ("__module__", "__qualname__")
    if old is new:
        return False
    return all(isinstance(getattr(o, k, None), str) for o in (old, new) for k in key) and all(
        getattr(old, k) == getattr(new, k) for k in key
    )
