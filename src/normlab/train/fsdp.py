"""FSDP2's pieces for :class:`~normlab.train.strategy.FullyShard`: its units and sharded checkpoints.

The units (:func:`shard_units`), as torchtitan shards: every residual block (found as
:func:`normlab.structure.find_blocks` finds them) is one ``fully_shard`` unit and the root holds
the rest (embeddings, final norm, head). Norms whose training loss has an auxiliary term built
after the forward from their parameters (Batchless, ``spec.aux_params``, :func:`holds_aux_loss_norm`)
need those parameters whole at that point: the unit that holds one keeps them gathered.

**Checkpoints** (:func:`save_sharded`, :func:`load_sharded`): ``torch.distributed.checkpoint``
writes each rank's shards of the model and optimizer into ``checkpoint-<step>.dcp/``, then rank 0
writes ``checkpoint.pt`` (step, RNG of every rank, config hash) naming that folder, atomically; a
crash mid-save leaves the previous pair intact. DCP reshards on load, so a checkpoint resumes on
another process count, and single-process (no process group) too: bit for bit with the same count.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from normlab.structure import find_blocks

__all__ = [
    "PARAM_DTYPES",
    "SHARDED_KEY",
    "holds_aux_loss_norm",
    "is_sharded_checkpoint",
    "load_sharded",
    "save_sharded",
    "shard_units",
]

PARAM_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ParamDtype = Literal["fp32", "bf16", "fp16"]
SHARDED_KEY = "sharded"  # checkpoint.pt's field naming the DCP folder


def holds_aux_loss_norm(module: nn.Module) -> bool:
    """Whether ``module`` holds a norm with an auxiliary loss built after the forward (Batchless)."""
    return any(getattr(getattr(type(m), "spec", None), "aux_params", ()) for m in module.modules())


def shard_units(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that become their own ``fully_shard`` unit: the residual blocks (none found:
    the root alone holds every parameter)."""
    stack = find_blocks(net, required=False)
    return list(stack.blocks) if stack is not None else []


# ------------------------------------------------------------------------------------------------
# sharded checkpoints


def is_sharded_checkpoint(state: dict[str, Any]) -> bool:
    return SHARDED_KEY in state


def save_sharded(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    config_hash: str,
    extra: dict[str, Any],
    rank_rng: list[dict[str, Any]] | None,
    is_main: bool,
) -> Path:
    """Every rank writes its shards to ``checkpoint-<step>.dcp/`` next to ``path``; then the main
    one writes ``path`` naming it, and removes the folders of earlier checkpoints. A collective."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.checkpoint.state_dict_saver import save

    from normlab.train.state import save_meta

    folder = path.with_name(f"{path.stem}-{step:07d}.dcp")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(folder))
    if is_main:
        save_meta(
            path,
            step=step,
            config_hash=config_hash,
            extra=extra,
            rank_rng=rank_rng,
            fields={SHARDED_KEY: folder.name},
        )
        remove_sharded(path, keep=folder.name)
    return folder


def remove_sharded(path: Path, keep: str | None = None) -> None:
    """Delete the DCP folders beside ``path`` (all, or all but ``keep``)."""
    for folder in path.parent.glob(f"{path.stem}-*.dcp"):
        if folder.name != keep and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


def load_sharded(
    path: Path, state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Load the model and optimizer of the sharded checkpoint ``state`` (read from ``path``) into
    ``model`` (sharded or not, any process count, or no process group at all)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load

    folder = path.with_name(str(state[SHARDED_KEY]))
    if not (folder / ".metadata").is_file():
        raise ValueError(f"load_state: {str(path)!r} names {str(folder)!r}, which holds no checkpoint")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    load({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(folder))  # in place
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
