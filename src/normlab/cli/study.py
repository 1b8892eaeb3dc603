"""``normlab study NAME | list`` and ``normlab report RUN_DIR``: run a study, rewrite a report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

STUDY_HELP = """\
Run a registered study: its grid of runs (seeds included), then the claims table with the
verdicts, and report.md / results.json / plots in the output directory. An interrupted study
continues with --resume, redoing only the unfinished runs (from their last checkpoint).
"""


def cmd_study(args: argparse.Namespace) -> int:
    from normlab.studies import StudyOptions, claims_text, get_study, list_studies, run_study

    if args.name == "list":
        rows = []
        for name in list_studies():
            study = get_study(name)
            rows.append((name, len(study.claims), study.budget, study.title))
        width = max(len(r[0]) for r in rows)
        for name, n_claims, budget, title in rows:
            print(f"{name:<{width}}  {n_claims} claims  {budget or '-'}\n{'':<{width}}  {title}")
        print(f"\n{len(rows)} studies. Run one with: normlab study NAME [--jobs N] [--resume]")
        return 0
    study = get_study(args.name)
    options = StudyOptions(seeds=args.seeds, scale=args.scale, corpus=args.corpus, images=args.images)
    out = Path(args.out) if args.out else Path("runs") / study.name
    try:
        results: dict[str, Any] = run_study(
            study,
            out,
            options=options,
            resume=args.resume,
            jobs=args.jobs,
            threads=args.threads,
            data_dir=args.data_dir,
            progress=not args.no_progress and sys.stderr.isatty(),
            tensorboard=args.tensorboard,
            device=args.device,
            nproc=args.nproc,
            dist_bn=args.dist_bn,
        )
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; continue with: normlab study {study.name} --out {out} --resume", file=sys.stderr
        )
        return 130
    print(f"\n{results['title']}\n")
    print(claims_text(results))
    print(f"\nreport: {results['report_path']}")
    failed = results.get("failed_runs", {})
    if failed:
        print(f"{len(failed)} run(s) failed (see runs/*/error.txt); rerun with --resume to retry them")
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from normlab.studies import claims_text, write_report

    results = write_report(args.run_dir)
    print(claims_text(results))
    print(f"\nreport: {results['report_path']}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Add the ``study`` and ``report`` subcommands to ``normlab``'s parser."""
    p = subparsers.add_parser(
        "study",
        help="run a study (reproduce papers' claims on real data) or list them",
        description=STUDY_HELP,
    )
    p.add_argument("name", help="a study name, or 'list'")
    p.add_argument("--out", help="output directory (default: runs/NAME)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study in --out")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default 1)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs)")
    p.add_argument("--seeds", type=int, help="seeds per cell (default: the study's)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every run's steps (default 1)")
    from normlab.data import CORPORA, image_set_names

    p.add_argument("--corpus", default="shakespeare", choices=CORPORA.names(), help="text corpus")
    p.add_argument(
        "--images",
        default="auto",
        choices=image_set_names(),
        help="image data set (auto: Fashion-MNIST if installed, else MNIST-5k)",
    )
    p.add_argument("--data-dir", help="data directory (default: $NORMLAB_DATA or ~/.cache/normlab)")
    p.add_argument("--device", default="cpu", help="cpu (default, bit-exact resume) or cuda")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes per run: above 1, each run trains data-parallel under torchrun "
        "(gloo on CPU, nccl with --device cuda), --jobs runs at a time (default 1)",
    )
    p.add_argument(
        "--dist-bn",
        default="sync",
        choices=["sync", "average", "broadcast"],
        help="BatchNorm statistics with --nproc > 1: sync (default: over the global batch), "
        "average or broadcast (running statistics synced before each evaluation and checkpoint)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (runs/*/tb)")
    p.set_defaults(func=cmd_study)

    p = subparsers.add_parser(
        "report", help="(re)write report.md, results.json and plots of a study directory"
    )
    p.add_argument("run_dir", help="the study directory (with plan.json)")
    p.set_defaults(func=cmd_report)
