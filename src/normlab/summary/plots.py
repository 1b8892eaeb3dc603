"""PNG plots of a :class:`~normlab.diagnostics.Diagnosis` (matplotlib, imported lazily).

* :func:`plot_layers`: per-layer/per-block curves: residual-stream variance, angular distance
  ``d(l, l+1)`` and block influence, layer-removal loss change, ``act_var``, ``act_corr`` and
  stable rank, gradient norms.
* :func:`plot_angular_heatmap`: ``d(l, l+n)`` over block ``l`` and offset ``n``, drawn as in
  the Curse-of-Depth code (``utils/angular_analysis.py``: each row clipped to its 1st-99th
  percentiles and min-max normalised, ``viridis_r``, cells with ``l + n > L`` masked); pass
  ``normalize_rows=False`` for the raw distances.
* :func:`plot_dyt` and :func:`plot_model_update` for the DyT relation and DeepNet's update norm.

Figures are built on ``matplotlib.figure.Figure`` (no pyplot global state, no display needed)
and written atomically.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from normlab._atomic import atomic_write_bytes
from normlab.diagnostics import Diagnosis
from normlab.diagnostics.tracking import ModelUpdateHistory

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ValueError("plots need matplotlib: pip install 'normlab[plot]'") from e
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Figure, path: str | os.PathLike[str], dpi: int) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return atomic_write_bytes(path, buf.getvalue())


def _finite_or_nan(xs: Sequence[float | None]) -> list[float]:
    return [x if x is not None and math.isfinite(x) else math.nan for x in xs]


def _has_data(xs: Sequence[float]) -> bool:
    return any(math.isfinite(x) for x in xs)


def _log_axis(ax: Axes, values: Sequence[float]) -> None:
    if all(v > 0 for v in values if math.isfinite(v)) and _has_data(values):
        ax.set_yscale("log")


def plot_layers(report: Diagnosis, path: str | os.PathLike[str], *, dpi: int = 100) -> Path:
    """A grid of per-block and per-layer curves; panels without data are left out."""
    panels: list[tuple[str, str, list[tuple[str, list[float]]], bool]] = []
    if report.residual is not None:
        panels.append(
            ("residual-stream variance", "x_l (0 = input)", [("var", report.residual.variance)], True)
        )
    if report.angular is not None:
        series = [
            ("d(l, l+1) last token", report.angular.adjacent("last_token")),
            ("d(l, l+1) all tokens", report.angular.adjacent("all_tokens")),
        ]
        if report.block_influence:
            series.append(("block influence", report.block_influence))
        panels.append(("what block l changes", "block l", series, False))
    if report.removal is not None:
        panels.append(("loss change without block l", "block l", [("dL", report.removal.delta)], False))
    if report.layers:
        panels.append(
            ("act_var (Beyond-BN)", "layer", [("act_var", [s.act_var for s in report.layers])], True)
        )
        panels.append(
            (
                "sample similarity",
                "layer",
                [
                    ("act_corr", [s.act_corr for s in report.layers]),
                    ("stable rank / N", [s.stable_rank / max(s.shape[0], 1) for s in report.layers]),
                ],
                False,
            )
        )
        panels.append(
            (
                "gradient norms",
                "layer",
                [
                    ("|dL/dW|", [s.weight_grad_norm for s in report.layers]),
                    ("|dL/d out|", [s.act_grad_norm for s in report.layers]),
                ],
                True,
            )
        )
    panels = [p for p in panels if any(_has_data(_finite_or_nan(s)) for _, s in p[2])]
    if not panels:
        raise ValueError("plot_layers: the report holds no per-layer data to plot")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(3.6 * cols, 2.7 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (title, xlabel, series, log) in zip(axes.flat, panels, strict=False):
        for label, ys in series:
            vals = _finite_or_nan(ys)
            ax.plot(range(len(vals)), vals, marker="o", markersize=2.5, linewidth=1.2, label=label)
        if log:
            _log_axis(ax, [v for _, ys in series for v in _finite_or_nan(ys)])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        if len(series) > 1:
            ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    title = report.model.spec or report.model.model_type
    fig.suptitle(f"{title}: loss {report.loss:.3f}", fontsize=10)
    return _save(fig, path, dpi)


def normalize_rows_robustly(data: np.ndarray, p_low: float = 1.0, p_high: float = 99.0) -> np.ndarray:
    """Each row clipped to its ``p_low``-``p_high`` percentiles, then min-max scaled to [0, 1]
    (a constant row gives 0); NaN cells stay NaN. The Curse-of-Depth heatmap normalisation."""
    out = np.full_like(data, np.nan, dtype=float)
    for i, row in enumerate(data):
        finite = row[np.isfinite(row)]
        if finite.size == 0:
            continue
        lo, hi = np.percentile(finite, p_low), np.percentile(finite, p_high)
        clipped = np.clip(row, lo, hi)
        span = np.nanmax(clipped) - np.nanmin(clipped)
        out[i] = 0.0 if span == 0 else (clipped - np.nanmin(clipped)) / span
        out[i][~np.isfinite(row)] = np.nan
    return out


def plot_angular_heatmap(
    report: Diagnosis,
    path: str | os.PathLike[str],
    *,
    variant: str = "last_token",
    normalize_rows: bool = True,
    dpi: int = 100,
) -> Path:
    """Heatmap of ``d(l, l+n)``: x = block ``l``, y = offset ``n`` (see the module docstring)."""
    if report.angular is None:
        raise ValueError("plot_angular_heatmap: the report has no angular distances (no blocks found)")
    if variant not in ("last_token", "all_tokens"):
        raise ValueError(
            f"plot_angular_heatmap: variant must be 'last_token' or 'all_tokens', got {variant!r}"
        )
    table = np.array(_table(getattr(report.angular, variant)), dtype=float)
    data = normalize_rows_robustly(table) if normalize_rows else table
    n_rows, n_cols = data.shape
    fig = _figure(max(4.0, 0.16 * n_cols + 1.8), max(3.0, 0.16 * n_rows + 1.2))
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(data)
    mesh = ax.pcolormesh(
        np.arange(n_cols + 1),
        np.arange(1, n_rows + 2),
        masked,
        cmap="viridis_r",
        edgecolors="white",
        linewidth=0.2,
        vmin=0.0 if normalize_rows else None,
        vmax=1.0 if normalize_rows else None,
    )
    step_x, step_y = max(1, math.ceil(n_cols / 12)), max(1, math.ceil(n_rows / 12))
    ax.set_xticks([c + 0.5 for c in range(0, n_cols, step_x)], [str(c) for c in range(0, n_cols, step_x)])
    ax.set_yticks([r + 1.5 for r in range(0, n_rows, step_y)], [str(r + 1) for r in range(0, n_rows, step_y)])
    ax.set_xlabel("block l", fontsize=9)
    ax.set_ylabel("n (distance to block l + n)", fontsize=9)
    ax.tick_params(labelsize=7)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    cbar = fig.colorbar(mesh, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("row-normalised d(l, l+n)" if normalize_rows else "d(l, l+n)", fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    what = "last token" if variant == "last_token" else "all tokens"
    title = report.model.spec or report.model.model_type
    ax.set_title(f"angular distance ({what})\n{title}", fontsize=9)
    return _save(fig, path, dpi)


def _table(rows: Sequence[Sequence[float | None]]) -> list[list[float]]:
    return [_finite_or_nan(r) for r in rows]


def plot_dyt(report: Diagnosis, path: str | os.PathLike[str], *, dpi: int = 100) -> Path:
    """DyT ``alpha`` against ``1/std(input)``, one point per layer (Zhu et al. 2025, Fig. 8)."""
    if report.dyt is None or not report.dyt.layers:
        raise ValueError("plot_dyt: the report has no DyT layers")
    fig = _figure(4.0, 3.2)
    ax = fig.add_subplot()
    xs = [s.inv_input_std for s in report.dyt.layers]
    ys = [s.alpha for s in report.dyt.layers]
    sc: Any = ax.scatter(xs, ys, c=range(len(xs)), cmap="viridis", s=14)
    fig.colorbar(sc, ax=ax).set_label("layer order", fontsize=8)
    ax.set_xlabel("1 / std(input)", fontsize=9)
    ax.set_ylabel("alpha", fontsize=9)
    ax.set_title(f"DyT alpha vs 1/std (pearson {report.dyt.pearson:.2f})", fontsize=9)
    return _save(fig, path, dpi)


def plot_model_update(history: ModelUpdateHistory, path: str | os.PathLike[str], *, dpi: int = 100) -> Path:
    """``||F(x; theta_t) - F(x; theta_0)||`` against the step (DeepNet, arXiv:2203.00555)."""
    if not history.points:
        raise ValueError("plot_model_update: no measurements")
    fig = _figure(4.0, 3.0)
    ax = fig.add_subplot()
    ax.plot([p.step for p in history.points], [p.norm for p in history.points], marker="o", markersize=3)
    ax.set_xlabel("step", fontsize=9)
    ax.set_ylabel("||F_t - F_0||", fontsize=9)
    ax.set_title("model update", fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path, dpi)
