"""``normlab bench``: speed of normlab's norms against the memory-bandwidth limit, torch and the papers' code.

A normalization layer reads its input once and writes its output once (backward: reads ``x`` and
``dy``, writes ``dx``), so its *minimal traffic* is 2 tensor passes forward and 3 backward (5 for
forward+backward; 4 and 4 for the fused residual add, which reads two inputs, writes ``y`` and
``h``, and gets two input gradients). Each case times, interleaved in rounds
so that a noisy neighbour hits every implementation alike:

- ``normlab``: the normlab layer, fused kernels on (the default);
- ``plain``: the same layer with the kernels off (``normlab.kernels.use_kernels(False)``);
- ``torch``: torch's native layer (``nn.LayerNorm`` for DyT/Derf/LNS, the layers they replace);
- ``paper``: the paper's reference code where it differs from torch: eager DyT
  (``tanh(alpha x) * w + b``, arXiv:2503.10622), eager Derf (arXiv:2512.10938), LNS as LayerNorm
  then a multiply (arXiv:2502.05795), RMSNorm's official ``x / (||x|| d^-1/2 + eps) * g``
  (arXiv:1910.07467);
- ``compile``: ``torch.compile`` of the paper's code (torch's layer where there is none), the
  generated-kernel baseline (``--compile`` on CPU; on by default on CUDA);
- ``liger``: Liger-Kernel's Triton layer (RMSNorm, LayerNorm, DyT, GroupNorm), on CUDA when the
  ``liger_kernel`` package is installed;
- ``copy``: ``dst.copy_(x)`` of the same tensor, the bandwidth a memory-bound kernel can reach.

On CUDA (``--device cuda``) the same cases run on the GPU with the Triton kernels, each sample
timed by CUDA events over several back-to-back calls; the default shape is 8x larger there so
that a tensor (200 MB in fp32) does not fit in the L2 cache, and %copy is then the fraction of the
HBM bandwidth that a same-run device copy reaches.

Reported per case: forward and forward+backward median ms and spread (half the inter-quartile
range, % of the median), achieved GB/s of the minimal traffic, that bandwidth over the same-run
``copy_`` bandwidth (``%copy``), and the time ratios to torch and to the paper's code (< 1 is
faster). The end-to-end part trains normlab's small GPT with each norm (kernels on and off) and
reports steps per second.

Timings depend on the machine's load: the JSON records the load average before and after, the
thread count and ``GLIBC_TUNABLES`` (see ``design/performance.md``: without
``glibc.malloc.mmap_max=0`` every tensor of 32 MiB or more is a fresh ``mmap`` with page faults).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

import normlab
from normlab import kernels
from normlab._atomic import atomic_write, atomic_write_text

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROLES = ("normlab", "plain", "torch", "paper", "compile", "liger")
DEVICES = ("cpu", "cuda")
RECOMMENDED_MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"


# ------------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class Case:
    """One benchmarked norm on one layout. ``build(dtype)`` returns role -> module; ``make_input``
    builds the input(s) of the layer (a tuple for the residual add)."""

    norm: str
    layout: str
    shape: tuple[int, ...]
    build: Callable[[torch.dtype], dict[str, nn.Module]]
    inputs: int = 1  # tensors the forward reads (2 for the residual add)
    outputs: int = 1  # tensors the forward writes (2 for the residual add: y and h)

    @property
    def passes_fwd(self) -> int:
        return self.inputs + self.outputs

    @property
    def passes_fwdbwd(self) -> int:
        # backward: read x (or h) and dy, write one gradient per input (autograd keeps the two
        # leaves' gradients of the residual add as two tensors)
        return self.passes_fwd + 2 + self.inputs


class _Plain(nn.Module):
    """A normlab layer run with the fused kernels off (forward; its backward is then plain too)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *xs: Tensor) -> Any:
        with kernels.use_kernels(False):
            return self.inner(*xs)


class _Transposed(nn.Module):
    """``(N, L, C)`` tokens through a channels-first norm: ``m(x.transpose(1, 2)).transpose(1, 2)``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.transpose(1, 2)).transpose(1, 2)  # type: ignore[no-any-return]


class PaperDyT(nn.Module):
    """DyT as in the paper's repository (facebookresearch/DynamicTanh): eager ``tanh``, then the affine."""

    def __init__(self, c: int, alpha: float = 0.5, channels_last: bool = True) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.alpha = nn.Parameter(torch.full((1,), alpha))
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.alpha * x)
        if self.channels_last:
            return x * self.weight + self.bias
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class PaperDerf(nn.Module):
    """Derf as in the official code (zlab-princeton/Derf): ``erf(alpha x + shift) * w + b``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), 0.5))
        self.shift = nn.Parameter(torch.zeros(1))
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x: Tensor) -> Tensor:
        return torch.erf(self.alpha * x + self.shift) * self.weight + self.bias


class PaperRMSNorm(nn.Module):
    """RMSNorm as the official code (bzhangGo/rmsnorm): ``x / (||x|| d^-1/2 + eps) * scale``."""

    def __init__(self, c: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(c))

    def forward(self, x: Tensor) -> Tensor:
        rms = x.norm(2, dim=-1, keepdim=True) * x.shape[-1] ** -0.5
        out: Tensor = self.scale * (x / (rms + self.eps))
        return out


class PaperLNS(nn.Module):
    """LayerNorm Scaling as the Curse-of-Depth repository: ``LayerNorm(x)`` then ``* 1/sqrt(l)``."""

    def __init__(self, c: int, layer_idx: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.scale = 1.0 / math.sqrt(layer_idx + 1)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.norm(x) * self.scale
        return out


class TorchLayerNorm2d(nn.Module):
    """LayerNorm over the channels of ``(N, C, H, W)`` in torch (timm's ``LayerNorm2d``): permute,
    ``F.layer_norm``, permute back; the layer DyT replaces in ConvNeXt."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(c)

    def forward(self, x: Tensor) -> Tensor:
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # type: ignore[no-any-return]


class _AddNorm(nn.Module):
    """``h = x + r; y = norm(h)``, returning ``y`` (the benchmark's loss reads ``y`` only)."""

    def __init__(self, c: int, kind: str, fused: bool) -> None:
        super().__init__()
        self.kind = kind
        self.fused = fused
        self.norm: nn.Module = nn.LayerNorm(c) if kind == "layernorm" else nn.RMSNorm(c, eps=1e-6)

    def forward(self, x: Tensor, r: Tensor) -> Tensor:
        w: Tensor | None = getattr(self.norm, "weight", None)
        b: Tensor | None = getattr(self.norm, "bias", None)
        if not self.fused:  # torch: the add, then torch's own norm
            return self.norm(x + r)  # type: ignore[no-any-return]
        if self.kind == "layernorm":
            return normlab.functional.add_layer_norm(x, r, (x.shape[-1],), w, b, 1e-5)[0]
        return normlab.functional.add_rms_norm(x, r, (x.shape[-1],), w, b, 1e-6)[0]


def _roles(
    normlab_module: nn.Module, torch_module: nn.Module | None, paper: nn.Module | None
) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {"normlab": normlab_module, "plain": _Plain(normlab_module)}
    if torch_module is not None:
        out["torch"] = torch_module
    if paper is not None:
        out["paper"] = paper
    return out


def default_cases(tokens: int = 8192, width: int = 768) -> list[Case]:
    """The standard shapes: transformer activations ``(B*T, C)`` and ``(N, L, C)``, and conv feature
    maps ``(N, C, H, W)`` of the same element count (``tokens * width``)."""
    c = width
    rows = (tokens, c)
    seq = min(1024, tokens)
    tok3 = (max(tokens // seq, 1), seq, c)
    hw = 32
    conv_c = max(32, (tokens * c) // (32 * hw * hw) // 32 * 32)
    conv = (max(tokens * c // (conv_c * hw * hw), 1), conv_c, hw, hw)

    def ln(dt: torch.dtype) -> nn.Module:
        return nn.LayerNorm(c)

    cases = [
        Case(
            "layernorm",
            "tokens",
            rows,
            lambda dt: _roles(normlab.LayerNorm(c), ln(dt), None),
        ),
        Case(
            "rmsnorm",
            "tokens",
            rows,
            lambda dt: _roles(normlab.RMSNorm(c), nn.RMSNorm(c, eps=1e-6), PaperRMSNorm(c)),
        ),
        Case(
            "dyt",
            "tokens",
            rows,
            lambda dt: _roles(normlab.DyT(c), ln(dt), PaperDyT(c)),
        ),
        Case(
            "derf",
            "tokens",
            rows,
            lambda dt: _roles(normlab.Derf(c), ln(dt), PaperDerf(c)),
        ),
        Case(
            "lns",
            "tokens",
            rows,
            lambda dt: _roles(normlab.LayerNormScaling(c, layer_idx=3), ln(dt), PaperLNS(c, 3)),
        ),
        Case(
            "add+layernorm",
            "tokens",
            rows,
            lambda dt: _roles(_AddNorm(c, "layernorm", True), _AddNorm(c, "layernorm", False), None),
            inputs=2,
            outputs=2,
        ),
        Case(
            "add+rmsnorm",
            "tokens",
            rows,
            lambda dt: _roles(_AddNorm(c, "rmsnorm", True), _AddNorm(c, "rmsnorm", False), None),
            inputs=2,
            outputs=2,
        ),
        Case(
            "groupnorm",
            "tokens (N,L,C)",
            tok3,
            lambda dt: _roles(
                _Transposed(normlab.GroupNorm(c, num_groups=32)), _Transposed(nn.GroupNorm(32, c)), None
            ),
        ),
        Case(
            "groupnorm",
            "conv (N,C,H,W)",
            conv,
            lambda dt: _roles(normlab.GroupNorm(conv[1], num_groups=32), nn.GroupNorm(32, conv[1]), None),
        ),
        Case(
            "dyt",
            "conv (N,C,H,W)",
            conv,
            lambda dt: _roles(
                normlab.DyT(conv[1], channels_first=True),
                TorchLayerNorm2d(conv[1]),
                PaperDyT(conv[1], channels_last=False),
            ),
        ),
        Case(
            "layernorm",
            "conv (N,C,H,W)",
            conv,
            lambda dt: _roles(
                normlab.LayerNorm(conv[1], channels_first=True), TorchLayerNorm2d(conv[1]), None
            ),
        ),
        Case(
            "batchnorm",
            "conv (N,C,H,W)",
            conv,
            lambda dt: _roles(normlab.BatchNorm(conv[1]), nn.BatchNorm2d(conv[1]), None),
        ),
    ]
    return cases


# ------------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timing:
    """Milliseconds of one implementation over the rounds."""

    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    @property
    def spread(self) -> float:
        """Half the inter-quartile range over the median (a relative +-)."""
        if len(self.samples) < 4:
            return math.nan
        q = statistics.quantiles(self.samples, n=4)
        return (q[2] - q[0]) / 2 / self.median

    def summary(self) -> dict[str, float]:
        return {
            "median_ms": self.median,
            "min_ms": min(self.samples) if self.samples else math.nan,
            "spread": self.spread,
            "n": float(len(self.samples)),
        }


def _ms(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


# Back-to-back calls per CUDA sample: one GPU kernel of ~0.1 ms is shorter than the host's
# launch path, so a sample times a queue of calls (the events bracket the whole queue).
CUDA_CALLS_PER_SAMPLE = 10


def _cuda_ms(fn: Callable[[], Any]) -> float:
    start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    start.record()
    for _ in range(CUDA_CALLS_PER_SAMPLE):
        fn()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end)) / CUDA_CALLS_PER_SAMPLE


def _inputs(case: Case, dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(case.shape, generator=g) + 0.3).to(device, dtype) for _ in range(case.inputs)]


def _liger(case: Case, c: int) -> nn.Module | None:
    """Liger-Kernel's layer for the case (its Triton kernels), or ``None`` where it has none or
    the package is missing or its API differs from the one this was written for (0.5-0.6)."""
    try:
        if case.norm == "rmsnorm" and case.layout == "tokens":
            from liger_kernel.transformers.rms_norm import LigerRMSNorm

            return LigerRMSNorm(c, eps=1e-6)  # type: ignore[no-any-return]
        if case.norm == "layernorm" and case.layout == "tokens":
            from liger_kernel.transformers.layer_norm import LigerLayerNorm

            return LigerLayerNorm(c)  # type: ignore[no-any-return]
        if case.norm == "dyt" and case.layout == "tokens":
            from liger_kernel.transformers.dyt import LigerDyT

            return LigerDyT(c)  # type: ignore[no-any-return]
        if case.norm == "groupnorm":
            from liger_kernel.transformers.group_norm import LigerGroupNorm

            groups = 32
            if case.layout.startswith("conv"):
                return LigerGroupNorm(case.shape[1], groups)  # type: ignore[no-any-return]
            return _Transposed(LigerGroupNorm(c, groups))
    except Exception:  # not installed, or another API: the role is left out
        return None
    return None


@dataclass
class CaseResult:
    norm: str
    layout: str
    shape: tuple[int, ...]
    dtype: str
    threads: int
    bytes_fwd: int
    bytes_fwdbwd: int
    copy_ms: float
    copy_gbps: float
    timings: dict[str, dict[str, dict[str, float]]]  # role -> "fwd"/"fwdbwd" -> summary
    derived: dict[str, dict[str, float]]  # role -> gbps/%copy/ratios

    def row(self, role: str = "normlab") -> dict[str, Any]:
        return {
            "norm": self.norm,
            "layout": self.layout,
            "dtype": self.dtype,
            "threads": self.threads,
            **self.derived.get(role, {}),
        }


def run_case(
    case: Case,
    dtype: torch.dtype,
    threads: int,
    repeats: int,
    warmup: int = 2,
    *,
    device: str = "cpu",
    compile: bool = False,
) -> CaseResult:
    """Times every role of ``case`` interleaved: one call of each per round, ``repeats`` rounds."""
    torch.set_num_threads(threads)
    modules = case.build(dtype)
    if compile:
        baseline = modules.get("paper", modules.get("torch", modules["plain"]))
        modules["compile"] = cast(nn.Module, torch.compile(baseline))
    if device == "cuda":
        liger = _liger(case, case.shape[-1])
        if liger is not None:
            modules["liger"] = liger
    modules = {role: m.to(device, dtype) for role, m in modules.items()}
    xs = _inputs(case, dtype, device=device)
    leaves = [x.clone().requires_grad_(True) for x in xs]
    dy = torch.randn(case.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    dst = torch.empty_like(xs[0])
    itemsize = xs[0].element_size()
    nbytes = xs[0].numel() * itemsize

    def fwd(m: nn.Module) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return m(*xs)

        return run

    def fwdbwd(m: nn.Module) -> Callable[[], Any]:
        params = list(m.parameters())

        def run() -> None:
            for t in (*leaves, *params):
                t.grad = None
            m(*leaves).backward(dy)

        return run

    jobs: dict[tuple[str, str], Callable[[], Any]] = {}
    for role, m in modules.items():
        jobs[(role, "fwd")] = fwd(m)
        jobs[(role, "fwdbwd")] = fwdbwd(m)
    jobs[("copy", "copy")] = lambda: dst.copy_(xs[0])
    times = {key: Timing() for key in jobs}
    for _ in range(warmup):
        for job in jobs.values():
            job()
    timer = _cuda_ms if device == "cuda" else _ms
    for _ in range(repeats):
        for key, job in jobs.items():
            times[key].samples.append(timer(job))

    copy_ms = times[("copy", "copy")].median
    copy_gbps = 2 * nbytes / copy_ms / 1e6
    timings: dict[str, dict[str, dict[str, float]]] = {}
    derived: dict[str, dict[str, float]] = {}
    for role in modules:
        tf, tb = times[(role, "fwd")], times[(role, "fwdbwd")]
        timings[role] = {"fwd": tf.summary(), "fwdbwd": tb.summary()}
        gf = case.passes_fwd * nbytes / tf.median / 1e6
        gb = case.passes_fwdbwd * nbytes / tb.median / 1e6
        d = {
            "fwd_ms": tf.median,
            "fwd_spread": tf.spread,
            "fwdbwd_ms": tb.median,
            "fwdbwd_spread": tb.spread,
            "fwd_gbps": gf,
            "fwdbwd_gbps": gb,
            "fwd_copy_frac": gf / copy_gbps,
            "fwdbwd_copy_frac": gb / copy_gbps,
        }
        for other in ("torch", "paper", "compile", "liger"):
            if other in modules and other != role:
                d[f"fwd_vs_{other}"] = tf.median / times[(other, "fwd")].median
                d[f"fwdbwd_vs_{other}"] = tb.median / times[(other, "fwdbwd")].median
        derived[role] = d
    return CaseResult(
        norm=case.norm,
        layout=case.layout,
        shape=case.shape,
        dtype=next(k for k, v in DTYPES.items() if v == dtype),
        threads=threads,
        bytes_fwd=case.passes_fwd * nbytes,
        bytes_fwdbwd=case.passes_fwdbwd * nbytes,
        copy_ms=copy_ms,
        copy_gbps=copy_gbps,
        timings=timings,
        derived=derived,
    )


# ------------------------------------------------------------------------------------------------
# End to end: training steps per second of the small GPT


E2E_NORMS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("layernorm", {}),
    ("rmsnorm", {}),
    ("dyt", {}),
    ("derf", {}),
    ("lns", {"norm": "layernorm", "placement": "lns"}),
)


def run_e2e(
    threads: int,
    steps: int,
    *,
    n_layer: int = 4,
    n_embd: int = 128,
    block_size: int = 128,
    batch: int = 32,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Training steps/s (AdamW, random tokens) of ``GPT`` with each norm, kernels on and off, interleaved."""
    from normlab.models import GPT, GPTConfig

    torch.set_num_threads(threads)
    vocab = 256
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, vocab, (batch, block_size), generator=g).to(device)
    targets = torch.randint(0, vocab, (batch, block_size), generator=g).to(device)
    runs: dict[tuple[str, bool], tuple[nn.Module, torch.optim.Optimizer]] = {}
    for label, kw in E2E_NORMS:
        cfg_kw: dict[str, Any] = {"norm": label, **kw}
        for on in (True, False):
            torch.manual_seed(0)
            model = GPT(
                GPTConfig(
                    vocab_size=vocab,
                    block_size=block_size,
                    n_layer=n_layer,
                    n_embd=n_embd,
                    n_head=4,
                    **cfg_kw,
                )
            ).to(device)
            runs[(label, on)] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    times: dict[tuple[str, bool], Timing] = {key: Timing() for key in runs}

    def step(key: tuple[str, bool]) -> None:
        model, opt = runs[key]
        with kernels.use_kernels(key[1]):
            out = model(idx, targets)
            assert out.loss is not None
            out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for key in runs:
        step(key)  # warm-up (and the first build, if any)

    def timed(key: tuple[str, bool]) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(key)
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    for _ in range(steps):
        for key in runs:
            times[key].samples.append(timed(key))
    rows = []
    for label, _ in E2E_NORMS:
        t_on, t_off = times[(label, True)], times[(label, False)]
        rows.append(
            {
                "norm": label,
                "threads": threads,
                "steps_per_s": 1e3 / t_on.median,
                "steps_per_s_kernels_off": 1e3 / t_off.median,
                "spread": t_on.spread,
                "speedup": t_off.median / t_on.median,
                "config": {"n_layer": n_layer, "n_embd": n_embd, "block_size": block_size, "batch": batch},
                "device": device,
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------
# Report


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(results: Sequence[CaseResult]) -> str:
    # the compile and liger columns only where some case has that role
    extra = [role for role in ("compile", "liger") if any(role in r.derived for r in results)]
    header = [
        "norm", "layout", "dtype", "thr", "fwd ms", "f+b ms", "±", "GB/s", "fwd %copy", "%copy", "plain",
        "t/torch", "t/paper", *(f"t/{role}" for role in extra), "torch %copy", "paper %copy",
    ]  # fmt: skip
    rows = []
    for r in results:
        d = r.derived["normlab"]
        rows.append(
            [
                r.norm,
                r.layout,
                r.dtype,
                str(r.threads),
                _fmt(d["fwd_ms"], ".3f" if d["fwd_ms"] < 1 else ".2f"),
                _fmt(d["fwdbwd_ms"], ".3f" if d["fwdbwd_ms"] < 1 else ".2f"),
                _fmt(100 * d["fwdbwd_spread"], ".0f") + "%",
                _fmt(d["fwdbwd_gbps"], ".1f"),
                _fmt(100 * d["fwd_copy_frac"], ".0f") + "%",
                _fmt(100 * d["fwdbwd_copy_frac"], ".0f") + "%",
                _fmt(r.derived["plain"]["fwdbwd_ms"], ".2f"),
                _fmt(d.get("fwdbwd_vs_torch"), ".2f"),
                _fmt(d.get("fwdbwd_vs_paper"), ".2f"),
                *(_fmt(d.get(f"fwdbwd_vs_{role}"), ".2f") for role in extra),
                _fmt(100 * r.derived["torch"]["fwdbwd_copy_frac"], ".0f") + "%"
                if "torch" in r.derived
                else "-",
                _fmt(100 * r.derived["paper"]["fwdbwd_copy_frac"], ".0f") + "%"
                if "paper" in r.derived
                else "-",
            ]
        )
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def format_e2e(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["norm       thr  steps/s  kernels off  speedup", "---------  ---  -------  -----------  -------"]
    for r in rows:
        lines.append(
            f"{r['norm']:<9}  {r['threads']:>3}  {r['steps_per_s']:>7.2f}  "
            f"{r['steps_per_s_kernels_off']:>11.2f}"
            f"  {r['speedup']:>6.2f}x"
        )
    return "\n".join(lines)


def machine_info(device: str = "cpu") -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "normlab": normlab.__version__,
        "python": platform.python_version(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "kernels": kernels.info(),
        **(_gpu_info() if device == "cuda" else {}),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _gpu_info() -> dict[str, Any]:
    from normlab.kernels import _gpu

    props = torch.cuda.get_device_properties(0)
    try:
        import triton

        triton_version = str(triton.__version__)
    except ImportError:
        triton_version = None
    return {
        "gpu": props.name,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "sms": props.multi_processor_count,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "gpu_kernels": _gpu.status(),
    }


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:  # pragma: no cover - not on Linux/macOS
        return None


def plot(report: dict[str, Any], path: Path) -> None:
    """Bar chart: forward+backward bandwidth as % of copy per case and implementation; e2e steps/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    e2e = report.get("e2e", [])
    fig, axes = plt.subplots(
        1 + bool(e2e), 1, figsize=(max(8.0, 0.55 * len(results) + 3), 9 if e2e else 5), squeeze=False
    )
    ax = axes[0][0]
    labels = [f"{r['norm']}\n{r['layout'].split(' ')[0]} {r['dtype']} t{r['threads']}" for r in results]
    roles = [role for role in ROLES if any(role in r["derived"] for r in results)]
    width = 0.8 / max(len(roles), 1)
    for k, role in enumerate(roles):
        vals = [
            100 * r["derived"][role]["fwdbwd_copy_frac"] if role in r["derived"] else 0.0 for r in results
        ]
        offset = (k - (len(roles) - 1) / 2) * width
        ax.bar([i + offset for i in range(len(results))], vals, width, label=role)
    on_gpu = report.get("settings", {}).get("device") == "cuda"
    target = 85 if on_gpu else 70  # the targets: fwd >= 85% of HBM (GPU), fwd+bwd >= 70% (CPU)
    ax.axhline(target, color="k", lw=0.8, ls="--", label=f"target {target}%")
    ax.axhline(100, color="gray", lw=0.8, ls=":")
    ax.set_xticks(range(len(results)), labels, fontsize=7, rotation=90)
    ax.set_ylabel("fwd+bwd bandwidth, % of same-run copy_")
    ax.set_title("normlab bench: minimal-traffic bandwidth vs copy (higher is better)")
    ax.legend(fontsize=8, ncols=5)
    if e2e:
        ax2 = axes[1][0]
        names = [f"{r['norm']} t{r['threads']}" for r in e2e]
        ax2.bar([i - 0.2 for i in range(len(e2e))], [r["steps_per_s"] for r in e2e], 0.4, label="kernels on")
        ax2.bar(
            [i + 0.2 for i in range(len(e2e))],
            [r["steps_per_s_kernels_off"] for r in e2e],
            0.4,
            label="kernels off",
        )
        ax2.set_xticks(range(len(e2e)), names, fontsize=8)
        cfg = e2e[0]["config"]
        ax2.set_ylabel("GPT training steps / s")
        ax2.set_title(
            f"end to end: GPT {cfg['n_layer']}x{cfg['n_embd']}, "
            f"batch {cfg['batch']}x{cfg['block_size']} tokens"
        )
        ax2.legend(fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)


def iter_runs(
    cases: Sequence[Case],
    dtypes: Sequence[str],
    threads: Sequence[int],
    repeats: int,
    *,
    device: str = "cpu",
    compile: bool = False,
) -> Iterator[CaseResult]:
    for t in threads:
        for dt in dtypes:
            for case in cases:
                yield run_case(case, DTYPES[dt], t, repeats, device=device, compile=compile)


def run_bench(
    *,
    norms: Sequence[str] | None = None,
    dtypes: Sequence[str] = ("fp32", "bf16"),
    threads: Sequence[int] | None = None,
    repeats: int = 15,
    tokens: int | None = None,
    width: int = 768,
    e2e_steps: int = 10,
    e2e_kwargs: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    device: str = "cpu",
    compile: bool | None = None,
) -> dict[str, Any]:
    """Run the benchmark and return the JSON-able report (see the module docstring).

    ``tokens`` defaults to 8192 rows on CPU and 65536 on CUDA; ``compile`` (the ``torch.compile``
    role) defaults to off on CPU (minutes of compilation) and on for CUDA.
    """
    if device not in DEVICES:
        raise ValueError(f"normlab bench: device must be one of {DEVICES}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("normlab bench: device 'cuda' asked for, but torch.cuda.is_available() is False")
    if tokens is None:
        tokens = 65536 if device == "cuda" else 8192
    if compile is None:
        compile = device == "cuda"
    for dt in dtypes:
        if dt not in DTYPES:
            raise ValueError(f"normlab bench: unknown dtype {dt!r}; choose from {sorted(DTYPES)}")
    if repeats < 1:
        raise ValueError(f"normlab bench: repeats must be >= 1, got {repeats}")
    if tokens < 1 or width < 32 or width % 32:
        raise ValueError(
            f"normlab bench: need tokens >= 1 and a width divisible by 32, got {tokens}, {width}"
        )
    cases = default_cases(tokens, width)
    if norms:
        known = sorted({c.norm for c in cases})
        unknown = [n for n in norms if n not in known]
        if unknown:
            raise ValueError(f"normlab bench: unknown norm(s) {unknown}; choose from {known}")
        cases = [c for c in cases if c.norm in norms]
    original_threads = torch.get_num_threads()
    thread_list = list(threads) if threads else [original_threads]
    if any(t < 1 for t in thread_list):
        raise ValueError(f"normlab bench: thread counts must be >= 1, got {thread_list}")
    if device == "cuda":
        thread_list = thread_list[:1]  # host threads do not matter to GPU kernels
        from normlab.kernels import _gpu

        _gpu.ensure_registered()
    else:
        kernels.build()
    report: dict[str, Any] = {"machine": machine_info(device), "load_before": _loadavg()}
    report["settings"] = {"dtypes": list(dtypes), "threads": thread_list, "repeats": repeats,
                          "tokens": tokens, "width": width, "device": device,
                          "compile": compile}  # fmt: skip
    results = []
    try:
        for r in iter_runs(cases, dtypes, thread_list, repeats, device=device, compile=compile):
            results.append(r)
            if progress is not None:
                d = r.derived["normlab"]
                progress(
                    f"{r.norm:<13} {r.layout:<15} {r.dtype} t{r.threads}: fwd+bwd {d['fwdbwd_ms']:.2f} ms, "
                    f"{100 * d['fwdbwd_copy_frac']:.0f}% of copy"
                )
        e2e: list[dict[str, Any]] = []
        if e2e_steps > 0:
            for t in thread_list:
                e2e += run_e2e(t, e2e_steps, device=device, **(e2e_kwargs or {}))
                if progress is not None:
                    progress(f"end to end, {t} thread(s): done")
    finally:
        torch.set_num_threads(original_threads)
    report["results"] = [
        {**{k: v for k, v in asdict(r).items() if k not in ("timings",)}, "timings": r.timings}
        for r in results
    ]
    report["e2e"] = e2e
    report["load_after"] = _loadavg()
    report["_table"] = format_table(results)
    return report


def save(report: dict[str, Any], out_dir: Path, *, png: bool = True) -> list[Path]:
    """``bench.json`` (and ``bench.png``) in ``out_dir``, written atomically; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "bench.json"]
    data = {k: v for k, v in report.items() if not k.startswith("_")}
    atomic_write_text(paths[0], json.dumps(data, indent=2, default=str) + "\n")
    if png:
        paths.append(out_dir / "bench.png")
        plot(report, paths[1])
    return paths
