"""Data-parallel training under ``torch.distributed``: the few collectives the loop needs.

A run launched by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` in the environment) initialises the default process group with
:func:`init_process_group` (gloo on CPU, nccl on CUDA), and :func:`normlab.train.train` then
trains data-parallel: the model is wrapped in ``DistributedDataParallel``, every rank computes
its share of each step's batch, rank 0 alone writes the run directory.

**Data.** Every batch is a pure function of ``(seed, step)`` (:mod:`normlab.train.tasks`), so
each rank builds the step's *global* batch and keeps its own contiguous slice
(:func:`shard`): rank ``r`` of ``W`` takes samples ``[r B/W, (r+1) B/W)``. This is what a
``DistributedSampler`` with a seed shared by every rank does, without a sampler: the ranks
together see exactly the batches of the single-process run, and a resumed run reads the same
ones. The global batch is always full (image epochs drop their last partial batch, language
windows are always complete), so there is no uneven final batch to pad or ``Join``; a
``batch_size`` that ``world_size * accum_steps`` does not divide is an error.

**Gradients.** DDP averages the ranks' gradients; with equal slices the mean of the ranks'
mean losses is the global-batch mean, so the parameters follow single-process training on the
global batch (up to float rounding) for every norm whose output for a sample does not depend
on the other samples: per-sample norms (LayerNorm, RMSNorm, GroupNorm, DyT, ...) and
Batchless (whose statistics are parameters, Berger & Uc Cetina 2022, arXiv:2212.14729) need no
synchronisation at all.

**BatchNorm-family statistics** (``dist_bn``):

- ``"sync"`` (the default): BatchNorm layers are converted with
  :func:`normlab.norms.convert_sync` to :class:`normlab.norms.CrossBatchNorm`, whose
  statistics span the global batch (Peng et al. 2018, arXiv:1711.07240): training equals the
  single-process run on the global batch and the running statistics stay identical on every
  rank. Other running-statistics norms (BLN, CBN, MBN, ...) are averaged as below.
- ``"average"``: plain BatchNorm on each rank's slice; before every evaluation and checkpoint
  the running statistics are averaged over the ranks (timm's ``distribute_bn(reduce=True)``).
- ``"broadcast"``: as ``"average"``, but rank 0's statistics are copied to every rank.

**Faults.** :func:`failed_ranks` all-reduces a flag with MAX (one slot per rank, so every rank
learns *which* ranks failed): the loop runs it around the run lock, the set-up and the final
writes (:func:`raise_together`). Before every micro-batch's backward it gathers each rank's
``(raised, loss)`` pair (:func:`gather_floats`, one collective that also gives the global mean
loss for the log), so a NaN loss or an exception on one rank makes every rank stop at the same
step, and the error or the ``diverged`` record names the rank. An exception inside a collective (in a
CrossBatchNorm forward, in DDP's backward) or a killed process leaves the others waiting in
that collective: the process-group timeout (:func:`timeout_seconds`, default
:data:`DEFAULT_TIMEOUT_S` s, ``$NORMLAB_DIST_TIMEOUT``) ends them with an error instead of
torch's default of 30 minutes.
"""

from __future__ import annotations

import datetime
import gc
import inspect
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from normlab.norms import CrossBatchNorm

DistBN = Literal["sync", "average", "broadcast"]
DIST_BN_MODES: tuple[str, ...] = ("sync", "average", "broadcast")
DEFAULT_DIST_BN: DistBN = "sync"
DEFAULT_TIMEOUT_S = 120.0
TIMEOUT_ENV = "NORMLAB_DIST_TIMEOUT"
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankFailedError(RuntimeError):
    """Another rank failed (an exception, a refused start): every rank stops together.

    ``ranks`` lists the failed ranks; the message names them.
    """

    def __init__(self, message: str, ranks: Sequence[int]) -> None:
        super().__init__(message)
        self.ranks = list(ranks)


@dataclass(frozen=True)
class Context:
    """This process's place in an initialised process group of more than one process."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context() -> Context | None:
    """The current process group, or ``None`` when training is single-process (no group, or
    a group of one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return Context(rank=dist.get_rank(), world_size=dist.get_world_size())


def is_main() -> bool:
    """True on rank 0 and in a single-process run: the process that writes files."""
    ctx = context()
    return ctx is None or ctx.is_main


def launched_by_torchrun(environ: dict[str, str] | None = None) -> bool:
    """Whether ``torchrun`` (or a launcher setting the same variables) started this process."""
    env = os.environ if environ is None else environ
    return all(name in env for name in TORCHRUN_ENV)


def timeout_seconds(timeout_s: float | None = None) -> float:
    """The process-group timeout: ``timeout_s``, else ``$NORMLAB_DIST_TIMEOUT``, else
    :data:`DEFAULT_TIMEOUT_S`. A rank that waits longer in one collective raises."""
    source = "timeout_s"
    if timeout_s is None:
        raw = os.environ.get(TIMEOUT_ENV)
        if raw is None:
            return DEFAULT_TIMEOUT_S
        source = f"${TIMEOUT_ENV}"
        try:
            timeout_s = float(raw)
        except ValueError:
            raise ValueError(f"{source} must be a number of seconds, got {raw!r}") from None
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"{source} must be a finite number of seconds > 0, got {timeout_s!r}")
    return float(timeout_s)


def init_process_group(
    device: str | torch.device = "cpu",
    *,
    timeout_s: float | None = None,
    init_method: str = "env://",
    rank: int | None = None,
    world_size: int | None = None,
) -> tuple[Context | None, torch.device]:
    """Initialise the default group from torchrun's environment (or the arguments).

    The backend is gloo for ``device="cpu"`` and nccl for CUDA, where each process takes the
    GPU ``cuda:LOCAL_RANK``. Returns the context (``None`` for a world of one process, where
    no group is created) and the device this process trains on.
    """
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"init_process_group: device {str(device)!r} requested but CUDA is not available"
            )
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise ValueError(f"init_process_group: device must be 'cpu' or 'cuda', got {str(device)!r}")
    if world_size < 2:
        return None, dev
    dist.init_process_group(
        "nccl" if dev.type == "cuda" else "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_seconds(timeout_s)),
    )
    return context(), dev


def destroy_process_group(*, barrier: bool = False) -> None:
    """Tear the default group down if there is one; with ``barrier``, after every rank got here
    (a rank that closes its sockets while a peer still finishes its last collective can make
    that peer's gloo threads abort at exit). No barrier after a failure: it would wait for the
    timeout. DDP wrappers left unreferenced in cycles (a run stopped by a fault) are collected
    first, while the group they hold is still alive."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def _device_for_collectives() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def no_buffer_broadcast(ddp: type[nn.Module]) -> dict[str, Any]:
    """DDP keyword that keeps buffers per rank between the syncs of ``dist_bn`` (by default DDP
    copies rank 0's buffers at every forward): ``forward_sync_buffers`` from torch 2.13 on,
    ``broadcast_buffers`` before (deprecated since)."""
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def shard(
    batch: tuple[Tensor, Tensor], ctx: Context | None, *, accum_steps: int = 1
) -> tuple[Tensor, Tensor]:
    """This rank's contiguous slice of a global batch (the whole batch without a group)."""
    if ctx is None:
        return batch
    inputs, targets = batch
    n = len(inputs)
    if n % (ctx.world_size * accum_steps):
        raise ValueError(
            f"train: batch_size={n} is not divisible by world_size={ctx.world_size} x "
            f"accum_steps={accum_steps}; every rank needs an equal slice"
        )
    size = n // ctx.world_size
    part = slice(ctx.rank * size, (ctx.rank + 1) * size)
    return inputs[part], targets[part]


def failed_ranks(failed: bool, ctx: Context | None) -> list[int]:
    """The ranks whose ``failed`` is true: one ``all_reduce(MAX)`` of a one-slot-per-rank flag
    vector. Every rank must call it at the same point (it is a collective)."""
    if ctx is None:
        return [0] if failed else []
    flags = torch.zeros(ctx.world_size, dtype=torch.int32, device=_device_for_collectives())
    flags[ctx.rank] = int(failed)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [r for r, f in enumerate(flags.tolist()) if f]


def gather_floats(values: Sequence[float], ctx: Context | None) -> list[list[float]]:
    """Every rank's ``values`` (the same length on every rank), in float64, by rank."""
    if ctx is None:
        return [list(values)]
    mine = torch.tensor(list(values), dtype=torch.float64, device=_device_for_collectives())
    out = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(out, mine)
    return [t.tolist() for t in out]


def raise_together(error: BaseException | None, ctx: Context | None, what: str) -> None:
    """Raise on every rank if ``what`` failed on any: the failed rank re-raises its own error,
    the others a :class:`RankFailedError` naming it. A no-op when every rank succeeded."""
    if ctx is None:
        if error is not None:
            raise error
        return
    ranks = failed_ranks(error is not None, ctx)
    if error is not None:
        raise error
    if ranks:
        names = ", ".join(str(r) for r in ranks)
        raise RankFailedError(
            f"train: {what} failed on rank {names} (see that rank's error); every rank stops", ranks
        )


def gather_objects(obj: Any, ctx: Context | None) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (``None`` elsewhere); ``[obj]`` without a group."""
    if ctx is None:
        return [obj]
    out: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(ctx: Context | None) -> None:
    if ctx is not None:
        dist.barrier()


def rank_seed(seed: int, rank: int) -> int:
    """The RNG seed of ``rank`` after the model is built (rank 0 keeps ``seed``'s stream):
    dropout draws differ across ranks, as for independent samples."""
    return seed if rank == 0 else seed + 1_000_003 * rank


def _running_stat_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that keep running statistics in buffers: torch's ``_NormBase`` family and the
    normlab norms whose spec says ``running_stats``, except CrossBatchNorm (already global)."""
    found = []
    for m in model.modules():
        if isinstance(m, CrossBatchNorm):
            continue
        spec = getattr(type(m), "spec", None)
        if isinstance(m, nn.modules.batchnorm._NormBase) or getattr(spec, "running_stats", False):
            found.append(m)
    return found


def sync_buffers(model: nn.Module, mode: DistBN, ctx: Context | None) -> int:
    """Make the running statistics of every rank equal; returns the number of buffers synced.

    ``"average"`` (and ``"sync"``, for norms CrossBatchNorm does not cover) all-reduces the
    floating-point buffers of each running-statistics norm to their mean over the ranks;
    ``"broadcast"`` copies rank 0's. Integer buffers (``num_batches_tracked``, counters) are
    broadcast from rank 0. As timm's ``distribute_bn``; call it before an evaluation and a
    checkpoint, on every rank.
    """
    if mode not in DIST_BN_MODES:
        raise ValueError(f"sync_buffers: mode must be one of {DIST_BN_MODES}, got {mode!r}")
    if ctx is None:
        return 0
    count = 0
    seen: set[int] = set()
    for module in _running_stat_modules(model):
        for buf in module.buffers(recurse=False):
            if id(buf) in seen:  # a module shared under two names: sync it once
                continue
            seen.add(id(buf))
            if buf.is_floating_point() and mode != "broadcast":
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                buf.div_(ctx.world_size)
            else:
                dist.broadcast(buf, src=0)
            count += 1
    return count


def check_identical(model: nn.Module, ctx: Context | None, *, parameters: bool = True) -> None:
    """Raise a :class:`RankFailedError` naming the ranks and the first tensor whose parameters
    (unless ``parameters=False``: sharded ones) or buffers differ from rank 0's (bitwise); a collective."""
    if ctx is None:
        return
    tensors = [*(model.named_parameters() if parameters else ()), *model.named_buffers()]
    first = -1  # this rank's first tensor that differs from rank 0's
    for i, (_, tensor) in enumerate(tensors):
        reference = tensor.detach().clone()
        dist.broadcast(reference, src=0)
        if first < 0 and not _same(reference, tensor.detach()):
            first = i
    rows = gather_floats([first], ctx)
    wrong = {r: tensors[int(row[0])][0] for r, row in enumerate(rows) if row[0] >= 0}
    if wrong:
        what = "; ".join(f"rank {r}: {name!r}" for r, name in wrong.items())
        raise RankFailedError(f"train: the model differs from rank 0's on {what}", list(wrong))


def _same(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality, NaN equal to NaN (a diverged run may hold NaN statistics)."""
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)
