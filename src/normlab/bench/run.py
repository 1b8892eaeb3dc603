"""``run_bench``: every case, dtype and thread count, then the end-to-end steps, as one JSON-able report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch

from normlab import kernels
from normlab.bench.cases import DEVICES, DTYPES, default_cases
from normlab.bench.render import format_table
from normlab.bench.timing import _loadavg, iter_runs, machine_info, run_e2e


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
