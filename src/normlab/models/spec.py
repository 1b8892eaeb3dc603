"""Turn a model spec string from the command line into a model (random weights, no download).

Specs:

* ``gpt:n_layer=12,placement=pre,norm=rmsnorm``: a normlab :class:`~normlab.models.GPT`;
  unspecified fields keep their defaults (``vocab_size=256``, ``block_size=128`` here).
* a path to a checkpoint written by :func:`normlab.models.save_checkpoint`.
* ``hf:gpt2``, ``hf:llama:num_hidden_layers=4,hidden_size=64``: a Hugging Face model built from
  the library's default config of that ``model_type`` (plus overrides), with random weights;
  ``config_json`` instead reads a ``config.json`` written by ``save_pretrained``.

Values are parsed as Python literals where they are one (``12``, ``0.1``, ``True``, ``None``),
else kept as strings. Hugging Face models come from :mod:`normlab.models.hf` (``transformers`` is optional).
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path
from typing import Any

from torch import nn

from normlab.models.checkpoint import load_checkpoint
from normlab.models.gpt import GPT, GPTConfig
from normlab.models.hf import hf_config, hf_model

GPT_DEFAULTS: dict[str, Any] = {"vocab_size": 256, "block_size": 128}


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, so ``depths=[1,1],x=2`` is two items."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def parse_overrides(text: str, *, where: str) -> dict[str, Any]:
    """``"a=1,b=x"`` -> ``{"a": 1, "b": "x"}``."""
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in _split_top_level(text))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{where}: expected key=value, got {item!r}")
        try:
            value: Any = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        out[key.strip()] = value
    return out


def gpt_from_spec(text: str) -> GPT:
    """A normlab GPT from ``"n_layer=12,placement=pre"`` (the part after ``gpt:``)."""
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    kwargs = {**GPT_DEFAULTS, **parse_overrides(text, where="gpt spec")}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"gpt spec: unknown fields {unknown}; known: {sorted(fields)}")
    return GPT(GPTConfig(**kwargs))


def hf_from_spec(text: str = "", *, config_json: str | Path | None = None) -> nn.Module:
    """A Hugging Face model with random weights from a ``model_type`` (and overrides) or a config.json."""
    if config_json is not None:
        data = json.loads(Path(config_json).read_text())
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"{config_json}: config.json has no 'model_type'")
        return hf_model(hf_config(model_type, data))
    model_type, _, rest = text.partition(":")
    if not model_type:
        raise ValueError("hf spec: expected hf:MODEL_TYPE[:key=value,...], e.g. hf:gpt2 or hf:llama")
    return hf_model(hf_config(model_type, parse_overrides(rest, where="hf spec")))


def model_from_spec(spec: str, *, config_json: str | Path | None = None) -> nn.Module:
    """Build the model a command-line spec names (see the module docstring)."""
    if config_json is not None:
        return hf_from_spec(config_json=config_json)
    kind, sep, rest = spec.partition(":")
    if sep and kind == "gpt":
        return gpt_from_spec(rest)
    if sep and kind == "hf":
        return hf_from_spec(rest)
    if Path(spec).is_file():
        return load_checkpoint(spec)[0]
    raise ValueError(
        f"model spec {spec!r}: expected gpt:key=value,..., hf:MODEL_TYPE[:key=value,...] "
        "or the path of a normlab checkpoint"
    )
