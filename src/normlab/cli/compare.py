"""``normlab compare``: the same norms-and-placements question as a study file, in one line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

COMPARE_HELP = """\
Train MODEL on DATA once per norm (and placement) and seed, rank them by the validation loss
(test accuracy for images) with Welch's 95% interval of each difference to the best, plot the
loss curves, and diagnose each trained model (per-layer statistics, residual stream, findings).
The same machinery as `normlab study FILE.toml`; --resume continues an interrupted comparison.

DATA: a text file or folder, nanoGPT's train.bin/val.bin folder, a datasets save_to_disk folder,
an ImageFolder of class sub-folders, or a built-in name (shakespeare, bible, fashion-mnist, mnist5k).
MODEL: gpt[:n_layer=4,n_embd=64,...], convnet[:...], hf:MODEL_TYPE[:key=value,...],
hf:path/config.json, or factory:package.module:function[:key=value,...].
"""


def _names(text: str, flag: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"{flag}: give a comma-separated list, got {text!r}")
    return names


def cmd_compare(args: argparse.Namespace) -> int:
    from normlab.cli.study import exit_code
    from normlab.studies import StudyOptions, ranking_text, run_study, study_from_dict
    from normlab.studies.compare import compare_document, diagnose_finals, diagnostics_text
    from normlab.studies.overrides import apply_to_document, parse_set

    doc = compare_document(
        data=args.data,
        model=args.model,
        norms=_names(args.norms, "--norms"),
        placements=_names(args.placements, "--placements") if args.placements else (),
        steps=args.steps,
        seeds=args.seeds,
        batch_size=args.batch_size,
        lr=args.lr,
        block_size=args.block_size,
        optimizer=args.optimizer,
        level=args.level,
    )
    sets = tuple(parse_set(text) for text in args.set)
    doc = apply_to_document(doc, sets, where="normlab compare")
    command = (
        "normlab compare " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["compare"] else "normlab compare"
    )
    source = {"file": "(command line)", "format": "toml", "text": command, "sets": [list(s) for s in sets]}
    study = study_from_dict(doc, base_dir=Path.cwd(), where="normlab compare", source=source)
    out = Path(args.out) if args.out else Path("runs") / "compare"
    try:
        results: dict[str, Any] = run_study(
            study,
            out,
            options=StudyOptions(sets=sets),
            resume=args.resume,
            jobs=args.jobs,
            threads=args.threads,
            progress=not args.no_progress and sys.stderr.isatty(),
            plots=not args.no_plots,
        )
    except KeyboardInterrupt:
        print("\ninterrupted; continue with the same command and --resume", file=sys.stderr)
        return 130
    print(f"\n{results['title']}\n")
    print(ranking_text(results))
    if not args.no_diagnose:
        print("\ndiagnostics of the final models (seed 0 of each cell):")
        print(diagnostics_text(diagnose_finals(out, plots=not args.no_plots)))
    print(f"\nreport: {results['report_path']}")
    return exit_code(results)


def add_parser(subparsers: Any) -> None:
    """Add the ``compare`` subcommand."""
    p = subparsers.add_parser(
        "compare",
        help="train a model once per norm (and placement) on your data; ranked table, curves, diagnostics",
        description=COMPARE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="a path or a built-in data set (see above)")
    p.add_argument("--model", required=True, help="a model spec (see above)")
    p.add_argument("--norms", required=True, help="comma-separated norms, e.g. layernorm,rmsnorm,dyt")
    p.add_argument("--placements", help="comma-separated placements (normlab's GPT), e.g. pre,peri,lns")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per cell (default 2)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per step (default 16)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3, cosine decay)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adam", "sgd"], help="(default adamw)")
    p.add_argument("--block-size", type=int, help="tokens per window of text data (default 64)")
    p.add_argument("--level", choices=["char", "byte"], help="text tokens (default char)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as in normlab study")
    p.add_argument("--out", help="output directory (default runs/compare)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted comparison in --out")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default 1)")
    p.add_argument("--threads", type=int, help="torch threads per run")
    p.add_argument("--no-diagnose", action="store_true", help="skip the diagnostics of the final models")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compare)
