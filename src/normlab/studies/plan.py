"""A study's plan file and run directories, read by the runner and the report alike.

``plan.json`` holds the grid (each run's config and its hash), the claims with their verdict
rules, the stopping rule of sequential seeding (``sequential``: start seeds, cap, each claim's
confidence and smallest effect) and the environment; it is written before the first run
starts, so neither the rules nor when to stop adding seeds can follow the results.
``seeds.json`` records how many seeds each cell has reached. ``runs/<cell>-s<seed>/`` is one run
directory each (see :mod:`normlab.train.rundir`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from normlab.data.user import source_fingerprint
from normlab.studies.environment import environment
from normlab.studies.framework import RunSpec, Study, StudyOptions
from normlab.train.config import RunConfig, config_hash

__all__ = [
    "ERROR_FILE",
    "PLAN_FILE",
    "PLAN_FORMAT",
    "SCHEDULE_FILE",
    "check_same_plan",
    "load_plan",
    "make_plan",
    "plan_configs",
    "run_dir",
    "stopping_rule",
]

PLAN_FILE = "plan.json"
PLAN_FORMAT = "normlab-study/1"
ERROR_FILE = "error.txt"
SCHEDULE_FILE = "seeds.json"  # the seeds per cell sequential seeding reached (the runner's state)


def run_dir(study_dir: Path, key: str) -> Path:
    return study_dir / "runs" / key


def stopping_rule(study: Study, options: StudyOptions) -> dict[str, Any]:
    """Sequential seeding as the plan states it: the seeds every cell starts with, the cap, and
    each claim's confidence level and smallest effect (``min_effect``, or ``tol`` of a similarity
    claim) that decide whether it is conclusive."""
    start = options.seeds if options.seeds is not None else study.default_seeds
    cap = options.max_seeds if options.max_seeds is not None else start
    claims = []
    for c in study.claims:
        rule = c.rule.to_dict()
        effect = {k: rule[k] for k in ("min_effect", "tol", "value", "rate") if rule.get(k) is not None}
        claims.append({"id": c.id, "level": rule.get("level"), **effect})
    return {
        "start_seeds": start,
        "max_seeds": cap,
        "rule": (
            "every cell starts with start_seeds seeds; after each round, every cell of a claim still "
            "inconclusive gets one more seed, up to max_seeds; the study stops when every claim is "
            "reproduced or not reproduced, or when no cell of an inconclusive claim can grow"
            if cap > start
            else "a fixed number of seeds per cell (max_seeds = start_seeds)"
        ),
        "claims": claims,
    }


def make_plan(study: Study, options: StudyOptions, specs: list[RunSpec]) -> dict[str, Any]:
    """The study's plan: the grid (every run up to ``max_seeds``), the claims with their rules
    and the stopping rule of sequential seeding, as JSON."""
    return {
        "format": PLAN_FORMAT,
        "study": study.name,
        "title": study.title,
        "question": study.question,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "options": asdict(options),
        "environment": environment(),
        "claims": [c.to_dict() for c in study.claims],
        "sequential": stopping_rule(study, options),
        **({"rank": dict(study.rank)} if study.rank else {}),
        **({"source": dict(study.source)} if study.source else {}),
        **({"data": data} if (data := _user_data(specs)) else {}),
        "plots": [p.to_dict() for p in study.plots],
        "runs": [
            {
                "key": s.key,
                "group": s.group,
                "cell": s.cell,
                "seed": s.seed,
                "params": dict(s.params),
                "config": s.config.to_dict(),
                "config_hash": config_hash(s.config),
            }
            for s in specs
        ],
    }


def _user_data(specs: list[RunSpec]) -> list[dict[str, Any]]:
    """Each user data source of the grid with its files' count, size and latest modification."""
    out: list[dict[str, Any]] = []
    for spec in specs:
        source = dict(spec.config.task.data)
        if source and all(d["source"] != source for d in out):
            out.append({"source": source, **source_fingerprint(source)})
    return out


def check_same_plan(old: dict[str, Any], new: dict[str, Any], path: Path) -> None:
    new = json.loads(json.dumps(new))  # tuples become lists, as in the stored plan
    if old.get("data", []) != new.get("data", []):
        changed = [d["source"]["path"] for d in new.get("data", []) if d not in old.get("data", [])]
        raise ValueError(
            f"{path} was planned on other data: {', '.join(changed) or 'a data source'} changed since "
            "(files, sizes or modification times). Resume on the same data, or choose a new --out"
        )
    old_runs = {r["key"]: r["config_hash"] for r in old.get("runs", [])}
    new_runs = {r["key"]: r["config_hash"] for r in new["runs"]}
    changed = sorted(k for k in old_runs.keys() & new_runs.keys() if old_runs[k] != new_runs[k])
    added, removed = sorted(new_runs.keys() - old_runs.keys()), sorted(old_runs.keys() - new_runs.keys())
    rules_changed = [c["id"] for c in old.get("claims", [])] != [c["id"] for c in new["claims"]] or any(
        (o["rule"], o["metric"], o["a"], o["b"]) != (n["rule"], n["metric"], n["a"], n["b"])
        for o, n in zip(old.get("claims", []), new["claims"], strict=False)
    )
    stopping_changed = old.get("sequential") != new.get("sequential")
    if old.get("study") != new["study"] or changed or added or removed or rules_changed or stopping_changed:
        what = []
        if old.get("study") != new["study"]:
            what.append(f"study {old.get('study')!r} != {new['study']!r}")
        if changed:
            what.append(f"{len(changed)} runs changed configuration (e.g. {changed[0]})")
        if added or removed:
            what.append(f"{len(added)} runs added, {len(removed)} removed (other --seeds/--scale/options?)")
        if rules_changed:
            what.append("the claims or their verdict rules changed")
        if stopping_changed:
            what.append("the stopping rule of sequential seeding changed (other --seeds/--max-seeds?)")
        raise ValueError(
            f"{path} was planned differently: {'; '.join(what)}. "
            "Resume with the same options, or choose a new --out"
        )


def load_plan(study_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(study_dir) / PLAN_FILE
    if not path.is_file():
        raise ValueError(f"{Path(study_dir)} is not a study directory (no {PLAN_FILE})")
    plan: dict[str, Any] = json.loads(path.read_text())
    if plan.get("format") != PLAN_FORMAT:
        raise ValueError(f"{path}: unknown plan format {plan.get('format')!r}")
    return plan


def plan_configs(plan: dict[str, Any]) -> dict[str, RunConfig]:
    return {r["key"]: RunConfig.from_dict(r["config"]) for r in plan["runs"]}
