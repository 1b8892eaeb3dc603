"""What ``normlab bench`` shows and writes: the table, the end-to-end lines, ``bench.json``, ``bench.png``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from normlab._atomic import atomic_write, atomic_write_text
from normlab.bench.cases import ROLES
from normlab.bench.timing import CaseResult


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
