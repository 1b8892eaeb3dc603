"""Learning-rate schedules as pure functions of the step, so resuming needs only the step.

- ``"constant"``: linear warm-up then ``1``.
- ``"cosine"``: linear warm-up then a cosine from ``1`` to ``min_ratio`` at the last step
  (Loshchilov & Hutter 2017, arXiv:1608.03983; LNS/Mix-LN decay to ``0.1 lr``).
- ``"linear"``: linear warm-up then a straight line to ``min_ratio``.
- ``"inverse_sqrt"``: linear warm-up then ``sqrt(warmup / t)`` (Vaswani et al. 2017; the
  schedule of Xiong et al. 2020, arXiv:2002.04745).

Warm-up multiplies by ``(t + 1) / warmup`` for ``t < warmup`` (0-based step ``t``), so the first
step already moves; ``warmup=0`` means no warm-up (Xiong et al.'s ``T_warmup = 1``).
"""

from __future__ import annotations

import math
from typing import Literal

ScheduleName = Literal["constant", "cosine", "linear", "inverse_sqrt"]
SCHEDULES: tuple[str, ...] = ("constant", "cosine", "linear", "inverse_sqrt")


def lr_factor(step: int, *, schedule: str, total: int, warmup: int = 0, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at 0-based ``step`` of ``total``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule: schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warmup < 0 or total < 1 or step < 0:
        raise ValueError(
            f"lr schedule: need warmup >= 0, total >= 1, step >= 0; got {warmup}, {total}, {step}"
        )
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "inverse_sqrt":
        return math.sqrt(max(warmup, 1) / (step + 1))
    span = max(total - warmup - 1, 1)
    progress = min((step - warmup) / span, 1.0)
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - min_ratio) * progress
