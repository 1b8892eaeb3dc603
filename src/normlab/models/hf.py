"""Hugging Face models built from configs, with random weights (nothing is downloaded).

``transformers`` is optional: it is imported inside these functions only, and its absence is a
``ValueError`` that says how to install it (``pip install 'normlab[hf]'``). This is the one
module of the core that imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = [
    "POSITION_FIELDS",
    "hf_causal_lm",
    "hf_config",
    "hf_image_classifier",
    "hf_model",
    "hf_model_of_class",
]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ValueError(
            "Hugging Face models need the 'transformers' package: pip install 'normlab[hf]'"
        ) from e
    return transformers


def hf_config(model_type: str, fields: Mapping[str, Any] | None = None) -> Any:
    """The library's default config of ``model_type`` with ``fields`` set.

    Raises:
        ValueError: an unknown ``model_type`` (transformers' message included).
    """
    transformers = _transformers()
    try:
        return transformers.AutoConfig.for_model(model_type, **dict(fields or {}))
    except ValueError as e:
        raise ValueError(f"hf: unknown model_type {model_type!r} ({e})") from None


def hf_model(config: Any) -> nn.Module:
    """A model of ``config`` with random weights: the masked-LM head for encoders (BERT), else the
    causal-LM head, else the image-classification head, else the bare model."""
    transformers = _transformers()
    auto_classes = (
        transformers.AutoModelForMaskedLM,
        transformers.AutoModelForCausalLM,
        transformers.AutoModelForImageClassification,
        transformers.AutoModel,
    )
    for auto in auto_classes:
        try:
            model: nn.Module = auto.from_config(config)
        except ValueError:  # this head does not exist for the model type; try the next
            continue
        return model
    raise ValueError(f"hf: transformers has no model class for config {type(config).__name__}")


def hf_model_of_class(class_name: str, config_dict: Mapping[str, Any]) -> nn.Module:
    """``transformers.<class_name>(config)`` for a config saved as ``config.to_dict()``."""
    transformers = _transformers()
    data = dict(config_dict)
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ValueError("hf: the saved config has no 'model_type'")
    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise ValueError(f"transformers has no class {class_name!r}")
    model: nn.Module = cls(hf_config(model_type, data))
    return model


# where each family keeps its context length, the first present counts
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def _config_of(config_dict: Mapping[str, Any], where: str) -> Any:
    data = dict(config_dict)
    model_type = data.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ValueError(f"{where}: the config has no 'model_type' (is it a Hugging Face config.json?)")
    return hf_config(model_type, data)


def _from_auto(auto: str, what: str, config_dict: Mapping[str, Any], where: str) -> nn.Module:
    transformers = _transformers()
    config = _config_of(config_dict, where)
    try:
        model: nn.Module = getattr(transformers, auto).from_config(config)
    except ValueError as e:
        raise ValueError(
            f"{where}: model_type {config.model_type!r} has no {what} model in transformers "
            f"{transformers.__version__} ({str(e).splitlines()[0]})"
        ) from None
    return model


def hf_causal_lm(config_dict: Mapping[str, Any], *, where: str = "hf") -> nn.Module:
    """``AutoModelForCausalLM`` of a ``config.json``'s contents, with random weights.

    Raises:
        ValueError: the config's ``model_type`` has no causal-LM class in transformers.
    """
    return _from_auto("AutoModelForCausalLM", "causal-LM", config_dict, where)


def hf_image_classifier(config_dict: Mapping[str, Any], *, where: str = "hf") -> nn.Module:
    """``AutoModelForImageClassification`` of a ``config.json``'s contents, with random weights."""
    return _from_auto("AutoModelForImageClassification", "image-classification", config_dict, where)
