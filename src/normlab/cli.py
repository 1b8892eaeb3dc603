"""The ``normlab`` command line: ``normlab list``, ``normlab smoke``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from normlab import __version__, cli_bench, cli_convert, cli_diagnose, cli_study
from normlab.blocks import PLACEMENTS, list_placements
from normlab.norms import NORMS, list_norms


def _table(rows: list[list[object]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [line.format(*header), line.format(*("-" * w for w in widths))]
    out += [line.format(*map(str, r)) for r in rows]
    return "\n".join(s.rstrip() for s in out)


def _placement_rows() -> list[list[object]]:
    rows: list[list[object]] = []
    for name in list_placements():
        cls = PLACEMENTS.get(name)
        source = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0].rstrip(".")
        final = "yes" if cls.NEEDS_FINAL_NORM else "no"
        rows.append([name, cls.__name__, ", ".join(PLACEMENTS.aliases(name)), final, source])
    return rows


def cmd_list(args: argparse.Namespace) -> int:
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
        print(_table(rows, norm_keys))
        print(f"\n{len(rows)} norms. Build one with normlab.create_norm(name, num_features, **options).\n")
        print(_table(placements, ["placement", "class", "aliases", "final norm", "source"]))
        print(
            f"\n{len(placements)} placements. Any norm in any placement: "
            "normlab.models.GPT(GPTConfig(..., norm=name, placement=name))."
        )
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    from normlab.smoke import run_smoke

    results = run_smoke(args.names or None)
    rows: list[list[object]] = [
        [
            r.name,
            "x".join(map(str, r.input_shape)),
            r.num_params,
            f"{r.out_mean:+.3f}",
            f"{r.out_std:.3f}",
            f"{r.grad_norm:.3g}",
            "yes" if r.eval_equals_train else "no",
            f"{r.max_err_vs_fp64:.1e}",
            f"{r.ms:.1f}",
            "ok" if r.ok else "FAIL",
        ]
        for r in results
    ]
    header = [
        "norm",
        "input",
        "params",
        "out mean",
        "out std",
        "|dx|",
        "eval==train",
        "err vs fp64",
        "ms",
        "",
    ]
    print(_table(rows, header))
    failed = [r.name for r in results if not r.ok]
    print(f"\n{len(results) - len(failed)} of {len(results)} norms ran a finite train step and eval pass.")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normlab", description="Normalization layers, placements and studies."
    )
    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list the registered norms and placements")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("smoke", help="run a train step and an eval pass of every norm, checked against fp64")
    p.add_argument("names", nargs="*", help="norms to check (default: all)")
    p.set_defaults(func=cmd_smoke)
    for command in (cli_convert, cli_diagnose, cli_study, cli_bench):  # each adds its subcommands
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as e:  # bad names or options: one clear line, not a traceback
        print(f"normlab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
