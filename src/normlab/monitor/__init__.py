"""Watch normalization during your own training: :class:`NormMonitor` for any loop, the Hugging
Face and Lightning callbacks in :mod:`normlab.integrations`, ``normlab report-monitor`` for plots.

    monitor = normlab.monitor.NormMonitor(model, every=50, log_dir="runs/monitor")
    for batch in loader:
        loss = model(batch).loss
        loss.backward()
        optimizer.step()
        monitor.step()          # measures steps 0, 50, 100, ... from this very forward/backward
        optimizer.zero_grad()
    monitor.close()
"""

from normlab.monitor.monitor import (
    LOG_FILE,
    PROBES,
    MonitorThresholds,
    NormAlertError,
    NormMonitor,
    NormMonitorWarning,
    read_log,
    trim_log,
)

__all__ = [
    "LOG_FILE",
    "PROBES",
    "MonitorThresholds",
    "NormAlertError",
    "NormMonitor",
    "NormMonitorWarning",
    "read_log",
    "trim_log",
]
