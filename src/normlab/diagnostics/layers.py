"""Per-layer probes of one forward/backward pass: activation statistics and gradient norms
(Lubana et al. 2021, "Beyond BatchNorm", arXiv:2106.05956), the DyT ``alpha`` against
``1/std`` of its input (Zhu et al. 2025, arXiv:2503.10622, Fig. 8), and the first
non-finite activation.

Every function leaves the model as it found it (:func:`~normlab.diagnostics.hooks.preserved_state`):
parameters, ``.grad`` fields (gradients come from ``torch.autograd.grad``), buffers, train/eval
flags, hooks and the random state.

A *batch* is what the model is called with: a tensor (``model(x)``), a tuple/list
(``model(*batch)``) or a mapping (``model(**batch)``); :func:`lm_inputs` builds one for a
language model from token ids. The loss is ``loss_fn(output)`` when given, else the model's
own ``output.loss`` (normlab GPT with targets, Hugging Face models with labels), else the
mean square of the output, a surrogate that the result names.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from normlab.diagnostics import metrics
from normlab.diagnostics._jsonable import Result
from normlab.diagnostics.hooks import Capture, ModuleSelector, first_tensor, preserved_state, select_modules
from normlab.structure import find_blocks, strip_prefixes, unwrap

Batch = Tensor | Sequence[Any] | Mapping[str, Any]
LossFn = Callable[[Any], Tensor]

SURROGATE_LOSS = "mean square of the output (no loss_fn and no output.loss)"


def call_model(model: nn.Module, batch: Batch) -> Any:
    """``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple/list, else ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def lm_inputs(model: nn.Module, tokens: Tensor) -> dict[str, Tensor]:
    """Keyword inputs that make a language model return its next-token loss.

    normlab's GPT: ``idx = tokens[:, :-1]``, ``targets = tokens[:, 1:]``. A Hugging Face model
    (recognised by its ``config`` attribute and a ``forward`` taking ``input_ids``):
    ``input_ids = labels = tokens`` (causal LMs shift inside; masked LMs then score
    reconstruction).
    """
    if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"lm_inputs: expected integer token ids (batch, tokens), got {tuple(tokens.shape)} {tokens.dtype}"
        )
    core = unwrap(model)
    if type(core).__name__ == "GPT" and hasattr(core, "blocks"):
        if tokens.shape[1] < 2:
            raise ValueError("lm_inputs: need at least 2 tokens per sequence for next-token targets")
        return {"idx": tokens[:, :-1], "targets": tokens[:, 1:]}
    return {"input_ids": tokens, "labels": tokens}


def model_loss(output: Any, loss_fn: LossFn | None = None) -> tuple[Tensor, str]:
    """The scalar loss of ``output`` and a description of where it came from."""
    loss: Any
    if loss_fn is not None:
        loss = loss_fn(output)
        where = "loss_fn"
    else:
        loss = getattr(output, "loss", None)
        where = "the model's own loss"
        if not isinstance(loss, Tensor):
            t = first_tensor(output)
            if t is None:
                raise ValueError(
                    f"model_loss: the output ({type(output).__name__}) holds no tensor; pass loss_fn"
                )
            return t.float().pow(2).mean(), SURROGATE_LOSS
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(f"model_loss: the loss must be a scalar tensor, got {loss!r}")
    return loss.reshape(()), where


def _channels_first(module: nn.Module, out: Tensor) -> bool:
    conv_like = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm)
    return out.dim() >= 4 or isinstance(module, conv_like)


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class LayerStats(Result):
    """One module's statistics over the batch (first call of the module).

    Attributes:
        name: qualified name, without ``module.``/``_orig_mod.`` prefixes.
        module_type: class name.
        shape: shape of the (first tensor of the) output.
        act_var: Beyond-BN ``act_var`` of the output (per-channel variance, channel mean).
        act_corr: mean cosine similarity between different samples' outputs.
        stable_rank: ``N / lambda_max`` of the samples' cosine Gram matrix.
        token_corr: for ``(B, T, d)`` outputs, mean cosine between tokens of one sequence.
        act_grad_norm: ``||dL/d(output)||_F`` over the whole batch (Beyond-BN ``Conv_prober``).
        weight_grad_norm: ``||dL/dW||_F`` over the module's weight matrices and kernels
            (parameters with 2 or more dimensions, recursively): the per-layer ``||dL/dW_l||``
            of Xiong et al. 2020 and Takase et al. 2022. Norm gains and biases are left out: in
            Post-LN/B2T/DeepNorm the last block's norm feeds the head directly, and its gain
            gradient would dominate the last block's number.
        param_grad_norm: ``||dL/dtheta||_F`` over every parameter of the module (recursively).
        num_params: parameters of the module (recursively).
    """

    name: str
    module_type: str
    shape: list[int]
    act_var: float
    act_corr: float
    stable_rank: float
    token_corr: float
    act_grad_norm: float
    weight_grad_norm: float
    param_grad_norm: float
    num_params: int


@dataclass
class DyTStats(Result):
    """A DyT/Derf layer: its scalar ``alpha`` and the spread of its input."""

    name: str
    module_type: str
    alpha: float
    input_std: float
    inv_input_std: float
    alpha_times_std: float


@dataclass
class DyTRelation(Result):
    """DyT's ``alpha`` against ``1/std(input)`` across layers (Zhu et al. 2025, Fig. 8: after
    training, ``alpha`` tracks ``1/std``; ``pearson`` is their correlation across layers).
    ``alpha_times_std`` well above 1 means most inputs sit in tanh's flat tails."""

    layers: list[DyTStats]
    pearson: float
    paper: str = "Zhu et al. 2025, arXiv:2503.10622"


@dataclass
class NonFiniteReport(Result):
    """The first NaN/inf seen in a forward pass.

    Attributes:
        name: qualified name of the module ("" for the model itself).
        module_type: its class.
        where: ``"output"`` (the module produced it) or ``"input"`` (it arrived from code
            outside any module, e.g. arithmetic in the parent's ``forward``, or from the batch).
        call_index: how many module calls had completed before it.
        shape: shape of the offending tensor.
        num_nan: NaN count; num_inf: infinity count.
    """

    name: str
    module_type: str
    where: str
    call_index: int
    shape: list[int]
    num_nan: int
    num_inf: int


@dataclass
class ProbePass(Result):
    """Everything one probing pass measured (used by :func:`~normlab.diagnostics.diagnose`)."""

    loss: float
    loss_kind: str
    layers: list[LayerStats] = field(default_factory=list)
    dyt: DyTRelation | None = None
    nonfinite: NonFiniteReport | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Non-finite watch


class NonFiniteWatch:
    """Context manager: remember the first module whose input or output holds a NaN/inf.

    Hooks every module (the model included); ``first`` is ``None`` while all is finite. Use it
    around a training step to find which module first produced a non-finite value; the hooks
    only read and are removed on exit.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.first: NonFiniteReport | None = None
        self._calls = 0
        self._handles: list[RemovableHandle] = []

    def _check(self, name: str, module: nn.Module, t: Tensor | None, where: str) -> None:
        if self.first is not None or t is None or not t.is_floating_point():
            return
        if bool(torch.isfinite(t).all()):
            return
        self.first = NonFiniteReport(
            name=name,
            module_type=type(module).__name__,
            where=where,
            call_index=self._calls,
            shape=list(t.shape),
            num_nan=int(torch.isnan(t).sum()),
            num_inf=int(torch.isinf(t).sum()),
        )

    def __enter__(self) -> NonFiniteWatch:
        try:
            for raw, module in self.model.named_modules():
                name = strip_prefixes(raw)

                def pre(
                    m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name
                ) -> None:
                    t = first_tensor(args)
                    self._check(name, m, t if t is not None else first_tensor(kwargs), "input")

                def post(m: nn.Module, args: tuple[Any, ...], out: Any, name: str = name) -> None:
                    self._calls += 1
                    self._check(name, m, first_tensor(out), "output")

                self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                self._handles.append(module.register_forward_hook(post))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def find_nonfinite(model: nn.Module, batch: Batch, *, train: bool | None = None) -> NonFiniteReport | None:
    """Run one forward pass (no grad) and return the first non-finite activation, or ``None``."""
    with preserved_state(model, train=train), torch.no_grad(), NonFiniteWatch(model) as watch:
        call_model(model, batch)
    return watch.first


# --------------------------------------------------------------------------------------------
# The probing pass


def is_dyt(module: nn.Module) -> bool:
    """A DyT/Derf-style layer: a scalar ``alpha`` and a class name with tanh/dyt/erf in it."""
    alpha = getattr(module, "alpha", None)
    name = type(module).__name__.lower()
    return isinstance(alpha, Tensor) and alpha.numel() == 1 and any(k in name for k in ("tanh", "dyt", "erf"))


def default_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The residual blocks when :func:`~normlab.structure.find_blocks` finds them, else every conv
    and linear layer, else every leaf module that holds parameters (a model made of norms)."""
    try:
        return list(find_blocks(model))
    except ValueError:
        pass
    named = [(n, m) for n, m in model.named_modules() if n]
    layers: list[tuple[str, nn.Module]] = [
        (n, m) for n, m in named if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
    ]
    if not layers:
        layers = [(n, m) for n, m in named if not m._modules and any(True for _ in m.parameters())]
    if not layers:
        raise ValueError(
            f"{type(model).__name__}: no blocks, conv/linear layers or parametrized modules to measure; "
            "pass layers="
        )
    return layers


def _grad_norm(module: nn.Module, grads_by_param: dict[int, Tensor | None], *, matrices: bool) -> float:
    params = [p for p in module.parameters() if p.dim() >= 2 or not matrices]
    if not grads_by_param or not params:
        return math.nan
    return metrics.fro_norm([grads_by_param.get(id(p)) for p in params])


def _layer_stats(
    name: str,
    module: nn.Module,
    out: Tensor,
    grad: Tensor | None,
    grads_by_param: dict[int, Tensor | None],
    channels_first: bool | None,
) -> LayerStats:
    cf = _channels_first(module, out) if channels_first is None else channels_first
    token = metrics.token_corr(out) if out.dim() == 3 and not cf else math.nan
    return LayerStats(
        name=name,
        module_type=type(module).__name__,
        shape=list(out.shape),
        act_var=metrics.act_var(out, channel_dim=metrics.channel_dim_for(out, channels_first=cf)),
        act_corr=metrics.act_corr(out),
        stable_rank=metrics.stable_rank(out),
        token_corr=token,
        act_grad_norm=metrics.fro_norm([grad]) if grad is not None else math.nan,
        weight_grad_norm=_grad_norm(module, grads_by_param, matrices=True),
        param_grad_norm=_grad_norm(module, grads_by_param, matrices=False),
        num_params=sum(p.numel() for p in module.parameters()),
    )


def probe_pass(
    model: nn.Module,
    batch: Batch,
    *,
    layers: ModuleSelector | None = None,
    loss_fn: LossFn | None = None,
    gradients: bool = True,
    train: bool | None = None,
    channels_first: bool | None = None,
    extra_captures: Sequence[Capture] = (),
) -> ProbePass:
    """One forward (and, with ``gradients``, one ``autograd.grad``) pass with every probe on.

    Args:
        model: any ``nn.Module``.
        batch: what the model is called with (see the module docstring).
        layers: the modules to measure (:func:`~normlab.diagnostics.hooks.select_modules`);
            ``None``: the residual blocks, or every conv/linear layer if there are none.
        loss_fn: ``output -> scalar`` loss; default the model's ``output.loss``.
        gradients: also measure activation and weight gradient norms.
        train: mode for the pass (``None``: keep the model's). BatchNorm in train mode uses
            batch statistics; its running statistics are restored afterwards.
        channels_first: override the layout guess of ``act_var`` (conv/BN/GN outputs and
            ``>= 4``-D tensors are ``(N, C, *)``, the rest channels-last).
        extra_captures: more :class:`Capture` objects to attach for the same pass.
    """
    pairs = default_layers(model) if layers is None else select_modules(model, layers)
    dyt_pairs = [(n, m) for n, m in model.named_modules() if n and is_dyt(m)]
    notes: list[str] = []
    with preserved_state(model, train=train), contextlib.ExitStack() as stack:
        cap = stack.enter_context(Capture(model, pairs, output_grads=gradients))
        dyt_cap = (
            stack.enter_context(Capture(model, dyt_pairs, inputs=True, outputs=False)) if dyt_pairs else None
        )
        for extra in extra_captures:
            stack.enter_context(extra)
        watch = stack.enter_context(NonFiniteWatch(model))
        grads_by_param: dict[int, Tensor | None] = {}
        with torch.set_grad_enabled(gradients):
            output = call_model(model, batch)
            loss, kind = model_loss(output, loss_fn)
            params = [p for p in model.parameters() if p.requires_grad]
            if gradients and params and loss.requires_grad:
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                grads_by_param = {id(p): g for p, g in zip(params, grads, strict=True)}
            elif gradients:
                notes.append("no parameter requires grad: gradient norms were not measured")
        loss_value = float(loss.detach())
        del output, loss
    stats = []
    for name, module in cap.modules:
        outs = cap.outputs[name]
        if not outs:
            notes.append(f"{name} ({type(module).__name__}) was not called")
            continue
        grad = cap.output_grad(name)
        stats.append(_layer_stats(name, module, outs[0], grad, grads_by_param, channels_first))
    dyt = None
    if dyt_cap is not None:
        rows = []
        for name, module in dyt_cap.modules:
            if not dyt_cap.inputs[name]:
                continue
            std = float(dyt_cap.inputs[name][0].double().std())
            alpha = float(module.alpha.detach().float().reshape(()))  # type: ignore[operator]
            inv = 1.0 / std if std > 0 else math.inf
            rows.append(DyTStats(name, type(module).__name__, alpha, std, inv, alpha * std))
        r = metrics.pearson([s.alpha for s in rows], [s.inv_input_std for s in rows])
        dyt = DyTRelation(layers=rows, pearson=r)
    return ProbePass(
        loss=loss_value, loss_kind=kind, layers=stats, dyt=dyt, nonfinite=watch.first, notes=notes
    )


def layer_stats(
    model: nn.Module,
    batch: Batch,
    *,
    layers: ModuleSelector | None = None,
    loss_fn: LossFn | None = None,
    gradients: bool = True,
    train: bool | None = None,
    channels_first: bool | None = None,
) -> list[LayerStats]:
    """Per-layer ``act_var``, ``act_corr``, stable rank and gradient norms (see :func:`probe_pass`).

    >>> stats = layer_stats(model, images, layers=nn.Conv2d, loss_fn=lambda out: F.cross_entropy(out, y))
    """
    return probe_pass(
        model,
        batch,
        layers=layers,
        loss_fn=loss_fn,
        gradients=gradients,
        train=train,
        channels_first=channels_first,
    ).layers


def dyt_alpha_relation(model: nn.Module, batch: Batch, *, train: bool | None = None) -> DyTRelation:
    """Each DyT/Derf layer's ``alpha``, ``std`` of its input and their correlation across layers.

    Raises:
        ValueError: the model has no DyT-like layer (:func:`is_dyt`).
    """
    if not any(is_dyt(m) for m in model.modules()):
        raise ValueError(f"dyt_alpha_relation: {type(model).__name__} has no DyT/Derf layer")
    result = probe_pass(model, batch, gradients=False, train=train).dyt
    assert result is not None
    return result
