"""End-of-run probes logged by the runner, by name (full diagnostics: ``normlab.diagnostics``).

A probe is ``fn(model, batch) -> dict`` of JSON values, registered with :func:`register_probe`
(a study file can register its own) and named in ``LMTask.probes`` / ``ImageTask.probes``; it
runs once at the end of training, in eval mode without gradients, on a fixed batch (the first
validation/test batch). Built in:

- ``"residual"`` (GPT): ``resid_var`` and ``angular`` below;
- ``"activations"`` (ConvNet): ``act_var`` below;
- ``"blocks"`` (any model with a stack of blocks, :func:`normlab.structure.find_blocks`):
  ``resid_var`` (and ``angular``) of each block's output for token models, ``act_var`` for
  image models, with forward hooks; index 0 is the first block's output.

Definitions:

- ``resid_var``: the variance of the residual stream after each block, ``var_l =
  x_l.float().var()`` over all ``(B, T, d)`` elements, ``l = 0..L`` (index 0: the embeddings),
  as in Sun et al. 2025 (arXiv:2502.05795) for Pre-LN vs LNS.
- ``angular``: the angular distance ``d(i, j) = arccos(cos(x_i, x_j)) / pi`` between the
  hidden states of the **last token** after blocks ``i`` and ``j``, averaged over samples
  (Gromov et al. 2024, arXiv:2403.17887, as used by Sun et al.; identical 0, orthogonal 0.5,
  opposite 1).
- ``act_var``: for CNNs, the mean over channels of the per-channel activation variance
  after each layer of the trunk, ``M.var(dim=[0, 2, 3]).mean()`` (Lubana et al. 2021,
  arXiv:2106.05956, their ``Activs_prober``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from normlab.models import GPT, ConvNet
from normlab.registry import Registry
from normlab.structure import find_blocks

ProbeFn = Callable[[nn.Module, Tensor], dict[str, Any]]
PROBES: Registry[ProbeFn] = Registry("probe")


def register_probe(name: str) -> Callable[[ProbeFn], ProbeFn]:
    """Decorator: ``@register_probe("grad_norms") def fn(model, batch) -> dict``."""
    return PROBES.register(name)


def get_probe(name: str) -> ProbeFn:
    """The probe registered as ``name``; an unknown name is a ``ValueError`` naming close ones."""
    return PROBES.get(name)


def angular_distance_matrix(hidden: list[Tensor]) -> list[list[float]]:
    """``d[i][j]`` between the last-token states of ``hidden[i]`` and ``hidden[j]`` (``(B, T, d)``)."""
    last = torch.stack([h[:, -1].double() for h in hidden])  # (L+1, B, d)
    unit = last / last.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    cos = torch.einsum("ibd,jbd->ijb", unit, unit).clamp(-1.0, 1.0)
    return (torch.arccos(cos) / math.pi).mean(dim=-1).tolist()


@register_probe("residual")
@torch.no_grad()
def probe_gpt(model: nn.Module, idx: Tensor) -> dict[str, Any]:
    """``resid_var`` and ``angular`` of a GPT on the token batch ``idx`` (eval mode)."""
    if not isinstance(model, GPT):
        raise ValueError(f"probe 'residual' needs a normlab GPT, got {type(model).__name__}")
    out = model(idx, output_hidden_states=True)
    hidden = list(out.hidden_states)
    return {
        "resid_var": [float(h.float().var()) for h in hidden],
        "angular": angular_distance_matrix(hidden),
    }


@register_probe("activations")
@torch.no_grad()
def probe_convnet(model: nn.Module, x: Tensor) -> dict[str, Any]:
    """``act_var`` after every ReLU (plain) or block (ResNet) of ``model.features``."""
    if not isinstance(model, ConvNet):
        raise ValueError(f"probe 'activations' needs a normlab ConvNet, got {type(model).__name__}")
    values: list[float] = []
    h = x
    for layer in model.features:
        h = layer(h)
        if not isinstance(layer, (nn.Conv2d,)) and not hasattr(layer, "spec"):
            values.append(float(h.float().var(dim=(0, 2, 3)).mean()))
    return {"act_var": values}


@register_probe("blocks")
@torch.no_grad()
def probe_blocks(model: nn.Module, batch: Tensor) -> dict[str, Any]:
    """The output of every block of ``model``'s block stack, on ``batch``, through forward hooks."""
    stack = find_blocks(model, required=False)
    if stack is None:
        raise ValueError(f"probe 'blocks': found no stack of blocks in {type(model).__name__}")
    outputs: list[Tensor] = []

    def keep(_module: nn.Module, _inputs: Any, out: Any) -> None:
        first = out if isinstance(out, Tensor) else next((o for o in out if isinstance(o, Tensor)), None)
        if first is not None:
            outputs.append(first.detach())

    handles = [module.register_forward_hook(keep) for _, module in stack]
    try:
        model(batch)
    finally:
        for h in handles:
            h.remove()
    if outputs and outputs[0].ndim == 4:  # images: channels first
        return {"act_var": [float(h.float().var(dim=(0, 2, 3)).mean()) for h in outputs]}
    return {
        "resid_var": [float(h.float().var()) for h in outputs],
        "angular": angular_distance_matrix(outputs) if outputs and outputs[0].ndim == 3 else [],
    }
