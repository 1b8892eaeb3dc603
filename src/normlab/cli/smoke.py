"""``normlab smoke``: a quick end-to-end check of every registered norm (build, train step, eval,
fp64 agreement), run by ``make demo``. For each norm it builds the spec's example
instance, runs a training forward and backward and an eval forward on a random input in the
norm's layout, and compares the fp32 output with the same module run in fp64 (same
parameters). Nothing is hard-coded: every figure is measured in the run.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from normlab._text import text_table
from normlab.norms import create_norm, get_norm_layer, list_norms


@dataclass(frozen=True)
class SmokeResult:
    """What one norm did on the smoke input."""

    name: str
    module: str
    input_shape: tuple[int, ...]
    num_params: int
    out_mean: float
    out_std: float
    grad_norm: float
    eval_equals_train: bool
    max_err_vs_fp64: float
    ms: float

    @property
    def ok(self) -> bool:
        return all(
            math.isfinite(v) for v in (self.out_mean, self.out_std, self.grad_norm, self.max_err_vs_fp64)
        )


def _example_input(module: nn.Module, num_features: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    channel_first = getattr(module, "channel_dim", -1) == 1
    shape = (8, num_features, 5, 5) if channel_first else (8, 16, num_features)
    return torch.randn(shape, generator=g) * 2.0 + 0.5


def smoke_one(name: str, num_features: int = 24, seed: int = 0) -> SmokeResult:
    """Run the smoke check for the norm registered as ``name``."""
    spec = get_norm_layer(name).spec
    module = create_norm(name, num_features, **spec.example_kwargs)
    x = _example_input(module, num_features, seed).requires_grad_(True)
    reference = copy.deepcopy(module).double()  # same parameters and buffers, before the update

    start = time.perf_counter()
    module.train()
    y = module(x)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1))
    (y * upstream).sum().backward()
    module.eval()
    with torch.no_grad():
        y_eval = module(x)
    ms = (time.perf_counter() - start) * 1e3

    reference.train()
    with torch.no_grad():
        y64 = reference(x.detach().double())
    assert x.grad is not None
    return SmokeResult(
        name=name,
        module=type(module).__name__,
        input_shape=tuple(x.shape),
        num_params=sum(p.numel() for p in module.parameters()),
        out_mean=y.mean().item(),
        out_std=y.std().item(),
        grad_norm=x.grad.norm().item(),
        eval_equals_train=bool(torch.equal(y.detach(), y_eval)),
        max_err_vs_fp64=(y.detach().double() - y64).abs().max().item(),
        ms=ms,
    )


def run_smoke(names: list[str] | None = None) -> list[SmokeResult]:
    """Smoke-check ``names`` (default: every registered norm)."""
    return [smoke_one(n) for n in (names or list_norms())]


def cmd_smoke(args: argparse.Namespace) -> int:
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
    print(text_table(rows, header))
    failed = [r.name for r in results if not r.ok]
    print(f"\n{len(results) - len(failed)} of {len(results)} norms ran a finite train step and eval pass.")
    return 1 if failed else 0


def add_parser(subparsers: Any) -> None:
    """Register ``normlab smoke``."""
    p = subparsers.add_parser(
        "smoke", help="run a train step and an eval pass of every norm, checked against fp64"
    )
    p.add_argument("names", nargs="*", help="norms to check (default: all)")
    p.set_defaults(func=cmd_smoke)
