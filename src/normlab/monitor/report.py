"""``normlab report-monitor``: a monitor log (``monitor.jsonl``) as findings, plots and Markdown.

Findings use the language and the rules of ``normlab diagnose`` (:mod:`normlab.diagnostics.findings`),
applied to the last measurement and to the trend over the run:

* ``nonfinite``: the first step and module with NaN/inf activations;
* ``dyt_saturation``: the largest ``alpha * std(input)`` of a DyT/Derf layer at or above 2.5
  (Zhu et al. 2025, arXiv:2503.10622), with the share of saturated inputs;
* ``residual_growth``: residual variance after the last block over after the first, at or above
  10 (Sun et al. 2025, arXiv:2502.05795), and how it changed since the first measurement;
* ``dead_blocks``: deep blocks whose input and output are closer than 0.01 (angular distance)
  and than a tenth of the shallower half's mean (at init every block is close alike);
* ``vanishing_gradients`` / ``exploding_gradients``: mean gradient norm of the first quarter of
  the blocks over the last quarter below 0.25 or above 10 (Xiong et al. 2020, arXiv:2002.04745);
* ``bn_drift``: a BatchNorm layer whose batch mean sits more than one running std from its
  running mean (eval-mode outputs will differ from training ones).

Plots (matplotlib): the per-block residual variance over steps as a heatmap (log colour), the
gradient norms per block, the DyT/Derf alphas and saturation margins, the angular distances.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from normlab._atomic import atomic_write_text
from normlab.diagnostics.findings import CURSE_OF_DEPTH, DYT, POST_LN_GRADS, quarter_ratio
from normlab.diagnostics.results import Finding, Thresholds
from normlab.monitor.monitor import MonitorThresholds, dead_deep_blocks, read_log
from normlab.summary.plots import _figure, _save

__all__ = ["monitor_findings", "report_monitor"]

# diagnose's thresholds (residual growth, DyT saturation, gradient ratios) and the monitor's own
DIAGNOSE = Thresholds()
MONITOR = MonitorThresholds()
BN_DRIFT = 1.0


def _values(xs: Sequence[float | None] | None) -> list[float]:
    return [float(x) if x is not None and math.isfinite(float(x)) else math.nan for x in (xs or [])]


def monitor_findings(records: Sequence[dict[str, Any]]) -> list[Finding]:
    """What the run's measurements say, worst first (see the module docstring for the rules)."""
    if not records:
        return []
    last, first = records[-1], records[0]
    blocks = last.get("blocks", [])
    found: list[Finding] = []
    bad = next((r for r in records if r.get("nonfinite")), None)
    if bad is not None:
        found.append(Finding("nonfinite", "error",
                             f"non-finite activations from step {bad['step']} on: {bad['nonfinite']} is the "
                             "first module whose output holds NaN or inf",
                             {"step": bad["step"], "module": bad["nonfinite"]}))  # fmt: skip
    alphas = last.get("alpha") or {}
    if alphas:
        name, worst = max(alphas.items(), key=lambda kv: kv[1]["margin"])
        if worst["margin"] >= DIAGNOSE.dyt_saturation:
            found.append(Finding("dyt_saturation", "warning",
                                 f"DyT {name} saturates at step {last['step']}: alpha {worst['alpha']:.3g} x "
                                 f"std(input) {worst['input_std']:.3g} = {worst['margin']:.3g}, "
                                 f"{worst['saturated']:.0%} of its inputs in tanh's flat tails; alpha should "
                                 "track 1/std(input): lower alpha_init",
                                 {"layer": name, **worst}, DYT))  # fmt: skip
    var, var0 = _values(last.get("residual_var")), _values(first.get("residual_var"))
    growth = DIAGNOSE.residual_growth
    if len(var) >= 2 and var[0] > 0 and math.isfinite(var[-1]) and var[-1] / var[0] >= growth:
        ratio = var[-1] / var[0]
        then = var0[-1] / var0[0] if len(var0) >= 2 and var0[0] > 0 else math.nan
        found.append(Finding("residual_growth", "warning",
                             f"residual variance grows {ratio:.3g}x from the first block to the last at step "
                             f"{last['step']} ({then:.3g}x at step {first['step']}): the Curse of Depth "
                             "signature; LayerNorm Scaling (lns) bounds it",
                             {"ratio": ratio, "ratio_at_start": then}, CURSE_OF_DEPTH))  # fmt: skip
    angular = _values(last.get("angular"))
    deep = dead_deep_blocks(angular, MONITOR)
    if len(deep) >= MONITOR.dead_run:
        names = [blocks[i] for i in deep]
        found.append(Finding("dead_blocks", "warning",
                             f"{len(deep)} deep blocks barely change their input at step {last['step']} "
                             f"(angular distance < {MONITOR.dead_angular}): {', '.join(names)}; they could "
                             "be removed or the residual scaled (LNS)",
                             {"blocks": ", ".join(names)}, CURSE_OF_DEPTH))  # fmt: skip
    ratio = quarter_ratio(_values(last.get("grad_norm")))
    vanishing, exploding = DIAGNOSE.vanishing_ratio, DIAGNOSE.exploding_ratio
    if math.isfinite(ratio) and (ratio < vanishing or ratio > exploding):
        code = "vanishing_gradients" if ratio < vanishing else "exploding_gradients"
        found.append(Finding(code, "warning",
                             f"gradient norm of the first blocks over the last is {ratio:.3g} at step "
                             f"{last['step']}: {'early' if ratio < vanishing else 'late'} blocks get "
                             f"{'much smaller' if ratio < vanishing else 'much larger'} gradients",
                             {"first_over_last": ratio}, POST_LN_GRADS))  # fmt: skip
    for name, stats in (last.get("bn_stats") or {}).items():
        if stats["mean_gap"] > BN_DRIFT:
            found.append(Finding("bn_drift", "warning",
                                 f"BatchNorm {name}: the batch mean sits {stats['mean_gap']:.3g} running "
                                 f"stds from the running mean (variance ratio {stats['var_ratio']:.3g}) at "
                                 f"step {last['step']}: eval-mode outputs will differ from training ones",
                                 {"layer": name, **stats}))  # fmt: skip
    return found


def _matrix(records: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([_values(r.get(key)) for r in records if r.get(key)], dtype=float)


def _edges(steps: Sequence[int]) -> np.ndarray:
    """Cell edges around the measured steps (midway between neighbours)."""
    x = np.asarray(steps, dtype=float)
    if len(x) == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = (x[1:] + x[:-1]) / 2
    return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])


def _plot_blocks(records: Sequence[dict[str, Any]], out: Path, dpi: int) -> list[Path]:
    written: list[Path] = []
    steps = [r["step"] for r in records]
    var = _matrix(records, "residual_var")
    grads = _matrix(records, "grad_norm")
    angular = _matrix(records, "angular")
    panels = [(k, m) for k, m in (("residual_var", var), ("angular", angular)) if m.size]
    if panels:
        fig = _figure(5.5 * len(panels), 3.8)
        for ax, (key, m) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
            shown = np.log10(np.where(m > 0, m, np.nan)) if key == "residual_var" else m
            image = ax.pcolormesh(_edges(steps[: m.shape[0]]), np.arange(m.shape[1] + 1) - 0.5, shown.T,
                                  cmap="viridis", shading="flat")  # fmt: skip
            ax.set_xlabel("step")
            ax.set_ylabel("block")
            title = "log10 residual variance" if key == "residual_var" else "angular distance in -> out"
            ax.set_title(title)
            fig.colorbar(image, ax=ax)
        written.append(_save(fig, out / "monitor_blocks.png", dpi))
    if grads.size:
        fig = _figure(6, 3.8)
        ax = fig.subplots()
        for b in range(grads.shape[1]):
            ax.plot(steps[: grads.shape[0]], grads[:, b], label=f"block {b}")
        if np.nanmin(grads) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title("gradient norm per block")
        if grads.shape[1] <= 12:
            ax.legend(fontsize=7)
        written.append(_save(fig, out / "monitor_grads.png", dpi))
    return written


def _plot_alpha(records: Sequence[dict[str, Any]], out: Path, dpi: int) -> list[Path]:
    names = sorted({n for r in records for n in (r.get("alpha") or {})})
    if not names:
        return []
    fig = _figure(11, 3.8)
    left, right = fig.subplots(1, 2)
    for name in names:
        points = [(r["step"], r["alpha"][name]) for r in records if name in (r.get("alpha") or {})]
        left.plot([s for s, _ in points], [p["alpha"] for _, p in points], label=name)
        right.plot([s for s, _ in points], [p["margin"] for _, p in points], label=name)
    right.axhline(DIAGNOSE.dyt_saturation, color="grey", linestyle="--", linewidth=0.8)
    left.set_title("DyT/Derf alpha")
    right.set_title("saturation margin alpha x std(input)")
    for ax in (left, right):
        ax.set_xlabel("step")
    if len(names) <= 12:
        right.legend(fontsize=7)
    return [_save(fig, out / "monitor_alpha.png", dpi)]


def _markdown(
    path: Path, records: Sequence[dict[str, Any]], findings: Sequence[Finding], images: Sequence[Path]
) -> str:
    last = records[-1]
    lines = [f"# Monitor report: {path.name}", ""]
    lines.append(f"{len(records)} measurements, steps {records[0]['step']} to {last['step']}, "
                 f"{len(last.get('blocks', []))} blocks.")  # fmt: skip
    lines += ["", "## Findings", ""]
    if findings:
        lines += [f"- **{f.code}** ({f.severity}): {f.message}" + (f" [{f.paper}]" if f.paper else "")
                  for f in findings]  # fmt: skip
    else:
        lines.append("- nothing to report: no rule fired on the last measurement")
    lines += ["", f"## Last measurement (step {last['step']})", ""]
    header = ["block", "residual var", "var growth", "angular", "grad norm"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, name in enumerate(last.get("blocks", [])):
        cells = [name]
        for key in ("residual_var", "var_growth", "angular", "grad_norm"):
            values = last.get(key) or []
            value = values[i] if i < len(values) else None
            cells.append("-" if value is None else f"{value:.4g}")
        lines.append("| " + " | ".join(cells) + " |")
    if last.get("alpha"):
        lines += ["", "| DyT layer | alpha | std(input) | margin | saturated |", "|---|---|---|---|---|"]
        for name, s in last["alpha"].items():
            lines.append(f"| {name} | {s['alpha']:.4g} | {s['input_std']:.4g} | {s['margin']:.4g} | "
                         f"{s['saturated']:.1%} |")  # fmt: skip
    if images:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images]
    return "\n".join(lines) + "\n"


def report_monitor(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    plots: bool = True,
    dpi: int = 100,
) -> dict[str, Any]:
    """Read ``path`` (a ``monitor.jsonl``), write ``monitor_report.md`` and the PNGs into ``out``
    (default: the log's folder); returns the findings, the files and the Markdown."""
    log = Path(path)
    records = read_log(log)
    folder = Path(out) if out is not None else log.parent
    folder.mkdir(parents=True, exist_ok=True)
    findings = monitor_findings(records)
    images = [*_plot_blocks(records, folder, dpi), *_plot_alpha(records, folder, dpi)] if plots else []
    text = _markdown(log, records, findings, images)
    summary = atomic_write_text(folder / "monitor_report.md", text)
    return {"findings": findings, "files": [summary, *images], "markdown": text}
