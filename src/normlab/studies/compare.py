"""``normlab compare``: a study without a file, then the diagnostics of every trained model.

:func:`compare_document` turns the command line (a data path, a model spec, the norms and
placements) into the same study document a TOML file holds, so the run, the resume, the report
and the ranking are those of :mod:`normlab.studies.userfile`. :func:`diagnose_finals` then runs
:func:`normlab.diagnostics.diagnose` on the final weights of each cell (its first finished seed)
on that run's own validation batch, and writes each diagnosis next to the study.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from normlab.data.images import image_set_names
from normlab.data.text import CORPORA
from normlab.data.user import IMAGE_SUFFIXES
from normlab.models.spec import parse_overrides
from normlab.studies.plan import load_plan, run_dir
from normlab.train.config import LMTask, RunConfig
from normlab.train.rundir import FINAL_FILE, RESULT_FILE
from normlab.train.tasks import ImageRuntime, LMRuntime, make_task

__all__ = ["compare_document", "data_table", "diagnose_finals", "model_table"]

DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def data_table(data: str) -> dict[str, Any]:
    """The ``[data]`` table of ``--data``: a built-in name, or what the path holds."""
    if data in CORPORA:
        return {"corpus": data}
    if data in image_set_names():
        return {"images": data}
    path = Path(data).expanduser()
    if not path.exists():
        known = [*CORPORA.names(), *image_set_names()]
        raise ValueError(f"--data {data!r}: no such file or folder, nor a built-in data set ({known})")
    if path.is_dir():
        if (path / "train.bin").is_file():
            return {"tokens": str(path)}
        if any((path / m).is_file() for m in DATASET_MARKERS):
            return {"hf_dataset": str(path)}
        subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if subdirs and any(f.suffix.lower() in IMAGE_SUFFIXES for d in subdirs for f in d.rglob("*")):
            return {"images": str(path)}
    return {"text": str(path)}


def model_table(spec: str) -> dict[str, Any]:
    """The ``[model]`` table of ``--model``.

    ``gpt[:key=value,...]``, ``convnet[:...]``, ``hf:MODEL_TYPE[:key=value,...]`` (the library's
    default config of that type), ``hf:path/config.json`` or a ``.json`` path, and
    ``factory:package.module:function[:key=value,...]``.
    """
    kind, _, rest = spec.partition(":")
    if kind in ("gpt", "convnet"):
        return {kind: parse_overrides(rest, where=f"--model {kind}")}
    if spec.endswith(".json") and kind != "hf":
        return {"hf_config": spec}
    if kind == "hf":
        if rest.endswith(".json"):
            return {"hf_config": rest}
        model_type, _, fields = rest.partition(":")
        if not model_type:
            raise ValueError("--model hf: expected hf:MODEL_TYPE[:key=value,...] or hf:path/config.json")
        return {"hf": model_type, "config": parse_overrides(fields, where="--model hf")}
    if kind == "factory":
        module, _, tail = rest.partition(":")
        function, _, kwargs = tail.partition(":")
        if not module or not function:
            raise ValueError("--model factory: expected factory:package.module:function[:key=value,...]")
        table: dict[str, Any] = {"factory": f"{module}:{function}"}
        if kwargs:
            table["kwargs"] = parse_overrides(kwargs, where="--model factory")
        return table
    raise ValueError(
        f"--model {spec!r}: expected gpt[:k=v,...], convnet[:k=v,...], hf:MODEL_TYPE[:k=v,...], "
        "hf:config.json or factory:package.module:function"
    )


def compare_document(
    *,
    data: str,
    model: str,
    norms: Sequence[str],
    placements: Sequence[str] = (),
    steps: int,
    seeds: int,
    batch_size: int,
    lr: float,
    block_size: int | None = None,
    optimizer: str = "adamw",
    level: str | None = None,
    name: str = "compare",
) -> dict[str, Any]:
    """The study document of a ``normlab compare`` command line."""
    data_t = data_table(data)
    is_image = "images" in data_t
    if level is not None and not is_image:
        data_t["level"] = level
    train: dict[str, Any] = {"steps": steps, "batch_size": batch_size, "lr": lr, "optimizer": optimizer}
    train["eval_every"] = max(1, steps // 5)
    if block_size is not None and not is_image:
        train["block_size"] = block_size
    sweep: dict[str, Any] = {"norm": list(norms)}
    if placements:
        sweep["placement"] = list(placements)
    models = ", ".join(norms) + (f" x {', '.join(placements)}" if placements else "")
    return {
        "name": name,
        "title": f"compare {models} on {data}",
        "seeds": seeds,
        "data": data_t,
        "model": model_table(model),
        "train": train,
        "sweep": sweep,
    }


def diagnose_finals(
    study_dir: str | Path, *, plots: bool = True, removal: bool = True
) -> list[dict[str, Any]]:
    """Diagnose the final model of each cell (its first finished seed) on its validation batch;
    writes ``diagnostics/<cell>/`` (``diagnostics.json``, ``summary.md``, plots) and returns one
    row per cell: the cell, the run, the loss, the residual-stream variance growth and the findings."""
    from normlab.diagnostics import diagnose
    from normlab.summary import write_summary

    study_dir = Path(study_dir)
    plan = load_plan(study_dir)
    rows: list[dict[str, Any]] = []
    done: set[str] = set()
    for r in sorted(plan["runs"], key=lambda r: (r["cell"], r["seed"])):
        path = run_dir(study_dir, r["key"])
        if r["cell"] in done or not (path / RESULT_FILE).is_file() or not (path / FINAL_FILE).is_file():
            continue
        done.add(r["cell"])
        config = RunConfig.from_dict(r["config"])
        runtime = make_task(config)
        model = runtime.build_model()
        model.load_state_dict(torch.load(path / FINAL_FILE, map_location="cpu", weights_only=True))
        model.eval()
        assert isinstance(runtime, (LMRuntime, ImageRuntime))
        inputs, targets = runtime.probe_batch()  # the batch of the run's end-of-run probes
        loss_fn = None
        if isinstance(config.task, LMTask):
            batch: Any = (inputs, targets)
            what = f"the first validation batch of the run ({tuple(inputs.shape)} tokens)"
        else:
            batch = inputs
            what = f"the first {len(inputs)} test images of the run"

            def loss_fn(out: Any, labels: Any = targets) -> Any:
                return F.cross_entropy(out, labels)

        report = diagnose(
            model, batch, loss_fn=loss_fn, removal=removal, train=False, data=what, spec=r["key"]
        )
        written = write_summary(report, study_dir / "diagnostics" / r["cell"], plots=plots)
        variance = report.residual.variance if report.residual is not None else []
        rows.append(
            {
                "cell": r["cell"],
                "params": r["params"],
                "run": r["key"],
                "loss": report.loss,
                "resid_var_first": variance[0] if variance else None,
                "resid_var_last": variance[-1] if variance else None,
                "findings": [f"{f.severity}: {f.code}" for f in report.findings],
                "summary": str(written.get("summary", written["json"])),
            }
        )
    (study_dir / "diagnostics").mkdir(exist_ok=True)
    (study_dir / "diagnostics" / "cells.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def diagnostics_text(rows: list[dict[str, Any]]) -> str:
    """One line per diagnosed cell."""
    out = []
    for row in rows:
        growth = ""
        if row["resid_var_first"] and row["resid_var_last"] is not None:
            growth = f", residual variance x{row['resid_var_last'] / row['resid_var_first']:.3g} over depth"
        found = "; ".join(row["findings"]) or "no findings"
        out.append(f"{row['cell']}: loss {row['loss']:.4g}{growth}; {found} ({row['summary']})")
    return "\n".join(out)
