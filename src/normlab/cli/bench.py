"""``normlab bench``: time normlab's fused norms against copy bandwidth, torch and the papers' code.

::

    normlab bench                                   # all cases, fp32 and bf16, current threads
    normlab bench --threads 1,2 --out bench/        # table on screen, bench/bench.json, bench/bench.png
    normlab bench --norms dyt,rmsnorm --dtypes fp32 --no-e2e --repeats 30
    normlab bench --device cuda                     # the Triton kernels, torch.compile, Liger-Kernel

See :mod:`normlab.bench` for what is measured. For stable figures set the allocator first
(``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184``) and run on
an idle machine; the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "cmd_bench"]


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"normlab bench: expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cmd_bench(args: argparse.Namespace) -> int:
    from normlab import bench

    if args.device == "cpu" and not os.environ.get("GLIBC_TUNABLES") and sys.platform.startswith("linux"):
        print(
            "note: GLIBC_TUNABLES is unset: tensors of 32 MiB or more then cost an mmap and page faults per "
            f"allocation. For stable figures run with GLIBC_TUNABLES={bench.RECOMMENDED_MALLOC}",
            file=sys.stderr,
        )
    if args.monitor:
        return _monitor_overhead(args)
    e2e_kwargs: dict[str, Any] = {}
    if args.quick:
        e2e_kwargs = {"n_layer": 2, "n_embd": 64, "block_size": 32, "batch": 4}
    elif args.device == "cuda":
        e2e_kwargs = {"n_layer": 6, "n_embd": 768, "block_size": 512, "batch": 16}
    report = bench.run_bench(
        norms=_names(args.norms) if args.norms else None,
        dtypes=_names(args.dtypes),
        threads=_ints(args.threads) if args.threads else None,
        repeats=args.repeats,
        tokens=args.tokens,
        width=args.width,
        e2e_steps=0 if args.no_e2e else args.e2e_steps,
        e2e_kwargs=e2e_kwargs,
        progress=None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True)),
        device=args.device,
        compile=True if args.compile else None,
    )
    machine = report["machine"]
    kernels = machine["kernels"]
    print(
        f"normlab bench: {machine['cpu']}, {machine['cpus']} CPUs, torch {machine['torch']}; "
        f"load {report['load_before']} -> {report['load_after']}; GLIBC_TUNABLES={machine['glibc_tunables']}"
    )
    if args.device == "cuda":
        gpu = machine["gpu_kernels"]
        print(
            f"GPU: {machine['gpu']}, CUDA {machine['cuda']}, Triton {machine['triton']}; "
            f"Triton kernels: {'on' if kernels['enabled'] and gpu['loaded'] else 'off'} ({gpu['reason']})"
        )
    else:
        print(
            f"fused kernels: {'on' if kernels['enabled'] and kernels['loaded'] else 'off'} "
            f"({kernels['reason']})"
        )
    print(
        "times are medians; '±' is half the inter-quartile range; GB/s counts the minimal traffic "
        "(fwd: 2 passes, fwd+bwd: 5, residual add: 4 and 8); %copy is that bandwidth over the same-run "
        "copy_ (fwd %copy: the forward's); "
        "t/torch and t/paper are time ratios (< 1 is faster); 'plain' is the layer with the kernels off\n"
    )
    print(report["_table"])
    if report["e2e"]:
        print()
        print(bench.format_e2e(report["e2e"]))
    paths = bench.save(report, Path(args.out), png=not args.no_plot and _have_matplotlib())
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0


def _monitor_overhead(args: argparse.Namespace) -> int:
    import json

    from normlab.bench.monitor import monitor_overhead

    size: dict[str, Any] = {"n_layer": 2, "n_embd": 64, "block_size": 32, "batch": 4} if args.quick else {}
    result = monitor_overhead(every=args.monitor_every, rounds=args.monitor_rounds, **size)
    print(
        f"NormMonitor(every={result['every']}) on {result['model']}, {result['threads']} threads: "
        f"{result['step_ms_plain']:.2f} ms per step plain, {result['step_ms_monitored']:.2f} ms monitored: "
        f"overhead {100 * result['overhead']:+.2f}% of a step (median of {result['rounds']} rounds each)"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "monitor_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'monitor_overhead.json'}")
    return 0


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("note: matplotlib is not installed (pip install normlab[plot]): no PNG", file=sys.stderr)
        return False
    return True


def add_parser(subparsers: Any) -> None:
    """Register ``normlab bench`` on the ``normlab`` command's subparsers."""
    p = subparsers.add_parser(
        "bench",
        help="time the norms (fused kernels, plain torch, papers' code) against copy bandwidth",
        description=(
            "Time every normlab norm on transformer (B*T, C), (N, L, C) and conv (N, C, H, W) shapes, "
            "forward and forward+backward, against a same-run tensor copy, torch's native layer and the "
            "papers' reference code; then GPT training steps/s with each norm. Writes a table, JSON, a PNG."
        ),
    )
    p.add_argument("--norms", default="", help="comma-separated norms (default: all cases)")
    p.add_argument(
        "--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16 (default fp32,bf16)"
    )
    p.add_argument("--threads", default="", help="comma-separated thread counts (default: torch's current)")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per case (default 15)")
    p.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="rows B*T of the transformer shape (default 8192 on CPU, 65536 on CUDA)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu (default) or cuda")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile of the paper's code (on by default with --device cuda)",
    )
    p.add_argument("--width", type=int, default=768, help="features C, divisible by 32 (default 768)")
    p.add_argument("--e2e-steps", type=int, default=10, help="timed GPT training steps per norm (default 10)")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end GPT figure")
    p.add_argument("--quick", action="store_true", help="a tiny end-to-end model (smoke runs)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument(
        "--monitor",
        action="store_true",
        help="instead: the NormMonitor's cost, GPT training steps with and without it",
    )
    p.add_argument("--monitor-every", type=int, default=50, help="with --monitor: measure every N steps")
    p.add_argument("--monitor-rounds", type=int, default=5, help="with --monitor: rounds of N steps each way")
    p.add_argument("--out", "-o", default="normlab-bench", help="output directory (default normlab-bench)")
    p.set_defaults(func=cmd_bench)
