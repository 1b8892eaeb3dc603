"""The training loop: plain, resumable bit-for-bit, logging to JSONL.

A run directory holds:

- ``config.json``: the :class:`~normlab.train.config.RunConfig` and its hash (written first);
- ``metrics.jsonl``: one record per line, ``{"kind": "train" | "eval" | "probe" | "start" |
  "resume" | "diverged", "step": ..., ...}``, flushed at every write;
- ``checkpoint.pt``: model, optimizer, RNG states and step, every ``ckpt_every`` steps,
  written atomically (removed once the run has finished);
- ``final.pt``: the final model ``state_dict``;
- ``result.json``: the summary, written last and atomically: its presence marks the run
  finished.

Each step: ``lr = base_lr * lr_factor(step)``; the batch of ``step``; ``loss = task loss +
aux_loss_weight * normlab.total_aux_loss(model)``; backward; optional global-norm clipping;
optimizer step. A non-finite loss stops the run and marks it diverged; its final metrics then
take the task's fallback values (the uniform predictor's loss, chance accuracy).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from normlab._atomic import atomic_torch_save, atomic_write_bytes
from normlab.norms import total_aux_loss
from normlab.train.config import RunConfig, TrainConfig, config_hash
from normlab.train.logger import JsonlLogger, read_jsonl
from normlab.train.probes import get_probe
from normlab.train.schedules import lr_factor
from normlab.train.state import (
    clean_stale_temps,
    load_state,
    save_state,
    seed_everything,
    set_rng_state,
)
from normlab.train.tasks import TaskRuntime, make_task

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
FINAL_FILE = "final.pt"
RESULT_FILE = "result.json"


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD; weight decay on ``dim >= 2`` parameters only."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # foreach=False: one code path on every machine, so resumed and uninterrupted runs match
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, foreach=False)


@contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``run_dir/.lock`` while training: two processes (a resumed
    study and a survivor of the killed one) never train the same run. The kernel drops the
    lock when its holder dies, even by SIGKILL. Where ``fcntl`` is missing, no lock is taken."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(run_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise ValueError(f"train: {str(run_dir)!r} is being trained by another process") from err
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def _grad_norm(params: Sequence[Tensor]) -> float:
    norms = [p.grad.detach().norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _accumulate_gradients(
    runtime: TaskRuntime, model: nn.Module, batch: tuple[Tensor, Tensor], cfg: TrainConfig, device: Any
) -> float:
    """Forward and backward over the ``cfg.accum_steps`` micro-batches of ``batch``; returns the
    mean task loss, or a non-finite value (before any backward of a non-finite loss)."""
    inputs, targets = batch
    micro = len(inputs) // cfg.accum_steps
    total = 0.0
    for i in range(cfg.accum_steps):
        part = (
            inputs[i * micro : (i + 1) * micro].to(device),
            targets[i * micro : (i + 1) * micro].to(device),
        )
        task_loss = runtime.loss(model, part)
        loss = task_loss
        if cfg.aux_loss_weight:
            loss = loss + cfg.aux_loss_weight * total_aux_loss(model)
        value = float(task_loss.detach())
        if not math.isfinite(value) or not math.isfinite(float(loss.detach())):
            return value if not math.isfinite(value) else math.nan
        # one slice's share of the batch mean, so the summed gradient is the batch gradient
        torch.autograd.backward(loss / cfg.accum_steps if cfg.accum_steps > 1 else loss)
        total += value
    return total / cfg.accum_steps


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary of a run from its logged records (what the claims are computed from).

    ``final``: the metrics of the last evaluation, or the task's fallback values if the run
    diverged; ``train_loss``: the mean training loss of the last 10% of the logged steps;
    ``probe``: the last probe record; ``diverged``; ``steps``: the last step logged.
    """
    evals = [r for r in records if r.get("kind") == "eval"]
    trains = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    starts = [r for r in records if r.get("kind") == "start"]
    diverged = [r for r in records if r.get("kind") == "diverged"]
    probes = [r for r in records if r.get("kind") == "probe"]
    fallback: dict[str, float] = dict(starts[0].get("fallback", {})) if starts else {}
    final: dict[str, Any] = {}
    if diverged:
        final = dict(fallback)
    elif evals:
        final = {k: v for k, v in evals[-1].items() if k not in ("kind", "step")}
    tail = trains[-max(1, len(trains) // 10) :] if trains else []
    return {
        "diverged": bool(diverged),
        "diverged_at": diverged[0]["step"] if diverged else None,
        "steps": max((int(r.get("step", 0)) for r in records), default=0),
        "final": final,
        "train_loss": (sum(float(r["loss"]) for r in tail) / len(tail)) if tail else None,
        "probe": {k: v for k, v in probes[-1].items() if k not in ("kind", "step")} if probes else {},
    }


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ValueError(
            "tensorboard logging needs the tensorboard package: pip install tensorboard"
        ) from err
    return SummaryWriter(str(run_dir / "tb"))


def _progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)


def train(
    config: RunConfig,
    run_dir: str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    resume: bool = True,
    progress: bool = False,
    tensorboard: bool = False,
    on_step: Callable[[int], None] | None = None,
    task: TaskRuntime | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Train ``config`` in ``run_dir`` and return its summary (the content of ``result.json``).

    A finished run (``result.json`` present) returns its summary without training. With
    ``resume`` an existing checkpoint is loaded and training continues from its step,
    bit-for-bit as if uninterrupted (same thread count, CPU); without it, a partial run
    starts over. ``on_step(step)`` is called after every optimizer step. ``device`` places the
    model and batches (CUDA runs are not bit-exact on resume: CUDA RNG and kernels are not
    covered).
    """
    for name in config.task.probes:  # an unknown probe fails now, not after training
        get_probe(name)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    digest = config_hash(config)
    result_path = run_dir / RESULT_FILE
    config_path = run_dir / CONFIG_FILE
    if config_path.exists():
        written = json.loads(config_path.read_text())
        if written.get("config_hash") != digest:
            raise ValueError(
                f"train: {str(run_dir)!r} holds a run of another configuration "
                f"({str(written.get('config_hash'))[:12]} != {digest[:12]}); use a new directory"
            )
        if result_path.exists():
            result: dict[str, Any] = json.loads(result_path.read_text())
            return result
    else:
        write_json(config_path, {"config_hash": digest, "config": config.to_dict()})
    cfg = config.train
    ckpt_path = run_dir / CHECKPOINT_FILE
    with _run_lock(run_dir), _deterministic(cfg.deterministic):
        clean_stale_temps(run_dir)
        runtime = task if task is not None else make_task(config, data_dir=data_dir)
        seed_everything(cfg.seed)
        model = runtime.build_model().to(device)
        optimizer = make_optimizer(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        start, elapsed = 0, 0.0
        if resume and ckpt_path.exists():
            state = load_state(ckpt_path, config_hash=digest)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"])
            start, elapsed = int(state["step"]), float(state["extra"].get("elapsed_s", 0.0))
        else:
            ckpt_path.unlink(missing_ok=True)
        # a fresh start drops every record of an earlier attempt; a resume keeps those up to its step
        logger = JsonlLogger.open(run_dir / METRICS_FILE, keep_until_step=start if start else -1)
        if start == 0:
            logger.log({"kind": "start", "step": 0, "fallback": runtime.fallback(), **runtime.describe()})
        else:
            logger.log({"kind": "resume", "step": start})
        writer = _tensorboard(run_dir) if tensorboard else None
        bar = _progress(cfg.steps, start, run_dir.name, progress)
        t0 = time.perf_counter()
        grad_norm = 0.0
        try:
            for step in range(start, cfg.steps):
                lr = cfg.lr * lr_factor(
                    step,
                    schedule=cfg.schedule,
                    total=cfg.steps,
                    warmup=cfg.warmup,
                    min_ratio=cfg.min_lr_ratio,
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                model.train()
                optimizer.zero_grad(set_to_none=True)
                value = _accumulate_gradients(runtime, model, runtime.batch(step), cfg, device)
                if not math.isfinite(value):
                    logger.log({"kind": "diverged", "step": step + 1, "loss": value})
                    break
                if cfg.grad_clip is not None:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=False))
                done = step + 1
                if done % cfg.log_every == 0 or done == cfg.steps:
                    if cfg.grad_clip is None:
                        grad_norm = _grad_norm(params)
                    record = {"kind": "train", "step": done, "loss": value, "lr": lr, "grad_norm": grad_norm}
                    logger.log(record)
                    if writer is not None:
                        writer.add_scalar("train/loss", value, done)
                        writer.add_scalar("train/lr", lr, done)
                    if bar is not None:
                        bar.set_postfix(loss=f"{value:.3f}", refresh=False)
                optimizer.step()
                if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                    model.eval()
                    metrics = runtime.evaluate(model)
                    logger.log({"kind": "eval", "step": done, **metrics})
                    if writer is not None:
                        for k, v in metrics.items():
                            writer.add_scalar(f"eval/{k}", v, done)
                if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < cfg.steps:
                    extra = {"elapsed_s": elapsed + time.perf_counter() - t0}
                    save_state(
                        ckpt_path,
                        model=model,
                        optimizer=optimizer,
                        step=done,
                        config_hash=digest,
                        extra=extra,
                    )
                if bar is not None:
                    bar.update(1)
                if on_step is not None:
                    on_step(done)
            last_step = max((int(r.get("step", 0)) for r in read_jsonl(run_dir / METRICS_FILE)), default=0)
            if config.task.probes:
                model.eval()
                logger.log({"kind": "probe", "step": last_step, **runtime.probe(model)})
        finally:
            logger.close()
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, run_dir / FINAL_FILE)
        summary = summarize(read_jsonl(run_dir / METRICS_FILE))
        summary.update(
            {
                "status": "finished",
                "config_hash": digest,
                "wall_s": round(elapsed + time.perf_counter() - t0, 3),
                "threads": torch.get_num_threads(),
                "kernels": _kernel_state(),
            }
        )
        write_json(result_path, _finite(summary))
        ckpt_path.unlink(missing_ok=True)
    return summary


def _kernel_state() -> str:
    """Whether normlab's fused CPU kernels ran (a resume must take the same path to match)."""
    from normlab import kernels

    if not kernels.enabled():
        return "off"
    return str(kernels.status().get("reason") or "not used")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
