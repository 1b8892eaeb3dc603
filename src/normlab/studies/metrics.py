"""Run metrics that several studies compute from a run's records: ``fn(records, summary) -> float | None``.

Each study names the ones it uses in ``Study.metrics``; a metric shared by two studies lives here,
so that no study imports another.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

SPIKE_THRESHOLD = 0.3


def resid_var_growth(records: list[dict[str, Any]], summary: Mapping[str, Any]) -> float | None:
    """``log(var(x_L) / var(x_1))``: growth of the residual-stream variance from the output of
    the first block to the output of the last, at the end of training (Sun et al. 2025)."""
    var = summary.get("probe", {}).get("resid_var")
    if not var or len(var) < 3 or not var[1] or not var[-1] or var[1] <= 0 or var[-1] <= 0:
        return None
    return math.log(var[-1] / var[1])


def loss_spikes(records: list[dict[str, Any]], summary: Mapping[str, Any]) -> float | None:
    """The number of loss spikes of a run: logged training losses ``loss_k`` with ``loss_k >
    min(loss_0 .. loss_{k-1}) + 0.3`` nats (:data:`SPIKE_THRESHOLD`), counted once per episode
    (a spike starts at a record above the line whose previous record was not).

    The running minimum makes the early descent and a plateau no spike; 0.3 nats is several
    times the step-to-step noise of the training loss on 512 characters a step. A diverged
    run's non-finite loss is not a logged record (see ``diverged``). ``None`` without records.
    """
    del summary
    losses = [
        float(r["loss"])
        for r in records
        if r.get("kind") == "train" and isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])
    ]
    if not losses:
        return None
    return float(count_spikes(losses, threshold=SPIKE_THRESHOLD))


def count_spikes(losses: Sequence[float], *, threshold: float) -> int:
    """Episodes where a loss exceeds the running minimum of the earlier losses by > ``threshold``."""
    if not threshold > 0:
        raise ValueError(f"count_spikes: threshold must be > 0, got {threshold!r}")
    count, running_min, inside = 0, math.inf, False
    for loss in losses:
        above = loss > running_min + threshold
        if above and not inside:
            count += 1
        inside = above
        running_min = min(running_min, loss)
    return count
