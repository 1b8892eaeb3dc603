"""Plain result dataclasses: ``to_dict()`` gives JSON-ready values (NaN and inf become ``None``)."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any


def jsonable(value: Any) -> Any:
    """Dataclasses, tuples, dicts and floats to JSON values; non-finite floats to ``None``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


class Result:
    """Mixin for result dataclasses: ``to_dict()`` and ``to_json()``."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = jsonable(self)
        return out

    def to_json(self, *, indent: int | None = 2) -> str:
        """Strict JSON (``allow_nan=False``): missing or non-finite numbers are ``null``."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)
