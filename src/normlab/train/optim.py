"""The optimization of a run: the optimizer and its parameter groups, determinism, gradient norms."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from normlab.train.config import TrainConfig

__all__ = ["deterministic", "grad_norm", "make_optimizer"]


def _named_by(name: str, key: str) -> bool:
    """Whether ``key`` of ``TrainConfig.lr_mult`` names the parameter ``name``."""
    return name == key or name.endswith("." + key)


def _lr_mult(name: str, lr_mult: dict[str, float]) -> float:
    hits = [m for key, m in lr_mult.items() if _named_by(name, key)]
    if len(set(hits)) > 1:
        raise ValueError(
            f"TrainConfig.lr_mult: parameter {name!r} matches keys with different multipliers {lr_mult}"
        )
    return hits[0] if hits else 1.0


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD; weight decay on ``dim >= 2`` parameters only; ``cfg.lr_mult``'s
    parameters in groups of their own (the Trainer sets each group's lr to ``lr * lr_mult``)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lr_mult = cfg.lr_mult or {}
    unused = sorted(k for k in lr_mult if not any(_named_by(n, k) for n, _ in named))
    if unused:
        raise ValueError(
            f"TrainConfig.lr_mult: {unused} name no trainable parameter of {type(model).__name__} "
            f"(names end like {sorted({n.rsplit('.', 1)[-1] for n, _ in named})})"
        )
    buckets: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in named:
        buckets.setdefault((p.dim() >= 2, _lr_mult(name, lr_mult)), []).append(p)
    groups: list[dict[str, object]] = [
        {"params": buckets.get((True, 1.0), []), "weight_decay": cfg.weight_decay},
        {"params": buckets.get((False, 1.0), []), "weight_decay": 0.0},
    ]
    for (decays, mult), params in sorted(buckets.items(), key=lambda kv: (kv[0][1], not kv[0][0])):
        if mult != 1.0:
            groups.append(
                {"params": params, "weight_decay": cfg.weight_decay if decays else 0.0, "lr_mult": mult}
            )
    # foreach=False: one code path on every machine, so resumed and uninterrupted runs match
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, foreach=False)


@contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def grad_norm(params: Sequence[Tensor]) -> float:
    norms = [p.grad.detach().norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
