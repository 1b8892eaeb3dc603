"""``normlab list``: the registered norms and placements, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from normlab._text import text_table

__all__ = ["add_parser", "cmd_list"]


def _placement_rows() -> list[list[object]]:
    from normlab.blocks import PLACEMENTS, list_placements

    rows: list[list[object]] = []
    for name in list_placements():
        cls = PLACEMENTS.get(name)
        source = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0].rstrip(".")
        final = "yes" if cls.NEEDS_FINAL_NORM else "no"
        rows.append([name, cls.__name__, ", ".join(PLACEMENTS.aliases(name)), final, source])
    return rows


def cmd_list(args: argparse.Namespace) -> int:
    from normlab.norms import NORMS, list_norms

    rows: list[list[object]] = []
    for name in list_norms():
        cls = NORMS.get(name)
        spec = cls.spec  # type: ignore[attr-defined]
        rows.append([name, cls.__name__, ", ".join(NORMS.aliases(name)), spec.layout, spec.paper])
    norm_keys = ["name", "class", "aliases", "layout", "paper"]
    placement_keys = ["name", "class", "aliases", "final_norm", "source"]
    placements = _placement_rows()
    if args.json:
        out = {
            "norms": [dict(zip(norm_keys, r, strict=True)) for r in rows],
            "placements": [dict(zip(placement_keys, r, strict=True)) for r in placements],
        }
        print(json.dumps(out, indent=2))
    else:
        print(text_table(rows, norm_keys))
        print(f"\n{len(rows)} norms. Build one with normlab.create_norm(name, num_features, **options).\n")
        print(text_table(placements, ["placement", "class", "aliases", "final norm", "source"]))
        print(
            f"\n{len(placements)} placements. Any norm in any placement: "
            "normlab.models.GPT(GPTConfig(..., norm=name, placement=name))."
        )
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``normlab list``."""
    p = subparsers.add_parser("list", help="list the registered norms and placements")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_list)
