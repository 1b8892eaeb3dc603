"""Cross-process BatchNorm for ``torch.distributed`` that also runs on CPU (gloo), and model conversion.

``torch.nn.SyncBatchNorm`` refuses CPU tensors (``ValueError: SyncBatchNorm expected input tensor
to be on GPU``, see pytorch#78081), so it cannot be used with gloo. :class:`CrossBatchNorm` is
device-agnostic: the same code runs with gloo on CPU and with nccl on GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from normlab import functional as NF
from normlab.norms._base import Device, DType, NormSpec, commit_if_finite, momentum_factor, register_norm
from normlab.norms.batch_norm import BatchNorm

F64 = torch.float64


def _reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _per_channel(p: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
    """``(C,)`` statistics as ``dtype``, viewed to broadcast against an ``(N, C, *)`` input."""
    return NF.channel_view(p.to(dtype), x, 1)


@register_norm("crossbn", aliases=("cross_batch_norm", "syncbn", "sync_batch_norm"))
class CrossBatchNorm(BatchNorm):
    """BatchNorm whose training statistics span every process of a ``torch.distributed`` group.

    In training, with an initialized process group of world size > 1, each process reduces its
    local per-channel ``count``, ``sum(x)`` and ``sum(x²)``; one ``all_reduce(SUM)`` of these
    (in **float64**) gives the global statistics, and the layer computes exactly what
    :class:`normlab.BatchNorm` computes on the concatenation of all processes' batches:
    ``y = (x - mean_G) / sqrt(var_G + eps) * weight + bias`` with the biased global variance
    ``var_G = sum(x²)/n - mean_G²``, and running statistics updated with the unbiased global
    variance ``var_G * n / (n - 1)``, ``n`` the global count. Batches may differ in size (and in
    spatial size) across processes; a process with an empty batch takes part in the collectives
    and returns an empty output. Every process applies the same running-statistics update, so
    the buffers stay identical across processes without a buffer broadcast.

    Without a process group (not initialized, or world size 1), and in eval mode, the layer is
    :class:`normlab.BatchNorm` exactly: no collective runs. Its state_dict keys are torch's
    BatchNorm keys, so checkpoints move freely between ``nn.BatchNorm2d``, ``normlab.BatchNorm``
    and this layer (see :func:`convert_sync` / :func:`revert_sync`).

    Follows ``torch.nn.SyncBatchNorm`` (``torch/nn/modules/_functions.py``, class
    ``SyncBatchNorm``) in semantics and in its backward (per-channel ``sum(dy)`` and
    ``sum(dy·(x - mean))`` all-reduced across processes), and Peng et al. 2018 (MegDet,
    arXiv:1711.07240), which introduced cross-GPU BatchNorm. Choices made:

    - **float64 statistics.** Local sums are accumulated in float64 and all-reduced in float64:
      ``sum(x²)/n - mean²`` cancels catastrophically in float32 once ``|mean| >> std``
      (relative variance error ~ ``6e-8 · mean²/var``), while in float64 the error is
      ~ ``1e-16 · mean²/var`` (``1e-11`` for ``randn * 3 + 1e3``). One all_reduce of
      ``2C + 1`` numbers per layer and step, rather than an all_gather of per-process
      (count, mean, M2) as ``nn.SyncBatchNorm`` does, so the traffic does not grow with the
      world size. The cost is a transient float64 copy of the input in the forward (freed
      before the normalization, never kept for backward). The running statistics are updated in
      float64 and rounded once into the buffers. The normalization itself runs in the compute
      dtype (fp32 for fp16/bf16/fp32).
    - **Custom autograd function, not a differentiable all_reduce.** The backward all-reduces
      ``sum(dy)`` and ``sum(dy·(x - mean))`` (float64) and forms ``dx`` from them; it keeps
      only ``x`` for backward (no float64 copy of the activations, which autograd through a
      float64 ``sum(x²)`` would keep). The input gradient is the gradient of the sum of every
      process's loss, as for the global batch. ``weight``/``bias`` gradients are this
      process's share: their sum over the processes is the global-batch gradient, which DDP's
      gradient all-reduce then forms (as an average). The distributed path is differentiable
      once (like ``nn.SyncBatchNorm``); the single-process path keeps double backward.
    - **Errors are raised consistently.** The global count is known only after the collective,
      so every process checks it after the all_reduce and raises the same ``ValueError`` when
      it is 1, as :class:`normlab.BatchNorm` does for a count of 1; no process is left waiting
      in a collective. A global count of 0 (every batch empty) gives empty outputs and no
      update, again as BatchNorm on an empty batch. Only a process whose local count is < 2
      reads the global count on the host (a device sync); others know the global count is >= 2.
    - **Non-finite statistics** (NaN/inf in any process's batch) skip the running-statistics
      update on every process alike and count it in ``skipped_updates``, as BatchNorm does.

    Like every collective, the backward must run on every process of the group (the backward
    all_reduce is skipped only when no input gradient is needed, which holds on all processes
    alike in one model); a process whose loss does not use this layer's output would leave the
    others waiting until the process-group timeout. ``torch.compile(fullgraph=True)`` traces the
    distributed path as one graph (checked with 2 gloo ranks and the eager backend); a process
    whose local count is < 2 reads the global count with ``.item()``, a graph break.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance, > 0.
        momentum: weight of the new batch in the running statistics, in [0, 1], or ``None``
            (cumulative average).
        affine: learn ``weight`` (init 1) and, if ``bias``, ``bias`` (init 0).
        track_running_stats: keep running statistics; if False, batch statistics are used in
            eval too (then local to each process: eval never synchronizes).
        bias: learn ``bias`` (with ``affine``).
        process_group: the group whose processes share statistics; ``None`` is the default
            (world) group.

    Shape: ``(N, C, *)`` -> same shape and dtype; ``N`` and ``*`` may differ across processes.
    """

    spec = NormSpec(
        paper="Peng et al. 2018 (MegDet), arXiv:1711.07240; Ioffe & Szegedy 2015, arXiv:1502.03167",
        layout="channel",
        batch_stats=True,
        running_stats=True,
        min_ndim=2,
    )
    # Set by convert_sync: the class this module replaced, which revert_sync restores.
    converted_from: type[nn.Module] | None = None

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        bias: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self.process_group = process_group

    def world_size(self) -> int:
        """Processes that share statistics: 1 without an initialized process group."""
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.world_size() <= 1:
            return super().forward(x)
        self._check_input(x)
        return self._synced_forward(x)

    def _synced_forward(self, x: Tensor) -> Tensor:
        c = self.num_features
        local_count = x.numel() // c
        with torch.no_grad():
            xd = x.detach().to(F64)
            dims = _reduce_dims(x)
            count = torch.full((1,), float(local_count), dtype=F64, device=x.device)
            packed = torch.cat([xd.sum(dims), (xd * xd).sum(dims), count])
            del xd
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.process_group)
        total = packed[2 * c :]
        update = True
        if local_count < 2:  # only here can the global count be < 2: read it (same on every process)
            n = round(float(total.item()))
            if n == 1:
                self._fail(
                    "expected more than 1 value per channel when using batch statistics, got 1 in total "
                    f"over the {self.world_size()} processes of the group (input of shape "
                    f"{tuple(x.shape)} on this process); use a global batch of >= 2 samples, call "
                    ".eval(), or use a per-sample norm (GroupNorm, LayerNorm)"
                )
            update = n >= 2
        n_safe = total.clamp(min=1.0)
        mean = packed[:c] / n_safe
        var = (packed[c : 2 * c] / n_safe - mean * mean).clamp(min=0.0)
        if self.track_running_stats and update:
            self._update_running_stats_global(mean, var, total)
        invstd = torch.rsqrt(var + self.eps)
        apply: Callable[..., Tensor] = _SyncedNormalize.apply
        return apply(x, self.weight, self.bias, mean, invstd, n_safe, self.process_group)

    @torch.no_grad()
    def _update_running_stats_global(self, mean: Tensor, var: Tensor, count: Tensor) -> None:
        """BatchNorm's update (NaN-safe, momentum or cumulative) from the global statistics."""
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        unbiased = var * (count / (count - 1))
        factor = momentum_factor(self.momentum, self.num_batches_tracked, F64)
        # In float64, rounded once into the buffer (as torch's CPU kernel does): BatchNorm's
        # three fp32 roundings per step gave 2e-7 instead of 6e-8 against fp64 after 2 steps.
        commit_if_finite(
            self,
            torch.isfinite(mean).all() & torch.isfinite(unbiased).all(),
            running_mean=self.running_mean.to(F64) * (1 - factor) + mean * factor,
            running_var=self.running_var.to(F64) * (1 - factor) + unbiased * factor,
        )

    def extra_repr(self) -> str:
        group = "" if self.process_group is None else ", process_group=<custom>"
        base: str = super().extra_repr()  # type: ignore[no-untyped-call]
        return base + group


class _SyncedNormalize(torch.autograd.Function):
    """``y = (x - mean) * invstd * weight + bias`` with global statistics; the backward all-reduces.

    ``mean``, ``invstd`` and ``count`` are float64 ``(C,)``/``(1,)`` tensors, identical on every
    process. The arithmetic on activations runs in the compute dtype (fp32 for half inputs).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        count: Tensor,
        group: dist.ProcessGroup | None,
    ) -> Tensor:
        cdtype = NF.compute_dtype(x)
        scale = invstd if weight is None else invstd * weight.detach().to(F64)
        # x - mean first (exact for values near the mean), in a fresh tensor that keeps x's memory format
        y = x.to(cdtype) - _per_channel(mean, x, cdtype)
        y.mul_(_per_channel(scale, x, cdtype))
        if bias is not None:
            y.add_(_per_channel(bias.detach(), x, cdtype))
        ctx.save_for_backward(x, weight, mean, invstd, count)
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd, count = ctx.saved_tensors
        cdtype = NF.compute_dtype(x)
        dims = _reduce_dims(x)
        dyc = dy.to(cdtype)
        xmu = x.to(cdtype) - _per_channel(mean, x, cdtype)
        sum_dy = dyc.sum(dims, dtype=F64)
        sum_dy_xmu = (dyc * xmu).sum(dims, dtype=F64)
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            packed = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=ctx.group)
            global_dy, global_dy_xmu = packed.chunk(2)
            scale = invstd if weight is None else invstd * weight.to(F64)
            mean_dy = global_dy / count
            proj = global_dy_xmu / count * invstd * invstd
            # dx = (dy - mean(dy) - (x - mean) * mean(dy * xhat) * invstd) * invstd * weight, global means
            dx = xmu.mul_(_per_channel(-proj, x, cdtype)).add_(dyc).sub_(_per_channel(mean_dy, x, cdtype))
            dx = dx.mul_(_per_channel(scale, x, cdtype)).to(x.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = (sum_dy_xmu * invstd).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            dbias = sum_dy.to(ctx.bias_dtype)
        return dx, dweight, dbias, None, None, None, None


# --------------------------------------------------------------------------------------------
# Conversion: BatchNorm <-> CrossBatchNorm

# Exact classes only: a subclass of one of these may compute something else (a frozen or
# cross-iteration BN), and silently replacing it would change the model.
SYNC_SOURCES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    BatchNorm,
)


def _swap(module: nn.Module, replace: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Replace modules throughout ``module`` (in place) by ``replace(m)`` where it is not None.

    A module shared under several names is replaced by one shared module.
    """
    memo: dict[int, nn.Module] = {}

    def visit(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        new = replace(m)
        if new is not None:
            memo[id(m)] = new
            return new
        memo[id(m)] = m
        # _modules, not named_children(), which lists a module held under two names only once
        for name, child in list(m._modules.items()):
            if child is None:
                continue
            new_child = visit(child)
            if new_child is not child:
                m.add_module(name, new_child)
        return m

    return visit(module)


def _move_state(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` (built on the meta device) ``src``'s parameter and buffer objects, and its mode.

    The same ``Parameter`` objects, so an optimizer built before the conversion still updates
    the model; their device, dtype and ``requires_grad`` come along.
    """
    for name in ("weight", "bias"):
        setattr(dst, name, getattr(src, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(dst, name, getattr(src, name))
    if "skipped_updates" in dst._buffers:
        previous = src._buffers.get("skipped_updates")
        if previous is None:
            device = next((t.device for t in (*src.parameters(), *src.buffers())), torch.device("cpu"))
            previous = torch.zeros((), dtype=torch.long, device=device)
        dst.skipped_updates = previous
    dst.train(src.training)
    if getattr(src, "qualified_name", None) is not None:
        dst.qualified_name = src.qualified_name


def _options(m: nn.Module) -> dict[str, Any]:
    return {
        "eps": m.eps,
        "momentum": m.momentum,
        "affine": m.affine,
        "track_running_stats": m.track_running_stats,
        "bias": m.bias is not None or not m.affine,
    }


def convert_sync(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every BatchNorm in ``module`` by a :class:`CrossBatchNorm` sharing its state.

    Converts modules of exactly the classes ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` and
    ``normlab.BatchNorm`` (subclasses are left alone: they may compute something else), at any
    depth. The new module takes over the old one's ``weight``/``bias`` Parameter objects and
    buffers (running statistics, ``num_batches_tracked``; device, dtype and ``requires_grad``
    with them), its ``eps``, ``momentum``, ``affine``, ``track_running_stats`` and train/eval
    mode, and records the replaced class for :func:`revert_sync`. A module shared under several
    names stays shared; already converted modules are left as they are, so a second call is a
    no-op. Like ``nn.SyncBatchNorm.convert_sync_batchnorm``, the children are replaced in place
    and the (possibly new, when ``module`` itself is a BatchNorm) root is returned.

    Args:
        module: the model.
        process_group: the group for the new modules; ``None`` keeps a ``SyncBatchNorm``'s own
            group and otherwise means the default (world) group.
    """

    def replace(m: nn.Module) -> nn.Module | None:
        if type(m) not in SYNC_SOURCES:
            return None
        group = process_group if process_group is not None else getattr(m, "process_group", None)
        new = CrossBatchNorm(cast(int, m.num_features), **_options(m), process_group=group, device="meta")
        _move_state(m, new)
        new.converted_from = type(m)
        return new

    return _swap(module, replace)


def revert_sync(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync`: each :class:`CrossBatchNorm` becomes the class it replaced.

    A ``CrossBatchNorm`` that was not made by :func:`convert_sync` (built directly, or loaded
    without the record) becomes a :class:`normlab.BatchNorm`: it accepts inputs of any rank (a
    torch ``BatchNormNd`` would have to be guessed from the input rank, which a module does not
    know) and has the same state_dict keys, math and running-statistics rules. A reverted
    ``nn.SyncBatchNorm`` gets the process group of the ``CrossBatchNorm``. State is carried as in
    :func:`convert_sync` (the same Parameter and buffer objects).
    """

    def replace(m: nn.Module) -> nn.Module | None:
        if type(m) is not CrossBatchNorm:
            return None
        target = m.converted_from or BatchNorm
        options = _options(m)
        if issubclass(target, BatchNorm):
            new: nn.Module = target(m.num_features, **options, device="meta")
        elif issubclass(target, nn.SyncBatchNorm):
            new = target(m.num_features, **options, process_group=m.process_group, device="meta")
        else:
            new = target(m.num_features, **options, device="meta")
        _move_state(m, new)
        return new

    return _swap(module, replace)
