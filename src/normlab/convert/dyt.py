"""Folding DyT's affine into the linear layers that read its output, for inference (jiachenzhu/DyT#15).

DyT computes ``y = w * tanh(alpha x) + b`` (Zhu et al. 2025, arXiv:2503.10622). When ``y`` feeds
only linear layers ``z = W y + c``, then ``z = (W diag(w)) tanh(alpha x) + (W b + c)``: the
per-feature ``w`` and ``b`` move into every consumer (FlashNorm's idea for RMSNorm,
arXiv:2407.09577) and the DyT keeps only ``tanh(alpha x)``, one multiply-add less per element.

Which linear layers read a DyT's output must be known for certain: a fold into a layer that is
not the only reader changes the model. Recognised structures:

* ``nn.Sequential``: a DyT directly followed by an ``nn.Linear``;
* normlab Pre-LN blocks: ``norm_attn`` -> ``attn.q_proj/k_proj/v_proj``, ``norm_mlp`` -> ``mlp.fc1``;
* normlab GPT: ``final_norm`` -> ``lm_head`` (refused while the head is tied to the embedding);
* Hugging Face LLaMA-family decoder layers (LLaMA, Mistral, Qwen2/3, Gemma 1):
  ``input_layernorm`` -> ``self_attn.q_proj/k_proj/v_proj``, ``post_attention_layernorm`` ->
  ``mlp.gate_proj/up_proj``; GPT-2 blocks: ``ln_1`` -> ``attn.c_attn``, ``ln_2`` -> ``mlp.c_fc``
  (GPT-2's ``Conv1D``, weight ``(in, out)``).

Every other DyT is refused with the reason.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from normlab.blocks.pre import PreLNBlock
from normlab.convert.batchnorm import FoldSummary
from normlab.convert.select import Where, compile_where
from normlab.norms.dyt import DyT
from normlab.structure import find_blocks, occurrences

__all__ = ["fold_dyt"]

# Decoder-layer classes whose forward is known to be x + attn(input_layernorm(x)), then
# x + mlp(post_attention_layernorm(x)) with the projections below.
_LLAMA_LAYERS = frozenset(
    {
        "LlamaDecoderLayer",
        "MistralDecoderLayer",
        "Qwen2DecoderLayer",
        "Qwen3DecoderLayer",
        "GemmaDecoderLayer",
    }
)


def _is_conv1d(m: nn.Module) -> bool:
    """Hugging Face's GPT-2 ``Conv1D``: ``y = x @ weight + bias`` with ``weight`` of shape ``(in, out)``."""
    return type(m).__name__ == "Conv1D" and isinstance(getattr(m, "weight", None), nn.Parameter)


def _consumers(parent: nn.Module, key: str) -> tuple[list[tuple[str, nn.Module]], str]:
    """The layers that alone read the output of ``parent.<key>``, as (path relative to parent, layer)."""
    if type(parent) is nn.Sequential:  # a subclass may override forward
        keys = list(parent._modules)
        i = keys.index(key)
        if i + 1 < len(keys) and type(parent._modules[keys[i + 1]]) is nn.Linear:
            nxt = keys[i + 1]
            layer = parent._modules[nxt]
            assert layer is not None
            return [(nxt, layer)], ""
        return [], "the next layer of its Sequential is not an nn.Linear"
    paths: list[str] = []
    if type(parent) is PreLNBlock:
        paths = {"norm_attn": ["attn.q_proj", "attn.k_proj", "attn.v_proj"], "norm_mlp": ["mlp.fc1"]}.get(
            key, []
        )
        if key == "norm_mlp" and getattr(getattr(parent, "mlp", None), "inner_norm", None) is not None:
            paths = []
    elif type(parent).__name__ == "GPT" and key == "final_norm" and hasattr(parent, "lm_head"):
        paths = ["lm_head"]
    elif type(parent).__name__ in _LLAMA_LAYERS:
        paths = {
            "input_layernorm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"],
        }.get(key, [])
    elif type(parent).__name__ == "GPT2Block":
        paths = {"ln_1": ["attn.c_attn"], "ln_2": ["mlp.c_fc"]}.get(key, [])
    if not paths:
        return [], (
            f"no linear layer is known to read its output alone ({type(parent).__name__}.{key}; recognised: "
            "nn.Sequential, normlab Pre-LN blocks and GPT, Hugging Face LLaMA-family and GPT-2 blocks)"
        )
    found = []
    for path in paths:
        try:
            layer = parent.get_submodule(path)
        except AttributeError:
            return [], f"{type(parent).__name__} has no {path}"
        if type(layer) is not nn.Linear and not _is_conv1d(layer):
            return [], f"{path} is a {type(layer).__name__}, not a linear layer"
        found.append((path, layer))
    return found, ""


def _fold_into(layer: nn.Module, w: Tensor | None, b: Tensor | None) -> None:
    """``layer(y)`` with ``y = w * t + b`` becomes ``layer'(t)`` (float64 arithmetic)."""
    weight: nn.Parameter = layer.weight  # type: ignore[assignment]
    conv1d = _is_conv1d(layer)  # weight (in, out) instead of nn.Linear's (out, in)
    with torch.no_grad():
        w64 = weight.double()
        extra = None
        if b is not None:
            extra = b.double() @ w64 if conv1d else w64 @ b.double()
        if w is not None:
            w64 = w64 * (w.double()[:, None] if conv1d else w.double()[None, :])
        weight.copy_(w64.to(weight.dtype))
        if extra is not None:
            bias = layer.bias
            if bias is None:
                layer.bias = nn.Parameter(extra.to(weight.dtype), requires_grad=weight.requires_grad)
            else:
                assert isinstance(bias, Tensor)
                bias.copy_((bias.double() + extra).to(bias.dtype))


def fold_dyt(model: nn.Module, *, where: Where = None) -> FoldSummary:
    """Fold each DyT's ``weight`` and ``bias`` into the linear layers that read its output (in place).

    For inference: the DyT becomes ``DyT(elementwise_affine=False)`` (``tanh(alpha x)``, the same
    ``alpha`` Parameter) and each consumer ``W, c`` becomes ``W diag(weight)``, ``c + W bias``
    (a bias is added where the layer had none and DyT has one). The model's output is unchanged
    up to float rounding. See the module docstring for the structures recognised; any other DyT,
    a channels-first DyT, one whose consumer is shared or tied (a head tied to the embedding)
    or read by other modules, or one scaled by an LNS hook, is left alone and listed in
    ``refused`` with the reason. A DyT already without affine is not listed.
    """
    select = compile_where(where, find_blocks(model, required=False) if where is not None else None)
    occ_by_id = occurrences(model)
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    report = FoldSummary()
    for occ in list(occ_by_id.values()):
        dyt = occ.module
        if type(dyt) is not DyT or not any(select(n, dyt) for n in occ.names):
            continue
        if dyt.weight is None and dyt.bias is None:
            continue
        if dyt.channels_first:
            report.refused[occ.name] = "channels-first DyT: no linear layer reads its channels directly"
            continue
        if dyt._forward_hooks:  # LNSScale (LayerNorm Scaling) or a hook of the user's: both act on y
            report.refused[occ.name] = (
                "it has forward hooks (e.g. LayerNorm Scaling) between it and its readers"
            )
            continue
        if len(occ.slots) != 1:
            report.refused[occ.name] = f"it is shared under {len(occ.slots)} names"
            continue
        parent, key = occ.slots[0]
        consumers, reason = _consumers(parent, key)
        if not consumers:
            report.refused[occ.name] = reason
            continue
        prefix = occ.name.rsplit(".", 1)[0] + "." if "." in occ.name else ""
        why = ""
        for path, layer in consumers:
            if len(occ_by_id[id(layer)].slots) != 1:
                why = f"{prefix}{path} is shared under several names"
            elif any(counts.get(id(p), 0) > 1 for p in layer.parameters()):
                why = f"{prefix}{path}'s weight is tied to another layer (e.g. the embedding)"
            elif cast(Tensor, layer.weight).shape[0 if _is_conv1d(layer) else 1] != dyt.num_features:
                why = f"{prefix}{path} does not take {dyt.num_features} inputs"
            if why:
                break
        if why:
            report.refused[occ.name] = why
            continue
        for _, layer in consumers:
            _fold_into(layer, dyt.weight, dyt.bias)
        plain = DyT(
            dyt.num_features,
            alpha_init=dyt.alpha_init,
            elementwise_affine=False,
            device="meta",
        )
        plain.alpha = dyt.alpha
        plain.train(dyt.training)
        plain.qualified_name = dyt.qualified_name
        parent._modules[key] = plain
        report.folded[occ.name] = tuple(prefix + path for path, _ in consumers)
    return report
