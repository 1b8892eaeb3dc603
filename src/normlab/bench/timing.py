"""How ``normlab bench`` times: interleaved rounds, medians and spreads, the copy baseline, steps/s."""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

import normlab
from normlab import kernels
from normlab.bench.cases import DTYPES, E2E_NORMS, Case, liger_module


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
        liger = liger_module(case, case.shape[-1])
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
