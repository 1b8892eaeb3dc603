"""``convert_norms``: change the normalization of an existing model, keeping what the maths allows.

Works on any ``nn.Module`` tree (torch, normlab, Hugging Face, timm, torchvision models): every
norm :func:`~normlab.convert.detect.read_norm` can read is a candidate; ``where`` selects among
them; each selected one is replaced, in every place it is held, by a normlab norm built from the
source's features, eps and layout, with its affine parameters (and statistics) carried over
where they mean the same thing. :func:`revert` undoes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from normlab.convert.detect import (
    TOKEN_KINDS,
    NormInfo,
    UnsupportedNormError,
    forward_example,
    probe_input,
    probe_tolerance,
    read_norm,
)
from normlab.convert.select import Where, compile_where
from normlab.norms import NORMS
from normlab.norms._base import NormMixin, NormSpec
from normlab.norms._info import EVAL, EXACT, NEW, ZERO_MEAN, NotConvertibleError
from normlab.norms.lns import LNSScale
from normlab.structure import BlockStack, Occurrence, find_blocks, occurrences

__all__ = [
    "ConversionSummary",
    "Replacement",
    "Skipped",
    "convert_norms",
    "record_inputs",
    "revert",
]


# options worth a glance in the report's table (the rest is in to_dict())
_SHOWN_OPTIONS = ("layer_idx", "base", "num_groups", "channels_first")


@dataclass
class Replacement:
    """One module replaced by :func:`convert_norms`.

    Attributes:
        names: every qualified name the module is held under (more than one when shared).
        source: class name of the replaced module.
        target: class name of the new module.
        relation: how the new function relates to the old one: ``"exact"``, ``"exact on
            zero-mean inputs"``, ``"exact in eval"`` or ``"approximate: new function"``.
        depth: index of the block that holds it, ``None`` outside the block stack.
        options: the keyword arguments the new module was built with (device/dtype left out).
        copied: target tensor -> where its value came from (``"weight"``, ``"1 + weight"``,
            ``"sqrt(running_var + eps)"``, ...).
        shared: the copied tensors that are the very same ``Parameter``/buffer objects as the
            source's (an optimizer built before the conversion keeps updating them).
        new: target tensors that were freshly initialised -> their init.
        dropped: source tensors that have no counterpart in the new module.
    """

    names: tuple[str, ...]
    source: str
    target: str
    relation: str
    depth: int | None
    options: dict[str, Any]
    copied: dict[str, str] = field(default_factory=dict)
    shared: list[str] = field(default_factory=list)
    new: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    checked: str = ""
    old_module: nn.Module | None = field(default=None, repr=False, compare=False)
    new_module: nn.Module | None = field(default=None, repr=False, compare=False)
    # internal: the slots that hold the module and which target tensors are source tensors
    slots: list[tuple[nn.Module, str]] = field(default_factory=list, repr=False, compare=False)
    moved: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.names[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "source": self.source,
            "target": self.target,
            "relation": self.relation,
            "depth": self.depth,
            "options": {k: _jsonable(v) for k, v in self.options.items()},
            "copied": dict(self.copied),
            "shared": list(self.shared),
            "new": dict(self.new),
            "dropped": list(self.dropped),
            "checked": self.checked,
        }

    def summary(self) -> str:
        parts = []
        shown = [f"{k}={self.options[k]}" for k in _SHOWN_OPTIONS if k in self.options]
        if shown:
            parts.append(", ".join(shown))
        if self.copied:
            parts.append(", ".join(k if k == v else f"{k}<-{v}" for k, v in self.copied.items()))
        if self.new:
            parts.append("new " + ", ".join(f"{k}={v}" for k, v in self.new.items()))
        if self.dropped:
            parts.append("dropped " + ", ".join(self.dropped))
        return "; ".join(parts)


@dataclass
class Skipped:
    """A norm :func:`convert_norms` left as it was, and why."""

    names: tuple[str, ...]
    source: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "source": self.source, "reason": self.reason}


@dataclass
class ConversionSummary:
    """What :func:`convert_norms` did (or, with ``dry_run``, would do). ``str(summary)`` is a table.

    ``recipe`` holds the call's arguments when they are plain data (a ``where`` given as
    strings or ranges), so that a saved conversion can be re-applied to a fresh model
    (the ``normlab convert`` checkpoints); otherwise it is ``None``.
    """

    to: str
    replaced: list[Replacement] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    blocks: BlockStack | None = None
    dry_run: bool = False
    recipe: dict[str, Any] | None = None
    reverted: bool = False

    def __len__(self) -> int:
        return len(self.replaced)

    def to_dict(self) -> dict[str, Any]:
        return {
            "to": self.to,
            "dry_run": self.dry_run,
            "blocks": None if self.blocks is None else {"name": self.blocks.name, "size": self.blocks.size},
            "replaced": [r.to_dict() for r in self.replaced],
            "skipped": [s.to_dict() for s in self.skipped],
            "recipe": self.recipe,
        }

    def __str__(self) -> str:
        verb = "would replace" if self.dry_run else "replaced"
        head = f"convert_norms -> {self.to}: {verb} {len(self.replaced)} norms, skipped {len(self.skipped)}"
        if self.blocks is not None:
            head += f" (blocks: {self.blocks.name or '<root>'}, {self.blocks.size})"
        lines = [head]
        rows = [
            [", ".join(r.names), f"{r.source} -> {r.target}", r.relation, r.summary()] for r in self.replaced
        ]
        lines += _columns(rows)
        if self.skipped:
            lines.append("skipped:")
            lines += _columns([[", ".join(s.names), s.source, s.reason] for s in self.skipped])
        return "\n".join(lines)


def _columns(rows: list[list[str]]) -> list[str]:
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() + "  " + r[-1]
        for r in rows
    ]


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return repr(v)


# --------------------------------------------------------------------------------------------
# Targets


def _resolve_target(to: str | type) -> tuple[str, type[nn.Module]]:
    if isinstance(to, str):
        name = NORMS.resolve(to)
        return name, NORMS.get(name)
    reg = getattr(to, "registry_name", None)
    if isinstance(to, type) and isinstance(reg, str) and reg in NORMS and NORMS.get(reg) is to:
        return reg, to
    raise ValueError(
        f"convert_norms: to must be a registered norm name or class (see normlab.list_norms()), got {to!r}"
    )


def _default_selected(info: NormInfo, spec: NormSpec) -> bool:
    """Which norms ``where=None`` converts: LayerNorm-like ones for per-token targets, BatchNorms for
    channel targets. BatchNorm is left alone when converting to DyT & co., as the DyT authors
    advise (jiachenzhu/DyT#9: DyT does not replace BN without a loss)."""
    if spec.layout == "channel":
        return info.kind == "batchnorm"
    return info.kind in TOKEN_KINDS


def _family_of_unreadable(module: nn.Module) -> str:
    return "channel" if "BatchNorm" in type(module).__name__ else "last"


def _placement(module: nn.Module, model: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    for source in (module, model):
        t = next((t for t in (*source.parameters(), *source.buffers()) if t.is_floating_point()), None)
        if t is not None:
            return t.device, t.dtype
    return None, None


# --------------------------------------------------------------------------------------------
# Building one replacement


def _build_kwargs(
    info: NormInfo,
    cls: type[nn.Module],
    depth: int | None,
    name: str,
    stack: BlockStack | None,
    norm_kwargs: Mapping[str, Any],
) -> tuple[int | tuple[int, ...], dict[str, Any]]:
    """The target's own mirror of ``info`` (its ``convert_kwargs``), the context it needs (its
    block's depth), then the caller's options."""
    spec: NormSpec = cls.spec  # type: ignore[attr-defined]
    features, kw = cls.convert_kwargs(info, options=norm_kwargs)  # type: ignore[attr-defined]
    for need in spec.needs:
        if need in norm_kwargs:
            continue
        if need == "layer_idx":
            if depth is None:
                where_blocks = f"the block stack {stack.name!r}" if stack is not None else "a block stack"
                raise NotConvertibleError(
                    f"{cls.__name__} needs layer_idx (the index of its block), and {name!r} is not inside "
                    f"{where_blocks}; leave it out with where=, or pass layer_idx="
                )
            kw["layer_idx"] = depth
        else:
            raise NotConvertibleError(f"{cls.__name__} needs {need!r}; pass it as a keyword argument")
    kw.update(norm_kwargs)
    return features, kw


def _set_tensor(module: nn.Module, name: str, value: Tensor) -> None:
    """Give ``module`` ``value`` as its parameter or buffer ``name`` (the same object)."""
    if name in module._parameters:
        module._parameters[name] = value  # type: ignore[assignment]
    else:
        module._buffers[name] = value


def _describe_init(t: Tensor) -> str:
    """``"0.5"`` for a tensor filled with one value, else ``"init"``."""
    t = t.detach()
    if t.device.type != "meta" and t.numel() and bool((t == t.reshape(-1)[0]).all()):
        return f"{float(t.reshape(-1)[0]):g}"
    return "init"


def _transfer(info: NormInfo, new: nn.Module, rec: Replacement, copy_affine: bool) -> None:
    """Carry the source's state into ``new`` and record what went where."""
    src = info.module
    handled: set[str] = set()
    rg_default = (
        any(p.requires_grad for p in src.parameters()) if any(True for _ in src.parameters()) else True
    )

    def carry(target_name: str, value: Tensor | None, source_expr: str, transform: str | None) -> None:
        current = getattr(new, target_name, None)
        if not isinstance(current, Tensor) or value is None or tuple(value.shape) != tuple(current.shape):
            return
        handled.add(target_name)
        unchanged = transform is None and value.dtype == current.dtype and value.device == current.device
        if unchanged and (isinstance(value, nn.Parameter) == isinstance(current, nn.Parameter)):
            _set_tensor(new, target_name, value)
            rec.shared.append(target_name)
            rec.moved[target_name] = source_expr
            rec.copied[target_name] = source_expr
            return
        with torch.no_grad():
            current.copy_(value.detach())
        if isinstance(current, nn.Parameter):
            current.requires_grad_(value.requires_grad if isinstance(value, nn.Parameter) else rg_default)
        rec.copied[target_name] = transform or source_expr

    if copy_affine:
        w_expr = info.weight_transform()
        w = info.weight if w_expr is None else info.effective_weight()
        carry("weight", w, "weight", w_expr)
        b = info.bias if info.scale == 1.0 else info.effective_bias()
        carry("bias", b, "bias", None if info.scale == 1.0 else f"bias x {info.scale:.6g}")
    # Statistics carry regardless of copy_affine: they describe the data, not learned affine.
    for stat, value, expr, transformed in cast(NormMixin, new).statistics_from(info):
        if value is None:  # the norm set it itself
            rec.copied[stat] = expr
            handled.add(stat)
        elif transformed:
            current = getattr(new, stat, None)
            if isinstance(current, Tensor) and tuple(current.shape) == tuple(value.shape):
                with torch.no_grad():
                    current.copy_(value)
                rec.copied[stat] = expr
                handled.add(stat)
        else:
            carry(stat, value, expr, None)
    # what the new module initialised itself, and what of the source found no home
    for pname, p in new.named_parameters(recurse=False):
        if pname not in handled:
            rec.new[pname] = _describe_init(p)
            p.requires_grad_(rg_default)
    for bname, buf in new.named_buffers(recurse=False):
        if bname not in handled and bname in new._buffers and bname not in new._non_persistent_buffers_set:
            rec.new[bname] = _describe_init(buf)
    carried = set(rec.copied.values())
    source_tensors = {
        "weight": info.weight,
        "bias": info.bias,
        "running_mean": info.running_mean,
        "running_var": info.running_var,
        "num_batches_tracked": info.num_batches_tracked,
        **info.extra,
    }
    for sname, t in source_tensors.items():
        if t is None:
            continue
        used = any(sname in expr for expr in carried)
        if not used:
            rec.dropped.append(sname)


def _make(
    info: NormInfo,
    cls: type[nn.Module],
    occ: Occurrence,
    depth: int | None,
    stack: BlockStack | None,
    model: nn.Module,
    copy_affine: bool,
    norm_kwargs: Mapping[str, Any],
    call_input: Tensor | None = None,
) -> Replacement:
    features, kw = _build_kwargs(info, cls, depth, occ.name, stack, norm_kwargs)
    device, dtype = _placement(info.module, model)
    try:
        new = cls(features, **kw, device=device, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise NotConvertibleError(f"building {cls.__name__}({features!r}, {kw}) failed: {e}") from e
    relation: str = cls.conversion_relation(info, kw)  # type: ignore[attr-defined]
    if not copy_affine and (info.weight is not None or info.bias is not None):
        relation = NEW + " (affine not copied)"
    for key in ("eps", "eps_mode"):
        if key in norm_kwargs and relation != NEW and norm_kwargs[key] != getattr(info, key):
            relation = NEW
    rec = Replacement(
        names=tuple(occ.names),
        source=info.source,
        target=cls.__name__,
        relation=relation,
        depth=depth,
        options=dict(kw),
        old_module=info.module,
        new_module=new,
        slots=list(occ.slots),
    )
    _transfer(info, new, rec, copy_affine)
    if "bias" in rec.dropped and relation in (EXACT, ZERO_MEAN, EVAL):
        rec.relation = NEW + " (bias dropped)"
    if info.note:
        rec.options.setdefault("read", info.note)
    new.train(info.module.training)
    _verify(info, new, rec, call_input)
    label = getattr(info.module, "qualified_name", None)
    if isinstance(new, NormMixin) and isinstance(label, str):
        new.qualified_name = label
    return rec


def _verify(info: NormInfo, new: nn.Module, rec: Replacement, call_input: Tensor | None) -> None:
    """The guard on a replacement: ``new`` must take what the model gives the old module and give
    an output of the same shape; a relation that claims equality is checked on it numerically
    (on zero-mean rows for ``exact on zero-mean inputs``; in eval mode, the only one that leaves
    running statistics alone), else downgraded to a new function with the difference found.

    The input is the one the model called the old module with (``example=`` of
    :func:`convert_norms`), else a fixed random input of the read shape.

    Raises:
        NotConvertibleError: ``new`` fails on that input or gives another shape.
    """
    old = info.module
    tensors = [*old.parameters(), *old.buffers(), *new.parameters(), *new.buffers()]
    x = call_input if call_input is not None else probe_input(info)
    # a model sized on the meta device (a study's build check) has no numbers to compare
    if x.device.type == "meta" or any(t.device.type == "meta" for t in tensors):
        rec.checked = "not run (meta device)"
        return
    if tensors and x.device != tensors[0].device:  # a parameterless source: the probe is on CPU
        x = x.to(tensors[0].device)
    if rec.relation == ZERO_MEAN:
        x = x - x.mean(dim=1 if info.channels_first else -1, keepdim=True)
    modes = [(m, m.training) for m in (*old.modules(), *new.modules())]
    try:
        old.eval()
        new.eval()
        with torch.no_grad():
            try:
                want = old.forward(x)
            except Exception as e:
                raise NotConvertibleError(
                    f"its own forward fails on a {tuple(x.shape)} probe input ({type(e).__name__}: {e})"
                ) from e
            try:
                got = new.forward(x)
            except Exception as e:
                raise NotConvertibleError(
                    f"the {type(new).__name__} built for it fails on the {tuple(x.shape)} input it takes "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                ) from e
    finally:
        for m, mode in modes:
            m.training = mode
    if not isinstance(want, Tensor) or not isinstance(got, Tensor) or got.shape != want.shape:
        shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in (want, got)]
        raise NotConvertibleError(
            f"on a {tuple(x.shape)} input it gives {shapes[0]}, {type(new).__name__} {shapes[1]}"
        )
    diff = float((got.double() - want.double()).abs().max() / (1.0 + want.double().abs().max()))
    where = "the model's input" if call_input is not None else "a probe input"
    if rec.relation not in (EXACT, ZERO_MEAN, EVAL):
        rec.checked = f"runs on {where} {tuple(x.shape)}"
        return
    if diff <= probe_tolerance(want.dtype):
        rec.checked = f"max relative difference {diff:.1e} on {where} {tuple(x.shape)}"
        return
    rec.checked = f"claimed {rec.relation}, differs by {diff:.2e} on {where} {tuple(x.shape)}"
    rec.relation = NEW + f" (differs by {diff:.1e} when checked)"


def _move_lns_hooks(src: nn.Module, dst: nn.Module) -> None:
    """LayerNorm Scaling is a forward hook on the norm (normlab.convert.lns); it moves with the norm."""
    for key, hook in list(src._forward_hooks.items()):
        if isinstance(hook, LNSScale):
            del src._forward_hooks[key]
            dst._forward_hooks[key] = hook


# --------------------------------------------------------------------------------------------
# The public functions


def convert_norms(
    model: nn.Module,
    to: str | type,
    *,
    where: Where = None,
    copy_affine: bool = True,
    strict: bool = True,
    dry_run: bool = False,
    example: Any = None,
    **norm_kwargs: Any,
) -> ConversionSummary:
    """Replace the normalization modules of ``model`` (in place) by normlab norm ``to``.

    ``convert_norms(llama, "dyt")`` turns every LlamaRMSNorm into a :class:`normlab.DyT`;
    ``convert_norms(resnet, "groupnorm")`` every BatchNorm into a GroupNorm;
    ``convert_norms(model, "dyt", where="layers.0-5")`` only the norms of blocks 0 to 5.

    Norms are found anywhere (``Sequential``, ``ModuleList``, ``ModuleDict``, attributes) and read
    by :func:`~normlab.convert.detect.read_norm`: torch's, normlab's, timm's (``LayerNorm2d``,
    ``RmsNorm``, channels-first variants, ``FrozenBatchNorm2d``) and Hugging Face's per-model
    classes (``LlamaRMSNorm``, ``Qwen2RMSNorm``, ``MistralRMSNorm``, Gemma's ``x * (1 + w)``
    convention, GPT-2/BERT ``nn.LayerNorm``, ConvNeXt's channels-first LayerNorm). A module held
    under several names is replaced by one new module held under all of them.

    The new norm is built with the source's features, layout (``channels_first``), eps, affine
    flags and, for BatchNorm-like targets, momentum and ``track_running_stats``; ``norm_kwargs``
    override or add options (``alpha_init=0.8``, ``num_groups=8``, ``bias=True``). With
    ``copy_affine`` the source's effective weight and bias are carried: Gemma's ``1 + w``, LNS's
    ``w / sqrt(l+1)``. A tensor carried unchanged is *the same* ``Parameter``/buffer object
    (optimizers keep working; :func:`revert` hands back what was trained). Statistics carry too:
    BatchNorm running statistics to BatchNorm-like targets, and to Batchless as
    ``mean = running_mean``, ``std = sqrt(running_var + eps)`` (equal in eval). Device, dtype,
    ``requires_grad``, train/eval mode and normlab error labels are preserved.

    Exactness (``Replacement.relation``): LayerNorm -> LayerNorm and RMSNorm -> RMSNorm (any
    library, Gemma included) are exact; LayerNorm <-> RMSNorm are equal on zero-mean inputs;
    BatchNorm -> normlab BatchNorm/CrossBatchNorm is exact, -> Batchless exact in eval; anything
    -> DyT/Derf is a new function (Zhu et al. 2025, arXiv:2503.10622 train DyT from scratch;
    the LayerNorm weight and bias are kept as DyT's weight and bias, alpha starts at
    ``alpha_init``). To LNS (Sun et al. 2025, arXiv:2502.05795) each norm gets ``layer_idx`` =
    the index of its block in the model's block stack.

    Args:
        model: the model; changed in place (not with ``dry_run``).
        to: a registered norm name (``normlab.list_norms()``) or class.
        where: which norms (see :func:`~normlab.convert.select.compile_where`): a name pattern
            (``"layers.0-5"``, ``"h.*.ln_1"``), a depth range (``"0-5"``, ``range(6)``), the
            query/key norms of attention (``"qk"``), a class, a callable ``(name, module) ->
            bool``, or a list of these. ``None``: the
            LayerNorm-like norms for a per-token target (LayerNorm, RMSNorm, DyT, LNS, ...),
            the BatchNorms for a channel target (GroupNorm, Batchless, CrossBatchNorm, ...);
            BatchNorm is left alone for DyT unless selected (DyT#9).
        copy_affine: carry weight and bias (else the new norm keeps its own init).
        strict: raise ``ValueError`` for a selected norm that cannot be converted (nothing is
            changed then); with ``strict=False`` it is skipped and the report says why.
        dry_run: build the report without changing the model.
        example: an input of the model (a tensor, a tuple of positional inputs or a mapping of
            keyword inputs). One no-grad eval forward records what each norm is called with:
            the guard then checks every replacement on that very input, and norms without
            weight or ``normalized_shape`` get their features from it. Without it, each
            replacement is checked on a random input of the shape read from the module.
        **norm_kwargs: options of the target norm, for every replaced module.

    Returns:
        A :class:`ConversionSummary`; a second identical call replaces nothing (modules that are
        already ``to`` are skipped).
    """
    target, cls = _resolve_target(to)
    spec: NormSpec = cls.spec  # type: ignore[attr-defined]
    stack = find_blocks(model, required=False)
    select = compile_where(where, stack)
    report = ConversionSummary(
        to=target, blocks=stack, dry_run=dry_run, recipe=_recipe(target, where, copy_affine, norm_kwargs)
    )
    replaced_prefixes: list[str] = []
    failures: list[str] = []
    calls = {} if example is None else record_inputs(model, example)

    def refuse(names: tuple[str, ...], source: str, kind: str, reason: object) -> None:
        # strict: collected, then raised with nothing changed; else skipped, with the reason
        if strict:
            failures.append(f"{source} {names[0]!r}: {reason}" if names != ("",) else str(reason))
        else:
            report.skipped.append(Skipped(names, source, f"{kind}: {reason}"))

    if _is_norm(model):  # the root has no parent slot to put a new module in
        reason = "the model itself is a norm module; convert it inside a container (nn.Sequential(norm))"
        refuse(("",), type(model).__name__, "refused", reason)
    for occ in occurrences(model).values():
        names, module = tuple(occ.names), occ.module
        if any(n.startswith(p) for n in names for p in replaced_prefixes):
            continue
        if not any(select(n, module) for n in names):
            continue
        call_input = calls.get(id(module))
        try:
            info = read_norm(module, input_shape=None if call_input is None else tuple(call_input.shape))
        except UnsupportedNormError as e:
            if where is not None or _family_of_unreadable(module) == spec.layout:
                refuse(names, type(module).__name__, "unsupported", e)
            continue
        if info is None:
            continue
        if where is None and not _default_selected(info, spec):
            reason = (
                f"left alone: a {info.kind} is not replaced by {target} by default; select it with where="
            )
            report.skipped.append(Skipped(names, info.source, reason))
            continue
        if type(module) is cls:
            report.skipped.append(Skipped(names, info.source, f"already {target}"))
            continue
        depth = None if stack is None else stack.depth_of(occ.name)
        try:
            rec = _make(info, cls, occ, depth, stack, model, copy_affine, norm_kwargs, call_input)
        except NotConvertibleError as e:
            refuse(names, info.source, "refused", e)
            continue
        report.replaced.append(rec)
        replaced_prefixes += [n + "." for n in names]
    if failures:
        raise ValueError(
            f"convert_norms(to={target!r}): cannot convert {len(failures)} module(s), nothing was changed "
            "(strict=False skips them):\n  " + "\n  ".join(failures)
        )
    _install(report)
    return report


def record_inputs(model: nn.Module, example: Any) -> dict[int, Tensor]:
    """``id(module) -> the first tensor it is called with`` for every leaf module of ``model``, from
    one no-grad forward on ``example`` in eval mode (dropout off, running statistics untouched;
    the modes are restored). ``example``: a tensor, a tuple of positional inputs, or a mapping
    of keyword inputs.

    Raises:
        ValueError: the model's forward fails on ``example`` (its message included).
    """
    seen: dict[int, Tensor] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        first = args[0] if args else next(iter(kwargs.values()), None)
        if id(module) not in seen and isinstance(first, Tensor):
            seen[id(module)] = first.detach().clone()

    leaves = [m for m in model.modules() if not m._modules]
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in leaves]
    try:
        forward_example(model, example)
    except Exception as e:
        raise ValueError(
            f"convert_norms: the model's forward on example= failed ({type(e).__name__}: {e})"
        ) from e
    finally:
        for h in handles:
            h.remove()
    return seen


def _install(report: ConversionSummary) -> None:
    """Put each new module in every slot of the old one (a dry run builds them, installs none)."""
    for rec in report.replaced:
        assert rec.old_module is not None and rec.new_module is not None
        if report.dry_run:
            rec.new_module = None  # built to check it can be, never installed
            continue
        _move_lns_hooks(rec.old_module, rec.new_module)
        for parent, key in rec.slots:
            parent._modules[key] = rec.new_module


def _is_norm(module: nn.Module) -> bool:
    try:
        return read_norm(module) is not None
    except UnsupportedNormError:
        return True


def _recipe(
    target: str, where: Where, copy_affine: bool, norm_kwargs: Mapping[str, Any]
) -> dict[str, Any] | None:
    def plain(w: Where) -> Any:
        if w is None or isinstance(w, str):
            return w
        if isinstance(w, range) and w.step == 1:
            return f"{w.start}-{w.stop - 1}" if len(w) else None
        if isinstance(w, (list, tuple)) and not any(isinstance(x, type) for x in w):
            items = [plain(x) for x in w]
            return items if all(isinstance(x, str) for x in items) else None
        return None

    where_plain = plain(where)
    if where is not None and where_plain is None:
        return None
    if not all(v is None or isinstance(v, (bool, int, float, str)) for v in norm_kwargs.values()):
        return None
    return {"to": target, "where": where_plain, "copy_affine": copy_affine, "norm_kwargs": dict(norm_kwargs)}


def revert(model: nn.Module, report: ConversionSummary) -> nn.Module:
    """Undo :func:`convert_norms`: put back the modules it replaced, in every place they were held.

    Right after a conversion the model's ``state_dict`` is exactly what it was before. Tensors
    the conversion *shared* (carried unchanged) are handed back as they are now, so training
    done in between is kept there; tensors it transformed or dropped come back with the values
    they had at conversion. The restored modules take the current device, dtype and train/eval
    mode of the modules they replace. Returns ``model``.

    Raises:
        ValueError: a dry-run report, a report already reverted, or a model whose module at a
            converted name is no longer the one the conversion put there (revert later
            conversions first).
    """
    if report.dry_run:
        raise ValueError("revert: the report is from a dry run; nothing was converted")
    if report.reverted:
        raise ValueError("revert: this conversion was already reverted")
    for rec in report.replaced:
        for (parent, key), name in zip(rec.slots, rec.names, strict=True):
            if parent._modules.get(key) is not rec.new_module:
                raise ValueError(
                    f"revert: the module at {name!r} is not the {rec.target} this conversion installed "
                    "(the model changed since, or a later conversion must be reverted first); "
                    "nothing was changed"
                )
        if not _in_model(model, rec):
            raise ValueError(f"revert: {rec.name!r} is not part of this model")
    for rec in reversed(report.replaced):
        old, new = rec.old_module, rec.new_module
        assert old is not None and new is not None
        for target_name, source_name in rec.moved.items():
            value = getattr(new, target_name)
            if isinstance(value, Tensor):
                _set_tensor(old, source_name, value)
        _follow(old, new)
        _move_lns_hooks(new, old)
        for parent, key in rec.slots:
            parent._modules[key] = old
    report.reverted = True
    return model


def _in_model(model: nn.Module, rec: Replacement) -> bool:
    parents = {id(m) for m in model.modules()} | {id(model)}
    return all(id(parent) in parents for parent, _ in rec.slots)


def _follow(old: nn.Module, new: nn.Module) -> None:
    """Move ``old`` to ``new``'s device and floating dtype (if they changed), and its mode."""
    ref = next((t for t in (*new.parameters(), *new.buffers()) if t.is_floating_point()), None)
    mine = next((t for t in (*old.parameters(), *old.buffers()) if t.is_floating_point()), None)
    if ref is not None and mine is not None and (ref.device != mine.device or ref.dtype != mine.dtype):
        old.to(device=ref.device)
        if ref.dtype != mine.dtype:
            old.to(dtype=ref.dtype)
    old.train(new.training)
