"""Running a study: plan first (rules included), then every unfinished run, then the report.

Layout of a study directory::

    plan.json                  # the grid, the claims, their rules and the stopping rule: written
                               # before any run
    seeds.json                 # the seeds each cell has reached (sequential seeding)
    runs/<cell>-s<seed>/       # one run directory each (see normlab.train.rundir)
    report.md, results.json, plots/*.png

Sequential seeding: every cell starts with ``seeds`` seeds (the study's ``default_seeds`` or
``--seeds``); when the cap ``max_seeds`` (``Study.max_seeds``, ``max_seeds = N`` in a study
file, ``--max-seeds N``) is above it, the runner evaluates the claims after each round and
gives one more seed to every cell of each claim still inconclusive, until every claim is
conclusive or those cells hold ``max_seeds`` seeds. The plan lists every run up to the cap and
states this stopping rule (with each claim's level and smallest effect) before the first run;
runs never scheduled are reported as "not needed". ``--resume`` reads ``seeds.json`` and goes on
from the last round, reusing every finished run.

A run is finished when its ``result.json`` exists (written last, atomically). ``--resume``
skips finished runs and continues unfinished ones from their last checkpoint, so a study
killed at any instant (SIGKILL included) loses at most ``ckpt_every`` steps of one run per job.

With ``nproc > 1`` each run is data-parallel: it is launched as
``python -m torch.distributed.run --standalone --nproc_per_node N -m normlab.train ...`` (a
subprocess per run; ``jobs`` such launches at a time, one by default) and trains as described
in :mod:`normlab.train.distributed`.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import itertools
import json
import multiprocessing
import os
import runpy
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from normlab.studies.framework import Claim, RunSpec, Study, StudyOptions
from normlab.studies.plan import ERROR_FILE, PLAN_FILE, SCHEDULE_FILE, check_same_plan, make_plan, run_dir
from normlab.studies.report import collect, write_report
from normlab.train.config import config_hash
from normlab.train.distributed import DEFAULT_DIST_BN, DIST_BN_MODES, DistBN
from normlab.train.rundir import CONFIG_FILE, RESULT_FILE, write_json
from normlab.train.strategy import DIST_MODES, Dist
from normlab.train.tasks import prepare_data
from normlab.train.trainer import train


def _init_worker(threads: int, parent: int, preload: tuple[str, ...] = ()) -> None:
    torch.set_num_threads(threads)
    for file in preload:  # a Python study file's own registrations (models, corpora, probes)
        runpy.run_path(file, run_name="normlab_preload")
    # a worker dies with its study: after a SIGKILL of the parent it must not keep training
    # a run that ``--resume`` will pick up again
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _run_one(
    spec: RunSpec,
    directory: str,
    data_dir: str | None,
    progress: bool,
    tensorboard: bool,
    device: str = "cpu",
) -> tuple[str, dict[str, Any] | None, str | None, float]:
    """Train one run; returns ``(key, summary, error, seconds)`` (exceptions become ``error``)."""
    t0 = time.perf_counter()
    path = Path(directory)
    try:
        summary = train(
            spec.config,
            path,
            data_dir=data_dir,
            resume=True,
            progress=progress,
            tensorboard=tensorboard,
            device=device,
        )
    except Exception as err:  # one failing run must not stop the others; it is retried on resume
        path.mkdir(parents=True, exist_ok=True)
        (path / ERROR_FILE).write_text(traceback.format_exc())
        return spec.key, None, f"{type(err).__name__}: {err}", time.perf_counter() - t0
    (path / ERROR_FILE).unlink(missing_ok=True)
    return spec.key, summary, None, time.perf_counter() - t0


def torchrun_command(
    config_file: Path,
    directory: Path,
    *,
    nproc: int,
    data_dir: str | None = None,
    device: str = "cpu",
    dist_bn: DistBN = DEFAULT_DIST_BN,
    preload: tuple[str, ...] = (),
    dist: Dist = "ddp",
) -> list[str]:
    """The command that trains one run on ``nproc`` processes of this machine (torchrun)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += ["-m", "normlab.train", "--config", str(config_file), "--run-dir", str(directory), "--resume"]
    cmd += ["--device", device, "--dist-bn", dist_bn, "--dist", dist]
    for file in preload:
        cmd += ["--preload", file]
    return cmd + (["--data-dir", data_dir] if data_dir is not None else [])


def _run_one_distributed(
    spec: RunSpec,
    directory: str,
    data_dir: str | None,
    device: str,
    nproc: int,
    threads: int,
    dist_bn: DistBN,
    preload: tuple[str, ...] = (),
    dist: Dist = "ddp",
) -> tuple[str, dict[str, Any] | None, str | None, float]:
    """Train one run with torchrun in a subprocess; returns what :func:`_run_one` returns."""
    t0 = time.perf_counter()
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config_file = path / CONFIG_FILE
    if not config_file.exists():  # what train writes first; the launched ranks read it
        write_json(config_file, {"config_hash": config_hash(spec.config), "config": spec.config.to_dict()})
    cmd = torchrun_command(
        config_file, path, nproc=nproc, data_dir=data_dir, device=device, dist_bn=dist_bn, preload=preload,
        dist=dist,
    )  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # torch threads of each rank
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    result = path / RESULT_FILE
    if proc.returncode != 0 or not result.exists():
        log = f"$ {' '.join(cmd)}\nexit code {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        (path / ERROR_FILE).write_text(log)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("normlab.train rank")]
        last = lines[-1] if lines else (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return (
            spec.key,
            None,
            f"torchrun exited with code {proc.returncode}: {last}",
            time.perf_counter() - t0,
        )
    (path / ERROR_FILE).unlink(missing_ok=True)
    summary: dict[str, Any] = json.loads(result.read_text())
    return spec.key, summary, None, time.perf_counter() - t0


def _brief(summary: dict[str, Any]) -> str:
    parts = [f"{k}={v:.4g}" for k, v in summary.get("final", {}).items() if isinstance(v, (int, float))]
    if summary.get("diverged"):
        parts.append(f"DIVERGED at step {summary.get('diverged_at')}")
    return ", ".join(parts)


def run_study(
    study: Study,
    out: str | os.PathLike[str],
    *,
    options: StudyOptions | None = None,
    resume: bool = False,
    jobs: int = 1,
    threads: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    tensorboard: bool = False,
    plots: bool = True,
    device: str = "cpu",
    nproc: int = 1,
    dist_bn: DistBN = DEFAULT_DIST_BN,
    preload: tuple[str, ...] = (),
    echo: Callable[[str], None] = print,
    dist: Dist = "ddp",
    reuse: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Run ``study`` into ``out`` and write its report; returns the results (``results.json``).

    Args:
        resume: continue a study directory that already has a plan (same options), skipping
            finished runs; without it an existing plan is an error.
        jobs: runs trained in parallel processes.
        threads: torch threads per run (default: all cores for one job, ``cores // jobs``
            for several).
        plots: draw the report's PNG figures (needs matplotlib).
        device: where runs train (``"cpu"``, ``"cuda"``; resume is bit-exact on CPU only).
        nproc: processes per run: above 1, each run is launched with torchrun and trains
            data-parallel (gloo on CPU, nccl with CUDA, one GPU per process), ``jobs`` runs
            at a time; ``threads`` is then per process (default ``cores // (jobs * nproc)``).
        dist_bn: BatchNorm statistics across the processes of a run (``"sync"``: over the
            global batch; ``"average"`` / ``"broadcast"``: see :mod:`normlab.train.distributed`).
        dist: how a run of ``nproc > 1`` processes is spread: ``"ddp"`` (DistributedDataParallel)
            or ``"fsdp"`` (FSDP2, :mod:`normlab.train.fsdp`).
        preload: Python files each worker process runs first (a ``.py`` study file, so that
            what it registers exists in the processes that train).
        reuse: another study directory: a finished run there of the same key and config (its
            ``config.json`` hash) is copied instead of trained (``--robust``: runs that read no
            text are the same on both corpora).
    """
    options = study.resolve(options or StudyOptions())
    _check_settings(
        jobs=jobs, threads=threads, nproc=nproc, dist_bn=dist_bn, device=device, tensorboard=tensorboard,
        dist=dist,
    )  # fmt: skip
    study_dir = Path(out)
    assert options.seeds is not None  # resolved
    start, cap = options.seeds, options.max_seeds or options.seeds
    specs = study.specs(replace(options, seeds=cap))  # every run sequential seeding may add
    plan = make_plan(study, options, specs)
    plan_path = study_dir / PLAN_FILE
    _claim(study_dir, plan, resume=resume)
    data_dir_s = None if data_dir is None else str(data_dir)
    _prepare_data(specs, data_dir_s, echo)
    if not plan_path.exists():
        study_dir.mkdir(parents=True, exist_ok=True)
        write_json(plan_path, plan)  # the rules and the stopping rule are on disk before the first run

    schedule = load_schedule(study_dir, specs, start=start)
    claim_cells = {c.id: _cells_of(c, specs) for c in study.claims}
    failures: dict[str, str] = {}
    t0 = time.perf_counter()
    trained = 0

    def train_round(todo: list[RunSpec]) -> None:
        done = 0

        def report(key: str, summary: dict[str, Any] | None, error: str | None, seconds: float) -> None:
            nonlocal done
            done += 1
            if error is not None:
                failures[key] = error
                echo(f"[{done}/{len(todo)}] {key}: FAILED ({error})")
            else:
                echo(f"[{done}/{len(todo)}] {key}: {_brief(summary or {})} ({seconds:.1f} s)")

        jobs_of = [(spec, str(run_dir(study_dir, spec.key))) for spec in todo]
        if nproc > 1:
            per_process = threads or max(1, (os.cpu_count() or 1) // (jobs * nproc))
            _run_with_torchrun(jobs_of, report, jobs=jobs, data_dir=data_dir_s, device=device, nproc=nproc,
                               threads=per_process, dist_bn=dist_bn, preload=preload, dist=dist)  # fmt: skip
        elif jobs == 1 or len(todo) <= 1:
            _run_here(jobs_of, report, threads=threads, data_dir=data_dir_s, progress=progress,
                      tensorboard=tensorboard, device=device)  # fmt: skip
        else:
            per_job = threads or max(1, (os.cpu_count() or 1) // jobs)
            _run_in_workers(jobs_of, report, jobs=jobs, threads=per_job, data_dir=data_dir_s,
                            tensorboard=tensorboard, device=device, preload=preload)  # fmt: skip

    for round_ in itertools.count(1):
        scheduled = [s for s in specs if s.seed < schedule[s.cell]]
        if reuse is not None:
            reuse_finished(Path(reuse), study_dir, scheduled)
        todo = [s for s in scheduled if s.key not in failures and not _finished(study_dir, s)]
        if round_ == 1:
            echo(
                f"study {study.name!r}: {len(scheduled)} runs in {len({s.cell for s in specs})} cells, "
                f"{len(scheduled) - len(todo)} already finished; {len(todo)} to run with {jobs} job(s)"
                + (f" of {nproc} processes each (torchrun)" if nproc > 1 else "")
                + (f"; then up to {cap} seeds a cell while a claim is inconclusive" if cap > start else "")
            )
        # the round's schedule is on disk before its runs start: a resumed study goes on with
        # this round, so an interruption cannot change which seeds the claims are decided on
        write_json(study_dir / SCHEDULE_FILE, {"cells": schedule, "rounds": round_})
        train_round(todo)
        trained += len(todo)
        if cap <= start or not study.claims:
            break
        open_claims = [
            c["id"] for c in collect(study_dir, study=study)["claims"] if c["verdict"] == "inconclusive"
        ]
        grow = sorted({cell for cid in open_claims for cell in claim_cells[cid] if schedule[cell] < cap})
        if not grow:
            if open_claims:
                echo(f"still inconclusive at max_seeds={cap}: {', '.join(open_claims)}")
            break
        for cell in grow:
            schedule[cell] += 1
        echo(
            f"round {round_ + 1}: {len(open_claims)} claim(s) inconclusive ({', '.join(open_claims)}); "
            f"one more seed for {len(grow)} cell(s)"
        )
    echo(f"trained {trained} runs in {time.perf_counter() - t0:.1f} s")
    results = write_report(study_dir, study=study, plots=plots)
    if failures:
        results["failed_runs"] = failures
    return results


def reuse_finished(source: Path, target: Path, specs: list[RunSpec]) -> list[str]:
    """Copy into ``target`` every finished run of ``source`` whose config is that of the spec
    of its key (the hash in ``config.json``); returns the keys copied."""
    copied = []
    for spec in specs:
        src, dst = run_dir(source, spec.key), run_dir(target, spec.key)
        if dst.exists() or not (src / RESULT_FILE).is_file() or not (src / CONFIG_FILE).is_file():
            continue
        if json.loads((src / CONFIG_FILE).read_text()).get("config_hash") != config_hash(spec.config):
            continue
        shutil.copytree(src, dst)
        copied.append(spec.key)
    return copied


def _finished(study_dir: Path, spec: RunSpec) -> bool:
    return (run_dir(study_dir, spec.key) / RESULT_FILE).exists()


def _cells_of(claim: Claim, specs: list[RunSpec]) -> set[str]:
    """The cells either side of ``claim`` selects."""
    sides = [side for side in (claim.a, claim.b) if side is not None]
    return {s.cell for s in specs if any(side.selects(s.group, s.params) for side in sides)}


def load_schedule(study_dir: Path, specs: list[RunSpec], *, start: int) -> dict[str, int]:
    """Seeds per cell so far: ``start`` each, or what an interrupted study's ``seeds.json``
    recorded (resume goes on from its last round)."""
    schedule = {s.cell: start for s in specs}
    path = study_dir / SCHEDULE_FILE
    if path.is_file():
        stored = json.loads(path.read_text()).get("cells", {})
        for cell in schedule:
            schedule[cell] = max(start, int(stored.get(cell, start)))
    return schedule


Jobs = list[tuple[RunSpec, str]]  # each run and its directory


def _check_settings(
    *,
    jobs: int,
    threads: int | None,
    nproc: int,
    dist_bn: str,
    device: str,
    tensorboard: bool,
    dist: str = "ddp",
) -> None:
    """Refuse settings the runner cannot honour, before anything is written."""
    if isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"run_study: jobs must be >= 1, got {jobs!r}")
    if threads is not None and threads < 1:
        raise ValueError(f"run_study: threads must be >= 1, got {threads!r}")
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"run_study: nproc must be an int >= 1, got {nproc!r}")
    if dist_bn not in DIST_BN_MODES:
        raise ValueError(f"run_study: dist_bn must be one of {DIST_BN_MODES}, got {dist_bn!r}")
    if dist not in DIST_MODES:
        raise ValueError(f"run_study: dist must be one of {DIST_MODES}, got {dist!r}")
    if dist != "ddp" and nproc < 2:
        raise ValueError(
            f"run_study: dist={dist!r} shards each run over processes: it needs nproc >= 2, got nproc={nproc}"
        )
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"run_study: device {device!r} requested but CUDA is not available here")
    if tensorboard:
        try:
            importlib.import_module("torch.utils.tensorboard")
        except ImportError as err:
            raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from err


def _claim(study_dir: Path, plan: dict[str, Any], *, resume: bool) -> None:
    """An empty or absent folder starts a study; one with the same plan resumes (with ``resume``)."""
    plan_path = study_dir / PLAN_FILE
    if plan_path.exists():
        if not resume:
            raise ValueError(
                f"{study_dir} already holds a study; pass --resume to finish it, or choose another --out"
            )
        check_same_plan(json.loads(plan_path.read_text()), plan, study_dir)
    elif study_dir.exists() and any(study_dir.iterdir()):
        raise ValueError(f"{study_dir} exists, is not empty and holds no study; choose another --out")


def _prepare_data(specs: list[RunSpec], data_dir: str | None, echo: Callable[[str], None]) -> None:
    """Load (and cache) every data set of the grid once, before any run: fail fast."""
    seen: set[str] = set()
    for spec in specs:
        task = spec.config.task
        ident = repr(
            (
                spec.config.kind,
                getattr(task, "corpus", None),
                getattr(task, "level", None),
                getattr(task, "dataset", None),
                sorted(task.data.items()),  # each user data source (and its options) once
            )
        )
        if ident not in seen:
            seen.add(ident)
            echo(f"data: {prepare_data(spec.config, data_dir=data_dir)}")


def _run_with_torchrun(
    todo: Jobs,
    report: Callable[[str, dict[str, Any] | None, str | None, float], None],
    *,
    jobs: int,
    data_dir: str | None,
    device: str,
    nproc: int,
    threads: int,
    dist_bn: DistBN,
    preload: tuple[str, ...] = (),
    dist: Dist = "ddp",
) -> None:
    """Each run a torchrun subprocess of ``nproc`` processes, ``jobs`` at a time (threads suffice)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as launcher:
        args = (data_dir, device, nproc, threads, dist_bn, preload, dist)
        launches = [launcher.submit(_run_one_distributed, spec, directory, *args) for spec, directory in todo]
        for launched in concurrent.futures.as_completed(launches):
            report(*launched.result())


def _run_here(
    todo: Jobs,
    report: Callable[[str, dict[str, Any] | None, str | None, float], None],
    *,
    threads: int | None,
    data_dir: str | None,
    progress: bool,
    tensorboard: bool,
    device: str,
) -> None:
    """Every run in this process, one after the other."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for spec, directory in todo:
            report(*_run_one(spec, directory, data_dir, progress, tensorboard, device))
    finally:
        torch.set_num_threads(previous)


def _run_in_workers(
    todo: Jobs,
    report: Callable[[str, dict[str, Any] | None, str | None, float], None],
    *,
    jobs: int,
    threads: int,
    data_dir: str | None,
    tensorboard: bool,
    device: str,
    preload: tuple[str, ...] = (),
) -> None:
    """``jobs`` spawned worker processes of ``threads`` torch threads each."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads, os.getpid(), preload)
    ) as pool:
        futures = [
            pool.submit(_run_one, spec, directory, data_dir, False, tensorboard, device)
            for spec, directory in todo
        ]
        for future in concurrent.futures.as_completed(futures):
            report(*future.result())
