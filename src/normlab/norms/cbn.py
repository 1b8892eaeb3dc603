"""Cross-Iteration Batch Normalization, CBN (Yao, Cao, Zheng, Huang & Lin, CVPR 2021, arXiv:2002.05712)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
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
    check_momentum,
    check_num_features,
    register_norm,
    reset_affine,
)
from normlab.norms.batch_norm import update_running_stats

WeightSource = nn.Module | Tensor

# Window buffers shaped like the compensating weight, unknown until a weight is first seen.
_WEIGHT_SHAPED = ("hist_dmean", "hist_dsqmean", "hist_weight")


@register_norm("cbn", aliases=("cross_iteration_batchnorm", "cross_iteration_bn"))
class CrossIterationBatchNorm(NormMixin, nn.Module):
    r"""Cross-Iteration BatchNorm: batch statistics pooled over the last ``window`` iterations.

    Follows the official ``Howal/Cross-iterationBatchNorm:mmdet/models/utils/CBN.py``
    (``CBatchNorm2d``). Per channel, with ``θ`` the weight of the layer that produced the input
    (the **preceding** conv or linear layer only), iteration ``t`` and the ``window - 1`` previous
    iterations ``i`` whose moments ``μ_i``, ``ν_i = E[x²]_i``, derivatives ``∂μ_i/∂θ``, ``∂ν_i/∂θ`` and
    weights ``θ_i`` are kept::

        μ_i(θ_t) = μ_i + rho * Σ ∂μ_i/∂θ · (θ_t - θ_i)      # first-order Taylor compensation
        ν_i(θ_t) = ν_i + rho * Σ ∂ν_i/∂θ · (θ_t - θ_i)      # (sums over the weight of each channel)
        keep_i   = ν_i(θ_t) - μ_i(θ_t)² >= 0                 # per channel; the current batch is always kept
        μ̄ = mean_{kept} μ_i(θ_t),   σ̄² = mean_{kept} ν_i(θ_t) - μ̄²
        y = (x - μ̄) / (sqrt(σ̄²) + eps) * weight + bias      # eps_mode="outside" (official default)

    An entry whose compensated variance is negative is dropped *for that channel only*, with the
    mean taken over the entries kept (the official code; the paper's ``max(ν, μ²)`` is not
    used). The stored entries are detached: gradients reach the input only through the
    current batch's ``μ_t`` and ``ν_t``. In training the running statistics are updated with the
    **current** batch's mean and unbiased variance only (PyTorch momentum convention, 0.1), and
    eval normalizes with them, exactly as BatchNorm.

    **Telling CBN the weight.** Compensation needs ``θ``: pass it per call
    (``cbn(y, weight=conv.weight)``, as the official ``forward(input, weight)``), attach the layer
    once (``cbn.attach(conv)`` or ``weight_source=conv``; then ``nn.Sequential(conv, cbn)`` works),
    or wrap the pair in :class:`CBNConv`. ``θ.shape[0]`` must be ``num_features`` (output channels
    first: ``nn.Conv1d/2d/3d``, grouped or not, and ``nn.Linear``; not ``ConvTranspose``). A bias
    of the preceding layer is not compensated (as the official code; use ``bias=False`` before a
    norm). **Without a weight there is no compensation**: the window is the naive average of the
    stored statistics (the paper's ``rho = 0`` baseline); entries recorded without a weight are
    never compensated. With a weight whose derivatives cannot be taken this iteration (grad mode
    off, or an input or weight that does not require grad, i.e. a frozen layer), the iteration
    uses the current batch alone and stores nothing, as the official code.

    **Cost of the compensation.** ``∂μ_t/∂θ`` and ``∂ν_t/∂θ`` are taken with two
    ``torch.autograd.grad`` calls per training step (as the official code): each backpropagates
    ``C`` scalars through the normalization's reductions into the preceding layer's weight
    gradient, i.e. about two extra weight-gradient passes of that layer (for a conv, the FLOPs of
    two convolutions) per step, and the window keeps ``3 * (window - 1)`` copies of ``θ``. These
    passes run through the norm's input, so a ``retain_grad()`` or tensor hook on a tensor between
    ``θ`` and this norm also sees them (as in the official code); parameter ``.grad`` is untouched.
    The autograd calls run eagerly: with a weight, ``torch.compile`` breaks the graph at them; the
    weight-free (naive) mode compiles with ``fullgraph=True``.

    **Burn-in** (``burnin`` iterations, i.e. training forwards; the official configs give epochs,
    which ``tools/train.py`` converts): with ``two_stage=True`` the first ``burnin`` iterations are
    plain BatchNorm and store nothing, then the window switches on and fills one iteration at a
    time, so it grows ``1, 2, ..., window``. With ``two_stage=False`` the number of stored
    iterations allowed grows as ``floor((window - 1) * min(t / burnin, 1))`` (integer arithmetic
    here; the official float product can round an exact boundary down).

    Differences from the official code, each documented and tested:

    - The variance used to normalize is the biased one everywhere. The official burn-in / plain
      path divides by the *unbiased* ``y.var()``, its window path by the biased ``E[x²] - μ²``;
      biased everywhere makes ``window=1`` exactly BatchNorm and the switch at burn-in seamless.
    - ``weight`` is initialized to 1 (torch convention; the official ``uniform_()`` is random),
      ``bias`` to 0.
    - The window is pooled as ``mean(σ_i²) + mean((μ_i - μ̄)²)``, which equals ``mean(ν_i) - μ̄²`` and
      computes the current batch's variance in two passes (no ``E[x²] - μ²`` cancellation for it).
    - Any input rank ``(N, C, *)`` (official: 4-D); the weight may be of any rank with ``C`` rows.
    - The window is kept in fixed-size buffers saved in the ``state_dict`` (official: Python lists,
      lost at a restart), so a resumed run continues with the same window.
    - A batch whose statistics are not finite updates neither the window nor the running
      statistics (``skipped_updates`` counts it), as normlab's BatchNorm.

    Args:
        num_features: number of channels ``C``.
        window: ``k``, the number of iterations pooled, current one included (>= 1; the official
            configs use ``buffer_num = 3``, i.e. ``k = 4``). ``window=1`` is BatchNorm.
        rho: weight of the compensation (1: on, 0: naive averaging of the stored statistics).
        burnin: iterations of plain BatchNorm before the window switches on (>= 0).
        two_stage: switch the window on at once after burn-in (``True``) or grow it linearly.
        eps: > 0; added to the standard deviation (``eps_mode="outside"``, official default) or to
            the variance inside the square root (``"inside"``, official ``out_p=True``, BatchNorm's).
        eps_mode: ``"outside"`` or ``"inside"``.
        momentum: weight of the current batch in the running statistics, in [0, 1], or ``None``
            for the cumulative average (as :class:`normlab.BatchNorm`).
        affine: learn ``weight`` (init 1) and, if ``bias``, ``bias`` (init 0).
        bias: learn ``bias`` (with ``affine``).
        track_running_stats: keep running statistics; if False, eval uses the current batch alone.
        weight_source: a layer (its ``.weight``) or a weight tensor to attach, see :meth:`attach`.

    Shape: ``(N, C, *)`` -> same shape and dtype. ``forward(x, weight=None)``: a ``weight`` given
    to the call takes precedence over the attached one.
    """

    spec = NormSpec(
        paper="Yao et al. 2021, arXiv:2002.05712",
        layout="channel",
        batch_stats=True,
        running_stats=True,
        min_ndim=2,
        # window=1: the generic suites call forward repeatedly (gradcheck's finite differences) and
        # need a train-mode output that does not depend on earlier calls; tests/test_bln_cbn.py
        # covers window > 1.
        example_kwargs={"window": 1},
    )
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None
    iteration: Tensor
    hist_mean: Tensor
    hist_sqmean: Tensor
    hist_len: Tensor
    hist_dmean: Tensor
    hist_dsqmean: Tensor
    hist_weight: Tensor
    skipped_updates: Tensor

    def __init__(
        self,
        num_features: int,
        *,
        window: int = 4,
        rho: float = 1.0,
        burnin: int = 0,
        two_stage: bool = True,
        eps: float = 1e-5,
        eps_mode: Literal["outside", "inside"] = "outside",
        momentum: float | None = 0.1,
        affine: bool = True,
        bias: bool = True,
        track_running_stats: bool = True,
        weight_source: WeightSource | None = None,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.num_features = check_num_features(owner, num_features)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"{owner}: window must be an int >= 1 (iterations pooled), got {window!r}")
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho):
            raise ValueError(f"{owner}: rho must be a finite number, got {rho!r}")
        if isinstance(burnin, bool) or not isinstance(burnin, int) or burnin < 0:
            raise ValueError(f"{owner}: burnin must be an int >= 0 (iterations), got {burnin!r}")
        if eps_mode not in ("outside", "inside"):
            raise ValueError(f"{owner}: eps_mode must be 'outside' or 'inside', got {eps_mode!r}")
        check_momentum(owner, momentum, allow_none=True)
        self.window = window
        self.rho = float(rho)
        self.burnin = burnin
        self.two_stage = bool(two_stage)
        self.eps = check_eps(owner, eps)
        self.eps_mode = eps_mode
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self._source: tuple[WeightSource] | None = None

        self.weight, self.bias = affine_parameters(
            num_features, weight=affine, bias=bias, device=device, dtype=dtype
        )
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        stored = window - 1
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("hist_mean", torch.zeros(stored, num_features, **factory))
        self.register_buffer("hist_sqmean", torch.zeros(stored, num_features, **factory))
        self.register_buffer("hist_len", torch.zeros((), dtype=torch.long, device=device))
        for name in _WEIGHT_SHAPED:
            self.register_buffer(name, torch.zeros(0, **factory))
        self.register_buffer(
            "skipped_updates", torch.zeros((), dtype=torch.long, device=device), persistent=False
        )
        self.reset_parameters()
        if weight_source is not None:
            self.attach(weight_source)

    # ------------------------------------------------------------------------------------------
    # The compensating weight

    def attach(self, source: WeightSource | None) -> CrossIterationBatchNorm:
        """Use ``source`` (a layer, through its ``.weight``, or a weight tensor) as ``θ``; None detaches.

        The layer is referenced, not registered as a submodule: it stays out of this module's
        ``state_dict`` and ``parameters()``, and a ``deepcopy`` of the whole model keeps the pair
        together (a ``deepcopy`` of this norm alone carries its own copy of the layer). Returns self.
        """
        if source is None:
            self._source = None
            return self
        if isinstance(source, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            self._fail("a ConvTranspose weight is (in, out, ...): its first dimension is not the channels")
        weight = source.weight if isinstance(source, nn.Module) else source
        if not isinstance(weight, Tensor):
            self._fail(f"the weight source must be a layer with a tensor .weight or a tensor, got {source!r}")
        self._check_weight(weight)
        self._source = (source,)
        return self

    @property
    def weight_source(self) -> WeightSource | None:
        """The attached layer or tensor, or None."""
        return None if self._source is None else self._source[0]

    def _attached_weight(self) -> Tensor | None:
        if self._source is None:
            return None
        source = self._source[0]
        weight = source.weight if isinstance(source, nn.Module) else source
        assert isinstance(weight, Tensor)
        return weight

    def _check_weight(self, weight: Tensor) -> None:
        if weight.dim() < 1 or weight.shape[0] != self.num_features:
            self._fail(
                f"the compensating weight must have num_features={self.num_features} rows "
                f"(output channels first), got shape {tuple(weight.shape)}"
            )
        stored = self.hist_weight
        if stored.numel() and tuple(stored.shape[1:]) != tuple(weight.shape):
            self._fail(
                f"the window holds derivatives for a weight of shape {tuple(stored.shape[1:])}, "
                f"got {tuple(weight.shape)}; call reset_window() after changing the preceding layer"
            )

    # ------------------------------------------------------------------------------------------
    # State

    def reset_parameters(self) -> None:
        reset_affine(self.weight, self.bias)
        self.reset_running_stats()

    def reset_running_stats(self) -> None:
        """Running statistics to (0, 1), counters to 0 and an empty window."""
        if self.running_mean is not None and self.running_var is not None:
            self.running_mean.zero_()
            self.running_var.fill_(1)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.zero_()
        self.iteration.zero_()
        self.reset_window()
        if hasattr(self, "skipped_updates"):
            self.skipped_updates.zero_()

    def reset_window(self) -> None:
        """Forget the stored iterations (burn-in progress and running statistics are kept)."""
        self.hist_mean.zero_()
        self.hist_sqmean.zero_()
        self.hist_len.zero_()
        for name in _WEIGHT_SHAPED:
            old = self._buffers[name]
            assert old is not None
            self._buffers[name] = torch.zeros(0, device=old.device, dtype=old.dtype)

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
        # The weight-shaped window buffers take the checkpoint's shape (empty until a weight is seen).
        adopt_buffer_shapes(self, state_dict, prefix, _WEIGHT_SHAPED)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def stored_iterations_allowed(self, iteration: Tensor | int) -> Tensor:
        """How many previous iterations the window may hold at training iteration ``iteration`` (1-based).

        The official ``_update_buffer_num``: ``window - 1`` after burn-in (``two_stage``), else
        ``floor((window - 1) * min(iteration / burnin, 1))``; always ``window - 1`` without burn-in.
        """
        stored = self.window - 1
        it = torch.as_tensor(iteration, dtype=torch.long, device=self.iteration.device)
        if self.burnin == 0:
            return torch.full_like(it, stored)
        if self.two_stage:
            return torch.where(it > self.burnin, stored, 0)
        return torch.clamp(stored * it // self.burnin, max=stored)

    def past_moments(self, weight: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The stored iterations' ``(μ_i, ν_i)`` compensated to ``weight``, and which entries are filled.

        ``weight`` defaults to the attached one; without a weight (or without stored derivatives)
        the stored moments are returned uncompensated. Shapes ``(window - 1, C)`` twice and
        ``(window - 1,)`` (bool); newest first. Detached.
        """
        weight = self._attached_weight() if weight is None else weight
        mu, nu = self.hist_mean, self.hist_sqmean
        if weight is not None and self.hist_dmean.numel() and self.rho != 0.0:
            self._check_weight(weight)
            delta = (weight.detach().to(self.hist_weight.dtype)[None] - self.hist_weight).flatten(2)
            mu = mu + (self.rho * (self.hist_dmean.flatten(2) * delta).sum(2)).to(mu.dtype)
            nu = nu + (self.rho * (self.hist_dsqmean.flatten(2) * delta).sum(2)).to(nu.dtype)
        filled = torch.arange(self.window - 1, device=mu.device) < self.hist_len
        return mu.detach(), nu.detach(), filled

    # ------------------------------------------------------------------------------------------
    # Forward

    def forward(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        self._check_input(x)
        count = math.prod(x.shape) // self.num_features  # values per channel
        use_batch_stats = self.training or not self.track_running_stats
        if use_batch_stats and count == 1:
            self._fail(
                f"expected more than 1 value per channel when using batch statistics, got input of shape "
                f"{tuple(x.shape)}; use a batch of >= 2 samples, call .eval(), or use a per-sample "
                "norm (GroupNorm, LayerNorm)"
            )
        if not self.training or count == 0:  # eval, or an empty batch: no state changes
            return self._normalize_plain(x, use_batch_stats)

        self.iteration.add_(1)
        theta = weight if weight is not None else self._attached_weight()
        plain = self.window == 1
        if theta is not None and not plain:
            self._check_weight(theta)
            derivable = torch.is_grad_enabled() and x.requires_grad and theta.requires_grad
            # The derivatives cost two backward passes: skip them while burn-in stores nothing.
            # (A Python read of a buffer; the autograd calls below break a compiled graph anyway.)
            plain = not derivable or int(self.stored_iterations_allowed(self.iteration)) == 0
        if plain:
            if self.track_running_stats:
                self._update_running_stats(x)
            return self._normalize_plain(x, True)
        return self._forward_window(x, theta)

    def _scale(self, var: Tensor) -> Tensor:
        if self.eps_mode == "inside":
            return torch.rsqrt(var + self.eps)
        return 1.0 / (torch.sqrt(var) + self.eps)

    def _affine(self, y: Tensor, x: Tensor) -> Tensor:
        if self.weight is not None:
            y = y * NF.channel_view(self.weight.to(y.dtype), y, 1)
        if self.bias is not None:
            y = y + NF.channel_view(self.bias.to(y.dtype), y, 1)
        return y.to(x.dtype)

    def _normalize_plain(self, x: Tensor, use_batch_stats: bool) -> Tensor:
        """The current batch alone (or the running statistics): BatchNorm with this eps placement."""
        if self.eps_mode == "inside":  # torch's kernel: bitwise normlab.BatchNorm
            return F.batch_norm(
                x,
                None if use_batch_stats else self.running_mean,
                None if use_batch_stats else self.running_var,
                self.weight,
                self.bias,
                use_batch_stats,
                0.0,
                self.eps,
            )
        xc = x.to(NF.compute_dtype(x))
        if use_batch_stats and x.numel() == 0:  # an empty batch: no statistics, an empty output
            mean, var = xc.new_zeros(self.num_features), xc.new_ones(self.num_features)
        elif use_batch_stats:
            dims = [0, *range(2, x.dim())]
            var, mean = torch.var_mean(xc, dim=dims, correction=0)
        else:
            assert self.running_mean is not None and self.running_var is not None
            mean, var = self.running_mean.to(xc.dtype), self.running_var.to(xc.dtype)
        y = (xc - NF.channel_view(mean, xc, 1)) * NF.channel_view(self._scale(var), xc, 1)
        return self._affine(y, x)

    def _forward_window(self, x: Tensor, theta: Tensor | None) -> Tensor:
        xc = x.to(NF.compute_dtype(x))
        dims = [0, *range(2, x.dim())]
        var_t, mu_t = torch.var_mean(xc, dim=dims, correction=0)
        nu_t = var_t + mu_t * mu_t  # E[x²] of the current batch
        if theta is not None:
            ones = torch.ones_like(mu_t)
            grads = (
                torch.autograd.grad(mu_t, theta, ones, retain_graph=True, allow_unused=True)[0],
                torch.autograd.grad(nu_t, theta, ones, retain_graph=True, allow_unused=True)[0],
            )
            if grads[0] is None or grads[1] is None:
                self._fail(
                    f"the compensating weight (shape {tuple(theta.shape)}) did not produce this input: "
                    "attach or pass the weight of the layer right before this norm"
                )
            dmu, dnu = grads[0].detach(), grads[1].detach()

        allowed = self.stored_iterations_allowed(self.iteration)
        mu_i, nu_i, filled = self.past_moments(theta)
        mu_i, nu_i = mu_i.to(xc.dtype), nu_i.to(xc.dtype)
        var_i = nu_i - mu_i * mu_i
        keep = (filled & (allowed > 0))[:, None] & (var_i >= 0)  # (window - 1, C)
        zero = xc.new_zeros(())
        n_kept = 1 + keep.sum(0)
        mu = (mu_t + torch.where(keep, mu_i, zero).sum(0)) / n_kept
        spread = torch.where(keep, var_i + (mu_i - mu) ** 2, zero).sum(0)
        var = (var_t + (mu_t - mu) ** 2 + spread) / n_kept

        with torch.no_grad():
            ok = torch.isfinite(mu_t).all() & torch.isfinite(var_t).all()
            store = ok & (allowed > 0)
            self._push(store, mu_t, nu_t, (dmu, dnu, theta) if theta is not None else None)
            self.hist_len.copy_(torch.where(store, torch.minimum(self.hist_len + 1, allowed), self.hist_len))
            if self.track_running_stats:
                self._update_running_stats(x)

        y = (xc - NF.channel_view(mu, xc, 1)) * NF.channel_view(self._scale(var), xc, 1)
        return self._affine(y, x)

    def _push(
        self, store: Tensor, mu_t: Tensor, nu_t: Tensor, derivs: tuple[Tensor, Tensor, Tensor] | None
    ) -> None:
        """Shift the window by one (newest first) where ``store``; derivatives 0 without a weight."""

        def shift(buf: Tensor, new: Tensor) -> None:
            rolled = torch.cat([new.detach().to(buf.dtype)[None], buf[:-1]])
            buf.copy_(torch.where(store, rolled, buf))

        shift(self.hist_mean, mu_t)
        shift(self.hist_sqmean, nu_t)
        if derivs is not None and not self.hist_weight.numel():  # first weight seen: materialize
            theta = derivs[2]
            for name in _WEIGHT_SHAPED:
                self._buffers[name] = theta.new_zeros((self.window - 1, *theta.shape))
        if self.hist_weight.numel():
            if derivs is None:
                derivs = (self.hist_dmean[0] * 0, self.hist_dsqmean[0] * 0, self.hist_weight[0] * 0)
            for name, new in zip(_WEIGHT_SHAPED, derivs, strict=True):
                buf = self._buffers[name]
                assert buf is not None
                shift(buf, new)

    def _update_running_stats(self, x: Tensor) -> None:
        """As normlab.BatchNorm: the current batch's mean and unbiased variance, non-finite skipped."""
        update_running_stats(self, x, self.momentum)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, window={self.window}, rho={self.rho}, burnin={self.burnin}, "
            f"two_stage={self.two_stage}, eps={self.eps}, eps_mode={self.eps_mode!r}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, weight_attached={self._source is not None}"
        )


class CBNConv(nn.Module):
    """A layer followed by a :class:`CrossIterationBatchNorm` compensated with that layer's weight.

    ``CBNConv(nn.Conv2d(3, 16, 3, bias=False), window=4)`` builds the norm for the layer's output
    channels; ``CBNConv(conv, norm)`` pairs an existing one. ``forward(x) = norm(conv(x),
    weight=conv.weight)``. Both are registered submodules (``conv.*``, ``norm.*`` in the
    ``state_dict``), so copies and checkpoints keep the pair together.
    """

    def __init__(
        self, conv: nn.Module, norm: CrossIterationBatchNorm | None = None, **norm_kwargs: Any
    ) -> None:
        super().__init__()
        weight = getattr(conv, "weight", None)
        if not isinstance(weight, Tensor):
            raise ValueError(f"CBNConv: the layer must have a tensor .weight, got {type(conv).__name__}")
        if norm is None:
            norm = CrossIterationBatchNorm(
                weight.shape[0], device=weight.device, dtype=weight.dtype, **norm_kwargs
            )
        elif norm_kwargs:
            raise ValueError(
                f"CBNConv: give either a norm or norm keyword arguments, got both ({norm_kwargs})"
            )
        if isinstance(conv, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            raise ValueError("CBNConv: a ConvTranspose weight is (in, out, ...), not output channels first")
        norm._check_weight(weight)
        self.conv = conv
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        weight = self.conv.weight
        assert isinstance(weight, Tensor)
        return self.norm(self.conv(x), weight=weight)  # type: ignore[no-any-return]
