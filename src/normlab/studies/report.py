"""The report of a study: ``report.md``, ``results.json`` and PNG plots, from the logged numbers.

Everything is recomputed from the run directories: each run's metrics come from its
``metrics.jsonl`` (via :func:`normlab.train.summarize`), the claims from the rules stored in
``plan.json`` before the first run. Runs without ``result.json`` (unfinished or failed) are
listed, not counted. Plots need matplotlib (``pip install normlab[plot]``); without it the
report says so and keeps the tables.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from normlab._atomic import atomic_write_bytes
from normlab.studies.framework import STUDIES, MetricFn, Stats, Study, rule_from_dict
from normlab.studies.plan import ERROR_FILE, SCHEDULE_FILE, load_plan, run_dir
from normlab.studies.stats import welch_interval
from normlab.train.logger import json_safe, read_jsonl, summarize
from normlab.train.rundir import METRICS_FILE, RESULT_FILE, write_json

NOT_NEEDED = "not needed"  # a run sequential seeding did not schedule
# ``--robust`` (normlab.studies.robust): the file it writes beside the plan, and its marks
ROBUST_FILE = "robust.json"
ROBUST, NOT_ROBUST, SAME_DATA = "robust", "not robust", "same data"

VERDICT_MARK = {
    "reproduced": "reproduced",
    "not reproduced": "NOT reproduced",
    "inconclusive": "inconclusive",
}


def run_metrics(
    records: list[dict[str, Any]], summary: Mapping[str, Any], custom: Mapping[str, MetricFn]
) -> dict[str, float | None]:
    """The scalar metrics of a run: its final evaluation, ``train_loss``, ``diverged``, custom ones."""
    out: dict[str, float | None] = {}
    for k, v in summary.get("final", {}).items():
        out[k] = float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None
    tl = summary.get("train_loss")
    out["train_loss"] = float(tl) if isinstance(tl, (int, float)) and math.isfinite(tl) else None
    out["diverged"] = 1.0 if summary.get("diverged") else 0.0
    for name, fn in custom.items():
        value = fn(records, summary)
        out[name] = float(value) if value is not None and math.isfinite(value) else None
    return out


def _curve(points: list[list[tuple[int, float]]]) -> dict[str, list[float]]:
    """Mean and sd over seeds at the steps every seed logged."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for seed_points in points:
        for step, value in seed_points:
            by_step[step].append(value)
    steps = sorted(s for s, v in by_step.items() if len(v) == len(points))
    stats = [Stats(tuple(by_step[s])) for s in steps]
    return {"step": [float(s) for s in steps], "mean": [s.mean for s in stats], "sd": [s.sd for s in stats]}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def collect(study_dir: str | os.PathLike[str], *, study: Study | None = None) -> dict[str, Any]:
    """The results of a study directory as a JSON-ready dict (what ``results.json`` holds)."""
    study_dir = Path(study_dir)
    plan = load_plan(study_dir)
    if study is None and plan["study"] in STUDIES:
        study = STUDIES.get(plan["study"])
    source = plan.get("source") or {}
    if study is None and source.get("format") == "py" and Path(source["file"]).is_file():
        from normlab.studies.userfile import load_study_file  # its custom metrics

        study = load_study_file(source["file"])
    custom = dict(study.metrics) if study is not None else {}
    needed = {c["metric"] for c in plan["claims"]}
    builtin = {"train_loss", "diverged"}
    runs: dict[str, Any] = {}
    schedule = _schedule(study_dir, plan)
    for r in plan["runs"]:
        path = run_dir(study_dir, r["key"])
        records = read_jsonl(path / METRICS_FILE)
        is_done = (path / RESULT_FILE).is_file()
        summary = summarize(records)
        result = json.loads((path / RESULT_FILE).read_text()) if is_done else {}
        status = "finished" if is_done else ("failed" if (path / ERROR_FILE).is_file() else "unfinished")
        beyond = int(r["seed"]) >= schedule.get(r["cell"], 1 << 30)
        if status == "unfinished" and beyond and not path.exists():
            status = NOT_NEEDED  # beyond the seeds sequential seeding gave its cell
        start = next((x for x in records if x.get("kind") == "start"), {})
        runs[r["key"]] = {
            "group": r["group"],
            "cell": r["cell"],
            "seed": r["seed"],
            "params": r["params"],
            "status": status,
            "metrics": run_metrics(records, summary, custom) if is_done else {},
            "diverged_at": summary.get("diverged_at"),
            "steps": summary.get("steps"),
            "wall_s": result.get("wall_s"),
            "threads": result.get("threads"),
            "kernels": result.get("kernels"),
            "data": start.get("data"),
            "probe": summary.get("probe", {}) if is_done else {},
            "_records": records,
        }
    missing_metric = sorted(
        m for m in needed - builtin - custom.keys() if not any(m in x["metrics"] for x in runs.values())
    )
    if missing_metric and any(x["status"] == "finished" for x in runs.values()):
        raise ValueError(
            f"report: metric(s) {missing_metric} are neither logged nor defined by a registered study "
            f"{plan['study']!r}"
        )

    cells: dict[str, Any] = {}
    for key, run in runs.items():
        cell = cells.setdefault(
            run["cell"], {"group": run["group"], "params": run["params"], "runs": [], "metrics": {}}
        )
        cell["runs"].append(key)
    for cell in cells.values():
        finished = [runs[k] for k in cell["runs"] if runs[k]["status"] == "finished"]
        names = sorted({m for r in finished for m in r["metrics"]})
        for m in names:
            values = tuple(r["metrics"][m] for r in finished if _finite(r["metrics"].get(m)))
            if values:  # a custom metric of another group (None everywhere here) is left out
                cell["metrics"][m] = Stats(values).to_dict()
        cell["finished"] = len(finished)
        cell["diverged"] = sum(1 for r in finished if r["metrics"].get("diverged"))
        cell["curves"] = _cell_curves([r["_records"] for r in finished])

    claims = [_evaluate_claim(c, runs) for c in plan["claims"]]
    robust = _robustness(study_dir)
    for c in claims:
        if c["id"] in robust.get("claims", {}):
            c["robust"] = robust["claims"][c["id"]]
    sequential = plan.get("sequential")
    ranking = _ranking(plan["rank"], cells, runs) if plan.get("rank") else []
    for run in runs.values():
        del run["_records"]
    statuses = ["finished", "unfinished", "failed"]
    if sequential and sequential["max_seeds"] > sequential["start_seeds"]:
        statuses.append(NOT_NEEDED)
    counts = {s: sum(1 for r in runs.values() if r["status"] == s) for s in statuses}
    return {
        "study": plan["study"],
        "title": plan["title"],
        "question": plan["question"],
        "created": plan["created"],
        "options": plan["options"],
        "environment": plan.get("environment", {}),
        "run_counts": counts,
        "claims": claims,
        "sequential": sequential,
        "rank": plan.get("rank"),
        "ranking": ranking,
        "source": {k: v for k, v in (plan.get("source") or {}).items() if k != "text"},
        "robust": {k: v for k, v in robust.items() if k != "claims"},
        "cells": cells,
        "runs": runs,
        "plots": [],
    }


def _robustness(study_dir: Path) -> dict[str, Any]:
    """``robust.json`` of a ``--robust`` study (:mod:`normlab.studies.robust`), else ``{}``."""
    path = study_dir / ROBUST_FILE
    if not path.is_file():
        return {}
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _schedule(study_dir: Path, plan: Mapping[str, Any]) -> dict[str, int]:
    """Seeds per cell sequential seeding scheduled (``seeds.json``); without it the plan's start
    seeds (an older plan without a stopping rule: every run)."""
    path = study_dir / SCHEDULE_FILE
    if path.is_file():
        return {k: int(v) for k, v in json.loads(path.read_text()).get("cells", {}).items()}
    sequential = plan.get("sequential")
    if not sequential:
        return {}
    return {r["cell"]: int(sequential["start_seeds"]) for r in plan["runs"]}


def _ranking(
    rank: Mapping[str, Any], cells: Mapping[str, Any], runs: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The cells of ``rank["group"]`` from best to worst by the mean of ``rank["metric"]``, each
    with Welch's 95% interval of its difference to the best cell, ``mean_cell - mean_best``."""
    metric, lower = rank["metric"], bool(rank["lower_is_better"])
    rows = []
    for name, cell in cells.items():
        if cell["group"] != rank.get("group", cell["group"]):
            continue
        values = [
            runs[k]["metrics"][metric]
            for k in sorted(cell["runs"], key=lambda k: int(runs[k]["seed"]))
            if _measured(runs[k], metric)
        ]
        rows.append(
            {
                "cell": name,
                "params": cell["params"],
                "values": values,
                "runs": sum(1 for k in cell["runs"] if runs[k]["status"] != NOT_NEEDED),
                "diverged": cell.get("diverged", 0),
            }
        )
    measured = [r for r in rows if r["values"]]
    measured.sort(key=lambda r: Stats(tuple(r["values"])).mean * (1 if lower else -1))
    best = measured[0]["values"] if measured else []
    out = []
    for i, r in enumerate(measured + [r for r in rows if not r["values"]]):
        s = Stats(tuple(r["values"]))
        ci = welch_interval(r["values"], best) if r["values"] and i > 0 else None
        out.append(
            {
                "rank": i + 1 if r["values"] else None,
                "cell": r["cell"],
                "params": r["params"],
                "metric": metric,
                "mean": s.mean if r["values"] else None,
                "sd": s.sd if r["values"] else None,
                "n": s.n,
                "runs": r["runs"],
                "diverged": r["diverged"],
                "diff_to_best": None if ci is None else ci[0],
                "ci95": None if ci is None else [ci[1], ci[2]],
            }
        )
    return out


def _ranking_rows(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    rank = results["rank"]
    ranking = results["ranking"]
    params = list(ranking[0]["params"]) if ranking else []
    direction = "lower" if rank["lower_is_better"] else "higher"
    header = ["#", *params, f"{rank['metric']} ({direction} is better)", "seeds", "diff to best [95% CI]"]
    rows = []
    for r in ranking:
        value = "n/a" if r["mean"] is None else f"{r['mean']:.4g} ± {r['sd']:.2g}"
        if r["rank"] == 1:
            diff = "best"
        elif r["ci95"] is None:
            diff = "n/a (needs 2 seeds a side)" if r["mean"] is not None else "no finished run"
        else:
            diff = f"{r['diff_to_best']:+.3g} [{r['ci95'][0]:+.3g}, {r['ci95'][1]:+.3g}]"
        seeds = f"{r['n']}/{r['runs']}" + (f" ({r['diverged']} diverged)" if r["diverged"] else "")
        rows.append([str(r["rank"] or "-"), *(str(r["params"][p]) for p in params), value, seeds, diff])
    return header, rows


def ranking_markdown(results: Mapping[str, Any]) -> str:
    """The ranked cells (Markdown)."""
    header, rows = _ranking_rows(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ranking_text(results: Mapping[str, Any]) -> str:
    """The ranked cells for a terminal, aligned columns."""
    header, rows = _ranking_rows(results)
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*row) for row in [header, *rows])


def _cell_curves(records_per_seed: list[list[dict[str, Any]]]) -> dict[str, Any]:
    if not records_per_seed:
        return {}
    curves: dict[str, Any] = {
        "loss": _curve(
            [
                [
                    (int(r["step"]), float(r["loss"]))
                    for r in recs
                    if r.get("kind") == "train" and _finite(r.get("loss"))
                ]
                for recs in records_per_seed
            ]
        )
    }
    eval_keys = sorted(
        {k for r in records_per_seed[0] if r.get("kind") == "eval" for k in r if k not in ("kind", "step")}
    )
    for k in eval_keys:
        curves[k] = _curve(
            [
                [(int(r["step"]), float(r[k])) for r in recs if r.get("kind") == "eval" and _finite(r.get(k))]
                for recs in records_per_seed
            ]
        )
    return curves


def _side_runs(side: Mapping[str, Any], runs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The runs the side selects, in seed order."""
    chosen = [
        r
        for r in runs.values()
        if r["group"] == side["group"] and all(r["params"].get(k) == v for k, v in side["where"].items())
    ]
    return sorted(chosen, key=lambda r: int(r["seed"]))


def _measured(run: Mapping[str, Any], metric: str) -> bool:
    return run["status"] == "finished" and _finite(run["metrics"].get(metric))


def _seed_values(side: Mapping[str, Any], metric: str, runs: Mapping[str, Any]) -> dict[int, float]:
    """Seed -> the side's value of ``metric`` over its finished runs that measured it; for a
    contrast (``minus``), its cell's value minus ``minus``'s, over the seeds measured in both."""

    def plain(cell: Mapping[str, Any]) -> dict[int, float]:
        return {
            int(r["seed"]): float(r["metrics"][metric])
            for r in _side_runs(cell, runs)
            if _measured(r, metric)
        }

    own = plain(side)
    if side.get("minus") is None:
        return own
    minus = plain(side["minus"])
    return {seed: own[seed] - minus[seed] for seed in sorted(own.keys() & minus.keys())}


def _side_stats(
    side: Mapping[str, Any],
    by_seed: Mapping[int, float],
    runs: Mapping[str, Any],
    seeds: set[int] | None = None,
) -> tuple[Stats, dict[str, Any]]:
    """The side's values (``by_seed``, from :func:`_seed_values`) in seed order (only those of
    ``seeds``, if given), and its run counts."""
    cells = [side] + ([side["minus"]] if side.get("minus") is not None else [])
    chosen = [r for cell in cells for r in _side_runs(cell, runs) if r["status"] != NOT_NEEDED]
    finished = [r for r in chosen if r["status"] == "finished"]
    values = tuple(v for seed, v in sorted(by_seed.items()) if seeds is None or seed in seeds)
    info = {
        "label": side["label"],
        "runs": len(chosen),
        "finished": len(finished),
        "diverged": sum(1 for r in finished if r["metrics"].get("diverged")),
        **Stats(values).to_dict(),
    }
    return Stats(values), info


def _evaluate_claim(claim: Mapping[str, Any], runs: Mapping[str, Any]) -> dict[str, Any]:
    metric = claim["metric"]
    rule = rule_from_dict(claim["rule"])
    values_a = _seed_values(claim["a"], metric, runs)
    values_b = _seed_values(claim["b"], metric, runs) if claim["b"] is not None else None
    seeds = None
    if getattr(rule, "paired", False) and values_b is not None:  # the seeds measured on both sides
        seeds = values_a.keys() & values_b.keys()
    a, a_info = _side_stats(claim["a"], values_a, runs, seeds)
    b, b_info = _side_stats(claim["b"], values_b, runs, seeds) if values_b is not None else (None, None)
    outcome = rule.evaluate(a, b)

    def side_text(s: Stats, info: Mapping[str, Any]) -> str:
        div = f", {info['diverged']} of {info['finished']} diverged" if info["diverged"] else ""
        missing = f", {info['runs'] - info['finished']} unfinished" if info["runs"] > info["finished"] else ""
        return f"{info['label']} {_fmt(s.mean)} ± {_fmt(s.sd, 2)} (n={s.n}{div}{missing})"

    measured = f"{metric}: {side_text(a, a_info)}"
    ratio = None
    if b is not None and b_info is not None:
        measured += f" vs {side_text(b, b_info)}"
        if b.n and a.n and b.mean != 0:
            ratio = a.mean / b.mean
            measured += f"; ratio {ratio:.3f}"
    rule_text = claim["rule_text"]
    if "level" not in claim["rule"]:  # a plan written with the k x sd rules
        label_b = claim["b"]["label"] if claim["b"] is not None else None
        rule_text = (
            f"{rule.describe(metric, claim['a']['label'], label_b)} (this plan's rule, "
            f"{claim['rule_text']!r}, used the deprecated k x sd margin; evaluated with the interval rule)"
        )
    return {
        "id": claim["id"],
        "text": claim["text"],
        "paper": claim["paper"],
        "metric": metric,
        "rule": rule_text,
        "n": [a.n] + ([b.n] if b is not None else []),
        "interval": _interval_of(outcome.numbers),
        "a": a_info,
        "b": b_info,
        "ratio": ratio,
        "verdict": outcome.verdict,
        "why": outcome.why,
        "numbers": outcome.numbers,
        "measured": measured,
    }


def _interval_of(numbers: Mapping[str, float]) -> dict[str, float] | None:
    if "low" not in numbers:
        return None
    return {"low": numbers["low"], "high": numbers["high"], "level": numbers["level"]}


# --------------------------------------------------------------------------------------------
# Rendering


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def claims_markdown(results: Mapping[str, Any]) -> str:
    """The claims table (Markdown); the paper column only when a claim names a paper."""
    papers = any(c["paper"] for c in results["claims"])
    robust = any("robust" in c for c in results["claims"])
    corpus2 = (results.get("robust") or {}).get("corpus2", "")
    header = ["claim", *(["paper"] if papers else []), "measured", "verdict"]
    header += [f"on {corpus2}", "robust"] if robust else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in results["claims"]:
        row = [_md(c["text"]), *([_md(c["paper"])] if papers else []), _md(c["measured"])]
        row.append(f"**{VERDICT_MARK[c['verdict']]}**")
        if robust:
            r = c.get("robust")
            row += [VERDICT_MARK[r["verdict2"]], f"**{r['mark']}**"] if r else ["n/a", "n/a"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _n_text(claim: Mapping[str, Any]) -> str:
    """``n = 3 vs 4`` seeds per side of a claim (from older results: the sides' own counts)."""
    n = claim.get("n") or [s["n"] for s in (claim["a"], claim["b"]) if s is not None]
    return "n = " + " vs ".join(str(x) for x in n)


def claims_text(results: Mapping[str, Any]) -> str:
    """The claims table for a terminal: one block per claim."""
    out = []
    for c in results["claims"]:
        out.append(f"[{VERDICT_MARK[c['verdict']]}] {c['text']}")
        if c["paper"]:
            out.append(f"    paper:    {c['paper']}")
        out.append(f"    measured: {c['measured']}")
        out.append(f"    verdict:  {_n_text(c)}; {c['why']}")
        out.append(f"    rule:     {c['rule']}")
        if "robust" in c:
            r, corpus2 = c["robust"], (results.get("robust") or {}).get("corpus2", "?")
            out.append(f"    robust:   {r['mark']} (on {corpus2}: {r['verdict2']}; {r['measured2']})")
    return "\n".join(out)


def _group_tables(results: Mapping[str, Any]) -> list[str]:
    out = []
    groups: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    for name, cell in results["cells"].items():
        groups[cell["group"]].append((name, cell))
    for group, cells in groups.items():
        params = list(cells[0][1]["params"])
        metrics = sorted({m for _, c in cells for m in c["metrics"]} - {"diverged"})
        header = [*params, "seeds", "diverged", *metrics]
        out += [f"### {group}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for _, cell in cells:
            row = [str(cell["params"][p]) for p in params]
            row += [str(cell["finished"]), str(cell["diverged"])]
            for m in metrics:
                s = cell["metrics"].get(m)
                row.append("n/a" if not s or s["mean"] is None else f"{s['mean']:.4g} ± {s['sd']:.2g}")
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return out


def _config_section(study_dir: Path, results: Mapping[str, Any]) -> list[str]:
    plan = load_plan(study_dir)
    out = []
    seen: set[str] = set()
    for r in plan["runs"]:
        if r["group"] in seen:
            continue
        seen.add(r["group"])
        varying = ", ".join(sorted(r["params"])) or "nothing"
        out += [
            f"Group `{r['group']}` (grid over: {varying}; seed {r['seed']} shown):",
            "",
            "```json",
            json.dumps(r["config"], indent=1, sort_keys=True),
            "```",
            "",
        ]
    return out


def render_markdown(study_dir: Path, results: Mapping[str, Any]) -> str:
    env = results["environment"]
    counts = results["run_counts"]
    lines = [
        f"# {results['title']}",
        "",
        f"Study `{results['study']}`, planned {results['created']}. {results['question']}",
        "",
    ]
    if results.get("ranking"):
        lines += [
            "## Ranking",
            "",
            ranking_markdown(results),
            "",
            "Mean ± sample sd over seeds; the interval is Welch's 95% confidence interval of the "
            "difference of means to the best cell (an interval that holds 0 does not separate the two).",
            "",
        ]
    if results.get("source"):
        src = results["source"]
        sets = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in src.get("sets", [])) or "none"
        lines += [f"Study file: `{src['file']}` (its text is in `plan.json`); --set: {sets}.", ""]
        for d in src.get("dropped_claims", []):
            lines += [f"- claim **{d['id']}** not evaluated: {d['why']}.", ""]
    lines += [
        "## Claims",
        "",
        claims_markdown(results) if results["claims"] else "No claims: the cells are ranked above.",
        "",
        "Verdict rules, fixed in `plan.json` before the first run:" if results["claims"] else "",
        "",
    ]
    for c in results["claims"]:
        lines.append(f"- **{c['id']}**: {c['rule']}. Here: {_n_text(c)}; {c['why']}.")
    if results.get("robust"):
        rob = results["robust"]
        marks = [c["robust"]["mark"] for c in results["claims"] if "robust" in c]
        tally = ", ".join(f"{marks.count(m)} {m}" for m in (ROBUST, NOT_ROBUST, SAME_DATA))
        lines += ["", f"Robustness (`--robust`): the same plan on corpus `{rob['corpus2']}` (in "
                  f"`{rob['dir']}/`, its own report there): {tally}. A claim is robust when both "
                  "corpora give the same verdict; *same data*: its runs read no text, so the "
                  "corpus cannot test it."]  # fmt: skip
    if results.get("sequential") and results["claims"]:
        seq = results["sequential"]
        lines += ["", f"Seeds (stopping rule, in `plan.json`): {seq['rule']}; start_seeds = "
                  f"{seq['start_seeds']}, max_seeds = {seq['max_seeds']}."]  # fmt: skip
    lines += [
        "",
        "Spreads are sample standard deviations over seeds; a diverged run counts with its task's "
        "fallback value (the uniform predictor's loss, chance accuracy). Directions and ratios are "
        "what is compared with the papers, never their absolute numbers.",
        "",
        f"Runs: {counts['finished']} finished, {counts['unfinished']} unfinished, {counts['failed']} failed"
        + (f", {counts[NOT_NEEDED]} not needed (seeding stopped)." if NOT_NEEDED in counts else "."),
        "",
        "## Results per cell",
        "",
        *_group_tables(results),
    ]
    if results["plots"]:
        lines += ["## Plots", ""]
        for p in results["plots"]:
            lines += [f"![{p['title']}]({p['path']})", ""]
    elif results.get("plot_note"):
        lines += ["## Plots", "", results["plot_note"], ""]
    lines += ["## Configuration", "", *_config_section(study_dir, results)]
    runs = results["runs"].values()
    data = sorted({r["data"] for r in runs if r.get("data")})
    kernels = sorted({str(r["kernels"]) for r in runs if r.get("kernels")})
    threads = sorted({int(r["threads"]) for r in runs if r.get("threads")})
    wall = sum(float(r["wall_s"]) for r in runs if r.get("wall_s"))
    lines += [
        "## Environment",
        "",
        f"- data: {', '.join(data) or 'n/a'}",
        f"- training time, summed over runs: {wall:.0f} s; torch threads per run: {threads or 'n/a'}",
        "- thread count: normlab's fused kernels sum their gradients in an order set by the sizes, "
        "so a GPT on normlab's layers trains to the same bits at any `--jobs`/`--threads`; torch's "
        "conv and small-batch linear weight gradients are summed per thread, so an image run at "
        "another thread count is like another draw of its seed",
        f"- normlab fused kernels in the runs: {', '.join(kernels) or 'n/a'}",
        *(f"- {k}: {v}" for k, v in env.items()),
        f"- options: {json.dumps(results['options'])}",
        "",
    ]
    return "\n".join(lines)


def write_report(
    study_dir: str | os.PathLike[str], *, study: Study | None = None, plots: bool = True
) -> dict[str, Any]:
    """Write ``report.md``, ``results.json`` and (with ``plots``) ``plots/*.png`` into
    ``study_dir``; returns the results."""
    from normlab.studies.plots import draw_plots

    study_dir = Path(study_dir)
    results = collect(study_dir, study=study)
    plan = load_plan(study_dir)
    try:
        if plots:
            results["plots"] = draw_plots(study_dir, results, plan)
    except ImportError:
        results["plot_note"] = "Plots skipped: matplotlib is not installed (pip install 'normlab[plot]')."
    report = render_markdown(study_dir, results)
    atomic_write_bytes(study_dir / "report.md", report.encode())
    write_json(study_dir / "results.json", json_safe(results))
    results["report_path"] = str(study_dir / "report.md")
    return results
