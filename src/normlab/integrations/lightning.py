"""A :class:`~normlab.monitor.NormMonitor` as a Lightning ``Callback`` (``lightning.pytorch``, or
``pytorch_lightning`` where that is what is installed).

    trainer = lightning.Trainer(callbacks=[NormMonitorCallback(every=50, log_dir="runs/monitor")])

The monitor attaches to the LightningModule when fitting starts and measures every ``every``-th
optimizer step (``trainer.global_step``) from Lightning's own forward and backward; a measured
step's scalars go through ``LightningModule.log_dict``, so the Trainer's loggers receive them,
and the full records to ``log_dir/monitor.jsonl`` on global rank 0.
"""

from __future__ import annotations

import os
from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:  # the older package name
    from pytorch_lightning import Callback  # type: ignore[assignment]

from normlab.monitor import NormMonitor
from normlab.monitor.monitor import check_every

__all__ = ["NormMonitorCallback"]


class NormMonitorCallback(Callback):
    """Measure normalization during ``Trainer.fit``; ``monitor_kwargs`` go to :class:`NormMonitor`."""

    def __init__(
        self, every: int = 50, log_dir: str | os.PathLike[str] | None = None, **monitor_kwargs: Any
    ) -> None:
        check_every(every, "NormMonitorCallback")
        self.every, self.log_dir, self.monitor_kwargs = every, log_dir, monitor_kwargs
        self.monitor: NormMonitor | None = None
        self._seen_step = 0

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()
        log_dir = self.log_dir if trainer.is_global_zero else None
        self._seen_step = int(trainer.global_step)
        kwargs = {"log_dir": log_dir, "start": self._seen_step, **self.monitor_kwargs}
        self.monitor = NormMonitor(pl_module, every=self.every, **kwargs)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.monitor is None or int(trainer.global_step) == self._seen_step:
            return  # an accumulation micro-batch: no optimizer step yet
        self._seen_step = int(trainer.global_step)
        record = self.monitor.step()
        if record is not None:
            pl_module.log_dict(NormMonitor.scalars(record), on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
