"""``normlab kernels status|build|clear``: the fused CPU kernels' build, cache and ISA."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

__all__ = ["add_parser", "cmd_kernels"]


def _status_record() -> dict[str, Any]:
    from normlab.kernels import _build, _gpu, enabled

    _build.load_cached()  # a finished build is loaded, proving it loads here; nothing is compiled
    record = _build.status()
    record.update(_build.toolchain())
    record["enabled"] = enabled()
    record["cache_env"] = next(
        (v for v in ("NORMLAB_KERNELS_CACHE", "TORCH_EXTENSIONS_DIR", "XDG_CACHE_HOME") if os.environ.get(v)),
        None,
    )
    record["builds_in_cache"] = [p.name for p in _build.cached_builds()]
    import torch

    record["gpu"] = (
        _gpu.status() if torch.cuda.is_available() else {"loaded": False, "reason": "CUDA is not available"}
    )
    return record


def _status_text(r: dict[str, Any]) -> str:
    from normlab.kernels import _build

    if r["loaded"]:
        state = f"loaded from the cache in {r['seconds'] * 1000:.0f} ms"
    elif r["attempted"]:
        state = f"not usable: {r['reason']}"
    else:
        state = f"not built for this machine: `normlab kernels build` builds them ({_build.EXPECTED_BUILD})"
    build = r["build"]
    built = f"built {build['built_at']} in {build['seconds']:.0f} s" if build else "none yet"
    others = len([b for b in r["builds_in_cache"] if b != f"cpu-{r['key']}"])
    lines = [
        ("fused CPU kernels", state),
        ("switch", "on" if r["enabled"] else "off (NORMLAB_KERNELS=0 or set_enabled(False))"),
        ("cache", f"{r['cache']}" + (f" (from ${r['cache_env']})" if r["cache_env"] else "")),
        ("build key", f"cpu-{r['key']}: {built}" if r["key"] else "none"),
        ("ISA", f"{r['isa']}: {r['isa_reason']}" if r["isa"] else r["isa_reason"]),
        ("flags", r["flags"] or "-"),
        ("compiler", f"{r['compiler']} ({r['compiler_version']})" if r["compiler"] else "not found"),
        ("ninja", f"{r['ninja']} ({r['ninja_version']})" if r["ninja"] else "not found (pip install ninja)"),
        ("other builds", f"{others} in the cache (`normlab kernels clear` removes all)"),
        ("GPU (Triton)", r["gpu"]["reason"]),
    ]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def cmd_kernels(args: argparse.Namespace) -> int:
    from normlab.kernels import _build

    if args.action == "status":
        record = _status_record()
        if args.json:
            print(json.dumps(record, indent=2, default=str))
        else:
            print(_status_text(record))
        return 0
    if args.action == "clear":
        removed = _build.clear()
        print(f"normlab kernels: removed {len(removed)} build(s) from {_build.cache_root()}")
        return 0
    # build
    if args.force:
        import shutil

        try:
            shutil.rmtree(_build.build_dir(), ignore_errors=True)
        except ValueError as err:
            raise ValueError(f"normlab kernels build: {err}") from err
    start = time.perf_counter()
    ok = _build.ensure_built(verbose=args.verbose)
    state = _build.status()
    if not ok:
        reason = state["reason"]
        print(f"normlab kernels: not built ({reason}); normlab's layers use plain torch", file=sys.stderr)
        return 1
    how = "built" if state["source"] == "build" else "loaded from the cache"
    seconds = time.perf_counter() - start
    print(f"normlab kernels: {how} in {seconds:.1f} s ({state['isa']} ISA): {state['path']}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``normlab kernels``."""
    p = subparsers.add_parser(
        "kernels",
        help="the fused CPU kernels: status, build ahead, clear the cache",
        description=(
            "The fused C++ kernels are compiled once per machine, torch version and CPU ISA into a cache "
            "folder ($NORMLAB_KERNELS_CACHE, else ~/.cache/normlab; point it at a shared file system "
            "so a cluster's nodes build once). `make install` runs `normlab kernels build`."
        ),
    )
    actions = p.add_subparsers(dest="action", required=True)
    s = actions.add_parser("status", help="loaded or not and why, the cache folder, build key, ISA, flags")
    s.add_argument("--json", action="store_true", help="print JSON")
    b = actions.add_parser("build", help="build now (or load the cached build)")
    b.add_argument("--verbose", action="store_true", help="show the compiler's output")
    b.add_argument("--force", action="store_true", help="delete this machine's build first and rebuild")
    actions.add_parser("clear", help="delete every build in the cache folder")
    p.set_defaults(func=cmd_kernels)
