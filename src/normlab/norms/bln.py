"""Batch Layer Normalization, BLN (Ziaee & Çano 2022, arXiv:2209.08898)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from normlab import functional as NF
from normlab.norms._base import (
    Device,
    DType,
    NormMixin,
    NormSpec,
    adopt_buffer_shapes,
    affine_parameters,
    check_eps,
    check_num_features,
    register_norm,
    reset_affine,
)

# The official layer shifts both mixing weights by this constant (1/m - 1e-4 and 1 - (1/m + 1e-4)).
MIX_OFFSET = 1e-4

# Per-epoch statistics: the finalized ones (used in eval) and the running sums of the epoch under way.
_MOVING = ("moving_batch_mean", "moving_batch_var", "moving_feature_mean", "moving_feature_var")
_SUMS = ("batch_mean_sum", "batch_var_sum", "feature_mean_sum", "feature_var_sum")


@register_norm("bln", aliases=("batch_layer_norm", "batch_layer_normalization"))
class BatchLayerNorm(NormMixin, nn.Module):
    r"""Batch Layer Normalization: a fixed mix of a batch norm and a feature (layer) norm.

    Follows the official TensorFlow layer ``A2Amir/Batch-Layer-Normalization:helpers/bln_layer.py``
    and its epoch callback ``helpers/bln_callback.py``. With ``m`` the *configured* ``batch_size``
    and ``d`` = ``num_features``::

        x_b = (x - mean_B) / sqrt(var_B + eps)      # over the batch dim 0 only: per position and feature
        x_f = (x - mean_F) / sqrt(var_F + eps)      # over the feature dim only: per sample and position
        y   = weight * ((1/m - 1e-4) * x_f + (1 - (1/m + 1e-4)) * x_b) / sqrt(d) + bias

    Both variances are biased; ``eps`` (the official ``offset``) is 1e-3, inside the square root.
    The ``1/sqrt(d)`` factor and the ``±1e-4`` offsets are the official code's (not in the usual
    BN/LN definitions). ``m``
    is the hyperparameter ``batch_size``, not the size of the current input, in training and eval
    alike (as the official layer); a smaller last batch still uses ``1/m``. At ``m = 1`` and a batch
    of one sample ``x_b = 0``, so ``y = weight * (1 - 1e-4) * x_f / sqrt(d) + bias``.

    **Layout.** The features are the last dimension, ``(N, *, C)``, as in the official
    channels-last layer (2-D dense, 3-D sequences ``(N, T, C)``, 4-D images ``(N, H, W, C)``);
    ``channels_first=True`` takes ``(N, C, *)`` (PyTorch convolutions) and normalizes the same way
    with dimension 1 as the feature dimension. The batch statistics are kept **per position and
    feature** (one value per element of ``x.shape[1:]``), the feature statistics per sample and
    position. Any rank >= 2 is accepted.

    **Moving statistics, one epoch at a time.** Each training forward adds the batch mean and
    variance (per position and feature) and the feature mean and variance (averaged over the
    batch, per position) to per-epoch sums. :meth:`new_epoch` (or :func:`bln_new_epoch` on a whole
    model) closes the epoch: the moving statistics become the averages over the batches of that
    epoch, both variances multiplied by ``m / (m - 1)`` as the official ``update_mm_mv`` does (also
    for the feature variance, whose Bessel factor would be ``d / (d - 1)``; the official factor is
    kept), and the sums restart from zero. Call it once at the end of every training epoch, before
    evaluating: epochs are not averaged together. Before the first call the moving statistics are
    zero (the official initial value), so eval normalizes with mean 0 and variance 0 (+ eps).

    Differences from the official code, each forced or harmless:

    - The official moving feature statistics have one slot per sample index of the batch, shape
      ``(m, *, 1)``, which only broadcast when the eval batch has exactly ``m`` samples; here they
      are pooled over the samples of each batch, shape ``(*, 1)``: the same estimator averaged over
      the slots (with shuffled data a slot index means nothing).
    - At ``m = 1`` the official ``m / (m - 1)`` divides by zero and makes the moving variances NaN;
      here the factor is 1 for ``m = 1``.
    - The official callback divides by the number of steps Keras reports; here by the number of
      training forwards accumulated since the last :meth:`new_epoch`. A batch whose statistics are
      not finite is not accumulated (``skipped_updates`` counts it), as normlab's BatchNorm.
    - Evaluating in the middle of an epoch uses the previous epoch's statistics; the official
      layer, whose sums and moving statistics are the same variables, would use unfinished sums.

    **Inference switches.** In eval, each of the four statistics is either the moving one
    (``True``) or the one of the current eval batch (``False``), independently, exactly as the
    official ``bln_inference``: ``batch_moving_mean``, ``batch_moving_var`` (defaults ``True``),
    ``feature_moving_mean``, ``feature_moving_var`` (defaults ``False``). A current-batch variance
    is always taken about the current batch's own mean, even when the mean used to centre is the
    moving one. The README grid-searches these four booleans.

    Args:
        num_features: size ``d`` of the feature dimension.
        batch_size: the configured mini-batch size ``m`` (>= 1) that sets the mixing weights.
        eps: added to both variances inside the square root, > 0 (official ``offset`` 1e-3).
        affine: learn ``weight`` (init 1) and, if ``bias``, ``bias`` (init 0), both of shape ``(d,)``.
        bias: learn ``bias`` (with ``affine``).
        channels_first: features are dimension 1 of ``(N, C, *)`` instead of the last dimension.
        batch_moving_mean, batch_moving_var, feature_moving_mean, feature_moving_var: the
            inference switches described above.

    Shape: ``(N, *, C)``, or ``(N, C, *)`` with ``channels_first`` -> same shape and dtype. The
    moving statistics fix the positions ``*`` at the first training batch; another shape then
    raises until :meth:`reset_running_stats`.
    """

    spec = NormSpec(
        paper="Ziaee & Çano 2022, arXiv:2209.08898",
        layout="last",
        batch_stats=True,
        running_stats=True,
        min_ndim=2,
        needs=("batch_size",),
        example_kwargs={"batch_size": 4},
        lazy_buffers=True,
    )
    batches_accumulated: Tensor
    skipped_updates: Tensor

    def __init__(
        self,
        num_features: int,
        *,
        batch_size: int,
        eps: float = 1e-3,
        affine: bool = True,
        bias: bool = True,
        channels_first: bool = False,
        batch_moving_mean: bool = True,
        batch_moving_var: bool = True,
        feature_moving_mean: bool = False,
        feature_moving_var: bool = False,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.num_features = check_num_features(owner, num_features)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                f"{owner}: batch_size must be an int >= 1 (the configured m), got {batch_size!r}"
            )
        self.batch_size = batch_size
        self.eps = check_eps(owner, eps)
        self.affine = affine
        self.channels_first = channels_first
        self.batch_moving_mean = bool(batch_moving_mean)
        self.batch_moving_var = bool(batch_moving_var)
        self.feature_moving_mean = bool(feature_moving_mean)
        self.feature_moving_var = bool(feature_moving_var)
        self.weight, self.bias = affine_parameters(
            num_features, weight=affine, bias=bias, device=device, dtype=dtype
        )
        for name in (*_MOVING, *_SUMS):
            # Shape-(0,) until the first training batch fixes the positions (see _materialize).
            self.register_buffer(name, torch.zeros(0, device=device, dtype=dtype))
        self.register_buffer("batches_accumulated", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer(
            "skipped_updates", torch.zeros((), dtype=torch.long, device=device), persistent=False
        )
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------
    # Mixing weights and state

    @property
    def feature_weight(self) -> float:
        """Weight of the feature-normalized term, ``1/m - 1e-4``."""
        return 1.0 / self.batch_size - MIX_OFFSET

    @property
    def batch_weight(self) -> float:
        """Weight of the batch-normalized term, ``1 - (1/m + 1e-4)``."""
        return 1.0 - (1.0 / self.batch_size + MIX_OFFSET)

    @property
    def variance_correction(self) -> float:
        """``m / (m - 1)`` applied to both moving variances at the end of an epoch (1 when ``m = 1``)."""
        m = self.batch_size
        return m / (m - 1) if m > 1 else 1.0

    def reset_parameters(self) -> None:
        reset_affine(self.weight, self.bias)
        self.reset_running_stats()

    def reset_running_stats(self) -> None:
        """Forget every moving statistic and per-epoch sum (back to the shape-free initial state)."""
        for name in (*_MOVING, *_SUMS):
            old = self._buffers[name]
            assert old is not None
            self._buffers[name] = torch.zeros(0, device=old.device, dtype=old.dtype)
        self.batches_accumulated.zero_()
        if hasattr(self, "skipped_updates"):
            self.skipped_updates.zero_()

    def on_epoch_end(self) -> bool:
        """The official Keras callback's epoch end: :meth:`new_epoch`."""
        return self.new_epoch()

    @torch.no_grad()
    def new_epoch(self) -> bool:
        """Close the epoch: moving statistics = averages over its batches; restart the sums.

        Returns ``True`` if statistics were updated, ``False`` when no training batch was seen
        since the last call (the moving statistics are then left as they are).
        """
        count = int(self.batches_accumulated)
        if count == 0:
            return False
        correction = self.variance_correction
        for moving, total, factor in zip(_MOVING, _SUMS, (1.0, correction, 1.0, correction), strict=True):
            acc = self._buffers[total]
            assert acc is not None
            self._buffers[moving] = acc / count * factor
            acc.zero_()
        self.batches_accumulated.zero_()
        return True

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # The statistics' shape depends on the training inputs: take the checkpoint's shape.
        adopt_buffer_shapes(self, state_dict, prefix, (*_MOVING, *_SUMS))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ------------------------------------------------------------------------------------------
    # Forward

    def _stat_shapes(self, x: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of the batch statistics (``x.shape[1:]``) and feature statistics (feature dim -> 1)."""
        batch_shape = tuple(x.shape[1:])
        feature_shape = list(batch_shape)
        feature_shape[0 if self.channels_first else -1] = 1
        return batch_shape, tuple(feature_shape)

    def _check_stat_shape(self, name: str, want: tuple[int, ...], x: Tensor) -> None:
        have = self._buffers[name]
        assert have is not None
        if have.numel() and tuple(have.shape) != want:
            self._fail(
                f"its statistics are kept per position, for inputs of shape (N, *{tuple(have.shape)}), "
                f"got shape {tuple(x.shape)}; call reset_running_stats() to start over with a new shape"
            )

    @torch.no_grad()
    def _accumulate(self, b_mean: Tensor, b_var: Tensor, f_mean: Tensor, f_var: Tensor) -> None:
        new = (b_mean[0], b_var[0], f_mean.mean(0), f_var.mean(0))
        ok = torch.stack([torch.isfinite(t).all() for t in new]).all()
        for name, value in zip(_SUMS, new, strict=True):
            acc = self._buffers[name]
            assert acc is not None
            if acc.shape != value.shape:  # first batch since reset_running_stats()
                acc = self._buffers[name] = torch.zeros(value.shape, device=acc.device, dtype=acc.dtype)
            acc.copy_(torch.where(ok, acc + value.to(acc.dtype), acc))
        self.batches_accumulated.add_(ok.long())
        self.skipped_updates.add_((~ok).long())

    def _moving(self, name: str, like: Tensor) -> Tensor:
        value = self._buffers[name]
        assert value is not None
        if value.numel() == 0:  # no epoch closed yet: the official initial value, zero
            return like.new_zeros(())
        return value.to(like.dtype)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        feature_dim = 1 if self.channels_first else -1
        xc = x.to(NF.compute_dtype(x))
        batch_shape, feature_shape = self._stat_shapes(x)
        switches = (
            self.batch_moving_mean,
            self.batch_moving_var,
            self.feature_moving_mean,
            self.feature_moving_var,
        )
        # Training fills the sums; eval reads the moving statistics its switches select.
        used = _SUMS if self.training else tuple(n for n, s in zip(_MOVING, switches, strict=True) if s)
        for name in used:
            self._check_stat_shape(name, batch_shape if "batch" in name else feature_shape, x)

        empty = x.shape[0] == 0  # no statistics at all (and an empty output)
        zero = xc.new_zeros(())
        f_var, f_mean = zero, zero
        if not empty:
            f_var, f_mean = torch.var_mean(xc, dim=feature_dim, keepdim=True, correction=0)
        b_var, b_mean = zero, zero
        if not empty and (self.training or not (self.batch_moving_mean and self.batch_moving_var)):
            b_var, b_mean = torch.var_mean(xc, dim=0, keepdim=True, correction=0)
        if self.training:
            if not empty:
                self._accumulate(b_mean.detach(), b_var.detach(), f_mean.detach(), f_var.detach())
        else:
            if self.batch_moving_mean:
                b_mean = self._moving("moving_batch_mean", xc)
            if self.batch_moving_var:
                b_var = self._moving("moving_batch_var", xc)
            if self.feature_moving_mean:
                f_mean = self._moving("moving_feature_mean", xc)
            if self.feature_moving_var:
                f_var = self._moving("moving_feature_var", xc)

        x_b = (xc - b_mean) / torch.sqrt(b_var + self.eps)
        x_f = (xc - f_mean) / torch.sqrt(f_var + self.eps)
        y = (self.feature_weight * x_f + self.batch_weight * x_b) / math.sqrt(self.num_features)
        if self.weight is not None:
            y = y * NF.channel_view(self.weight.to(y.dtype), y, feature_dim)
        if self.bias is not None:
            y = y + NF.channel_view(self.bias.to(y.dtype), y, feature_dim)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        switches = "".join(
            str(int(s))
            for s in (
                self.batch_moving_mean,
                self.batch_moving_var,
                self.feature_moving_mean,
                self.feature_moving_var,
            )
        )
        return (
            f"{self.num_features}, batch_size={self.batch_size}, eps={self.eps}, affine={self.affine}, "
            f"channels_first={self.channels_first}, moving(bm,bv,fm,fv)={switches}"
        )


def bln_new_epoch(model: nn.Module) -> int:
    """Close the epoch in every :class:`BatchLayerNorm` inside ``model``; the number updated.

    Call at the end of each training epoch, before evaluating (the official Keras callback
    does this after the last training batch of every epoch).
    """
    return sum(1 for m in model.modules() if isinstance(m, BatchLayerNorm) and m.new_epoch())
