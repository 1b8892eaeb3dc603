"""``normlab report-monitor FILE.jsonl``: a NormMonitor log as findings, PNG plots and Markdown."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "cmd_report_monitor"]


def cmd_report_monitor(args: argparse.Namespace) -> int:
    from normlab.monitor.report import report_monitor

    try:
        result = report_monitor(args.log, args.out, plots=not args.no_plots)
    except FileNotFoundError as err:
        raise ValueError(f"report-monitor: {args.log!r} does not exist") from err
    findings = result["findings"]
    for f in findings:
        print(f"{f.severity}: {f.code}: {f.message}")
    if not findings:
        print("no findings: no rule fired on the last measurement")
    for path in result["files"]:
        print(f"wrote {path}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``normlab report-monitor``."""
    p = subparsers.add_parser(
        "report-monitor",
        help="findings, plots and a Markdown summary of a NormMonitor log (monitor.jsonl)",
    )
    p.add_argument("log", help="the monitor.jsonl that NormMonitor (or a callback) wrote")
    p.add_argument("--out", help="folder for monitor_report.md and the PNGs (default: the log's)")
    p.add_argument("--no-plots", action="store_true", help="the Markdown summary only (no matplotlib)")
    p.set_defaults(func=cmd_report_monitor)
