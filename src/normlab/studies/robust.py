"""Robustness of a study's verdicts: the same plan on a second corpus.

``normlab study NAME --robust [--corpus2 PATH]`` runs the study as asked into ``--out``, then
the same study with only the corpus changed into ``--out/robust/`` (the King James Bible by
default, or Shakespeare when the first corpus is the Bible), and marks every claim:

- ``robust``: both corpora give the same verdict;
- ``not robust``: they disagree (a verdict that flips with the corpus is not a finding);
- ``same data``: every run of the claim reads no text (an image run), so its config is the
  same on both corpora; its finished runs are copied, not retrained, and the corpus cannot
  test it.

The comparison is written to ``robust.json`` in the first study's directory, and the report
(``normlab report`` included) gives it a column.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from normlab.studies.framework import RunSpec, Study, StudyOptions
from normlab.studies.report import NOT_ROBUST, ROBUST, ROBUST_FILE, SAME_DATA, write_report
from normlab.studies.runner import run_study
from normlab.train.config import config_hash
from normlab.train.rundir import write_json

ROBUST_DIR = "robust"


def second_corpus(first: str, corpus2: str | None) -> str:
    """The corpus of the robustness rerun: ``corpus2``, else the Bible (Shakespeare after the Bible).

    Raises:
        ValueError: ``corpus2`` is the first corpus.
    """
    second = corpus2 if corpus2 is not None else ("shakespeare" if first == "bible" else "bible")
    if os.path.abspath(os.path.expanduser(second)) == os.path.abspath(os.path.expanduser(first)):
        raise ValueError(f"--corpus2 {second!r} is the corpus of the first run; name another one")
    return second


def shared_keys(specs: list[RunSpec], specs2: list[RunSpec]) -> set[str]:
    """Keys of the runs whose config is the same in both grids (it does not read the corpus)."""
    first = {s.key: config_hash(s.config) for s in specs}
    return {s.key for s in specs2 if first.get(s.key) == config_hash(s.config)}


def compare(
    results: Mapping[str, Any], results2: Mapping[str, Any], *, same_data: set[str], corpora: tuple[str, str]
) -> dict[str, Any]:
    """``robust.json``: each claim's verdict on both corpora and its mark (``same_data``: the ids
    of the claims whose runs read no text)."""
    second = {c["id"]: c for c in results2["claims"]}
    claims = {}
    for c in results["claims"]:
        other = second.get(c["id"])
        if other is None:
            continue
        if c["id"] in same_data:
            mark = SAME_DATA
        else:
            mark = ROBUST if other["verdict"] == c["verdict"] else NOT_ROBUST
        claims[c["id"]] = {
            "mark": mark,
            "verdict": c["verdict"],
            "verdict2": other["verdict"],
            "measured2": other["measured"],
            "why2": other["why"],
            "n2": other.get("n"),
        }
    return {"corpus": corpora[0], "corpus2": corpora[1], "dir": ROBUST_DIR, "claims": claims}


def same_data_claims(study: Study, specs: list[RunSpec], shared: set[str]) -> set[str]:
    """Ids of the claims all of whose runs (in ``specs``) are ``shared`` by both corpora."""
    out = set()
    for claim in study.claims:
        sides = [side for side in (claim.a, claim.b) if side is not None]
        keys = {s.key for s in specs if any(side.selects(s.group, s.params) for side in sides)}
        if keys and keys <= shared:
            out.add(claim.id)
    return out


def run_robust(
    study: Study,
    out: str | os.PathLike[str],
    *,
    options: StudyOptions,
    corpus2: str | None = None,
    resume: bool = False,
    echo: Any = print,
    **run_kwargs: Any,
) -> dict[str, Any]:
    """:func:`~normlab.studies.runner.run_study` on ``options.corpus``, then on a second corpus
    (``--out/robust``), then the report of the first with each claim marked (see the module)."""
    out = Path(out)
    corpus = second_corpus(options.corpus, corpus2)
    options2 = dataclasses.replace(options, corpus=corpus)  # validates a corpus file first
    resolved = study.resolve(options)
    every = dataclasses.replace(resolved, seeds=resolved.max_seeds or resolved.seeds)  # up to the cap
    specs, specs2 = study.specs(every), study.specs(dataclasses.replace(every, corpus=corpus))
    if not any(getattr(s.config.task, "level", None) for s in specs):
        raise ValueError(f"--robust: study {study.name!r} trains no language model: no run reads a corpus")
    shared = shared_keys(specs, specs2)
    results = run_study(study, out, options=options, resume=resume, echo=echo, **run_kwargs)
    echo(f"\nrobustness: the same study on corpus {corpus!r} in {out / ROBUST_DIR}")
    if shared:
        echo(f"{len(shared)} run(s) read no text: their finished runs are copied, not retrained")
    results2 = run_study(
        study, out / ROBUST_DIR, options=options2, resume=resume, echo=echo, reuse=out, **run_kwargs
    )
    same = same_data_claims(study, specs, shared)
    robust = compare(results, results2, same_data=same, corpora=(options.corpus, corpus))
    write_json(out / ROBUST_FILE, robust)
    failed = {**results.get("failed_runs", {}), **results2.get("failed_runs", {})}
    results = write_report(out, study=study, plots=run_kwargs.get("plots", True))
    if failed:
        results["failed_runs"] = failed
    return results
