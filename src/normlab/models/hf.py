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
    "hf_tiny_config",
    "shrink_config",
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


# --------------------------------------------------------------------------------------------
# Tiny configs of any architecture

# Size fields of Hugging Face configs, by family of meaning, and the tiny value each gets.
_TINY_FIELDS: dict[str, int] = {
    **dict.fromkeys(
        (
            "num_hidden_layers",
            "n_layer",
            "n_layers",
            "num_layers",
            "encoder_layers",
            "decoder_layers",
            "num_decoder_layers",
            "num_encoder_layers",
            "text_layers",
        ),
        2,
    ),
    **dict.fromkeys(
        ("hidden_size", "n_embd", "d_model", "embed_dim", "dim", "word_embed_proj_dim", "emb_dim"), 64
    ),
    **dict.fromkeys(
        (
            "num_attention_heads",
            "n_head",
            "n_heads",
            "num_heads",
            "encoder_attention_heads",
            "decoder_attention_heads",
        ),
        4,
    ),
    **dict.fromkeys(("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num"), 2),
    **dict.fromkeys(("head_dim", "d_kv", "kv_channels", "attention_head_size"), 16),
    **dict.fromkeys(
        (
            "intermediate_size",
            "n_inner",
            "d_ff",
            "ffn_dim",
            "encoder_ffn_dim",
            "decoder_ffn_dim",
            "ffn_hidden_size",
            "mlp_dim",
        ),
        128,
    ),
    **dict.fromkeys(
        ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size"), 32
    ),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k"), 2),
    **dict.fromkeys(("vocab_size",), 128),
    **dict.fromkeys(("image_size",), 32),
    **dict.fromkeys(("patch_size",), 8),
}
_TOKEN_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id")


def _shrink(data: dict[str, Any], keep_depth: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and ("model_type" in value or key.endswith("config")):
            out[key] = _shrink(value, keep_depth)
        elif keep_depth and _TINY_FIELDS.get(key) == 2:
            out[key] = value
        elif key in _TINY_FIELDS and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            out[key] = min(value, _TINY_FIELDS[key])
        elif key in ("depths", "num_layers_per_stage") and isinstance(value, list):
            out[key] = [1 for _ in value]
        elif key in ("hidden_sizes", "embed_dims") and isinstance(value, list):
            out[key] = [16 * 2**i for i in range(len(value))]
        else:
            out[key] = value
    # derived sizes the config class checks against each other
    if isinstance(out.get("expand"), int) and isinstance(out.get("num_heads"), int) and "head_dim" in out:
        width = next((out[k] for k in ("hidden_size", "d_model") if isinstance(out.get(k), int)), None)
        if width is not None and isinstance(out["head_dim"], int):
            out["num_heads"] = max(1, width * out["expand"] // out["head_dim"])
    if out.get("num_key_value_heads", 0) is None and isinstance(out.get("num_attention_heads"), int):
        out["num_key_value_heads"] = min(2, out["num_attention_heads"])
    layers = next((out[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in out), None)
    for key in ("layer_types", "block_types", "layers_block_type", "hybrid_override_pattern"):
        if isinstance(layers, int) and isinstance(out.get(key), (list, str)):
            out[key] = out[key][:layers]
    vocab = out.get("vocab_size")
    if isinstance(vocab, int):
        for key in _TOKEN_ID_FIELDS:
            tid = out.get(key)
            if isinstance(tid, int) and tid >= vocab:
                out[key] = vocab - 1 - _TOKEN_ID_FIELDS.index(key)
            elif isinstance(tid, list):
                out[key] = [t if t < vocab else vocab - 1 for t in tid if isinstance(t, int)]
    return out


def hf_tiny_config(
    model_type: str, fields: Mapping[str, Any] | None = None, *, keep_depth: bool = False
) -> Any:
    """A small config of ``model_type`` (2 layers, width 64, 4 heads, vocabulary 128, ...).

    The library's default config with every size field it has (layers, width, heads, key/value
    heads, head dim, FFN and expert sizes, vocabulary, image and patch size, per-stage depths and
    widths, in sub-configs too) set to a small value; per-layer lists (``layer_types``) are cut
    to the new depth and token ids kept inside the vocabulary. ``fields`` are set last. What
    builds from it is the architecture in miniature, for tests and inspection. ``keep_depth``
    keeps the default number of layers (for configs whose per-layer patterns need them).

    Raises:
        ValueError: an unknown ``model_type``, or a config class that rejects the small sizes.
    """
    return shrink_config(hf_config(model_type), fields, keep_depth=keep_depth)


def shrink_config(config: Any, fields: Mapping[str, Any] | None = None, *, keep_depth: bool = False) -> Any:
    """``config`` (a Hugging Face config) in miniature: see :func:`hf_tiny_config`."""
    data = _shrink(config.to_dict(), keep_depth)
    for key in ("model_type", "transformers_version", "architectures", "_name_or_path"):
        data.pop(key, None)
    data.update(fields or {})
    try:
        return type(config)(**data)
    except Exception as e:  # config classes raise their own validation errors
        raise ValueError(
            f"hf: model_type {config.model_type!r} rejects a tiny config ({type(e).__name__}: {e})"
        ) from None
