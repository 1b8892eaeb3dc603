"""Where each norm of a block sits, read from one forward: the roles behind ``inspect`` and LNS.

A norm whose output is a sublayer's input is that sublayer's pre-norm; a norm whose input is a
sublayer's output normalizes it before the residual add (Peri-LN / sandwich); a block whose
output is a norm's output is Post-LN. Tensors are compared by value (``torch.equal``), so casts
and views inside a block do not hide a relation, and nothing depends on a library's attribute
names except the query/key norms (:func:`normlab.convert.select.is_qk_name`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from normlab.convert.detect import UnsupportedNormError, forward_example, read_norm
from normlab.convert.select import is_qk_name
from normlab.structure import BlockStack

__all__ = [
    "Call",
    "block_parts",
    "block_roles",
    "default_example",
    "is_norm_module",
    "placement_of",
    "trace",
    "trace_roles",
]


@dataclass
class Call:
    inputs: list[Tensor]
    output: Tensor | None
    order: int


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    for attr in ("last_hidden_state", "hidden_states"):
        t = getattr(value, attr, None)
        if isinstance(t, Tensor):
            return t
    return None


def trace(model: nn.Module, example: Any, watched: list[nn.Module]) -> dict[int, Call]:
    """The first call of each watched module in one no-grad eval forward: its tensor inputs and
    its output (detached), and its call order."""
    calls: dict[int, Call] = {}
    counter = [0]

    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if id(module) not in calls:
            tensors = [a.detach() for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
            calls[id(module)] = Call(tensors, None, counter[0])
            counter[0] += 1

    def post(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        call = calls.get(id(module))
        if call is not None and call.output is None:
            t = _first_tensor(out)
            call.output = None if t is None else t.detach()

    handles = []
    for m in {id(m): m for m in watched}.values():
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        forward_example(model, example)
    finally:
        for h in handles:
            h.remove()
    return calls


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    return a is not None and b is not None and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def residual_scale(x_in: Tensor, branches: list[Tensor], residuals: list[Tensor]) -> float | None:
    """``alpha`` where ``x_in == alpha * r + o`` for one residual ``r`` and branch output ``o``
    (least squares, then checked to 1e-4 of the input's scale), else ``None``: how a Post-LN
    norm's input shows a DeepNorm-style scaled residual (Wang et al. 2022, arXiv:2203.00555)."""
    x = x_in.double()
    scale = float(x.abs().max()) or 1.0
    for o in branches:
        for r in residuals:
            if o.shape != x.shape or r.shape != x.shape or o is r:
                continue
            d, r64 = x - o.double(), r.double()
            rr = float((r64 * r64).sum())
            if rr == 0.0:
                continue
            alpha = float((d * r64).sum()) / rr
            if float((d - alpha * r64).abs().max()) <= 1e-4 * scale:
                return alpha
    return None


def block_parts(blocks: list[tuple[str, nn.Module]]) -> list[nn.Module]:
    """What the roles are read from: each block's children, a list's items in its place."""
    parts: list[nn.Module] = []
    for _, b in blocks:
        for c in b._modules.values():
            if isinstance(c, (nn.ModuleList, nn.ModuleDict)):
                parts += [c2 for c2 in c._modules.values() if c2 is not None]
            elif c is not None:
                parts.append(c)
    return parts


def trace_roles(model: nn.Module, stack: BlockStack, example: Any) -> dict[str, dict[str, str]]:
    """``block name -> {relative norm name: role}`` for every block of ``stack``, from one
    no-grad eval forward of ``model`` on ``example`` (see :func:`block_roles`)."""
    blocks = list(stack)
    norms = {
        n: m
        for bn, b in blocks
        for n, m in b.named_modules(prefix=bn)
        if not m._modules and is_norm_module(m)
    }
    calls = trace(model, example, [*norms.values(), *(b for _, b in blocks), *block_parts(blocks)])
    return {
        bn: block_roles(bn, b, {n: m for n, m in norms.items() if n.startswith(bn + ".")}, calls)
        for bn, b in blocks
    }


def _sublayers(block: nn.Module, calls: Mapping[int, Call]) -> list[tuple[str, nn.Module, Call]]:
    """The called non-norm children of ``block``, a list's items in its place (T5's ``layer``)."""
    out = []
    for k, c in block._modules.items():
        if c is None:
            continue
        if isinstance(c, (nn.ModuleList, nn.ModuleDict)) and id(c) not in calls:
            out += [
                (f"{k}.{k2}", c2, calls[id(c2)])
                for k2, c2 in c._modules.items()
                if c2 is not None and id(c2) in calls
            ]
        elif id(c) in calls and not is_norm_module(c):
            out.append((k, c, calls[id(c)]))
    return out


def block_roles(
    block_name: str,
    block: nn.Module,
    norms: Mapping[str, nn.Module],
    calls: Mapping[int, Call],
) -> dict[str, str]:
    """``relative name -> role`` of each norm of one block, from the calls of one forward.

    A block whose output is a norm's output (directly, or as the output of the sublayer that
    holds the norm) is Post-LN: its norms come after residual adds. Otherwise a norm whose output
    is a sublayer's input (or whose input is the input of the sublayer holding it) is that
    sublayer's pre-norm, and a norm whose input is a sublayer's output normalizes that output
    before the add (Peri-LN / sandwich). Query/key norms are recognised by name."""
    subs = _sublayers(block, calls)
    block_call = calls.get(id(block))

    def owner(rel: str) -> tuple[str, Call] | None:
        return next(((n, c) for n, _, c in subs if rel.startswith(n + ".")), None)

    ends: set[str] = set()
    for name, module in norms.items():
        rel, call = name[len(block_name) + 1 :], calls.get(id(module))
        if call is None or call.output is None:
            continue
        own = owner(rel)
        last = block_call is not None and _same(call.output, block_call.output)
        if last or (own is not None and subs and own[0] == subs[-1][0] and _same(call.output, own[1].output)):
            ends.add(rel)
    post_ln = bool(ends)
    roles: dict[str, str] = {}
    for name, module in norms.items():
        rel, call = name[len(block_name) + 1 :], calls.get(id(module))
        if is_qk_name(rel):
            roles[rel] = "qk"
            continue
        if call is None or call.output is None or not call.inputs:
            roles[rel] = "not called"
            continue
        x_in, out = call.inputs[0], call.output
        own = owner(rel)
        feeds = [n for n, _, c in subs if own is None and any(_same(out, t) for t in c.inputs)]
        reads = [n for n, _, c in subs if _same(x_in, c.output)]
        ends_owner = own is not None and _same(out, own[1].output)
        if post_ln and (feeds or ends_owner or rel in ends):
            earlier = [c.output for m in norms.values() if (c := calls.get(id(m))) and c.order < call.order]
            residuals = [
                t for t in (*(block_call.inputs[:1] if block_call else []), *earlier) if t is not None
            ]
            alpha = residual_scale(x_in, [c.output for _, _, c in subs if c.output is not None], residuals)
            if alpha is not None and abs(alpha - 1.0) > 1e-3:
                roles[rel] = f"post (after a residual add scaled by alpha={alpha:.3g}: DeepNorm-style)"
            else:
                roles[rel] = "post (after the residual add)"
        elif len(feeds) >= 2:
            roles[rel] = "pre (parallel: " + ", ".join(feeds) + ")"
        elif feeds:
            roles[rel] = f"pre ({feeds[0]})"
        elif own is not None and own[1].inputs and _same(x_in, own[1].inputs[0]):
            roles[rel] = f"pre ({own[0]})"
        elif reads:
            roles[rel] = f"sublayer output ({reads[0]})"
        elif ends_owner and own is not None:
            roles[rel] = f"sublayer output ({own[0]})"
        elif block_call is not None and block_call.inputs and _same(x_in, block_call.inputs[0]):
            roles[rel] = "pre"
        else:
            roles[rel] = "inside a sublayer"
    return roles


def placement_of(block: nn.Module, roles: Mapping[str, str]) -> str:
    """The placement a block's norm roles make: Pre-LN, parallel Pre-LN, Post-LN (DeepNorm-style
    where a residual is scaled), Peri-LN / sandwich, sublayer-output norms only, mixed; a normlab
    block says its own placement."""
    reg = getattr(block, "registry_name", None)
    if isinstance(reg, str) and hasattr(block, "norm_attn"):
        return f"{reg} (normlab placement)"
    kinds = {r.split(" ")[0] for r in roles.values() if r != "qk"}
    kinds.discard("inside")
    if not kinds:
        return "no norm"
    if "not" in kinds:
        return "not traced"
    pre, sub, post = "pre" in kinds, "sublayer" in kinds, "post" in kinds
    parallel = any(r.startswith("pre (parallel") for r in roles.values())
    if pre and not sub and not post:
        return "parallel Pre-LN" if parallel else "Pre-LN"
    if pre and sub and not post:
        return "Peri-LN / sandwich"
    if sub and not pre and not post:
        return "sublayer-output norms only (res-post-norm)"
    if post and not pre and not sub:
        scaled = sorted({r.split("alpha=")[1].split(":")[0] for r in roles.values() if "DeepNorm-style" in r})
        return f"DeepNorm-style Post-LN (residual x alpha={', '.join(scaled)})" if scaled else "Post-LN"
    return "mixed (" + ", ".join(sorted(kinds)) + ")"


def is_norm_module(module: nn.Module) -> bool:
    try:
        return read_norm(module) is not None
    except UnsupportedNormError:
        return True


def default_example(model: nn.Module) -> Any:
    """A small input for a Hugging Face model or a normlab GPT, from its config (``None`` for
    anything else)."""
    config: Any = getattr(model, "config", None)
    vocab_size, block_size = getattr(config, "vocab_size", None), getattr(config, "block_size", None)
    if isinstance(vocab_size, int) and isinstance(block_size, int) and not hasattr(config, "to_dict"):
        # normlab's GPT: token ids of its vocabulary
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab_size, (1, min(8, block_size)), generator=gen)
        first = next(iter(model.parameters()), None)
        return ids if first is None else ids.to(first.device)
    if config is None or not hasattr(config, "to_dict"):
        return None
    main = getattr(model, "main_input_name", "input_ids")
    ref = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None else torch.float32
    gen = torch.Generator().manual_seed(0)
    if main == "input_ids":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab = int(getattr(text, "vocab_size", 0) or getattr(config, "vocab_size", 0) or 0)
        if vocab < 8:
            return None
        ids = torch.randint(3, min(vocab, 1000), (1, 8), generator=gen).to(device)
        batch = {"input_ids": ids}
        if getattr(config, "is_encoder_decoder", False):
            batch["decoder_input_ids"] = ids[:, :4]
        return batch
    if main == "input_features":
        bins = int(getattr(config, "num_mel_bins", 80))
        frames = 2 * int(getattr(config, "max_source_positions", 1500))
        feats = torch.randn(1, bins, frames, generator=gen).to(device, dtype)
        return {"input_features": feats, "decoder_input_ids": torch.tensor([[1, 2, 3]], device=device)}
    if main == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = size[0] if isinstance(size, (list, tuple)) else int(size)
        channels = int(getattr(config, "num_channels", 3))
        return {"pixel_values": torch.randn(1, channels, size, size, generator=gen).to(device, dtype)}
    return None
