"""FSDP2 training (``torch.distributed.fsdp.fully_shard``) and sharded checkpoints.

:class:`FullyShard` is the Trainer's third strategy (``--dist fsdp``): as torchtitan does, every
residual block (found as :func:`normlab.structure.find_blocks` finds them) is one
``fully_shard`` unit and the root holds the rest (embeddings, final norm, head), so each rank
stores ``1 / world_size`` of every parameter, its gradients and the optimizer state, and a block's
parameters exist whole only between its all-gather and its reshard. The data, the BatchNorm modes,
the fault handling and the RNG of :class:`~normlab.train.strategy.DataParallel` are kept: each rank
trains its slice of the global batch and the reduce-scatter averages the gradients, so training
follows the single-process run on the global batch (tested for every norm and placement).

Norms whose training loss has an auxiliary term built after the forward from their parameters
(Batchless, ``spec.aux_params``) need those parameters whole at that point: the unit that holds
one keeps its parameters gathered after the forward (``reshard_after_forward=False``).

**Checkpoints** (:func:`save_sharded`, :func:`load_sharded`): ``torch.distributed.checkpoint``
writes each rank's shards of the model and optimizer into ``checkpoint-<step>.dcp/``, then rank 0
writes ``checkpoint.pt`` (step, RNG of every rank, config hash) naming that folder, atomically; a
crash mid-save leaves the previous pair intact. DCP reshards on load, so a checkpoint resumes on
another process count, and single-process (no process group) too: bit for bit with the same count.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from normlab.structure import find_blocks
from normlab.train import distributed
from normlab.train.strategy import DataParallel

__all__ = [
    "PARAM_DTYPES",
    "FullyShard",
    "is_sharded_checkpoint",
    "load_sharded",
    "save_sharded",
    "shard_units",
]

PARAM_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ParamDtype = Literal["fp32", "bf16", "fp16"]
SHARDED_KEY = "sharded"  # checkpoint.pt's field naming the DCP folder


def _holds_aux_loss_norm(module: nn.Module) -> bool:
    return any(getattr(getattr(type(m), "spec", None), "aux_params", ()) for m in module.modules())


def shard_units(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that become their own ``fully_shard`` unit: the residual blocks (none found:
    the root alone holds every parameter)."""
    stack = find_blocks(net, required=False)
    return list(stack.blocks) if stack is not None else []


class FullyShard(DataParallel):
    """FSDP2 over the process group ``ctx``: one ``fully_shard`` unit per block, then the root.

    Args:
        reshard_after_forward: free each block's gathered parameters after its forward (and
            gather them again for the backward): less memory, one more all-gather per block.
        param_dtype: ``"bf16"`` / ``"fp16"``: FSDP's ``MixedPrecisionPolicy`` computes in that
            dtype and reduces gradients in fp32 (the sharded parameters and optimizer stay fp32).
        per_block: one unit per block (each all-gathered on its own); ``False``: the whole
            model is one unit, gathered at once (more memory, fewer collectives).
    """

    def __init__(
        self,
        ctx: distributed.Context,
        dist_bn: distributed.DistBN = distributed.DEFAULT_DIST_BN,
        *,
        reshard_after_forward: bool = True,
        param_dtype: ParamDtype = "fp32",
        per_block: bool = True,
    ) -> None:
        super().__init__(ctx, dist_bn)
        if param_dtype not in PARAM_DTYPES:
            raise ValueError(f"train: param_dtype must be one of {tuple(PARAM_DTYPES)}, got {param_dtype!r}")
        self.reshard_after_forward = reshard_after_forward
        self.param_dtype = param_dtype
        self.per_block = per_block
        self.units: list[str] = []
        self.kept_gathered: list[str] = []

    shards_parameters = True

    def prepare(self, net: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        net = super().prepare(net)
        scalars = [n for n, p in net.named_parameters() if p.dim() == 0]
        if scalars:
            raise ValueError(
                f"train: FSDP cannot shard the 0-dim parameters {scalars}; make them 1-element "
                "tensors (shape (1,)), as normlab's norms and GPT keep their scalars"
            )
        device = next((p.device for p in net.parameters()), torch.device("cpu"))
        mesh = init_device_mesh(device.type, (self.ctx.world_size,))
        kwargs: dict[str, Any] = {"mesh": mesh}
        dtype = PARAM_DTYPES[self.param_dtype]
        if dtype is not None:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for name, unit in shard_units(net) if self.per_block else []:
            keep = _holds_aux_loss_norm(unit)
            fully_shard(unit, reshard_after_forward=self.reshard_after_forward and not keep, **kwargs)
            self.units.append(name)
            if keep and self.reshard_after_forward:
                self.kept_gathered.append(name)
        keep = _holds_aux_loss_norm(net)  # conservative: the final norm is usually one of them
        fully_shard(net, reshard_after_forward=self.reshard_after_forward and not keep, **kwargs)
        if keep and self.reshard_after_forward:
            self.kept_gathered.append("(root)")
        return net

    def wrap(self, net: nn.Module) -> nn.Module:
        return net  # fully_shard changed the modules in place

    def gradient_sync(self, model: nn.Module, sync: bool) -> Any:
        from contextlib import nullcontext

        model.set_requires_gradient_sync(sync)  # type: ignore[operator]
        return nullcontext()

    def clip_grad_norm(self, params: Sequence[Tensor], max_norm: float) -> float:
        total = self.grad_norm_tensor(params)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=False)
        return float(total)

    def grad_norm(self, params: Sequence[Tensor]) -> float:
        return float(self.grad_norm_tensor(params))

    @staticmethod
    def grad_norm_tensor(params: Sequence[Tensor]) -> Tensor:
        """The global 2-norm of the sharded gradients (every rank gets the same value)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        total = torch.nn.utils.get_total_norm(grads, foreach=False)
        full = getattr(total, "full_tensor", None)
        return full() if callable(full) else total

    @contextmanager
    def gathered(self, net: nn.Module) -> Iterator[None]:
        # The units gather their own parameters when called; the root's (embeddings, head, a
        # ConvNet's stem) only in the root's forward, which a probe calling parts skips.
        net.unshard()  # type: ignore[operator]
        try:
            yield
        finally:
            net.reshard()  # type: ignore[operator]

    def check_identical(self, net: nn.Module) -> None:
        # each rank holds other shards of the parameters by design: the buffers must agree
        distributed.check_identical(net, self.ctx, parameters=False)

    def full_state_dict(self, net: nn.Module) -> dict[str, Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full: dict[str, Any] = get_model_state_dict(net, options=options)  # whole on rank 0 only
        return full

    def check_resume(self, state: dict[str, Any], path: Path) -> None:
        super().check_resume(state, path)
        if SHARDED_KEY not in state:
            raise ValueError(
                f"train: {str(path)!r} is a single-file checkpoint (a single-process or DDP run); "
                "resume it with the strategy that wrote it (--dist ddp)"
            )

    def record(self) -> dict[str, Any]:
        out = {**super().record(), "dist": "fsdp", "reshard_after_forward": self.reshard_after_forward}
        out["param_dtype"] = self.param_dtype
        out["fsdp_units"] = len(self.units) + 1
        if self.kept_gathered:
            out["kept_gathered"] = self.kept_gathered
        return out

    def checkpoint_extra(self) -> dict[str, Any]:
        return {**super().checkpoint_extra(), "dist": "fsdp", "world_size": self.ctx.world_size}


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
