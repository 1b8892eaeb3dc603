"""The cost of a :class:`~normlab.monitor.NormMonitor`: GPT training steps with and without it.

Rounds of ``every`` steps (so that each monitored round holds exactly one measurement) alternate
between the plain model and the monitored one, and the median round times are compared: the
overhead is the monitored median over the plain one, minus one, as a share of a training step.
The unmeasured steps still pay the hooks' early returns; the measured one pays the statistics.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from normlab.models import GPT, GPTConfig
from normlab.monitor import NormMonitor

__all__ = ["monitor_overhead"]


def monitor_overhead(
    *,
    every: int = 50,
    rounds: int = 5,
    n_layer: int = 6,
    n_embd: int = 256,
    block_size: int = 128,
    batch: int = 8,
    norm: str = "dyt",
) -> dict[str, Any]:
    """Median seconds per round of ``every`` steps, plain and monitored, and the overhead."""
    if every < 1 or rounds < 1:
        raise ValueError(f"monitor_overhead: every and rounds must be >= 1, got {every}, {rounds}")
    torch.manual_seed(0)
    vocab = 256
    cfg = GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=n_layer, n_head=max(1, n_embd // 64),
                    n_embd=n_embd, norm=norm)  # fmt: skip
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, vocab, (batch, block_size), generator=g)
    tgt = torch.randint(0, vocab, (batch, block_size), generator=g)

    def round_of(monitor: NormMonitor | None) -> float:
        start = time.perf_counter()
        for _ in range(every):
            out = model(idx, tgt)
            assert out.loss is not None
            out.loss.backward()
            opt.step()
            if monitor is not None:
                monitor.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    round_of(None)  # warm-up: allocator, kernels, caches
    plain, watched = [], []
    for _ in range(rounds):
        plain.append(round_of(None))
        with NormMonitor(model, every=every, on_alert="ignore") as monitor:
            watched.append(round_of(monitor))
            assert len(monitor.records) == 1
    p, w = statistics.median(plain), statistics.median(watched)
    return {
        "every": every,
        "rounds": rounds,
        "model": f"GPT n_layer={n_layer} n_embd={n_embd} block_size={block_size} batch={batch} norm={norm}",
        "threads": torch.get_num_threads(),
        "step_ms_plain": 1000 * p / every,
        "step_ms_monitored": 1000 * w / every,
        "overhead": w / p - 1,
    }
