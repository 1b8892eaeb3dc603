"""The Trainer: one run, resumable bit for bit, logging to JSONL, in a few readable steps.

``Trainer(config, run_dir).run()`` (or :func:`train`) does::

    setup     claim the run directory, lock it, build the data, model and optimizer, resume
    step      lr = base_lr * lr_factor(step); the micro-batches of the step's batch: loss =
              task loss + aux_loss_weight * total_aux_loss(model), backward; clipping;
              optimizer step; the norms' training hooks (normlab.norms.TrainingHooks)
    evaluate  every eval_every steps and at the end
    checkpoint every ckpt_every steps: model, optimizer, every RNG, the step (atomically)
    finish    the end-of-run probes, final.pt, result.json (written last: the run is done)

A non-finite loss stops the run and marks it diverged; its final metrics then take the task's
fallback values (the uniform predictor's loss, chance accuracy). Where the model lives and how
batches and statistics are shared between processes is the :mod:`strategy
<normlab.train.strategy>`'s: single-process, or data-parallel under ``torch.distributed``
(``torchrun -m normlab.train``). The run directory's files: :mod:`normlab.train.rundir`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normlab._atomic import atomic_torch_save
from normlab.norms import TrainingHooks, total_aux_loss
from normlab.train import distributed
from normlab.train.config import RunConfig, config_hash
from normlab.train.fsdp import is_sharded_checkpoint, load_sharded, remove_sharded, save_sharded
from normlab.train.logger import (
    JsonlLogger,
    NoLogger,
    json_safe,
    open_tensorboard,
    progress_bar,
    read_jsonl,
    summarize,
)
from normlab.train.optim import deterministic, make_optimizer
from normlab.train.probes import get_probe
from normlab.train.rundir import (
    CHECKPOINT_FILE,
    FINAL_FILE,
    METRICS_FILE,
    RESULT_FILE,
    claim,
    run_lock,
    write_json,
)
from normlab.train.schedules import lr_factor
from normlab.train.state import clean_stale_temps, load_state, save_state, seed_everything
from normlab.train.strategy import Dist, SingleProcess, make_strategy
from normlab.train.tasks import TaskRuntime, make_task

__all__ = ["Trainer", "train"]


class Trainer:
    """Train ``config`` in ``run_dir``; :meth:`run` returns its summary (``result.json``).

    A finished run (``result.json`` present) returns its summary without training. With
    ``resume`` an existing checkpoint is loaded and training continues from its step, bit for
    bit as if uninterrupted (same thread count, CPU); without it, a partial run starts over.
    ``on_step(step)`` is called after every optimizer step; ``task`` is a bound task (the data
    already loaded); ``device`` places the model and batches (CUDA runs are not bit-exact on
    resume: CUDA RNG and kernels are not covered); ``strategy`` spreads the run over processes
    (default: :func:`~normlab.train.strategy.make_strategy` of the current process group).
    """

    def __init__(
        self,
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
        strategy: SingleProcess | None = None,
    ) -> None:
        for name in config.task.probes:  # an unknown probe fails now, not after training
            get_probe(name)
        self.config, self.cfg = config, config.train
        self.run_dir = Path(run_dir)
        self.data_dir, self.resume, self.device = data_dir, resume, device
        self.progress, self.tensorboard, self.on_step = progress, tensorboard, on_step
        self.strategy = strategy if strategy is not None else make_strategy()
        self.strategy.check(self.cfg)
        self.digest = config_hash(config)
        self.runtime: TaskRuntime | None = task
        self.start = 0
        self._elapsed = 0.0  # seconds trained before this process (a resumed run)
        self._t0 = 0.0

    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / CHECKPOINT_FILE

    # ---- the run ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        finished = claim(self.run_dir, self.digest, self.config.to_dict(), write=self.strategy.is_main)
        if finished is not None:
            return finished
        with ExitStack() as stack:
            self.setup(stack)
            for step in range(self.start, self.cfg.steps):
                if not self.step(step):
                    break
            return self.finish()

    def setup(self, stack: ExitStack) -> None:
        """Lock the run directory, build everything, resume from the checkpoint if there is one;
        the logger, TensorBoard writer and progress bar close with ``stack``."""
        strategy, cfg, main = self.strategy, self.cfg, self.strategy.is_main
        error: Exception | None = None
        try:
            if main:  # the main process holds the lock for the group
                stack.enter_context(run_lock(self.run_dir))
        except ValueError as err:
            error = err
        strategy.raise_together(error, "taking the run lock")
        stack.enter_context(deterministic(cfg.deterministic))
        try:
            if main:
                clean_stale_temps(self.run_dir)
            if self.runtime is None:
                self.runtime = make_task(self.config, data_dir=self.data_dir)
            seed_everything(cfg.seed)
            self.net = strategy.prepare(self.runtime.build_model().to(self.device))
            self.optimizer = make_optimizer(self.net, cfg)
            if self.resume and self.ckpt_path.exists():
                self._resume()
            else:
                if main:
                    self.ckpt_path.unlink(missing_ok=True)
                    remove_sharded(self.ckpt_path)
                strategy.fresh_rng(cfg.seed)
        except Exception as err:
            error = err
        strategy.raise_together(error, "setting up the run")
        assert self.runtime is not None
        strategy.agree_on_start(self.start, self.run_dir)
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.model: nn.Module = strategy.wrap(self.net)
        self.hooks = TrainingHooks(self.net, steps_per_epoch=self.runtime.steps_per_epoch)
        # a fresh start drops every record of an earlier attempt; a resume keeps those up to its step
        self.logger: JsonlLogger | NoLogger = (
            JsonlLogger.open(self.run_dir / METRICS_FILE, keep_until_step=self.start if self.start else -1)
            if main
            else NoLogger()
        )
        stack.callback(self.logger.close)
        if self.start == 0:
            start = {
                "kind": "start",
                "step": 0,
                "fallback": self.runtime.fallback(),
                **self.runtime.describe(),
            }
            self.logger.log({**start, **strategy.record()})
        else:
            self.logger.log({"kind": "resume", "step": self.start, **strategy.record()})
        self.monitor = None
        if cfg.monitor_every:  # the norm signals during training, as a user's loop records them
            from normlab.monitor import LOG_FILE, NormMonitor, trim_log

            if main:
                trim_log(self.run_dir / LOG_FILE, self.start)
            log_dir = self.run_dir if main else None
            self.monitor = NormMonitor(self.net, every=cfg.monitor_every, log_dir=log_dir, start=self.start)
            stack.callback(self.monitor.close)
        self.writer = open_tensorboard(self.run_dir) if self.tensorboard and main else None
        self.bar = progress_bar(cfg.steps, self.start, self.run_dir.name, self.progress and main)
        if self.writer is not None:
            stack.callback(self.writer.close)
        if self.bar is not None:
            stack.callback(self.bar.close)
        self._t0 = time.perf_counter()
        self._grad_norm = 0.0

    def _resume(self) -> None:
        state = load_state(self.ckpt_path, config_hash=self.digest)
        self.strategy.check_resume(state, self.ckpt_path)
        if is_sharded_checkpoint(state):  # FSDP's: any process count, or none
            load_sharded(self.ckpt_path, state, self.net, self.optimizer)
        else:
            self.net.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.strategy.restore_rng(state, self.cfg.seed)
        self.start, self._elapsed = int(state["step"]), float(state["extra"].get("elapsed_s", 0.0))

    def step(self, step: int) -> bool:
        """One optimizer step (0-based ``step``); ``False`` when the loss was not finite."""
        cfg = self.cfg
        lr = cfg.lr * lr_factor(
            step, schedule=cfg.schedule, total=cfg.steps, warmup=cfg.warmup, min_ratio=cfg.min_lr_ratio
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        value, failed = self._accumulate(step)
        if failed:
            record = {"kind": "diverged", "step": step + 1, "loss": value}
            self.logger.log({**record, **self.strategy.diverged(failed, step, self.run_dir)})
            return False
        if cfg.grad_clip is not None:
            self._grad_norm = self.strategy.clip_grad_norm(self.params, cfg.grad_clip)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            self._log_train(done, value, lr)
        self.optimizer.step()
        self.hooks.after_step(self.net, done)  # e.g. MBN's second forward, BLN's epoch end
        if self.monitor is not None:  # after the norms' hooks: a forward they run is this step's
            self.monitor.step()
        evaluate = (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps
        checkpoint = cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < cfg.steps
        if evaluate or checkpoint:
            self.strategy.sync_buffers(self.net)
        if evaluate:
            self.evaluate(done)
        if checkpoint:
            self.checkpoint(done)
        if self.bar is not None:
            self.bar.update(1)
        if self.on_step is not None:
            self.on_step(done)
        return True

    def _accumulate(self, step: int) -> tuple[float, list[int]]:
        """Forward and backward over the ``accum_steps`` micro-batches of this process's share of
        batch ``step``; returns the mean task loss (over every process) and the processes whose
        loss was not finite (then before any backward of that micro-batch, everywhere alike).

        The strategy gathers each micro-batch's loss (and whether computing it raised) before its
        backward, so that every process stops or goes on together. DDP all-reduces the gradients
        once per step: the micro-batches before the last run under ``no_sync()``.
        """
        assert self.runtime is not None
        accum = self.cfg.accum_steps
        inputs = targets = None
        total = 0.0
        for i in range(accum):
            error: Exception | None = None
            value = math.nan
            loss = None
            try:
                if inputs is None or targets is None:
                    inputs, targets = self.strategy.shard(self.runtime.batch(step), accum)
                micro = len(inputs) // accum
                part = (
                    inputs[i * micro : (i + 1) * micro].to(self.device),
                    targets[i * micro : (i + 1) * micro].to(self.device),
                )
                self.hooks.record(part[0])
                task_loss = self.runtime.loss(self.model, part)
                loss = task_loss
                if self.cfg.aux_loss_weight:
                    loss = loss + self.cfg.aux_loss_weight * total_aux_loss(self.model)
                value = float(task_loss.detach())
                if math.isfinite(value) and not math.isfinite(float(loss.detach())):
                    value = math.nan  # a finite task loss with a non-finite auxiliary loss
            except Exception as err:
                if self.strategy.ctx is None:
                    raise
                error = err
            values = self.strategy.step_losses(value, error, step)
            bad = [r for r, v in enumerate(values) if not math.isfinite(v)]
            if bad:
                return values[bad[0]], bad
            assert loss is not None
            scaled = loss / accum if accum > 1 else loss  # the slice's share of the batch mean
            with self.strategy.gradient_sync(self.model, sync=i == accum - 1):
                torch.autograd.backward(scaled)
            total += sum(values) / len(values)  # equal slices: the global mean
        return total / accum, []

    def _log_train(self, done: int, value: float, lr: float) -> None:
        if self.cfg.grad_clip is None:
            self._grad_norm = self.strategy.grad_norm(self.params)
        self.logger.log(
            {"kind": "train", "step": done, "loss": value, "lr": lr, "grad_norm": self._grad_norm}
        )
        if self.writer is not None:
            self.writer.add_scalar("train/loss", value, done)
            self.writer.add_scalar("train/lr", lr, done)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{value:.3f}", refresh=False)

    def evaluate(self, done: int) -> dict[str, float]:
        """The task's evaluation after ``done`` steps, logged. Every process evaluates the same
        model, so none waits for the main one."""
        assert self.runtime is not None
        self.net.eval()
        metrics = self.runtime.evaluate(self.net)
        self.logger.log({"kind": "eval", "step": done, **metrics})
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"eval/{k}", v, done)
        return metrics

    def checkpoint(self, done: int) -> None:
        """Everything a resumed run needs, after ``done`` steps (the main process writes it)."""
        rngs = self.strategy.gather_rng()
        extra = {"elapsed_s": self._wall(), **self.strategy.checkpoint_extra()}
        fields: dict[str, Any] = {"model": self.net, "optimizer": self.optimizer, "step": done,
                                  "config_hash": self.digest, "extra": extra, "rank_rng": rngs}  # fmt: skip
        if self.strategy.shards_parameters:  # every process writes its shards
            save_sharded(self.ckpt_path, is_main=self.strategy.is_main, **fields)
        elif self.strategy.is_main:
            save_state(self.ckpt_path, **fields)

    def _wall(self) -> float:
        return self._elapsed + time.perf_counter() - self._t0

    def finish(self) -> dict[str, Any]:
        """The end-of-run probes, ``final.pt`` and ``result.json``; returns the summary."""
        assert self.runtime is not None
        strategy = self.strategy
        strategy.sync_buffers(self.net)  # a run stopped by a NaN skipped the last evaluation
        strategy.check_identical(self.net)
        error: Exception | None = None
        summary: dict[str, Any] = {}
        result_path = self.run_dir / RESULT_FILE
        try:
            probe: dict[str, Any] | None = None
            # a sharded model's forward is a collective: every process runs the probes' forwards
            if self.config.task.probes and (strategy.is_main or strategy.shards_parameters):
                self.net.eval()
                with strategy.gathered(self.net):
                    probe = self.runtime.probe(self.net)
            full = strategy.full_state_dict(self.net)
            if strategy.is_main:
                metrics_path = self.run_dir / METRICS_FILE
                if probe is not None:
                    last_step = max((int(r.get("step", 0)) for r in read_jsonl(metrics_path)), default=0)
                    self.logger.log({"kind": "probe", "step": last_step, **probe})
                self.logger.close()
                state = {k: v.detach().cpu() for k, v in full.items()}
                atomic_torch_save(state, self.run_dir / FINAL_FILE)
                if self.monitor is not None and self.monitor.records:
                    _monitor_report(self.run_dir)
                summary = summarize(read_jsonl(metrics_path))
                summary.update(
                    {
                        "status": "finished",
                        "config_hash": self.digest,
                        "wall_s": round(self._wall(), 3),
                        "threads": torch.get_num_threads(),
                        "kernels": _kernel_state(),
                        **strategy.record(),
                    }
                )
                write_json(result_path, json_safe(summary))
                self.ckpt_path.unlink(missing_ok=True)
                remove_sharded(self.ckpt_path)
        except Exception as err:
            error = err
        strategy.raise_together(error, "writing the results")  # also the barrier before reading
        if not strategy.is_main:
            summary = json.loads(result_path.read_text())
        return summary


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
    dist: Dist = "ddp",
    fsdp: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``config`` in ``run_dir`` and return its summary: :class:`Trainer` with the strategy
    of the current process group.

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

    ``dist="fsdp"`` shards the model with FSDP2 instead (:class:`~normlab.train.strategy.FullyShard`,
    options ``fsdp``: ``reshard_after_forward``, ``param_dtype``): the same batches and
    statistics, checkpoints sharded through ``torch.distributed.checkpoint``.
    """
    return Trainer(
        config,
        run_dir,
        data_dir=data_dir,
        resume=resume,
        progress=progress,
        tensorboard=tensorboard,
        on_step=on_step,
        task=task,
        device=device,
        strategy=make_strategy(dist_bn, dist, **(fsdp or {})),
    ).run()


def _monitor_report(run_dir: Path) -> None:
    """The run's monitor log as ``monitor_report.md`` and its plots (where matplotlib is), the
    same report as ``normlab report-monitor`` gives for a user's own loop."""
    import importlib.util

    from normlab.monitor import LOG_FILE
    from normlab.monitor.report import report_monitor

    report_monitor(run_dir / LOG_FILE, run_dir, plots=importlib.util.find_spec("matplotlib") is not None)


def _kernel_state() -> str:
    """Whether normlab's fused CPU kernels ran (a resume must take the same path to match)."""
    from normlab import kernels

    if not kernels.enabled():
        return "off"
    return str(kernels.status().get("reason") or "not used")
