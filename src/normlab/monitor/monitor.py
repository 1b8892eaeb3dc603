"""NormMonitor: what normalization does in a model, measured during the user's own training.

``monitor = NormMonitor(model, every=50, log_dir="runs/monitor")`` attaches hooks; the loop
calls ``monitor.step()`` after each optimizer step. Every ``every``-th step (the first one
included) the hooks read the forward and backward that the loop runs anyway (no extra forward)
and ``step()`` writes one record:

* ``residual``: the residual-stream variance after each block, ``x_l.float().var()`` (Sun et al.
  2025, arXiv:2502.05795, the Curse of Depth signal), and each block's growth ``var(out) / var(in)``;
* ``angular``: the angular distance ``arccos(cos(in, out)) / pi`` between a block's input and
  output, averaged over tokens (Gromov et al. 2024, arXiv:2403.17887): near 0, the block does
  not change its input;
* ``grad_norm``: the 2-norm of each block's parameter gradients (Xiong et al. 2020,
  arXiv:2002.04745: where gradients vanish or explode), read when they are accumulated, so a
  ``zero_grad`` before ``step()`` does not hide them (under DDP: this process's gradients);
* ``alpha``: each DyT/Derf layer's ``alpha``, the input's std, the saturation margin
  ``alpha * std(input)`` and the share of inputs past 99% of tanh's (erf's) range (Zhu et al. 2025,
  arXiv:2503.10622: alpha tracks 1/std; a margin of 2.5 or more means most inputs are saturated);
* ``bn_stats``: for each BatchNorm-family layer in training mode, the gap between the batch
  statistics and the running ones it is about to update: ``mean_c |mu_b - mu_r| / sqrt(var_r +
  eps)`` and ``mean_c var_b / var_r`` (large gaps: eval-mode outputs differ from training);
* ``nonfinite``: the first module (in forward order) whose output holds a NaN or an infinity.

Records go to ``log_dir/monitor.jsonl`` (one JSON object per line, flushed), to a TensorBoard
``SummaryWriter`` when one is given, and to Weights & Biases when a ``wandb`` run is active.
Alerts (:class:`MonitorThresholds`): a saturated DyT, exploding residual variance, dead deep
blocks, non-finite activations warn once each (:class:`NormMonitorWarning`) with the module and
the numbers, or with ``on_alert="raise"`` stop the loop at ``step()`` (:class:`NormAlertError`),
before the loop's next checkpoint can overwrite a good one. ``close()`` (or the ``with`` block)
removes every hook: the model computes bit for bit what it computed before.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from normlab.diagnostics.hooks import first_tensor
from normlab.diagnostics.layers import default_layers, is_dyt
from normlab.diagnostics.metrics import angular_distance

__all__ = [
    "LOG_FILE",
    "PROBES",
    "MonitorThresholds",
    "NormAlertError",
    "NormMonitor",
    "NormMonitorWarning",
    "dead_deep_blocks",
    "read_log",
    "trim_log",
]

PROBES = ("residual", "angular", "grad_norm", "alpha", "bn_stats", "nonfinite")
LOG_FILE = "monitor.jsonl"
MAX_ROWS = 2048  # token rows per block for the angular distance: a bounded cost per measurement
MAX_ELEMENTS = 1 << 16  # elements per DyT input for the saturated share
# |z| beyond which tanh(z) (erf(z)) is within 1% of +-1
TANH_99 = math.atanh(0.99)
ERF_99 = 1.8213863677184496

_ATTACHED: weakref.WeakKeyDictionary[nn.Module, NormMonitor] = weakref.WeakKeyDictionary()


class NormMonitorWarning(UserWarning):
    """A monitor alert (``on_alert="warn"``): the module, the signal and its numbers."""


class NormAlertError(RuntimeError):
    """A monitor alert with ``on_alert="raise"``: training should stop here. ``record`` is the
    measurement that raised it (already written to the log)."""

    def __init__(self, message: str, record: dict[str, Any]) -> None:
        super().__init__(message)
        self.record = record


@dataclass(frozen=True)
class MonitorThresholds:
    """When a measurement raises an alert.

    ``dyt_saturation``: ``alpha * std(input)`` of a DyT/Derf layer (Zhu et al. 2025).
    ``residual_growth``: residual variance after the last block over that after the first.
    ``dead_angular``, ``dead_ratio``: a block of the deeper half whose input and output are
    closer than ``dead_angular`` (angular distance) and than ``dead_ratio`` times the mean of
    the shallower half's is dead (Sun et al. 2025: deep Pre-LN blocks that stop contributing);
    ``dead_run`` of them raise the alert.
    """

    dyt_saturation: float = 2.5
    residual_growth: float = 100.0
    dead_angular: float = 0.01
    dead_ratio: float = 0.1
    dead_run: int = 2


@dataclass
class _Block:
    name: str
    module: nn.Module
    calls: int = 0
    var_in: float = 0.0
    var_out: float = 0.0
    angular: float = 0.0


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _mean_var(t: Tensor) -> float:
    return float(t.detach().float().var()) if t.numel() > 1 else 0.0


def _token_rows(t: Tensor) -> Tensor:
    """Rows to compare: tokens ``(B, T, C) -> (B*T, C)``, else one row per sample, at most
    :data:`MAX_ROWS` of them, evenly spaced."""
    rows = t.detach().reshape(-1, t.shape[-1]) if t.dim() == 3 else t.detach().reshape(t.shape[0], -1)
    if rows.shape[0] > MAX_ROWS:
        rows = rows[:: math.ceil(rows.shape[0] / MAX_ROWS)]
    return rows


class NormMonitor:
    """Watch the normalization of ``model`` during training (see the module docstring).

    Args:
        model: any ``nn.Module``; what is watched is what ``normlab.diagnose`` measures: its
            residual blocks (:func:`normlab.structure.find_blocks`), else its conv and linear
            layers, or the ``layers`` given.
        every: measure on steps ``0, every, 2 every, ...`` (counted by :meth:`step`).
        log_dir: folder of ``monitor.jsonl`` (created); ``None``: keep records in memory only.
        probes: which signals (:data:`PROBES`, default all).
        layers: the blocks to watch, as modules or qualified names, instead of the found ones.
        writer: a TensorBoard ``SummaryWriter`` (``add_scalar``) to log the scalars to.
        wandb: log to the active Weights & Biases run (``None``: when one is active).
        on_alert: ``"warn"`` (once per alert and module), ``"raise"`` or ``"ignore"``.
        thresholds: when alerts fire.
        start: the number of optimizer steps already done (a resumed run goes on counting).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int = 50,
        log_dir: str | os.PathLike[str] | None = None,
        probes: Iterable[str] | None = None,
        layers: Sequence[nn.Module | str] | None = None,
        writer: Any = None,
        wandb: bool | None = None,
        on_alert: Literal["warn", "raise", "ignore"] = "warn",
        thresholds: MonitorThresholds | None = None,
        start: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"NormMonitor: model must be an nn.Module, got {type(model).__name__}")
        check_every(every, "NormMonitor")
        chosen = tuple(PROBES if probes is None else probes)
        unknown = [p for p in chosen if p not in PROBES]
        if unknown:
            raise ValueError(f"NormMonitor: unknown probe(s) {unknown}; the probes are {list(PROBES)}")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"NormMonitor: start must be an int >= 0, got {start!r}")
        if on_alert not in ("warn", "raise", "ignore"):
            raise ValueError(f"NormMonitor: on_alert must be 'warn', 'raise' or 'ignore', got {on_alert!r}")
        if model in _ATTACHED:
            raise ValueError(
                f"NormMonitor: a monitor is already attached to this {type(model).__name__}; "
                "close() it first (or use the one you have)"
            )
        self.model, self.every, self.probes = model, every, chosen
        self.on_alert, self.thresholds = on_alert, thresholds or MonitorThresholds()
        self.writer, self._wandb = writer, wandb
        self.blocks = [_Block(n, m) for n, m in self._find_layers(model, layers)]
        self.dyt = [(n, m) for n, m in model.named_modules() if is_dyt(m)] if "alpha" in chosen else []
        with_stats = [(n, m) for n, m in model.named_modules() if _running_stats(m)]
        self.bns = with_stats if "bn_stats" in chosen else []
        self.records: list[dict[str, Any]] = []
        self.steps = start  # optimizer steps so far: start + calls of step()
        self._armed = start % every == 0  # steps 0, every, 2 every, ... are measured
        self._alpha: dict[str, dict[str, float]] = {}
        self._bn: dict[str, dict[str, float]] = {}
        self._nonfinite: str | None = None
        self._grad_sq: dict[int, float] = {}
        self._warned: set[tuple[str, str]] = set()
        self._handles: list[Any] = []
        self._t0 = time.perf_counter()
        self.log_path: Path | None = None
        self._log: Any = None
        if log_dir is not None:
            folder = Path(log_dir)
            folder.mkdir(parents=True, exist_ok=True)
            self.log_path = folder / LOG_FILE
            self._log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._attach()
        _ATTACHED[model] = self

    # ---- attaching ----------------------------------------------------------------------------

    @staticmethod
    def _find_layers(
        model: nn.Module, layers: Sequence[nn.Module | str] | None
    ) -> list[tuple[str, nn.Module]]:
        if layers is not None:
            names = {id(m): n for n, m in model.named_modules()}
            found = []
            for item in layers:
                if isinstance(item, str):
                    try:
                        found.append((item, model.get_submodule(item)))
                    except AttributeError as err:
                        owner = type(model).__name__
                        raise ValueError(f"NormMonitor: layers: {owner} has no module {item!r}") from err
                elif isinstance(item, nn.Module) and id(item) in names:
                    found.append((names[id(item)], item))
                else:
                    owner = type(model).__name__
                    raise ValueError(f"NormMonitor: layers: {item!r} is not a module of this {owner}")
            if not found:
                raise ValueError("NormMonitor: layers is empty")
            return found
        try:  # as normlab.diagnose: the residual blocks, else the conv and linear layers
            return default_layers(model)
        except ValueError:
            raise ValueError(
                f"NormMonitor: no residual blocks, conv/linear layers or parametrized modules found in "
                f"{type(model).__name__}; pass layers=[...] (modules or qualified names) to watch"
            ) from None

    def _attach(self) -> None:
        watch_blocks = any(p in self.probes for p in ("residual", "angular", "nonfinite"))
        for block in self.blocks if watch_blocks else []:
            hook = self._block_hook(block)
            self._handles.append(block.module.register_forward_hook(hook, with_kwargs=True))
        for name, module in self.dyt:
            self._handles.append(module.register_forward_hook(self._dyt_hook(name), with_kwargs=True))
        for name, module in self.bns:
            self._handles.append(module.register_forward_pre_hook(self._bn_hook(name), with_kwargs=True))
        self._grad_params: list[Tensor] = []
        if "grad_norm" in self.probes:
            seen: set[int] = set()
            for block in self.blocks:
                for p in block.module.parameters():
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        self._grad_params.append(p)
        self._grad_handles: list[Any] = []
        if self._armed:
            self._arm_grads()

    def _arm_grads(self) -> None:
        """Gradient hooks only for the measured steps: the others pay no Python call per parameter."""
        for p in self._grad_params:
            register: Any = p.register_post_accumulate_grad_hook  # untyped in torch
            self._grad_handles.append(register(self._grad_hook))

    def _disarm_grads(self) -> None:
        for handle in self._grad_handles:
            handle.remove()
        self._grad_handles.clear()

    def _block_hook(self, block: _Block) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if not self._armed or not module.training:  # an evaluation between steps is not one
                return
            y = first_tensor(output)
            x = first_tensor(args)
            if x is None:
                x = first_tensor(kwargs)
            if y is None or not y.is_floating_point():
                return
            with torch.no_grad():
                watch = "nonfinite" in self.probes and self._nonfinite is None
                if watch and not bool(torch.isfinite(y).all()):
                    self._nonfinite = block.name
                block.calls += 1
                block.var_out += _mean_var(y)
                if x is not None and x.shape == y.shape and x.is_floating_point():
                    block.var_in += _mean_var(x)
                    if "angular" in self.probes and y.dim() >= 2:
                        block.angular += float(angular_distance(_token_rows(x), _token_rows(y)).mean())

        return hook

    def _dyt_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            x = first_tensor(args)
            if not self._armed or not module.training or x is None:
                return
            with torch.no_grad():
                alpha_param: Tensor = module.alpha  # type: ignore[assignment]
                alpha = float(alpha_param.detach().float().reshape(-1)[0])
                std = float(x.detach().float().std()) if x.numel() > 1 else 0.0
                flat = x.detach().reshape(-1)
                if flat.numel() > MAX_ELEMENTS:
                    flat = flat[:: math.ceil(flat.numel() / MAX_ELEMENTS)]
                z = alpha * flat.float()
                shift = getattr(module, "shift", None)
                if isinstance(shift, Tensor):
                    z = z + shift.detach().float().reshape(-1)[0]
                limit = ERF_99 if "erf" in type(module).__name__.lower() else TANH_99
                self._alpha[name] = {
                    "alpha": alpha,
                    "input_std": std,
                    "margin": abs(alpha) * std,
                    "saturated": float((z.abs() > limit).float().mean()),
                }

        return hook

    def _bn_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = first_tensor(args)
            mean_r = getattr(module, "running_mean", None)
            var_r = getattr(module, "running_var", None)
            if not self._armed or not module.training or x is None or mean_r is None or var_r is None:
                return
            dim = int(getattr(module, "channel_dim", 1)) % x.dim()
            if x.shape[dim] != mean_r.numel():
                return
            with torch.no_grad():
                reduce = [d for d in range(x.dim()) if d != dim]
                xf = x.detach().float()
                mean_b = xf.mean(dim=reduce)
                var_b = xf.var(dim=reduce, unbiased=False)
                eps = float(getattr(module, "eps", 1e-5))
                scale = (var_r.float() + eps).sqrt()
                self._bn[name] = {
                    "mean_gap": float(((mean_b - mean_r.float()).abs() / scale).mean()),
                    "var_ratio": float((var_b / (var_r.float() + eps)).mean()),
                }

        return hook

    def _grad_hook(self, p: Tensor) -> None:
        # A sharded (DTensor) gradient is summed at step(), where every process takes part; here,
        # inside the backward, a collective could interleave with FSDP's own.
        if self._armed and p.grad is not None and not hasattr(p.grad, "full_tensor"):
            self._grad_sq[id(p)] = _square_sum(p.grad)

    # ---- measuring ----------------------------------------------------------------------------

    def step(self, batch: Any = None) -> dict[str, Any] | None:
        """Call once per optimizer step, after it; returns the record when this step was measured.

        ``batch`` is accepted for loops that pass it and unused: every probe reads the forward
        and backward the loop already ran.
        """
        if self.model not in _ATTACHED or _ATTACHED[self.model] is not self:
            raise RuntimeError("NormMonitor: step() after close()")
        record = self._collect() if self._armed else None
        self._disarm_grads()
        self.steps += 1
        self._armed = self.steps % self.every == 0
        if self._armed:
            self._arm_grads()
        if record is not None:
            self._emit(record)
        return record

    def _collect(self) -> dict[str, Any]:
        record: dict[str, Any] = {"step": self.steps, "time_s": round(time.perf_counter() - self._t0, 3)}
        record["blocks"] = [b.name for b in self.blocks]
        measured = [b for b in self.blocks if b.calls]
        if measured and ("residual" in self.probes or "angular" in self.probes):
            if "residual" in self.probes:
                record["residual_var"] = [b.var_out / b.calls if b.calls else None for b in self.blocks]
                record["var_growth"] = [
                    (b.var_out / b.var_in) if b.calls and b.var_in > 0 else None for b in self.blocks
                ]
            if "angular" in self.probes:
                record["angular"] = [b.angular / b.calls if b.calls else None for b in self.blocks]
        if "grad_norm" in self.probes:
            norms: list[float | None] = []
            for b in self.blocks:
                total, found = 0.0, False
                for p in b.module.parameters():
                    if p.grad is not None:  # the final (synchronised) gradient when still there
                        total += _square_sum(p.grad)
                        found = True
                    elif id(p) in self._grad_sq:
                        total += self._grad_sq[id(p)]
                        found = True
                norms.append(math.sqrt(total) if found else None)
            record["grad_norm"] = norms
        if self._alpha:
            record["alpha"] = dict(self._alpha)
        if self._bn:
            record["bn_stats"] = dict(self._bn)
        if "nonfinite" in self.probes:
            record["nonfinite"] = self._nonfinite
        record["alerts"] = self._alerts(record)
        for b in self.blocks:
            b.calls, b.var_in, b.var_out, b.angular = 0, 0.0, 0.0, 0.0
        self._alpha, self._bn, self._nonfinite, self._grad_sq = {}, {}, None, {}
        return record

    def _alerts(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        th = self.thresholds
        alerts: list[dict[str, Any]] = []

        def alert(code: str, module: str, message: str) -> None:
            alerts.append({"code": code, "module": module, "message": message})

        if record.get("nonfinite"):
            name = record["nonfinite"]
            alert("nonfinite", name, f"non-finite activations: {name} is the first module whose output "
                  f"holds NaN or inf at step {record['step']}")  # fmt: skip
        for name, s in record.get("alpha", {}).items():
            if s["margin"] >= th.dyt_saturation:
                alert("dyt_saturation", name, f"DyT {name} saturates: alpha {_fmt(s['alpha'])} x "
                      f"std(input) {_fmt(s['input_std'])} = {_fmt(s['margin'])} >= {th.dyt_saturation}; "
                      f"{s['saturated']:.0%} of its inputs are past 99% of its range")  # fmt: skip
        var = [v for v in record.get("residual_var") or [] if v is not None]
        if len(var) >= 2 and var[0] > 0 and var[-1] / var[0] >= th.residual_growth:
            alert("residual_growth", record["blocks"][-1], f"residual variance grows "
                  f"{_fmt(var[-1] / var[0])}x from the first block ({_fmt(var[0])}) to the last "
                  f"({_fmt(var[-1])}) >= {th.residual_growth}x: the Curse of Depth signature "
                  "(LayerNorm Scaling, arXiv:2502.05795)")  # fmt: skip
        angular = [a if a is not None else math.nan for a in record.get("angular") or []]
        run = dead_deep_blocks(angular, th)
        if len(run) >= th.dead_run:
            names = [record["blocks"][i] for i in run]
            alert("dead_blocks", names[0], f"{len(run)} deep blocks barely change their input "
                  f"(angular distance < {th.dead_angular}): {', '.join(names)}")  # fmt: skip
        return alerts

    def _emit(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self._log is not None:
            self._log.write(json.dumps(record, allow_nan=True) + "\n")
            self._log.flush()
        scalars = self.scalars(record)
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, record["step"])
        run = _wandb_run(self._wandb)
        if run is not None:
            run.log(scalars)
        raised = [a for a in record["alerts"] if (a["code"], a["module"]) not in self._warned]
        for alert in raised:
            self._warned.add((alert["code"], alert["module"]))
        if raised and self.on_alert == "raise":
            raise NormAlertError(f"NormMonitor: {raised[0]['message']}", record)
        if self.on_alert == "warn":
            for alert in raised:
                warnings.warn(f"NormMonitor: {alert['message']}", NormMonitorWarning, stacklevel=3)

    @staticmethod
    def scalars(record: dict[str, Any]) -> dict[str, float]:
        """The record as flat ``normlab/<signal>/<module>`` scalars (TensorBoard, W&B, HF logs)."""
        out: dict[str, float] = {}
        for key in ("residual_var", "var_growth", "angular", "grad_norm"):
            for name, value in zip(record["blocks"], record.get(key) or [], strict=False):
                if value is not None:
                    out[f"normlab/{key}/{name}"] = float(value)
        for name, stats in record.get("alpha", {}).items():
            for key, value in stats.items():
                out[f"normlab/dyt_{key}/{name}"] = float(value)
        for name, stats in record.get("bn_stats", {}).items():
            for key, value in stats.items():
                out[f"normlab/bn_{key}/{name}"] = float(value)
        out["normlab/alerts"] = float(len(record.get("alerts", [])))
        return out

    # ---- detaching ----------------------------------------------------------------------------

    def close(self) -> None:
        """Remove every hook and close the log; the model is as it was before the monitor."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._disarm_grads()
        if self._log is not None:
            self._log.close()
            self._log = None
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]

    def __enter__(self) -> NormMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"NormMonitor({type(self.model).__name__}, every={self.every}, blocks={len(self.blocks)}, "
            f"probes={list(self.probes)}, log={str(self.log_path) if self.log_path else None})"
        )


def dead_deep_blocks(angular: Sequence[float], th: MonitorThresholds) -> list[int]:
    """The blocks of the deeper half whose angular distance (input to output; NaN: unmeasured)
    is below both ``th.dead_angular`` and ``th.dead_ratio`` times the shallower half's mean: both
    small and far below the shallow blocks', since at init every block changes its input little."""
    half = len(angular) // 2
    shallow = [a for a in angular[:half] if math.isfinite(a)]
    bar = min(th.dead_angular, th.dead_ratio * (sum(shallow) / len(shallow))) if shallow else 0.0
    return [i for i in range(half, len(angular)) if angular[i] < bar]


def check_every(every: object, owner: str) -> None:
    """Refuse an ``every`` that is not a positive int (a bool neither)."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"{owner}: every must be an int >= 1, got {every!r}")


def _square_sum(grad: Tensor) -> float:
    """``sum(grad ** 2)``; of a sharded (FSDP, DTensor) gradient, over every shard (a collective:
    every process calls :meth:`NormMonitor.step`, as the Trainer's do)."""
    total = grad.detach().float().square().sum()
    full = getattr(total, "full_tensor", None)
    return float(full() if callable(full) else total)


def trim_log(path: str | os.PathLike[str], before_step: int) -> None:
    """Keep the records of ``path`` measured before ``before_step`` (a resumed run rewrites the
    rest); ``before_step=0`` empties it."""
    log = Path(path)
    if not log.exists():
        return
    kept = [r for r in _read_or_empty(log) if int(r.get("step", 0)) < before_step]
    from normlab._atomic import atomic_write_text

    atomic_write_text(log, "".join(json.dumps(r, allow_nan=True) + "\n" for r in kept))


def _read_or_empty(path: Path) -> list[dict[str, Any]]:
    try:
        return read_log(path)
    except ValueError:
        return []


def _running_stats(module: nn.Module) -> bool:
    spec = getattr(type(module), "spec", None)
    return isinstance(module, nn.modules.batchnorm._NormBase) or bool(getattr(spec, "running_stats", False))


def _wandb_run(wanted: bool | None) -> Any:
    """The active W&B run: only where ``wandb`` is imported already (or ``wanted=True``)."""
    if wanted is False:
        return None
    module = sys.modules.get("wandb")
    if module is None and wanted:
        import importlib

        try:
            module = importlib.import_module("wandb")
        except ImportError as err:
            raise ValueError("NormMonitor: wandb=True, but wandb is not installed") from err
    return getattr(module, "run", None) if module is not None else None


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a ``monitor.jsonl`` (a truncated last line, from a crash, is skipped)."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    if not records:
        raise ValueError(f"read_log: {str(path)!r} holds no monitor records")
    return records
