"""``inspect(model)``: where a model's norms sit, what each computes, and what normlab can do with them.

For any ``nn.Module`` (a normlab model, a Hugging Face, timm or torchvision model, a user's):

* every norm site (a module :func:`~normlab.convert.detect.read_norm` reads, or one that looks
  like a norm and is refused, with the reason), what it computes, its features and eps;
* its role: a block's pre-norm, post-norm (after the residual add), a norm of a sublayer's
  output before the add (Peri-LN / sandwich), a query/key norm, the final norm, an embedding
  norm;
* the placement of each block of the model's stack (:func:`~normlab.structure.find_blocks`):
  Pre-LN, parallel Pre-LN (one norm feeds attention and MLP), Post-LN, DeepNorm-style Post-LN
  (the norm's input is ``alpha * x + f(x)`` with ``alpha != 1``, fitted from the traced
  tensors), Peri-LN / sandwich, post-sublayer norms only, or normlab's own placement name
  (DeepNorm, B2T, Mix-LN, ...);
* for every site, the relation of each normlab conversion (``exact``, ``exact on zero-mean
  inputs``, new function, or the refusal), from dry runs of
  :func:`~normlab.convert.convert.convert_norms`, and whether LayerNorm Scaling applies.

Roles come from one no-grad forward on ``example`` (for a Hugging Face model one is made from
its config when not given): a norm whose output is the input of a sublayer is that sublayer's
pre-norm; a norm whose input is a sublayer's output normalizes that output (Peri-LN); a norm
whose output is the block's (or its sublayer's) output comes after the residual add (Post-LN).
Without a forward (a model on the meta device, or no input), roles are ``"not traced"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from normlab.convert.convert import convert_norms, record_inputs
from normlab.convert.detect import NormInfo, UnsupportedNormError, read_norm
from normlab.convert.lns import layernorm_scaling_plan
from normlab.convert.roles import (
    Call,
    block_parts,
    block_roles,
    default_example,
    placement_of,
    trace,
)
from normlab.norms._base import NormMixin
from normlab.structure import find_blocks, occurrences

__all__ = ["BlockPlacement", "Inspection", "NormSite", "inspect"]

# what each kind of target is tried for, by the layout of the source
_TOKEN_TARGETS = ("layernorm", "rmsnorm", "dyt")
_CHANNEL_TARGETS = ("batchnorm", "groupnorm", "batchless")
_CHANNEL_KINDS = ("batchnorm", "groupnorm", "instancenorm", "batchless")


@dataclass
class NormSite:
    """One norm module of the model (held under one or more names)."""

    names: list[str]
    source: str
    kind: str | None
    computes: str
    features: tuple[int, ...] | None
    eps: float | None
    role: str
    depth: int | None
    conversions: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.names[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "source": self.source,
            "kind": self.kind,
            "computes": self.computes,
            "features": None if self.features is None else list(self.features),
            "eps": self.eps,
            "role": self.role,
            "depth": self.depth,
            "conversions": dict(self.conversions),
        }


@dataclass
class BlockPlacement:
    """The placement of one block of the stack and the role of each norm in it."""

    name: str
    source: str
    placement: str
    qk_norm: bool
    roles: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "placement": self.placement,
            "qk_norm": self.qk_norm,
            "roles": dict(self.roles),
        }


@dataclass
class Inspection:
    """What :func:`inspect` found; ``str()`` is a readable report, ``to_dict()`` JSON-ready."""

    model: str
    stack: str
    blocks: list[BlockPlacement]
    sites: list[NormSite]
    lns: str
    traced: str

    @property
    def placements(self) -> dict[str, int]:
        """``placement -> number of blocks``, in order of first appearance."""
        counts: dict[str, int] = {}
        for b in self.blocks:
            counts[b.placement] = counts.get(b.placement, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "stack": self.stack,
            "placements": self.placements,
            "blocks": [b.to_dict() for b in self.blocks],
            "sites": [s.to_dict() for s in self.sites],
            "lns": self.lns,
            "traced": self.traced,
        }

    def __str__(self) -> str:
        lines = [f"normlab inspect: {self.model}"]
        n = len(self.blocks)
        lines.append(f"  blocks: {n} in {self.stack}" if n else "  blocks: no stack of blocks found")
        if self.blocks:
            lines.append(
                "  placement: "
                + ", ".join(f"{p} x {k}" for p, k in self.placements.items())
                + (" (with q/k norms)" if any(b.qk_norm for b in self.blocks) else "")
            )
        lines.append(f"  roles from: {self.traced}")
        lines.append(f"  LayerNorm Scaling: {self.lns}")
        kinds: dict[str, int] = {}
        for s in self.sites:
            kinds[s.source] = kinds.get(s.source, 0) + 1
        listed = ", ".join(f"{k} x {v}" for k, v in kinds.items())
        lines.append(f"  norms: {len(self.sites)} ({listed})")
        lines.append("")
        shown = _representatives(self.sites)
        rows = [["norm", "role", "class", "computes", "conversions"]]
        for s, count in shown:
            label = s.name if count == 1 else f"{s.name} (+{count - 1} alike)"
            conv = "; ".join(f"{t}: {r}" for t, r in s.conversions.items())
            rows.append([label, s.role, s.source, s.computes, conv])
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            cells = "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True))
            lines.append(f"  {cells}  {r[4]}")
        return "\n".join(lines)


def _representatives(sites: list[NormSite]) -> list[tuple[NormSite, int]]:
    """One row per (role, class, conversions) in the stack, the others counted; sites outside it
    each get their own row."""
    seen: dict[tuple[Any, ...], list[Any]] = {}
    out: list[list[Any]] = []
    for s in sites:
        if s.depth is None:
            out.append([s, 1])
            continue
        parts = [p for p in s.name.split(".") if not p.isdigit()]  # the same norm of every block
        key = (".".join(parts), s.role, s.source, s.computes, tuple(s.conversions.items()))
        if key in seen:
            seen[key][1] += 1
        else:
            row = [s, 1]
            seen[key] = row
            out.append(row)
    return [(r[0], r[1]) for r in out]


# --------------------------------------------------------------------------------------------
# What a norm computes


def computes(info: NormInfo) -> str:
    """The formula of ``info`` in one line (another normlab norm: the first line of its docstring)."""
    w = {0.0: "w", 1.0: "(1 + w)"}.get(info.weight_offset, f"({info.weight_offset:g} + w)")
    scale = "" if info.scale == 1.0 else f" x {info.scale:.4g}"
    affine = (f" * {w}" if info.weight is not None else "") + (" + b" if info.bias is not None else "")
    eps = "eps" if info.eps is None else f"{info.eps:g}"
    dims = "" if len(info.shape) == 1 else f" over the last {len(info.shape)} dims"
    if info.kind == "layernorm":
        return f"(x - mean) / sqrt(var + {eps}){affine}{scale}{dims}"
    if info.kind == "rmsnorm":
        return f"x / sqrt(mean(x^2) + {eps}){affine}{scale}{dims}"
    if info.kind == "batchnorm":
        return f"(x - running_mean) / sqrt(running_var + {eps}){affine} per channel (batch stats in train)"
    if info.kind == "groupnorm":
        return f"(x - mean) / sqrt(var + {eps}){affine} over {info.num_groups} groups of channels"
    if info.kind == "instancenorm":
        return f"(x - mean) / sqrt(var + {eps}){affine} per sample and channel"
    doc = (type(info.module).__doc__ or "").strip().splitlines()
    return doc[0].rstrip(".") if isinstance(info.module, NormMixin) and doc else info.note or info.kind


def _outside_role(order: int | None, block_orders: list[int]) -> str:
    if order is None:
        return "not called"
    if not block_orders:
        return "outside the blocks"
    if order < min(block_orders):
        return "before the blocks (embedding)"
    if order > max(block_orders):
        return "final (after the blocks)"
    return "between blocks (an encoder's final norm, a decoder's embedding norm)"


# --------------------------------------------------------------------------------------------
# The function


def inspect(model: nn.Module, example: Any = None) -> Inspection:
    """The norm sites of ``model``, the placement of each of its blocks, and what normlab's
    conversions and LayerNorm Scaling would do (nothing is changed).

    Args:
        model: any ``nn.Module``.
        example: an input of the model (a tensor, a tuple of positional inputs or a mapping of
            keyword inputs) for the forward that gives each norm its role; for a Hugging Face
            model (one with a ``config``) a small one is made from the config when not given.

    Returns:
        An :class:`Inspection`; ``print()`` it for the report.
    """
    stack = find_blocks(model, required=False)
    occ = occurrences(model)
    infos: list[tuple[list[str], nn.Module, NormInfo | None, str]] = []
    on_meta = any(t.device.type == "meta" for t in (*model.parameters(), *model.buffers()))
    if example is None and not on_meta:
        example = default_example(model)
    traced = "not traced (no example input; pass example=)" if example is None else "one forward on example"
    if on_meta:
        traced, example = "not traced (the model is on the meta device)", None
    shapes: dict[int, Tensor] = {}
    if example is not None:
        try:
            shapes = record_inputs(model, example)
        except ValueError as e:
            traced, example = f"not traced ({e})", None
    for o in occ.values():
        call = shapes.get(id(o.module))
        try:
            info = read_norm(o.module, input_shape=None if call is None else tuple(call.shape))
        except UnsupportedNormError as e:
            infos.append((list(o.names), o.module, None, f"refused: {e}"))
            continue
        if info is not None:
            infos.append((list(o.names), o.module, info, ""))
    calls: dict[int, Call] = {}
    blocks = list(stack) if stack is not None else []
    if example is not None:
        watched = [m for _, m, _, _ in infos] + [b for _, b in blocks]
        watched += block_parts(blocks)
        calls = trace(model, example, watched)
    sites = []
    block_orders = sorted(calls[id(b)].order for _, b in blocks if id(b) in calls)
    placements: list[BlockPlacement] = []
    roles_by_name: dict[str, str] = {}
    for block_name, block in blocks:
        norms = {n: m for names, m, _, _ in infos for n in names if n.startswith(block_name + ".")}
        if example is None:
            roles = {n[len(block_name) + 1 :]: "not traced" for n in norms}
        else:
            roles = block_roles(block_name, block, norms, calls)
        roles_by_name.update({f"{block_name}.{k}": v for k, v in roles.items()})
        placements.append(
            BlockPlacement(
                block_name,
                type(block).__name__,
                placement_of(block, roles),
                any(r == "qk" for r in roles.values()),
                roles,
            )
        )
    for names, module, info, refusal in infos:
        depth = None if stack is None else stack.depth_of(names[0])
        if depth is not None:
            role = roles_by_name.get(names[0], "inside a block")
        else:
            c = calls.get(id(module))
            role = (
                "not traced"
                if example is None
                else _outside_role(None if c is None else c.order, block_orders)
            )
        sites.append(
            NormSite(
                names,
                type(module).__name__,
                None if info is None else info.kind,
                refusal if info is None else computes(info),
                None if info is None else info.shape,
                None if info is None else info.eps,
                role,
                depth,
            )
        )
    _conversions(model, sites, infos, example)
    return Inspection(
        model=type(model).__name__,
        stack=("-" if stack is None else stack.name or "<root>"),
        blocks=placements,
        sites=sites,
        lns=_lns(model, example),
        traced=traced,
    )


def _conversions(
    model: nn.Module,
    sites: list[NormSite],
    infos: list[tuple[list[str], nn.Module, NormInfo | None, str]],
    example: Any,
) -> None:
    by_name = {s.name: s for s in sites}
    readable = {names[0]: info for names, _, info, _ in infos if info is not None}
    channel = {n for n, i in readable.items() if i.kind in _CHANNEL_KINDS}
    token = set(readable) - channel
    for group, targets in ((token, _TOKEN_TARGETS), (channel, _CHANNEL_TARGETS)):
        if not group:
            continue

        def chosen(name: str, module: nn.Module, group: set[str] = group) -> bool:
            return name in group

        for target in targets:
            rep = convert_norms(
                model,
                target,
                where=chosen,
                strict=False,
                dry_run=True,
                example=example,
            )
            for r in rep.replaced:
                by_name[r.name].conversions[target] = r.relation
            for s in rep.skipped:
                if s.names[0] in by_name:
                    reason = s.reason if not s.reason.startswith("already") else "already " + target
                    by_name[s.names[0]].conversions[target] = reason


def _lns(model: nn.Module, example: Any) -> str:
    try:
        plan = layernorm_scaling_plan(model, example=example)
    except ValueError as e:
        return f"refused: {str(e).removeprefix('apply_layernorm_scaling: ')}"
    last = 1.0 / math.sqrt(1 + max(depth for _, _, depth in plan)) if plan else 1.0
    return f"applies: {len(plan)} pre-norms scaled by 1/sqrt(l + 1), from 1 to {last:.3g}"
