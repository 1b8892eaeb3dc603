"""How one run is spread over processes: the Trainer asks its strategy, never ``torch.distributed``.

* :class:`SingleProcess`: the model as it is, every call a local one.
* :class:`DataParallel`: ``DistributedDataParallel`` over an initialised process group (gloo on
  CPU, nccl on CUDA), each rank on its slice of the global batch, BatchNorm statistics by
  ``dist_bn``, faults raised on every rank together (:mod:`normlab.train.distributed`).

* :class:`FullyShard`: FSDP2 as torchtitan trains (``fully_shard`` on every block, then the
  root; each rank stores ``1 / world_size`` of the parameters, gradients and optimizer state),
  with DataParallel's batches, BatchNorm modes, faults and RNG; checkpoints sharded through
  ``torch.distributed.checkpoint`` (:mod:`normlab.train.fsdp`).

:func:`make_strategy` picks one from the current process group and ``dist``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from normlab.norms import convert_sync
from normlab.train import distributed
from normlab.train.config import TrainConfig
from normlab.train.fsdp import (
    PARAM_DTYPES,
    ParamDtype,
    holds_aux_loss_norm,
    is_sharded_checkpoint,
    shard_units,
)
from normlab.train.state import rng_state, seed_everything, set_rng_state

__all__ = ["DIST_MODES", "DataParallel", "FullyShard", "SingleProcess", "make_strategy"]

Dist = Literal["ddp", "fsdp"]
DIST_MODES: tuple[str, ...] = ("ddp", "fsdp")


class SingleProcess:
    """One process trains the whole model on the whole batch."""

    ctx: distributed.Context | None = None
    shards_parameters = False  # each process holds a part of every parameter (FSDP)

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run directory."""
        return self.ctx is None or self.ctx.is_main

    def check(self, cfg: TrainConfig) -> None:
        """Refuse a configuration this strategy cannot train (before anything is written)."""

    def prepare(self, net: nn.Module) -> nn.Module:
        """The model to train, before the optimizer is built (its parameters are the optimizer's)."""
        return net

    def wrap(self, net: nn.Module) -> nn.Module:
        """What the forward and backward run through."""
        return net

    def shard(self, batch: tuple[Tensor, Tensor], accum_steps: int) -> tuple[Tensor, Tensor]:
        """This process's part of a step's global batch."""
        return batch

    def gradient_sync(self, model: nn.Module, sync: bool) -> AbstractContextManager[Any]:
        """Where a micro-batch's backward runs: ``sync=False`` for all but the last of a step
        (DDP's ``no_sync()``: the gradients are reduced once per step)."""
        no_sync = getattr(model, "no_sync", None)
        return no_sync() if no_sync is not None and not sync else nullcontext()

    def clip_grad_norm(self, params: Sequence[Tensor], max_norm: float) -> float:
        """Clip the gradients to a global 2-norm of ``max_norm``; returns the norm before."""
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False))

    def grad_norm(self, params: Sequence[Tensor]) -> float:
        """The global 2-norm of the gradients."""
        from normlab.train.optim import grad_norm

        return grad_norm(params)

    def full_state_dict(self, net: nn.Module) -> dict[str, Tensor]:
        """The whole model's state dict on the main process (a collective where sharded)."""
        return dict(net.state_dict())

    def gathered(self, net: nn.Module) -> AbstractContextManager[Any]:
        """Where code may call the model's parts directly (the probes): their parameters whole."""
        return nullcontext()

    def step_losses(self, value: float, error: Exception | None, step: int) -> list[float]:
        """Every process's loss of a micro-batch (raising the error of a process that failed)."""
        if error is not None:
            raise error
        return [value]

    def raise_together(self, error: BaseException | None, what: str) -> None:
        """Raise ``error`` (on every process, if any failed ``what``)."""
        if error is not None:
            raise error

    def agree_on_start(self, start: int, run_dir: Path) -> None:
        """Check that every process resumes from the same step."""

    def check_resume(self, state: dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint that this strategy cannot continue."""

    def restore_rng(self, state: dict[str, Any], seed: int) -> None:
        """The random state of a resumed run."""
        set_rng_state(state["rng"])

    def fresh_rng(self, seed: int) -> None:
        """The random state of a fresh run, after the model is built."""

    def gather_rng(self) -> list[dict[str, Any]] | None:
        """Every process's random state for the checkpoint (``None``: the main one's suffices)."""
        return None

    def sync_buffers(self, net: nn.Module) -> None:
        """Make the running statistics of every process equal (before an evaluation, a checkpoint)."""

    def check_identical(self, net: nn.Module) -> None:
        """Check that every process holds the same model (at the end)."""

    def record(self) -> dict[str, Any]:
        """What the logs and results say of the strategy."""
        return {}

    def checkpoint_extra(self) -> dict[str, Any]:
        """What a checkpoint records of the strategy."""
        return {"dist_bn": None}

    def diverged(self, failed: list[int], step: int, run_dir: Path) -> dict[str, Any]:
        """The fields of a ``diverged`` record beyond the step and the loss."""
        return {}


class DataParallel(SingleProcess):
    """``DistributedDataParallel`` over the process group ``ctx``; BatchNorm statistics by ``dist_bn``.

    ``"sync"`` converts BatchNorm to the cross-process :class:`~normlab.norms.CrossBatchNorm`
    (statistics over the global batch); ``"average"`` / ``"broadcast"`` keep per-rank BatchNorm
    and average (or copy rank 0's) running statistics before every evaluation and checkpoint.
    """

    def __init__(
        self, ctx: distributed.Context, dist_bn: distributed.DistBN = distributed.DEFAULT_DIST_BN
    ) -> None:
        if dist_bn not in distributed.DIST_BN_MODES:
            raise ValueError(f"train: dist_bn must be one of {distributed.DIST_BN_MODES}, got {dist_bn!r}")
        self.ctx: distributed.Context = ctx
        self.dist_bn = dist_bn

    def check(self, cfg: TrainConfig) -> None:
        if cfg.batch_size % (self.ctx.world_size * cfg.accum_steps):
            raise ValueError(
                f"train: batch_size={cfg.batch_size} is not divisible by world_size={self.ctx.world_size} x "
                f"accum_steps={cfg.accum_steps}; every rank needs an equal slice of the global batch"
            )

    def prepare(self, net: nn.Module) -> nn.Module:
        return convert_sync(net) if self.dist_bn == "sync" else net  # the same Parameters, global statistics

    def wrap(self, net: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel  # imports torch._dynamo: seconds

        return DistributedDataParallel(net, **distributed.no_buffer_broadcast(DistributedDataParallel))

    def shard(self, batch: tuple[Tensor, Tensor], accum_steps: int) -> tuple[Tensor, Tensor]:
        return distributed.shard(batch, self.ctx, accum_steps=accum_steps)

    def step_losses(self, value: float, error: Exception | None, step: int) -> list[float]:
        rows = distributed.gather_floats([float(error is not None), value], self.ctx)
        raised = [r for r, row in enumerate(rows) if row[0]]
        if error is not None:
            raise error
        if raised:
            names = ", ".join(map(str, raised))
            raise distributed.RankFailedError(
                f"train: rank {names} raised an exception at step {step + 1} (see that rank's traceback); "
                "every rank stops",
                raised,
            )
        return [row[1] for row in rows]

    def raise_together(self, error: BaseException | None, what: str) -> None:
        distributed.raise_together(error, self.ctx, what)

    def agree_on_start(self, start: int, run_dir: Path) -> None:
        starts = [int(row[0]) for row in distributed.gather_floats([start], self.ctx)]
        if len(set(starts)) > 1:
            raise ValueError(
                f"train: the ranks resume from different steps {starts} (by rank): every rank must "
                f"read the same {str(run_dir)!r} (a shared file system on several nodes)"
            )

    def check_resume(self, state: dict[str, Any], path: Path) -> None:
        saved = state["extra"].get("dist_bn")
        if saved is not None and saved != self.dist_bn:
            raise ValueError(
                f"train: {str(path)!r} was trained with dist_bn={saved!r}; resuming it "
                f"with dist_bn={self.dist_bn!r} would change BatchNorm's statistics mid-run"
            )

    def restore_rng(self, state: dict[str, Any], seed: int) -> None:
        ranks = state.get("rank_rng")
        if ranks is not None and len(ranks) == self.ctx.world_size:
            set_rng_state(ranks[self.ctx.rank])
        elif self.ctx.is_main:
            set_rng_state(state["rng"])
        else:  # another world size: the run goes on, not bit-exactly
            seed_everything(distributed.rank_seed(seed + int(state["step"]), self.ctx.rank))

    def fresh_rng(self, seed: int) -> None:
        if not self.ctx.is_main:
            seed_everything(distributed.rank_seed(seed, self.ctx.rank))

    def gather_rng(self) -> list[dict[str, Any]] | None:
        return distributed.gather_objects(rng_state(), self.ctx)

    def sync_buffers(self, net: nn.Module) -> None:
        distributed.sync_buffers(net, self.dist_bn, self.ctx)

    def check_identical(self, net: nn.Module) -> None:
        distributed.check_identical(net, self.ctx)

    def record(self) -> dict[str, Any]:
        return {"world_size": self.ctx.world_size, "dist_bn": self.dist_bn}

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"dist_bn": self.dist_bn}

    def diverged(self, failed: list[int], step: int, run_dir: Path) -> dict[str, Any]:
        if self.ctx.is_main:
            print(
                f"normlab.train: non-finite loss on rank {', '.join(map(str, failed))} at step "
                f"{step + 1}: every rank stops ({run_dir})",
                file=sys.stderr,
            )
        return {"rank": failed[0], "ranks": failed}


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

    shards_parameters = True

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
            keep = holds_aux_loss_norm(unit)
            fully_shard(unit, reshard_after_forward=self.reshard_after_forward and not keep, **kwargs)
            self.units.append(name)
            if keep and self.reshard_after_forward:
                self.kept_gathered.append(name)
        keep = holds_aux_loss_norm(net)  # conservative: the final norm is usually one of them
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
        if not is_sharded_checkpoint(state):
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


def make_strategy(
    dist_bn: distributed.DistBN = distributed.DEFAULT_DIST_BN, dist: Dist = "ddp", **fsdp: Any
) -> SingleProcess:
    """:class:`DataParallel` (``dist="ddp"``) or :class:`~normlab.train.strategy.FullyShard`
    (``dist="fsdp"``, with its options ``fsdp``) when a process group of more than one process is
    initialised, else :class:`SingleProcess`."""
    if dist_bn not in distributed.DIST_BN_MODES:
        raise ValueError(f"train: dist_bn must be one of {distributed.DIST_BN_MODES}, got {dist_bn!r}")
    if dist not in DIST_MODES:
        raise ValueError(f"train: dist must be one of {DIST_MODES}, got {dist!r}")
    if fsdp and dist != "fsdp":
        raise ValueError(f"train: {sorted(fsdp)} are options of dist='fsdp', not of dist={dist!r}")
    ctx = distributed.context()
    if ctx is None:
        return SingleProcess()
    if dist == "fsdp":
        return FullyShard(ctx, dist_bn, **fsdp)
    return DataParallel(ctx, dist_bn)
