"""LayerNorm Scaling on an existing Pre-LN model (Sun et al. 2025, "The Curse of Depth", arXiv:2502.05795).

LNS multiplies the output of both pre-norms of block ``l`` (0-based) by ``1/sqrt(l + 1)``:
``x <- x + Attn(LN(x) / sqrt(l+1))``, ``x <- x + FFN(LN(x) / sqrt(l+1))``; the final norm and
the embeddings are not scaled. Here the factor is a forward hook on each pre-norm
(:class:`LNSScale`), so the weights, the state_dict keys and the module classes stay as they
are: a checkpoint of the LNS model is a checkpoint of the original, and
:func:`remove_layernorm_scaling` gives the original function back exactly. The hook is a
picklable object; ``copy.deepcopy`` and ``torch.save(model)`` keep it.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from normlab.blocks.lns import LNSBlock
from normlab.blocks.pre import PreLNBlock
from normlab.convert.roles import default_example, placement_of, trace_roles
from normlab.norms.lns import LayerNormScaling, LNSScale
from normlab.structure import find_blocks

__all__ = [
    "LNSScale",
    "apply_layernorm_scaling",
    "layernorm_scaling_plan",
    "pre_norm_names",
    "remove_layernorm_scaling",
]


# Decoder layers whose FFN norm is applied to the sublayer *output* (sandwich / Peri-LN:
# Gemma 2/3, OLMo 2): their "post_attention_layernorm" is not a pre-norm.
_SANDWICH_ATTRS = ("post_feedforward_layernorm", "pre_feedforward_layernorm")


def pre_norm_names(block: nn.Module) -> list[str]:
    """The attribute names of ``block``'s pre-norms, in call order.

    * normlab Pre-LN blocks (placement ``"pre"``): ``norm_attn``, ``norm_mlp``;
    * Hugging Face GPT-2 family (GPT-2, GPT-J, ...): ``ln_1`` (, ``ln_cross_attn``), ``ln_2``;
    * Hugging Face LLaMA family (LLaMA, Qwen2/3, Mistral, Gemma 1, GPT-NeoX, ...):
      ``input_layernorm``, ``post_attention_layernorm``.

    Raises:
        ValueError: any other block (Post-LN such as BERT, sandwich norms such as Gemma 2,
            normlab blocks that already scale), with the reason.
    """
    name = type(block).__name__
    if isinstance(block, LNSBlock):
        raise ValueError(f"{name} already applies LayerNorm Scaling")
    if isinstance(block, PreLNBlock) and type(block) is PreLNBlock:
        return ["norm_attn", "norm_mlp"]
    if hasattr(block, "norm_attn"):
        raise ValueError(
            f"{name} is a normlab block of placement {getattr(block, 'registry_name', '?')!r}, not Pre-LN"
        )
    present = [a for a in ("ln_1", "ln_cross_attn", "ln_2") if isinstance(getattr(block, a, None), nn.Module)]
    if "ln_1" in present:
        return present
    if isinstance(getattr(block, "input_layernorm", None), nn.Module):
        sandwich = [a for a in _SANDWICH_ATTRS if hasattr(block, a)]
        if sandwich:
            raise ValueError(f"{name} has {sandwich[0]} (sandwich norms), not a Pre-LN block")
        return [
            a
            for a in ("input_layernorm", "post_attention_layernorm")
            if isinstance(getattr(block, a, None), nn.Module)
        ]
    raise ValueError(
        f"{name} is not a Pre-LN block normlab recognises (normlab 'pre', Hugging Face GPT-2 or LLaMA "
        "families); Post-LN models (BERT) have no pre-norms to scale"
    )


_PRE_LN = ("Pre-LN", "parallel Pre-LN")


def layernorm_scaling_plan(model: nn.Module, *, example: Any = None) -> list[tuple[str, nn.Module, int]]:
    """``[(qualified name, norm, l), ...]``: the pre-norms LNS scales by ``1/sqrt(l + 1)`` (``l``
    the 0-based index of their block), changing nothing.

    With an input (``example``, or one made from a Hugging Face model's config), the pre-norms
    are found by what one forward shows (:func:`normlab.convert.inspection.block_roles`): the
    norms whose output is a sublayer's input, in blocks whose placement is Pre-LN (parallel
    included). Without one, by the attribute names of :func:`pre_norm_names`.

    Raises:
        ValueError: no block stack, an encoder-decoder, a block that is not Pre-LN (with its
            traced placement), a norm that already scales, or a norm shared between blocks.
    """
    stack = find_blocks(model, required=False)
    if stack is None:
        raise ValueError(
            "apply_layernorm_scaling: no stack of blocks (a ModuleList of repeated blocks) found"
        )
    if "encoder" in stack.name and "decoder" in stack.name:
        raise ValueError(
            f"apply_layernorm_scaling: {stack.name} is an encoder-decoder; LNS (arXiv:2502.05795) scales "
            "the pre-norms of one stack of a Pre-LN decoder"
        )
    on_meta = any(t.device.type == "meta" for t in model.parameters())
    if example is None and not on_meta:
        example = default_example(model)
    traced: dict[str, dict[str, str]] = {}
    if example is not None and not on_meta:
        try:
            traced = trace_roles(model, stack, example)
        except Exception:  # a forward that fails here leaves the reading by names
            traced = {}
    plan: list[tuple[str, nn.Module, int]] = []
    seen: dict[int, str] = {}
    for i, (block_name, block) in enumerate(stack):
        roles = traced.get(block_name)
        normlab_block = hasattr(block, "norm_attn")
        try:
            if roles is None or normlab_block:
                attrs = pre_norm_names(block)
            else:
                placement = placement_of(block, roles)
                if placement not in _PRE_LN:
                    raise ValueError(f"{type(block).__name__} is {placement} (seen in a forward), not Pre-LN")
                attrs = [rel for rel, role in roles.items() if role.startswith("pre")]
        except ValueError as e:
            raise ValueError(f"apply_layernorm_scaling: block {block_name}: {e}") from None
        for attr in attrs:
            norm = block.get_submodule(attr)
            qname = f"{block_name}.{attr}"
            if isinstance(norm, LayerNormScaling) and norm.layer_idx > 0:
                raise ValueError(
                    f"apply_layernorm_scaling: {qname} is already an LNS norm (layer_idx={norm.layer_idx})"
                )
            if id(norm) in seen:
                raise ValueError(f"apply_layernorm_scaling: {qname} is the same module as {seen[id(norm)]}")
            seen[id(norm)] = qname
            plan.append((qname, norm, i))
    return plan


def apply_layernorm_scaling(model: nn.Module, *, example: Any = None) -> dict[str, float]:
    """Turn a Pre-LN model into its LayerNorm Scaling version (arXiv:2502.05795), in place.

    The pre-norms of block ``l`` of the model's block stack (normlab GPT ``blocks``, GPT-2
    ``transformer.h``, LLaMA/Qwen/Mistral ``model.layers``, any block a forward shows to be
    Pre-LN: see :func:`layernorm_scaling_plan`) get their output multiplied by
    ``1/sqrt(l + 1)``; the final norm is left alone. Parameters and the state_dict do not change.
    A second call changes nothing. Returns ``{qualified name of each scaled norm: scale}``.

    Args:
        example: an input of the model for the forward that finds the pre-norms (a Hugging Face
            model gets one from its config).

    Raises:
        ValueError: see :func:`layernorm_scaling_plan`. Nothing is changed then.
    """
    plan = layernorm_scaling_plan(model, example=example)
    for qname, norm, i in plan:
        hooks = [h for h in norm._forward_hooks.values() if isinstance(h, LNSScale)]
        if hooks and hooks[0].layer_idx != i:
            raise ValueError(
                f"apply_layernorm_scaling: {qname} is scaled for layer {hooks[0].layer_idx}, not {i}"
            )
    scaled: dict[str, float] = {}
    for qname, norm, i in plan:
        if not any(isinstance(h, LNSScale) for h in norm._forward_hooks.values()):
            norm.register_forward_hook(LNSScale(i))
        scaled[qname] = 1.0 / math.sqrt(i + 1)
    return scaled


def remove_layernorm_scaling(model: nn.Module) -> int:
    """Undo :func:`apply_layernorm_scaling`: remove every LNS hook; returns how many were removed."""
    removed = 0
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if isinstance(hook, LNSScale):
                del module._forward_hooks[key]
                removed += 1
    return removed
