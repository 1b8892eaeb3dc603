"""``python -m normlab.train --config CONFIG.json --run-dir DIR [--resume]``: train one run.

Single-process, or data-parallel under ``torchrun`` (what ``torchrun -m normlab.train`` runs),
with DDP or (``--dist fsdp``) FSDP2:

    torchrun --standalone --nproc_per_node 4 -m normlab.train --config config.json --run-dir runs/x --resume

``CONFIG.json`` is a run directory's ``config.json`` (``{"config_hash": ..., "config": {...}}``)
or a bare :meth:`RunConfig.to_dict` object. Under torchrun (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT`` set) the process group is initialised with gloo on CPU or
nccl with ``--device cuda`` (each process on ``cuda:LOCAL_RANK``), with the timeout
``--timeout`` or ``$NORMLAB_DIST_TIMEOUT`` (see :mod:`normlab.train.distributed`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from normlab.train import distributed
from normlab.train.config import RunConfig
from normlab.train.fsdp import PARAM_DTYPES
from normlab.train.strategy import DIST_MODES
from normlab.train.trainer import train


def load_config(path: str | Path) -> RunConfig:
    """A :class:`RunConfig` from a run's ``config.json`` or a bare ``RunConfig.to_dict()`` JSON."""
    try:
        data: Any = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--config: cannot read {str(path)!r}: {err}") from err
    if isinstance(data, dict) and "config" in data and "kind" not in data:
        data = data["config"]
    if not isinstance(data, dict):
        raise ValueError(f"--config: {str(path)!r} holds no run configuration")
    return RunConfig.from_dict(data)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m normlab.train",
        description="Train one run (single-process, or data-parallel under torchrun).",
    )
    p.add_argument("--config", required=True, help="config.json of a run directory, or a RunConfig JSON")
    p.add_argument("--run-dir", required=True, help="the run directory (rank 0 writes it)")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    p.add_argument("--data-dir", help="data directory (default: $NORMLAB_DATA or ~/.cache/normlab)")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, cuda:LOCAL_RANK)")
    p.add_argument(
        "--dist-bn",
        default=distributed.DEFAULT_DIST_BN,
        choices=distributed.DIST_BN_MODES,
        help="BatchNorm statistics across processes (default: sync, over the global batch)",
    )
    p.add_argument(
        "--dist",
        default="ddp",
        choices=DIST_MODES,
        help="under torchrun: ddp (default, DistributedDataParallel) or fsdp (FSDP2: fully_shard per "
        "block, checkpoints sharded with torch.distributed.checkpoint)",
    )
    p.add_argument(
        "--fsdp-param-dtype",
        default="fp32",
        choices=tuple(PARAM_DTYPES),
        help="with --dist fsdp: compute in this dtype (MixedPrecisionPolicy, fp32 gradient reduction)",
    )
    p.add_argument(
        "--no-reshard-after-forward",
        action="store_true",
        help="with --dist fsdp: keep each block's gathered parameters until its backward",
    )
    p.add_argument(
        "--timeout",
        type=float,
        help=f"process-group timeout in seconds (default: ${distributed.TIMEOUT_ENV} "
        f"or {distributed.DEFAULT_TIMEOUT_S:g})",
    )
    p.add_argument("--progress", action="store_true", help="a progress bar on rank 0")
    p.add_argument(
        "--preload",
        action="append",
        default=[],
        metavar="FILE",
        help="run this Python file first (a study file that registers its own models or corpora)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    fsdp: dict[str, Any] = {}
    if args.dist == "fsdp":
        fsdp = {"param_dtype": args.fsdp_param_dtype}
        fsdp["reshard_after_forward"] = not args.no_reshard_after_forward
    elif args.fsdp_param_dtype != "fp32" or args.no_reshard_after_forward:
        raise SystemExit(
            "python -m normlab.train: --fsdp-param-dtype and --no-reshard-after-forward need --dist fsdp"
        )
    config = load_config(args.config)
    device: Any = args.device
    ctx = None
    if distributed.launched_by_torchrun():
        ctx, device = distributed.init_process_group(args.device, timeout_s=args.timeout)
    try:
        summary = train(
            config,
            args.run_dir,
            data_dir=args.data_dir,
            resume=args.resume,
            progress=args.progress,
            device=device,
            dist_bn=args.dist_bn,
            dist=args.dist,
            fsdp=fsdp,
        )
    except Exception as err:
        if ctx is not None:  # say which process failed: torchrun interleaves every rank's output
            print(f"normlab.train rank {ctx.rank}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        distributed.destroy_process_group()
        raise
    distributed.destroy_process_group(barrier=True)
    if ctx is None or ctx.is_main:
        final = ", ".join(f"{k}={v:.4g}" for k, v in summary["final"].items() if isinstance(v, (int, float)))
        print(f"{args.run_dir}: {final}{' (diverged)' if summary['diverged'] else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
