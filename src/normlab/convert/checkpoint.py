"""Converted checkpoints: a model's source, the conversions applied to it, and its weights.

The file ``normlab convert`` writes is a ``torch.save`` of plain data and tensors
(``weights_only`` loadable): ``{"format": "normlab-converted/1", "source", "steps",
"state_dict", "report"}``. ``source`` says how to rebuild the original model (a normlab GPT
config, or a Hugging Face class and config, built by :mod:`normlab.models.hf`); ``steps`` lists
the conversions applied in order. :func:`load_converted` rebuilds the model, re-applies the
steps and loads the weights; a converted checkpoint can be converted again (the steps accumulate).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from normlab.convert.convert import convert_norms
from normlab.convert.lns import apply_layernorm_scaling
from normlab.models.checkpoint import config_from_dict, config_to_dict, read_payload
from normlab.models.gpt import GPT
from normlab.models.hf import hf_model_of_class

FORMAT = "normlab-converted/1"

__all__ = ["FORMAT", "apply_steps", "build_source", "describe_source", "load_converted"]


def describe_source(model: nn.Module) -> dict[str, Any]:
    """How to rebuild ``model`` unconverted: a normlab GPT config, or a Hugging Face class and config."""
    if isinstance(model, GPT):
        return {"kind": "gpt", "config": config_to_dict(model.config)}
    config = getattr(model, "config", None)
    to_dict: Callable[[], dict[str, Any]] | None = getattr(config, "to_dict", None)
    if to_dict is not None and hasattr(config, "model_type"):
        return {"kind": "hf", "class": type(model).__name__, "config": to_dict()}
    raise ValueError(f"normlab convert: cannot describe a {type(model).__name__} for re-loading")


def build_source(source: dict[str, Any], map_location: str | torch.device = "cpu") -> nn.Module:
    """The unconverted model that :func:`describe_source` described (random weights)."""
    if source.get("kind") == "gpt":
        return GPT(config_from_dict(source["config"]), device=map_location)
    if source.get("kind") == "hf":
        return hf_model_of_class(source["class"], source["config"]).to(map_location)
    raise ValueError(f"unknown source kind {source.get('kind')!r}")


def apply_steps(model: nn.Module, steps: list[dict[str, Any]]) -> list[Any]:
    """Re-apply recorded conversion steps to a freshly built model; returns their reports."""
    reports: list[Any] = []
    for step in steps:
        op = step.get("op")
        if op == "convert_norms":
            reports.append(
                convert_norms(
                    model,
                    step["to"],
                    where=step["where"],
                    copy_affine=step["copy_affine"],
                    strict=step.get("strict", True),
                    **step["norm_kwargs"],
                )
            )
        elif op == "apply_layernorm_scaling":
            reports.append(apply_layernorm_scaling(model))
        else:
            raise ValueError(f"unknown conversion step {op!r}")
    return reports


def load_converted(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint written by ``normlab convert``; returns ``(model, payload)``."""
    payload = read_payload(
        path, FORMAT, owner="load_converted", what="a converted checkpoint", map_location=map_location
    )
    model = build_source(payload["source"], map_location)
    apply_steps(model, payload["steps"])
    model.load_state_dict(payload["state_dict"])
    return model, payload
