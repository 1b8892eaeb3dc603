"""Saving and loading normlab GPT checkpoints: the config travels with the weights.

A checkpoint is one ``torch.save`` file holding ``{"format", "config", "state_dict",
"extra"}``. It is written to a temporary file in the same directory, flushed to disk and
then renamed over the target, so a crash mid-write never leaves a truncated checkpoint
nor destroys the previous one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from normlab._atomic import atomic_torch_save
from normlab.models.gpt import GPT, GPTConfig

FORMAT = "normlab-gpt/1"


# Deprecated fields and the values every checkpoint written before 0.2 holds for them (the
# defaults of then): such a value means "not set" and is dropped on load.
_LEGACY_DEFAULTS = {"b2t_rescale": False, "mixln_alpha": 0.25, "layernorm_scaling": False}


def config_to_dict(config: GPTConfig) -> dict[str, Any]:
    """The config as plain Python values (``norm_kwargs``, ``placement_kwargs`` copied to dicts;
    deprecated fields left out when unset)."""
    d = dataclasses.asdict(config)
    d["norm_kwargs"] = dict(config.norm_kwargs)
    d["placement_kwargs"] = dict(config.placement_kwargs)
    return {k: v for k, v in d.items() if not (k in _LEGACY_DEFAULTS and v is None)}


def config_from_dict(d: Mapping[str, Any]) -> GPTConfig:
    """Inverse of :func:`config_to_dict`; unknown keys are an error naming them. A checkpoint
    written before ``placement_kwargs`` existed loads as the same model."""
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"GPT config: unknown keys {unknown}; known: {sorted(known)}")
    d = {k: v for k, v in d.items() if not (k in _LEGACY_DEFAULTS and v == _LEGACY_DEFAULTS[k])}
    return GPTConfig(**d)


def save_checkpoint(
    model: GPT, path: str | os.PathLike[str], *, extra: Mapping[str, Any] | None = None
) -> Path:
    """Write ``model`` (config and weights) and ``extra`` (JSON-like metadata) atomically."""
    payload = {
        "format": FORMAT,
        "config": config_to_dict(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": dict(extra or {}),
    }
    return atomic_torch_save(payload, path)


def read_payload(
    path: str | os.PathLike[str], fmt: str, *, owner: str, what: str, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """The ``torch.save`` dict at ``path`` (``weights_only``), refusing a missing file or another
    ``format``; ``owner`` and ``what`` name the caller and the expected kind in the error."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{owner}: no file at {str(path)!r}")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{owner}: {str(path)!r} is not {what} (format {found!r})")
    return payload


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> tuple[GPT, dict[str, Any]]:
    """Rebuild the GPT of a checkpoint written by :func:`save_checkpoint`; returns ``(model, extra)``."""
    payload = read_payload(
        path, FORMAT, owner="load_checkpoint", what="a normlab GPT checkpoint", map_location=map_location
    )
    # built for real, not on the meta device: non-persistent buffers get their init values
    model = GPT(config_from_dict(payload["config"]), device=map_location)
    model.load_state_dict(payload["state_dict"])
    return model, dict(payload["extra"])
