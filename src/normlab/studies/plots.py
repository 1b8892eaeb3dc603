"""PNG figures of a study report (matplotlib, imported here only, with the Agg backend).

Default figures: the training-loss curves of every group, and the curves of every evaluation
metric logged more than once. A study adds ``xy`` (final metric against a grid parameter),
``layers`` (per-layer probes) and ``heatmap`` (angular distances) figures with
:class:`~normlab.studies.framework.PlotSpec`.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from normlab.studies.framework import Stats


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_") or "plot"


def _label(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "all"


def _cells(results: Mapping[str, Any], group: str) -> list[tuple[str, Mapping[str, Any]]]:
    return [(n, c) for n, c in results["cells"].items() if c["group"] == group and c["finished"]]


def _default_specs(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    specs = []
    groups = sorted({c["group"] for c in results["cells"].values()})
    for g in groups:
        specs.append(
            {"kind": "curves", "group": g, "metric": "loss", "title": f"{g}: training loss", "logy": False}
        )
        keys: set[str] = set()
        for _, cell in _cells(results, g):
            keys |= {k for k, v in cell["curves"].items() if k != "loss" and len(v["step"]) > 1}
        for k in sorted(keys):
            specs.append({"kind": "curves", "group": g, "metric": k, "title": f"{g}: {k}", "logy": False})
    return specs


def draw_plots(study_dir: Path, results: Mapping[str, Any], plan: Mapping[str, Any]) -> list[dict[str, str]]:
    """Draw the default and the study's figures into ``study_dir/plots``; returns their paths.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = study_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    drawn = []
    specs = _default_specs(results) + [dict(p) for p in plan.get("plots", [])]
    for i, spec in enumerate(specs):
        cells = _cells(results, spec["group"])
        if not cells:
            continue
        kind = spec["kind"]
        title = spec.get("title") or f"{spec['group']}: {spec['metric']}"
        if kind == "heatmap":
            fig = _heatmap(plt, results, cells, spec)
        else:
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            if kind == "curves":
                _curves(ax, cells, spec)
            elif kind == "xy":
                _xy(ax, cells, spec)
            elif kind == "layers":
                _layers(ax, results, cells, spec)
            else:
                plt.close(fig)
                raise ValueError(f"plot: unknown kind {kind!r}")
            if spec.get("logx"):
                ax.set_xscale("log", base=2)
            if spec.get("logy"):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        if fig is None:
            continue
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        name = f"{i:02d}-{_slug(title)}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        drawn.append({"title": title, "path": f"plots/{name}"})
    return drawn


def _curves(ax: Any, cells: list[tuple[str, Mapping[str, Any]]], spec: Mapping[str, Any]) -> None:
    for _, cell in cells:
        curve = cell["curves"].get(spec["metric"])
        if not curve or not curve["step"]:
            continue
        steps, mean, sd = curve["step"], curve["mean"], curve["sd"]
        (line,) = ax.plot(steps, mean, label=f"{_label(cell['params'])} (n={cell['finished']})", lw=1.2)
        lo = [m - s for m, s in zip(mean, sd, strict=True)]
        hi = [m + s for m, s in zip(mean, sd, strict=True)]
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("step")
    ax.set_ylabel(spec["metric"] if spec["metric"] != "loss" else "training loss")


def _xy(ax: Any, cells: list[tuple[str, Mapping[str, Any]]], spec: Mapping[str, Any]) -> None:
    x_key, series = spec["x"], spec.get("series")
    xs = [cell["params"].get(x_key) for _, cell in cells]
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    categories = sorted({str(x) for x in xs})  # a non-numeric x gets evenly spaced ticks
    lines: dict[Any, list[tuple[float, float, float]]] = defaultdict(list)
    for (_, cell), x in zip(cells, xs, strict=True):
        s = cell["metrics"].get(spec["metric"])
        if not s or s["mean"] is None or x is None:
            continue
        pos = float(x) if numeric else float(categories.index(str(x)))
        lines[cell["params"].get(series) if series else "all"].append((pos, s["mean"], s["sd"] or 0.0))
    for name, pts in sorted(lines.items(), key=lambda kv: str(kv[0])):
        pts.sort()
        ax.errorbar(
            [p[0] for p in pts],
            [p[1] for p in pts],
            yerr=[p[2] for p in pts],
            marker="o",
            capsize=3,
            label=str(name),
        )
    if not numeric:
        ax.set_xticks(range(len(categories)), categories)
    ax.set_xlabel(x_key)
    ax.set_ylabel(spec["metric"])


def _probe_values(results: Mapping[str, Any], cell: Mapping[str, Any], key: str) -> list[Any]:
    return [
        results["runs"][k]["probe"][key]
        for k in cell["runs"]
        if results["runs"][k]["status"] == "finished" and key in results["runs"][k]["probe"]
    ]


def _layers(
    ax: Any, results: Mapping[str, Any], cells: list[tuple[str, Mapping[str, Any]]], spec: Mapping[str, Any]
) -> None:
    for _, cell in cells:
        per_seed = [v for v in _probe_values(results, cell, spec["metric"]) if v]
        if not per_seed:
            continue
        n = min(len(v) for v in per_seed)
        stats = [Stats(tuple(float(v[i]) for v in per_seed if v[i] is not None)) for i in range(n)]
        ax.errorbar(
            list(range(n)),
            [s.mean for s in stats],
            yerr=[s.sd for s in stats],
            marker=".",
            capsize=2,
            label=_label(cell["params"]),
        )
    ax.set_xlabel("layer (0 = input of the first block)")
    ax.set_ylabel(spec["metric"])


def _heatmap(
    plt: Any, results: Mapping[str, Any], cells: list[tuple[str, Mapping[str, Any]]], spec: Mapping[str, Any]
) -> Any:
    panels = []
    for _, cell in cells:
        mats = [m for m in _probe_values(results, cell, spec["metric"]) if m]
        if mats:
            n = len(mats[0])
            mean = [[sum(float(m[i][j]) for m in mats) / len(mats) for j in range(n)] for i in range(n)]
            panels.append((_label(cell["params"]), mean))
    if not panels:
        return None
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.3 * rows), squeeze=False)
    vmax = max(max(max(r) for r in m) for _, m in panels)
    for ax, (label, mat) in zip(axes.flat, panels, strict=False):
        im = ax.imshow(mat, vmin=0.0, vmax=vmax, cmap="viridis", origin="lower")
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("layer j")
        ax.set_ylabel("layer i")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    return fig
