"""A :class:`~normlab.monitor.NormMonitor` as a Hugging Face ``transformers.TrainerCallback``.

    trainer = Trainer(model=model, args=args, train_dataset=train)
    trainer.add_callback(NormMonitorCallback(every=50, log_dir="runs/monitor"))
    trainer.train()

The monitor attaches to the Trainer's model when training begins and measures every ``every``-th
optimizer step from the Trainer's own forward and backward. A measured step asks the Trainer to
log, and its scalars (``normlab/residual_var/<block>``, ``normlab/grad_norm/<block>``,
``normlab/dyt_margin/<layer>``, ...) join that log, so the reporters of ``report_to``
(TensorBoard, Weights & Biases, ...) receive them. The full records go to
``log_dir/monitor.jsonl`` on the main process (``normlab report-monitor`` plots them).
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any

from transformers import TrainerCallback

from normlab.monitor import NormMonitor
from normlab.monitor.monitor import check_every

__all__ = ["NormMonitorCallback"]


class NormMonitorCallback(TrainerCallback):
    """Measure normalization during ``Trainer.train()``; ``monitor_kwargs`` go to :class:`NormMonitor`
    (``probes``, ``layers``, ``on_alert``, ``thresholds``)."""

    def __init__(
        self, every: int = 50, log_dir: str | os.PathLike[str] | None = None, **monitor_kwargs: Any
    ) -> None:
        check_every(every, "NormMonitorCallback")
        self.every, self.log_dir, self.monitor_kwargs = every, log_dir, monitor_kwargs
        self.monitor: NormMonitor | None = None
        self._pending: dict[str, float] = {}
        self._placed = False

    def _go_first(self) -> None:
        """Run before the reporters, so that the scalars this callback adds to a log reach them.

        Callbacks run in the order of the Trainer's ``CallbackHandler``, where ``add_callback`` and
        ``Trainer(callbacks=...)`` put them after the reporters; the handler is not passed to
        callbacks, so it is read from the calling frame (its ``call_event``). Moving this callback
        to the front while the handler iterates its list neither skips nor repeats one.
        """
        if self._placed:
            return
        self._placed = True
        frame = inspect.currentframe()
        caller = frame.f_back.f_back if frame is not None and frame.f_back is not None else None
        handler = caller.f_locals.get("self") if caller is not None else None
        callbacks = getattr(handler, "callbacks", None)
        if isinstance(callbacks, list) and any(c is self for c in callbacks):
            callbacks.remove(self)
            callbacks.insert(0, self)
        else:
            warnings.warn(
                "NormMonitorCallback: cannot find the Trainer's callback handler; the reporters before "
                "this callback will not see its scalars (monitor.jsonl has them all)",
                stacklevel=3,
            )

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._go_first()

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._go_first()
        if model is None:
            raise ValueError("NormMonitorCallback: the Trainer passed no model to on_train_begin")
        if self.monitor is not None:
            self.monitor.close()
        main = bool(getattr(state, "is_world_process_zero", True))
        log_dir = self.log_dir if main else None
        start = int(getattr(state, "global_step", 0))  # a resumed run goes on counting
        kwargs = {"log_dir": log_dir, "start": start, **self.monitor_kwargs}
        self.monitor = NormMonitor(model, every=self.every, **kwargs)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.monitor is None:
            return control
        record = self.monitor.step()
        if record is not None:
            self._pending = NormMonitor.scalars(record)
            control.should_log = True
        return control

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if self._pending and logs is not None:
            logs.update(self._pending)
            self._pending = {}

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
