"""The ``normlab`` command: one module per subcommand, each imported for its parser only.

Every subcommand module keeps what it runs behind function-level imports, so that building the
parser (and ``normlab list``) imports neither the benchmark, nor conversion, nor the studies.
A ``ValueError`` from a command is one line on stderr and exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from normlab import __version__

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

# module of normlab.cli -> what it adds to the parser (its add_parser), in --help order
SUBCOMMANDS = (
    "listing",
    "smoke",
    "convert",
    "inspect",
    "diagnose",
    "study",
    "compare",
    "bench",
    "kernels",
    "report_monitor",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normlab", description="Normalization layers, placements and studies."
    )
    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"normlab.cli.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as e:  # bad names or options: one clear line, not a traceback
        print(f"normlab: error: {e}", file=sys.stderr)
        return 2
