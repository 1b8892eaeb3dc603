"""Models from outside normlab for normlab's training tasks, their norms set by :func:`convert_norms`.

Four entries of :data:`normlab.models.MODELS`, so that a study can train a Hugging Face
architecture or the user's own model from scratch and sweep its norms:

- ``"hf"`` (language models) and ``"hf-image"`` (image classifiers): options ``{"config":
  <the contents of a config.json>, "norm": NAME or None, "norm_kwargs": {...}}``. The model is
  ``AutoModelForCausalLM`` / ``AutoModelForImageClassification`` of that config with random
  weights; the data set its ``vocab_size`` (resp. ``num_labels``, ``num_channels`` and
  ``image_size``).
- ``"factory"`` and ``"factory-image"``: options ``{"target": "package.module:function",
  "path": [folders put on sys.path first], "kwargs": {...}, "norm", "norm_kwargs"}``. The
  function gets ``kwargs`` and, where its signature names them, the data's facts
  (``vocab_size``, ``block_size``; ``in_channels``, ``num_classes``, ``image_size``) and
  ``norm`` / ``norm_kwargs``; a function that does not take ``norm`` gets its norms converted.

Then ``convert_norms(model, norm, **norm_kwargs)`` (strict: a norm it refuses is an error) sets
the norms before training, when ``norm`` is given and not taken by the factory. The built
model is wrapped so the task sees one interface: :class:`TokenLM` (``forward(idx, targets) ->
(logits, loss)``, the next-token cross-entropy computed here) or :class:`Classifier`
(``forward(x) -> logits``). A model may return logits, an output with ``.logits``, or a tuple
whose first item is the logits.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.convert.convert import convert_norms
from normlab.models.hf import POSITION_FIELDS, hf_causal_lm, hf_image_classifier
from normlab.models.zoo import register_model

__all__ = [
    "FACTORY_MODELS",
    "HF_MODELS",
    "Classifier",
    "LMOutput",
    "TokenLM",
    "check_factory",
    "load_target",
    "meta_build",
    "set_norms",
]


# the registered names of the models below, one per kind of task
HF_MODELS = ("hf", "hf-image")
FACTORY_MODELS = ("factory", "factory-image")


class LMOutput(NamedTuple):
    logits: Tensor
    loss: Tensor | None


def _logits(out: Any, where: str) -> Tensor:
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ValueError(f"{where}: the model returned {type(out).__name__}; expected logits, .logits or a tuple")


class TokenLM(nn.Module):
    """A token-ids-to-logits model as a normlab language model.

    ``forward(idx, targets=None) -> LMOutput(logits, loss)`` with ``loss = CE(logits, targets)``
    over every position (``-1`` ignored), the next-token loss of :class:`normlab.models.GPT`;
    ``keyword``: the model is called ``model(**{keyword: idx})`` (``"input_ids"`` for Hugging
    Face models), else ``model(idx)``.
    """

    def __init__(
        self, model: nn.Module, *, vocab_size: int, keyword: str | None = None, name: str = "model"
    ) -> None:
        super().__init__()
        self.model, self.vocab_size, self.keyword, self.name = model, vocab_size, keyword, name

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> LMOutput:
        out = self.model(**{self.keyword: idx}) if self.keyword else self.model(idx)
        logits = _logits(out, self.name)
        if logits.shape[:2] != idx.shape or logits.shape[-1] < self.vocab_size:
            raise ValueError(
                f"{self.name}: logits of shape {tuple(logits.shape)} for token ids of shape "
                f"{tuple(idx.shape)}; expected (batch, time, >= {self.vocab_size})"
            )
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return LMOutput(logits, loss)

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, call={self.keyword or 'positional'}"


class Classifier(nn.Module):
    """An images-to-logits model as a normlab classifier: ``forward(x) -> (B, classes)`` logits."""

    def __init__(self, model: nn.Module, *, keyword: str | None = None, name: str = "model") -> None:
        super().__init__()
        self.model, self.keyword, self.name = model, keyword, name

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(**{self.keyword: x}) if self.keyword else self.model(x)
        logits = _logits(out, self.name)
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"{self.name}: logits of shape {tuple(logits.shape)}; expected (batch, classes)")
        return logits


def set_norms(model: nn.Module, norm: str | None, norm_kwargs: Mapping[str, Any], *, where: str) -> None:
    """``convert_norms(model, norm, **norm_kwargs)``, strict; a model with no norm it would
    replace (nor one that is already ``norm``) is an error, since the sweep would not change it."""
    if norm is None:
        if norm_kwargs:
            raise ValueError(f"{where}: norm_kwargs {dict(norm_kwargs)} given without a norm")
        return
    summary = convert_norms(model, norm, **dict(norm_kwargs))
    already = [s for s in summary.skipped if s.reason.startswith("already")]
    if not len(summary) and not already:
        why = f" ({summary.skipped[0].source}: {summary.skipped[0].reason})" if summary.skipped else ""
        raise ValueError(
            f"{where}: norm={norm!r} changes nothing: convert_norms finds no norm of "
            f"{type(model).__name__} that it replaces by {norm!r}{why}"
        )
    if already and norm_kwargs and not len(summary):
        raise ValueError(
            f"{where}: the model's norms already are {norm!r}; "
            f"norm_kwargs {dict(norm_kwargs)} cannot be applied"
        )


def _hf_options(options: Mapping[str, Any], where: str) -> tuple[dict[str, Any], str | None, dict[str, Any]]:
    unknown = sorted(set(options) - {"config", "norm", "norm_kwargs"})
    if unknown:
        raise ValueError(f"{where}: options are config, norm and norm_kwargs, not {unknown}")
    config = options.get("config")
    if not isinstance(config, Mapping) or "model_type" not in config:
        raise ValueError(f"{where}: config must be the contents of a config.json with a model_type")
    return dict(config), options.get("norm"), dict(options.get("norm_kwargs", {}))


@register_model("hf", task="lm")
def build_hf_lm(options: Mapping[str, Any], *, vocab_size: int, block_size: int) -> nn.Module:
    """A Hugging Face causal LM of ``options["config"]``, random weights, norms set by ``norm``."""
    where = "model hf"
    config, norm, norm_kwargs = _hf_options(options, where)
    config["vocab_size"] = vocab_size
    config["use_cache"] = False
    for name in POSITION_FIELDS:
        if isinstance(config.get(name), int):
            if config[name] < block_size:
                raise ValueError(
                    f"{where}: {name}={config[name]} of the config is shorter than block_size={block_size}"
                )
            break
    model = hf_causal_lm(config, where=where)
    set_norms(model, norm, norm_kwargs, where=where)
    return TokenLM(model, vocab_size=vocab_size, keyword="input_ids", name=f"hf {config['model_type']}")


@register_model("hf-image", task="image")
def build_hf_image(
    options: Mapping[str, Any],
    *,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int] | None = None,
) -> nn.Module:
    """A Hugging Face image classifier of ``options["config"]``, random weights."""
    where = "model hf-image"
    config, norm, norm_kwargs = _hf_options(options, where)
    config["num_labels"] = num_classes
    config["num_channels"] = in_channels
    if image_size is not None and "image_size" in config:
        if image_size[0] != image_size[1]:
            raise ValueError(
                f"{where}: the images are {image_size[0]}x{image_size[1]}; this config takes square images"
            )
        config["image_size"] = image_size[0]
    config.pop("id2label", None)
    config.pop("label2id", None)
    model = hf_image_classifier(config, where=where)
    set_norms(model, norm, norm_kwargs, where=where)
    return Classifier(model, keyword="pixel_values", name=f"hf {config['model_type']}")


def load_target(
    target: str, path: list[str] | tuple[str, ...] = (), *, where: str = "factory"
) -> Callable[..., Any]:
    """The function ``"package.module:function"`` names, importing the module (``path`` first on sys.path)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{where}: target must be 'package.module:function', got {target!r}")
    for folder in reversed(list(path)):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"{where}: cannot import {module_name!r} ({e}); searched {list(path)} then sys.path"
        ) from None
    fn: Any = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"{where}: module {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise ValueError(f"{where}: {target!r} is a {type(fn).__name__}, not a function")
    result: Callable[..., Any] = fn
    return result


def _accepts(fn: Callable[..., Any]) -> tuple[set[str], bool]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


_FACTORY_KEYS = {"target", "path", "kwargs", "norm", "norm_kwargs"}


def check_factory(options: Mapping[str, Any], *, where: str = "model factory") -> Callable[..., Any]:
    """Import the factory and check that it takes every key of ``kwargs``; returns it."""
    unknown = sorted(set(options) - _FACTORY_KEYS)
    if unknown:
        raise ValueError(f"{where}: options are {sorted(_FACTORY_KEYS)}, not {unknown}")
    if not isinstance(options.get("target"), str):
        raise ValueError(f"{where}: target must be 'package.module:function', got {options.get('target')!r}")
    fn = load_target(options["target"], list(options.get("path", [])), where=where)
    names, var_kw = _accepts(fn)
    refused = sorted(k for k in options.get("kwargs", {}) if k not in names and not var_kw)
    if refused:
        raise ValueError(
            f"{where}: {options['target']} takes no argument {refused}; its arguments: {sorted(names)}"
        )
    return fn


def _build_factory(options: Mapping[str, Any], facts: Mapping[str, Any], *, where: str) -> nn.Module:
    fn = check_factory(options, where=where)
    names, var_kw = _accepts(fn)
    kwargs = dict(options.get("kwargs", {}))
    kwargs.update({k: v for k, v in facts.items() if k in names and k not in kwargs})
    norm, norm_kwargs = options.get("norm"), dict(options.get("norm_kwargs", {}))
    takes_norm = "norm" in names
    if takes_norm and norm is not None:
        kwargs["norm"] = norm
        if norm_kwargs:
            if "norm_kwargs" not in names and not var_kw:
                raise ValueError(f"{where}: {options['target']} takes norm but not norm_kwargs")
            kwargs["norm_kwargs"] = norm_kwargs
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{where}: {options['target']} returned {type(model).__name__}, not an nn.Module")
    if not takes_norm:
        set_norms(model, norm, norm_kwargs, where=where)
    return model


@register_model("factory", task="lm", check=check_factory)
def build_factory_lm(options: Mapping[str, Any], *, vocab_size: int, block_size: int) -> nn.Module:
    """The user's language model: ``target(**kwargs)`` mapping token ids to logits."""
    facts = {"vocab_size": vocab_size, "block_size": block_size}
    model = _build_factory(options, facts, where="model factory")
    return TokenLM(model, vocab_size=vocab_size, name=str(options["target"]))


@register_model("factory-image", task="image", check=check_factory)
def build_factory_image(
    options: Mapping[str, Any],
    *,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int] | None = None,
) -> nn.Module:
    """The user's image classifier: ``target(**kwargs)`` mapping images to logits."""
    facts = {"in_channels": in_channels, "num_classes": num_classes, "image_size": image_size}
    model = _build_factory(options, facts, where="model factory-image")
    return Classifier(model, name=str(options["target"]))


def meta_build(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` on the meta device: checks a configuration without allocating its weights."""
    with torch.device("meta"):
        return build()
