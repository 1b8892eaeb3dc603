"""Hooks that observe a model without changing it: selection, block discovery, capture, guards.

Everything here is measurement plumbing shared by the probes:

* :func:`select_modules` picks modules by type, by name pattern or by predicate; ``"blocks"``
  is the model's block stack (:func:`normlab.structure.find_blocks`, the one conversion uses).
* :class:`Capture` records module inputs, outputs and output gradients as detached CPU floats.
  Forward hooks return ``None`` and gradient hooks are tensor hooks that return ``None``, so
  outputs and gradients are bit-for-bit those of the unhooked model; every handle is removed
  on exit, also on error.
* :func:`preserved_state` restores what a measuring forward pass could change: train/eval
  flags, every buffer (BatchNorm running statistics, ``num_batches_tracked``, ...) and the
  random number generators (dropout), so diagnostics interleaved with training leave the
  training trajectory untouched.

Names are reported without the wrapper prefixes of ``DistributedDataParallel`` (``module.``)
and ``torch.compile`` (``_orig_mod.``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from normlab.structure import find_blocks, strip_prefixes

ModuleSelector = (
    str
    | type[nn.Module]
    | tuple[type[nn.Module], ...]
    | Sequence[str]
    | Callable[[str, nn.Module], bool]
    | Sequence[tuple[str, nn.Module]]
)
"""What :func:`select_modules` accepts: ``"blocks"``; a glob or ``re:`` pattern on qualified
names; a list of patterns; a module class or tuple of classes; a ``(name, module) -> bool``
predicate; or explicit ``(name, module)`` pairs."""


def first_tensor(obj: Any) -> Tensor | None:
    """The first tensor of a module's output or input: the tensor itself, the first tensor of a
    tuple/list, a mapping's ``hidden_states``/``last_hidden_state``/first tensor value, or the
    ``logits`` of a model output; ``None`` if there is none."""
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for item in obj:
            if isinstance(item, Tensor):
                return item
        return None
    if isinstance(obj, Mapping):
        for key in ("hidden_states", "last_hidden_state", "logits", "x", "input"):
            if isinstance(obj.get(key), Tensor):
                return obj[key]  # type: ignore[no-any-return]
        for value in obj.values():
            if isinstance(value, Tensor):
                return value
        return None
    for attr in ("logits", "last_hidden_state"):
        value = getattr(obj, attr, None)
        if isinstance(value, Tensor):
            return value
    return None


def to_cpu_float(t: Tensor) -> Tensor:
    """A detached CPU copy in float32 (float64 stays float64); never aliases ``t``."""
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.detach().to(device="cpu", dtype=dtype, copy=True)


# --------------------------------------------------------------------------------------------
# Selecting modules


def _is_pairs(sel: object) -> bool:
    return (
        isinstance(sel, Sequence)
        and not isinstance(sel, str)
        and len(sel) > 0
        and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], nn.Module) for p in sel)
    )


def _name_matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def select_modules(model: nn.Module, select: ModuleSelector) -> list[tuple[str, nn.Module]]:
    """Modules of ``model`` (in registration order) with their qualified names.

    ``select`` is ``"blocks"`` (:func:`find_blocks`), a glob on the prefix-stripped qualified
    name (``"blocks.*.attn"``) or a regular expression prefixed ``re:``, a list of such
    patterns, a module class or tuple of classes, a ``(name, module) -> bool`` predicate, or
    explicit ``(name, module)`` pairs (returned as given). The returned names are the real
    attribute paths (``model.get_submodule(name)`` works); display them with
    :func:`strip_prefixes`.

    Raises:
        ValueError: nothing matched, naming the selector.
    """
    if isinstance(select, str) and select == "blocks":
        return list(find_blocks(model))
    if _is_pairs(select):
        pairs = cast("Sequence[tuple[str, nn.Module]]", select)
        return [(str(n), m) for n, m in pairs]
    named = [(n, m) for n, m in model.named_modules() if n]
    out: list[tuple[str, nn.Module]]
    if isinstance(select, type) or (
        isinstance(select, tuple) and select and all(isinstance(t, type) for t in select)
    ):
        types = cast("type[nn.Module] | tuple[type[nn.Module], ...]", select)
        out = [(n, m) for n, m in named if isinstance(m, types)]
    elif isinstance(select, str):
        out = [(n, m) for n, m in named if _name_matches(strip_prefixes(n), select)]
    elif isinstance(select, Sequence) and all(isinstance(s, str) for s in select):
        patterns = [str(s) for s in select]
        out = [(n, m) for n, m in named if any(_name_matches(strip_prefixes(n), s) for s in patterns)]
    elif callable(select):
        out = [(n, m) for n, m in named if select(strip_prefixes(n), m)]
    else:
        raise ValueError(f"select_modules: unsupported selector {select!r}")
    if not out:
        raise ValueError(f"select_modules: no module of {type(model).__name__} matches {select!r}")
    return out


# --------------------------------------------------------------------------------------------
# Capturing


def _input_tensor(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Tensor | None:
    t = first_tensor(args)
    return t if t is not None else first_tensor(kwargs)


class Capture:
    """Record inputs, outputs and output gradients of chosen modules; a context manager.

    ``with Capture(model, "blocks", output_grads=True) as cap: loss = ...; loss.backward()``
    then ``cap.outputs["blocks.3"]`` is the list of that module's outputs, one entry per call,
    as detached CPU float tensors (:func:`to_cpu_float`); ``cap.order`` lists the module names
    in the order their forward finished. Only the first tensor of a tuple/dict output is kept
    (the hidden states of a Hugging Face layer).

    Guarantees: forward hooks return ``None``; output gradients come from tensor hooks that
    return ``None`` (no ``register_full_backward_hook``, whose wrappers can change autograd
    graphs), so the model's outputs and gradients are bit-for-bit unchanged. All module and
    tensor hooks are removed on exit, including after an exception. Under ``torch.no_grad()``
    outputs carry no graph and no gradient is recorded.

    Args:
        model: the model.
        select: which modules (see :func:`select_modules`); names are reported prefix-stripped.
        inputs: record each call's first input tensor.
        outputs: record each call's first output tensor.
        output_grads: record ``dL/d(output)`` of each call when a backward pass reaches it.
        keep: store the tensors; with ``keep=False`` only ``on_output`` sees them.
        on_output: optional ``(name, module, output)`` callback, called with the live output
            inside the forward hook (it must not modify it).
    """

    def __init__(
        self,
        model: nn.Module,
        select: ModuleSelector = "blocks",
        *,
        inputs: bool = False,
        outputs: bool = True,
        output_grads: bool = False,
        keep: bool = True,
        on_output: Callable[[str, nn.Module, Tensor], None] | None = None,
    ) -> None:
        self.modules = [(strip_prefixes(n), m) for n, m in select_modules(model, select)]
        self._want_inputs, self._want_outputs, self._want_grads = inputs, outputs, output_grads
        self._keep, self._on_output = keep, on_output
        self.inputs: dict[str, list[Tensor]] = {n: [] for n, _ in self.modules}
        self.outputs: dict[str, list[Tensor]] = {n: [] for n, _ in self.modules}
        self.output_grads: dict[str, list[Tensor]] = {n: [] for n, _ in self.modules}
        self.order: list[str] = []
        self._handles: list[RemovableHandle] = []
        self._tensor_handles: list[RemovableHandle] = []
        self._attached = False

    def _make_hooks(self, name: str) -> tuple[Callable[..., None], Callable[..., None]]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            t = _input_tensor(args, kwargs)
            if t is not None and self._keep:
                self.inputs[name].append(to_cpu_float(t))

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            t = first_tensor(output)
            self.order.append(name)
            if t is None:
                return
            if self._on_output is not None:
                self._on_output(name, module, t)
            if self._want_outputs and self._keep:
                self.outputs[name].append(to_cpu_float(t))
            if self._want_grads and t.requires_grad and torch.is_grad_enabled():
                slot = len(self.output_grads[name])
                self.output_grads[name].append(torch.empty(0))

                def grad_hook(g: Tensor) -> None:
                    # several backward passes accumulate, like .grad does
                    prev = self.output_grads[name][slot]
                    g = to_cpu_float(g)
                    self.output_grads[name][slot] = g if prev.numel() == 0 else prev + g

                self._tensor_handles.append(t.register_hook(grad_hook))  # type: ignore[no-untyped-call]

        return pre_hook, hook

    def attach(self) -> Capture:
        if self._attached:
            raise ValueError("Capture: already attached")
        self._attached = True
        try:
            for name, module in self.modules:
                pre_hook, hook = self._make_hooks(name)
                if self._want_inputs:
                    self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
                self._handles.append(module.register_forward_hook(hook))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove every module and tensor hook (idempotent)."""
        for h in self._handles + self._tensor_handles:
            h.remove()
        self._handles.clear()
        self._tensor_handles.clear()
        self._attached = False

    def __enter__(self) -> Capture:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @property
    def num_hooks(self) -> int:
        """Hooks currently attached (module and tensor hooks)."""
        return len(self._handles) + len(self._tensor_handles)

    def output_grad(self, name: str, call: int = 0) -> Tensor | None:
        """``dL/d(output)`` of call ``call`` of ``name``, or ``None`` if no backward reached it."""
        grads = self.output_grads.get(name, [])
        if call >= len(grads) or grads[call].numel() == 0:
            return None
        return grads[call]


def count_hooks(model: nn.Module) -> int:
    """Forward, pre-forward and backward hooks registered on ``model`` and its submodules."""
    total = 0
    for m in model.modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
        ):
            total += len(getattr(m, attr, {}))
    return total


# --------------------------------------------------------------------------------------------
# Leaving the model as it was


@contextlib.contextmanager
def preserved_state(model: nn.Module, *, train: bool | None = None) -> Iterator[None]:
    """Run the body, then restore ``model``'s train/eval flags, buffers and the RNG state.

    ``train`` sets the mode for the body (``None`` keeps each module's current flag). Buffers
    are copied back bit for bit, so a train-mode forward pass leaves BatchNorm running
    statistics and ``num_batches_tracked`` as they were; the CPU (and the model's CUDA
    devices') random state is restored, so dropout in the body does not shift the caller's
    random stream.
    """
    flags = [(m, m.training) for m in model.modules()]
    buffers = [
        (m, key, b, b.detach().clone())
        for m in model.modules()
        for key, b in m._buffers.items()
        if b is not None
    ]
    devices = sorted(
        {t.device.index or 0 for t in list(model.parameters()) + list(model.buffers()) if t.is_cuda}
    )
    with torch.random.fork_rng(devices=devices):
        try:
            if train is not None:
                model.train(train)
            yield
        finally:
            for m, flag in flags:
                m.training = flag
            with torch.no_grad():
                for m, key, b, saved in buffers:
                    m._buffers[key] = b  # a forward pass may have rebound the attribute
                    if b.shape == saved.shape:
                        b.copy_(saved)
                    else:
                        b.data = saved
