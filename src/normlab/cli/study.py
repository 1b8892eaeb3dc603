"""``normlab study NAME | list`` and ``normlab report RUN_DIR``: run a study, rewrite a report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

STUDY_HELP = """\
Run a study: a registered one by NAME (`normlab study list`), or your own from a .toml or .py
file (`normlab study init my.toml` writes one that runs as written). Its grid of runs (seeds
included), then the claims table with the verdicts (and, for a study file, the cells ranked by
its metric), and report.md / results.json / plots in the output directory. An interrupted study
continues with --resume, redoing only the unfinished runs (from their last checkpoint).
--set KEY=VALUE (repeatable, a TOML value) changes one setting: `--set train.steps=2000`,
`--set 'sweep.norm=["dyt"]'`; it is recorded in plan.json.
"""


SIZES = ("tiny", "small", "base")  # normlab.studies.framework.SIZES, without importing the studies


def _is_file(name: str) -> bool:
    return name.endswith((".toml", ".py")) or "/" in name or Path(name).is_file()


def cmd_study(args: argparse.Namespace) -> int:
    from normlab.studies import StudyOptions, claims_text, get_study, list_studies, ranking_text, run_study
    from normlab.studies.overrides import parse_set
    from normlab.studies.userfile import load_study_file

    if args.name == "init":
        return _init(args.path)
    if args.path is not None:
        raise ValueError(
            f"study {args.name}: unexpected argument {args.path!r} (only `study init PATH` takes one)"
        )
    if args.name == "list":
        rows = []
        for name in list_studies():
            study = get_study(name)
            sizes = "; ".join(f"{k} ({study.size(k).describe()})" for k in study.sizes)
            rows.append((name, len(study.claims), study.budget, study.title, sizes))
        width = max(len(r[0]) for r in rows)
        for name, n_claims, budget, title, sizes in rows:
            print(f"{name:<{width}}  {n_claims} claims  {budget or '-'}\n{'':<{width}}  {title}")
            print(f"{'':<{width}}  --size: {sizes}")
        print(f"\n{len(rows)} studies. Run one with: normlab study NAME [--jobs N] [--resume]")
        return 0
    sets = tuple(parse_set(text) for text in args.set)
    if _is_file(args.name):
        study = load_study_file(args.name, sets=sets)
        flags = (("--corpus", args.corpus), ("--images", args.images), ("--robust", args.robust or None))
        for flag, value in flags:
            if value is not None:
                raise ValueError(f"{flag} is for registered studies; a study file names its data in [data]")
        preload = (study.source["file"],) if study.source and study.source["format"] == "py" else ()
    else:
        study, preload = get_study(args.name), ()
    options = StudyOptions(
        seeds=args.seeds,
        max_seeds=args.max_seeds,
        scale=args.scale,
        size=args.size,
        corpus=args.corpus or "shakespeare",
        images=args.images or "auto",
        sets=sets,
    )
    out = Path(args.out) if args.out else Path("runs") / study.name
    if args.corpus2 is not None and not args.robust:
        raise ValueError("--corpus2 names the corpus of --robust; pass --robust too")
    runner: Any = run_study
    extra: dict[str, Any] = {}
    if args.robust:
        from normlab.studies.robust import run_robust  # it checks --corpus2 before any run

        runner, extra = run_robust, {"corpus2": args.corpus2}
    try:
        results: dict[str, Any] = runner(
            study,
            out,
            **extra,
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
            preload=preload,
            dist=args.dist,
        )
    except KeyboardInterrupt:
        resume_flags = [*(f"--set {k}={v!r}" for k, v in sets), *(["--robust"] if args.robust else [])]
        again = " ".join([args.name, *resume_flags])
        print(f"\ninterrupted; continue with: normlab study {again} --out {out} --resume", file=sys.stderr)
        return 130
    print(f"\n{results['title']}\n")
    if results.get("ranking"):
        print(ranking_text(results))
    if results["claims"]:
        print("\n" + claims_text(results))
    for dropped in results.get("source", {}).get("dropped_claims", []):
        print(f"claim {dropped['id']} not evaluated: {dropped['why']}")
    print(f"\nreport: {results['report_path']}")
    return exit_code(results)


def exit_code(results: dict[str, Any]) -> int:
    """1 (saying so) when runs failed, else 0."""
    failed = results.get("failed_runs", {})
    if failed:
        print(f"{len(failed)} run(s) failed (see runs/*/error.txt); rerun with --resume to retry them")
        return 1
    return 0


def _init(path: str | None) -> int:
    from normlab.studies.template import TEMPLATE

    if path is None:
        raise ValueError("study init: give the file to write, e.g. normlab study init my-study.toml")
    target = Path(path)
    if target.suffix != ".toml":
        raise ValueError(f"study init: {path!r}: the template is TOML; name the file *.toml")
    if target.exists():
        raise ValueError(f"study init: {path!r} exists; choose another name (nothing was written)")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(TEMPLATE, encoding="utf-8")
    print(f"wrote {target}; run it with: normlab study {target}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from normlab.studies import claims_text, ranking_text, write_report

    results = write_report(args.run_dir)
    if results.get("ranking"):
        print(ranking_text(results) + "\n")
    if results["claims"]:
        print(claims_text(results))
    print(f"\nreport: {results['report_path']}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Add the ``study`` and ``report`` subcommands to ``normlab``'s parser."""
    p = subparsers.add_parser(
        "study",
        help="run a study (a paper's claims, or your own .toml/.py file), list them, or write a template",
        description=STUDY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", help="a study name, a study file (.toml, .py), 'list', or 'init'")
    p.add_argument("path", nargs="?", help="with init: the .toml file to write")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting (repeatable; a TOML value): train.steps=2000, 'sweep.norm=[\"dyt\"]'",
    )
    p.add_argument("--out", help="output directory (default: runs/NAME)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study in --out")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default 1)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs)")
    from normlab.data import CORPORA, image_set_names

    p.add_argument("--seeds", type=int, help="seeds per cell to start with (default: the study's)")
    p.add_argument(
        "--max-seeds",
        type=int,
        help="add seeds, one round at a time, to the cells of claims still inconclusive, up to N "
        "per cell (N >= 2; default: the study's, usually --seeds: a fixed number)",
    )
    p.add_argument(
        "--size",
        help=f"a scale the study defines: {', '.join(SIZES)} (`normlab study list` shows each study's)",
    )
    p.add_argument("--scale", type=float, default=1.0, help="multiply every run's steps (default 1)")

    p.add_argument(
        "--corpus",
        help=f"text corpus of a registered study: {', '.join(CORPORA.names())} (default shakespeare) "
        "or the path of a UTF-8 text file",
    )
    p.add_argument(
        "--robust",
        action="store_true",
        help="then rerun the study on a second corpus (--corpus2; default: the Bible, or Shakespeare "
        "after --corpus bible) into OUT/robust and mark each claim robust / not robust",
    )
    p.add_argument("--corpus2", help="with --robust: the second corpus (a built-in name or a text file)")
    p.add_argument(
        "--images",
        choices=image_set_names(),
        help="image data set of a registered study (default auto: Fashion-MNIST if installed, else MNIST-5k)",
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
    p.add_argument(
        "--dist",
        default="ddp",
        choices=["ddp", "fsdp"],
        help="with --nproc > 1: ddp (default, DistributedDataParallel) or fsdp (FSDP2 fully_shard "
        "per block, sharded checkpoints)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (runs/*/tb)")
    p.set_defaults(func=cmd_study)

    p = subparsers.add_parser(
        "report", help="(re)write report.md, results.json and plots of a study directory"
    )
    p.add_argument("run_dir", help="the study directory (with plan.json)")
    p.set_defaults(func=cmd_report)
