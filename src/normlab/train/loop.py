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
optimizer step; ``runtime.after_step`` (what a norm prescribes outside the forward pass, e.g.
BLN's epoch end). A non-finite loss stops the run and marks it diverged; its final metrics
then take the task's fallback values (the uniform predictor's loss, chance accuracy).

Under ``torch.distributed`` (a process group of more than one process, e.g. ``torchrun -m
normlab.train``) the same loop trains data-parallel: see :func:`train` and
:mod:`normlab.train.distributed`.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from normlab._atomic import atomic_torch_save, atomic_write_bytes
from normlab.norms import convert_sync, total_aux_loss
from normlab.train import distributed
from normlab.train.config import RunConfig, TrainConfig, config_hash
from normlab.train.logger import JsonlLogger, read_jsonl
from normlab.train.probes import get_probe
from normlab.train.schedules import lr_factor
from normlab.train.state import (
    clean_stale_temps,
    load_state,
    rng_state,
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
    runtime: TaskRuntime,
    model: nn.Module,
    step: int,
    cfg: TrainConfig,
    device: Any,
    ctx: distributed.Context | None = None,
) -> tuple[float, list[int]]:
    """Forward and backward over the ``cfg.accum_steps`` micro-batches of this rank's share of
    batch ``step``; returns the mean task loss (over every rank) and the ranks whose loss was
    not finite (then before any backward of that micro-batch, on every rank alike).

    With a process group, each micro-batch's loss (and whether computing it raised) is
    gathered from every rank before its backward, so all ranks stop or go on together; an
    exception on one rank is raised there and as a :class:`~normlab.train.distributed.
    RankFailedError` naming it on the others. DDP all-reduces the gradients once per step:
    the micro-batches before the last run under ``no_sync()``.
    """
    accum = cfg.accum_steps
    part_inputs: Tensor | None = None
    part_targets: Tensor | None = None
    total = 0.0
    for i in range(accum):
        error: Exception | None = None
        value = math.nan
        loss: Tensor | None = None
        try:
            if part_inputs is None or part_targets is None:
                part_inputs, part_targets = distributed.shard(runtime.batch(step), ctx, accum_steps=accum)
            micro = len(part_inputs) // accum
            part = (
                part_inputs[i * micro : (i + 1) * micro].to(device),
                part_targets[i * micro : (i + 1) * micro].to(device),
            )
            task_loss = runtime.loss(model, part)
            loss = task_loss
            if cfg.aux_loss_weight:
                loss = loss + cfg.aux_loss_weight * total_aux_loss(model)
            value = float(task_loss.detach())
            if math.isfinite(value) and not math.isfinite(float(loss.detach())):
                value = math.nan  # a finite task loss with a non-finite auxiliary loss
        except Exception as err:
            if ctx is None:
                raise
            error = err
        if ctx is None:
            values = [value]
        else:
            rows = distributed.gather_floats([float(error is not None), value], ctx)
            raised = [r for r, row in enumerate(rows) if row[0]]
            if error is not None:
                raise error
            if raised:
                names = ", ".join(map(str, raised))
                raise distributed.RankFailedError(
                    f"train: rank {names} raised an exception at step {step + 1} (see that rank's "
                    "traceback); every rank stops",
                    raised,
                )
            values = [row[1] for row in rows]
        bad = [r for r, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            return values[bad[0]], bad
        assert loss is not None
        scaled = loss / accum if accum > 1 else loss  # the slice's share of the batch mean
        no_sync = getattr(model, "no_sync", None)
        with no_sync() if no_sync is not None and i < accum - 1 else nullcontext():
            torch.autograd.backward(scaled)
        total += sum(values) / len(values)  # equal slices: the global mean
    return total / accum, []


def _no_buffer_broadcast(ddp: type[nn.Module]) -> dict[str, Any]:
    """DDP keyword that keeps buffers per rank between the syncs of ``dist_bn`` (by default DDP
    copies rank 0's buffers at every forward): ``forward_sync_buffers`` from torch 2.13 on,
    ``broadcast_buffers`` before (deprecated since)."""
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class _NoLogger:
    """What ranks other than 0 log to: nothing (rank 0 writes the run directory)."""

    def log(self, record: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


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
    dist_bn: distributed.DistBN = distributed.DEFAULT_DIST_BN,
) -> dict[str, Any]:
    """Train ``config`` in ``run_dir`` and return its summary (the content of ``result.json``).

    A finished run (``result.json`` present) returns its summary without training. With
    ``resume`` an existing checkpoint is loaded and training continues from its step,
    bit-for-bit as if uninterrupted (same thread count, CPU); without it, a partial run
    starts over. ``on_step(step)`` is called after every optimizer step. ``device`` places the
    model and batches (CUDA runs are not bit-exact on resume: CUDA RNG and kernels are not
    covered).

    Data-parallel: when a ``torch.distributed`` process group of more than one process is
    initialised (``python -m normlab.train`` under ``torchrun`` does it; see
    :mod:`normlab.train.distributed`), every process calls ``train`` with the same arguments:
    the model is wrapped in ``DistributedDataParallel``, each rank trains on its slice of the
    global batch ``config.train.batch_size``, BatchNorm statistics follow ``dist_bn``
    (``"sync"``, the default: cross-process BatchNorm over the global batch; ``"average"`` /
    ``"broadcast"``: plain BatchNorm, running statistics averaged / copied from rank 0 before
    every evaluation and checkpoint), and rank 0 alone writes the run directory. Checkpoints hold
    the unwrapped model (the keys of a single-process run, so either resumes the other) and every
    rank's RNG state; a resume with the same world size is bit-exact. At the end every rank
    checks that its parameters and buffers equal rank 0's, bitwise.
    """
    for name in config.task.probes:  # an unknown probe fails now, not after training
        get_probe(name)
    if dist_bn not in distributed.DIST_BN_MODES:
        raise ValueError(f"train: dist_bn must be one of {distributed.DIST_BN_MODES}, got {dist_bn!r}")
    ctx = distributed.context()
    main = ctx is None or ctx.is_main
    cfg = config.train
    if ctx is not None and cfg.batch_size % (ctx.world_size * cfg.accum_steps):
        raise ValueError(
            f"train: batch_size={cfg.batch_size} is not divisible by world_size={ctx.world_size} x "
            f"accum_steps={cfg.accum_steps}; every rank needs an equal slice of the global batch"
        )
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
    elif main:
        write_json(config_path, {"config_hash": digest, "config": config.to_dict()})
    ckpt_path = run_dir / CHECKPOINT_FILE
    with ExitStack() as stack:
        error: Exception | None = None
        try:
            if main:  # rank 0 holds the lock for the group
                stack.enter_context(_run_lock(run_dir))
        except ValueError as err:
            error = err
        distributed.raise_together(error, ctx, "taking the run lock")
        stack.enter_context(_deterministic(cfg.deterministic))
        start, elapsed = 0, 0.0
        try:
            if main:
                clean_stale_temps(run_dir)
            runtime = task if task is not None else make_task(config, data_dir=data_dir)
            seed_everything(cfg.seed)
            net = runtime.build_model().to(device)
            if ctx is not None and dist_bn == "sync":
                net = convert_sync(net)  # the same Parameters and buffers, global statistics
            optimizer = make_optimizer(net, cfg)
            if resume and ckpt_path.exists():
                state = load_state(ckpt_path, config_hash=digest)
                saved_bn = state["extra"].get("dist_bn")
                if ctx is not None and saved_bn is not None and saved_bn != dist_bn:
                    raise ValueError(
                        f"train: {str(ckpt_path)!r} was trained with dist_bn={saved_bn!r}; resuming it "
                        f"with dist_bn={dist_bn!r} would change BatchNorm's statistics mid-run"
                    )
                net.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                ranks_rng = state.get("rank_rng")
                if ctx is not None and ranks_rng is not None and len(ranks_rng) == ctx.world_size:
                    set_rng_state(ranks_rng[ctx.rank])
                elif ctx is None or ctx.is_main:
                    set_rng_state(state["rng"])
                else:  # another world size: the run goes on, not bit-exactly
                    seed_everything(distributed.rank_seed(cfg.seed + int(state["step"]), ctx.rank))
                start, elapsed = int(state["step"]), float(state["extra"].get("elapsed_s", 0.0))
            else:
                if main:
                    ckpt_path.unlink(missing_ok=True)
                if ctx is not None and not main:
                    seed_everything(distributed.rank_seed(cfg.seed, ctx.rank))
        except Exception as err:
            error = err
        distributed.raise_together(error, ctx, "setting up the run")
        if ctx is not None:
            starts = [int(row[0]) for row in distributed.gather_floats([start], ctx)]
            if len(set(starts)) > 1:
                raise ValueError(
                    f"train: the ranks resume from different steps {starts} (by rank): every rank must "
                    f"read the same {str(run_dir)!r} (a shared file system on several nodes)"
                )
        params = [p for p in net.parameters() if p.requires_grad]
        model: nn.Module = net
        if ctx is not None:
            from torch.nn.parallel import DistributedDataParallel  # imports torch._dynamo: seconds

            model = DistributedDataParallel(net, **_no_buffer_broadcast(DistributedDataParallel))
        # a fresh start drops every record of an earlier attempt; a resume keeps those up to its step
        logger: JsonlLogger | _NoLogger = (
            JsonlLogger.open(run_dir / METRICS_FILE, keep_until_step=start if start else -1)
            if main
            else _NoLogger()
        )
        stack.callback(logger.close)
        scale = {"world_size": ctx.world_size, "dist_bn": dist_bn} if ctx is not None else {}
        if start == 0:
            logger.log(
                {"kind": "start", "step": 0, "fallback": runtime.fallback(), **runtime.describe(), **scale}
            )
        else:
            logger.log({"kind": "resume", "step": start, **scale})
        writer = _tensorboard(run_dir) if tensorboard and main else None
        bar = _progress(cfg.steps, start, run_dir.name, progress and main)
        if writer is not None:
            stack.callback(writer.close)
        if bar is not None:
            stack.callback(bar.close)
        t0 = time.perf_counter()
        grad_norm = 0.0
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
            value, failed = _accumulate_gradients(runtime, model, step, cfg, device, ctx)
            if failed:
                record: dict[str, Any] = {"kind": "diverged", "step": step + 1, "loss": value}
                if ctx is not None:
                    record.update({"rank": failed[0], "ranks": failed})
                    if main:
                        print(
                            f"normlab.train: non-finite loss on rank {', '.join(map(str, failed))} at step "
                            f"{step + 1}: every rank stops ({run_dir})",
                            file=sys.stderr,
                        )
                logger.log(record)
                break
            if cfg.grad_clip is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=False))
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                if cfg.grad_clip is None:
                    grad_norm = _grad_norm(params)
                logger.log({"kind": "train", "step": done, "loss": value, "lr": lr, "grad_norm": grad_norm})
                if writer is not None:
                    writer.add_scalar("train/loss", value, done)
                    writer.add_scalar("train/lr", lr, done)
                if bar is not None:
                    bar.set_postfix(loss=f"{value:.3f}", refresh=False)
            optimizer.step()
            runtime.after_step(net, done)  # e.g. BLN's epoch end, MBN's second forward
            evaluate = (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps
            checkpoint = cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < cfg.steps
            if evaluate or checkpoint:
                distributed.sync_buffers(net, dist_bn, ctx)
            if evaluate:  # every rank evaluates the same model, so none waits for rank 0
                net.eval()
                metrics = runtime.evaluate(net)
                logger.log({"kind": "eval", "step": done, **metrics})
                if writer is not None:
                    for k, v in metrics.items():
                        writer.add_scalar(f"eval/{k}", v, done)
            if checkpoint:
                rngs = distributed.gather_objects(rng_state(), ctx)
                if main:
                    save_state(
                        ckpt_path,
                        model=net,
                        optimizer=optimizer,
                        step=done,
                        config_hash=digest,
                        extra={
                            "elapsed_s": elapsed + time.perf_counter() - t0,
                            "dist_bn": dist_bn if ctx is not None else None,
                        },
                        rank_rng=rngs if ctx is not None else None,
                    )
            if bar is not None:
                bar.update(1)
            if on_step is not None:
                on_step(done)
        distributed.sync_buffers(net, dist_bn, ctx)  # a run stopped by a NaN skipped the last eval
        distributed.check_identical(net, ctx)
        error = None
        try:
            if main:
                if config.task.probes:
                    last_step = max(
                        (int(r.get("step", 0)) for r in read_jsonl(run_dir / METRICS_FILE)), default=0
                    )
                    net.eval()
                    logger.log({"kind": "probe", "step": last_step, **runtime.probe(net)})
                logger.close()
                atomic_torch_save(
                    {k: v.detach().cpu() for k, v in net.state_dict().items()}, run_dir / FINAL_FILE
                )
                summary = summarize(read_jsonl(run_dir / METRICS_FILE))
                summary.update(
                    {
                        "status": "finished",
                        "config_hash": digest,
                        "wall_s": round(elapsed + time.perf_counter() - t0, 3),
                        "threads": torch.get_num_threads(),
                        "kernels": _kernel_state(),
                        **scale,
                    }
                )
                write_json(result_path, _finite(summary))
                ckpt_path.unlink(missing_ok=True)
        except Exception as err:
            error = err
        distributed.raise_together(error, ctx, "writing the results")  # also the barrier before reading
        if not main:
            summary = json.loads(result_path.read_text())
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
