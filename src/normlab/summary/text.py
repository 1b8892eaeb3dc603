"""Text renderings of a :class:`~normlab.diagnostics.Diagnosis`: the console table, a
short Markdown summary, and :func:`write_summary`, which writes every file of a diagnosis."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from normlab._atomic import atomic_write_text
from normlab._text import text_table as _columns
from normlab.diagnostics import Diagnosis


def _fmt(x: float | None, spec: str = ".3g") -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return format(x, spec)


def _table(rows: Sequence[Sequence[str]], header: Sequence[str], *, markdown: bool = False) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    return _columns(rows, header)


def table_rows(report: Diagnosis) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per block when blocks were found, else one per layer."""
    by_name = {s.name: s for s in report.layers}
    if report.residual is not None and report.angular is not None:
        header = ["block", "name", "var x_l+1", "d(l,l+1)", "BI", "dL removed", "act_corr", "|dL/dW|"]
        d = report.angular.adjacent("last_token")
        rows = []
        for i, name in enumerate(report.model.block_names):
            s = by_name.get(name)
            rows.append(
                [
                    str(i),
                    name,
                    _fmt(report.residual.variance[i + 1]),
                    _fmt(d[i], ".3f"),
                    _fmt(report.block_influence[i] if report.block_influence else None, ".3f"),
                    _fmt(report.removal.delta[i] if report.removal is not None else None, "+.2e"),
                    _fmt(s.act_corr if s else None, ".3f"),
                    _fmt(s.weight_grad_norm if s else None),
                ]
            )
        return header, rows
    header = ["layer", "type", "act_var", "act_corr", "stable rank", "|dL/d out|", "|dL/dW|"]
    rows = [
        [
            s.name,
            s.module_type,
            _fmt(s.act_var),
            _fmt(s.act_corr, ".3f"),
            _fmt(s.stable_rank),
            _fmt(s.act_grad_norm),
            _fmt(s.weight_grad_norm),
        ]
        for s in report.layers
    ]
    return header, rows


def text_table(report: Diagnosis) -> str:
    """The console table, then the findings."""
    header, rows = table_rows(report)
    out = [_table(rows, header)]
    out.append(f"\nloss {report.loss:.4f} ({report.loss_kind}); data: {report.data or 'as given'}")
    if report.findings:
        out.append("\nfindings:")
        out += [
            f"- [{f.severity}] {f.message} ({f.paper})" if f.paper else f"- [{f.severity}] {f.message}"
            for f in report.findings
        ]
    else:
        out.append("\nno findings: nothing crossed the verdict thresholds")
    return "\n".join(out)


def markdown_summary(report: Diagnosis, *, images: Sequence[str] = ()) -> str:
    """A short Markdown page: what was measured, the findings, the table and the images."""
    m = report.model
    lines = [f"# normlab diagnose: {m.spec or m.model_type}", ""]
    lines.append(
        f"- model: `{m.model_type}`, {m.num_params:,} parameters, {m.num_blocks} blocks"
        + (f" in `{m.stack}`" if m.stack and m.stack != "given" else "")
        + (f" (`{m.block_names[0]}` ... `{m.block_names[-1]}`)" if m.block_names else "")
    )
    lines.append(f"- data: {report.data or 'as given'}")
    lines.append(f"- loss: {report.loss:.4f} ({report.loss_kind})")
    if report.nonfinite is not None:
        lines.append(f"- first non-finite activation: `{report.nonfinite.name}` ({report.nonfinite.where})")
    for note in report.notes:
        lines.append(f"- note: {note}")
    lines += ["", "## Findings", ""]
    if report.findings:
        lines += [
            f"- **{f.code}** ({f.severity}): {f.message}. *{f.paper}*"
            if f.paper
            else f"- **{f.code}** ({f.severity}): {f.message}"
            for f in report.findings
        ]
    else:
        lines.append("Nothing crossed the verdict thresholds (`normlab.diagnostics.Thresholds`).")
    header, rows = table_rows(report)
    lines += [
        "",
        "## Per block" if report.angular is not None else "## Per layer",
        "",
        _table(rows, header, markdown=True),
    ]
    if images:
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(img).stem}]({img})" for img in images]
    lines += ["", "Numbers: `diagnostics.json`. Definitions: `normlab.diagnostics` docstrings."]
    return "\n".join(lines) + "\n"


def write_summary(
    report: Diagnosis, out_dir: str | os.PathLike[str], *, plots: bool = True
) -> dict[str, Path]:
    """Write ``diagnostics.json``, the PNG plots (when matplotlib is installed and ``plots``)
    and ``summary.md`` into ``out_dir``; each file atomically. Returns the written paths."""
    out = Path(out_dir)
    written: dict[str, Path] = {"json": atomic_write_text(out / "diagnostics.json", report.to_json() + "\n")}
    images: list[str] = []
    if plots:
        from normlab.summary import plots as P

        written["layers"] = P.plot_layers(report, out / "layers.png")
        images.append("layers.png")
        if report.angular is not None:
            written["angular"] = P.plot_angular_heatmap(report, out / "angular_distance.png")
            written["angular_all_tokens"] = P.plot_angular_heatmap(
                report, out / "angular_distance_all_tokens.png", variant="all_tokens"
            )
            images += ["angular_distance.png", "angular_distance_all_tokens.png"]
        if report.dyt is not None and report.dyt.layers:
            written["dyt"] = P.plot_dyt(report, out / "dyt_alpha.png")
            images.append("dyt_alpha.png")
        if report.model_update is not None and report.model_update.points:
            written["model_update"] = P.plot_model_update(report.model_update, out / "model_update.png")
            images.append("model_update.png")
    written["summary"] = atomic_write_text(out / "summary.md", markdown_summary(report, images=images))
    return written
