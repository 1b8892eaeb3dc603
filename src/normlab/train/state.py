"""Training state for bit-exact resume: model, optimizer, step, schedule and every RNG.

The checkpoint is one ``torch.save`` file written to a temporary file in the same folder,
flushed, fsynced and renamed over the target, so the previous checkpoint survives a kill at
any instant. It loads with ``weights_only=True``: the numpy RNG state is stored as a tensor.
The data position is the step itself (batches are a function of ``(seed, step)``).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from normlab._atomic import atomic_torch_save

FORMAT = "normlab-train-state/1"


def rng_state() -> dict[str, Any]:
    """The states of Python's ``random``, numpy's global RNG and torch's CPU generator."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    py_version, py_state, py_gauss = random.getstate()
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    version, py_state, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in py_state), gauss))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            int(npst["pos"]),
            int(npst["has_gauss"]),
            float(npst["cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch"])


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def clean_stale_temps(folder: str | os.PathLike[str]) -> int:
    """Remove ``.*.tmp`` files left by a process killed while writing; returns the count."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = list(folder.glob(".*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def save_state(
    path: str | os.PathLike[str],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    config_hash: str,
    extra: dict[str, Any] | None = None,
    rank_rng: list[dict[str, Any]] | None = None,
) -> Path:
    """Write everything a resumed run needs to continue bit-for-bit after ``step`` steps.

    ``rank_rng``: in a data-parallel run, the RNG states of every rank (rank order), gathered
    by rank 0; ``rng`` is then rank 0's, so the checkpoint also resumes single-process.
    """
    fields = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    return save_meta(path, step=step, config_hash=config_hash, extra=extra, rank_rng=rank_rng, fields=fields)


def save_meta(
    path: str | os.PathLike[str],
    *,
    step: int,
    config_hash: str,
    extra: dict[str, Any] | None = None,
    rank_rng: list[dict[str, Any]] | None = None,
    fields: dict[str, Any] | None = None,
) -> Path:
    """The checkpoint file of :func:`save_state` with ``fields`` for the model and optimizer
    (their state dicts, or where a sharded checkpoint keeps them)."""
    payload = {
        "format": FORMAT,
        "step": step,
        "config_hash": config_hash,
        **(fields or {}),
        "rng": rng_state(),
        "extra": dict(extra or {}),
    }
    if rank_rng is not None:
        payload["rank_rng"] = list(rank_rng)
    return atomic_torch_save(payload, path)


def load_state(path: str | os.PathLike[str], *, config_hash: str) -> dict[str, Any]:
    """Read a checkpoint of :func:`save_state`, refusing one made for another configuration."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"load_state: {str(path)!r} is not a readable checkpoint: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"load_state: {str(path)!r} is not a normlab training checkpoint")
    if payload["config_hash"] != config_hash:
        raise ValueError(
            f"load_state: {str(path)!r} was written for config {payload['config_hash'][:12]}, "
            f"not {config_hash[:12]}; the run's configuration changed, so it cannot resume"
        )
    return dict(payload)
