"""Batchless Normalization (Berger & Uc Cetina 2022, arXiv:2212.14729).

Follows the official TensorFlow code ``ichteltelch/Batchless:batchless_normalization.py``
(``BatchlessNormalization``, ``init_bln``, ``init_bln_singlePass``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from normlab import functional as NF
from normlab.norms._base import (
    Device,
    DType,
    NormMixin,
    NormSpec,
    affine_parameters,
    check_eps,
    check_num_features,
    register_norm,
    reset_affine,
)
from normlab.norms._info import EVAL, NEW, NormInfo

StdParametrization = Literal["log", "abs", "inv"]
# parametrization -> name of the parameter that holds sigma in that form
_STD_PARAM_NAMES: dict[str, str] = {"log": "log_std", "abs": "std", "inv": "inv_std"}
InitMethod = Literal["two_pass", "single_pass"]
_INIT_METHODS = ("two_pass", "single_pass")


def _finite(owner: str, name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")
    return float(value)


# No "bln" alias: the paper's "BlN" and Batch Layer Normalization's "BLN" read the same here.
@register_norm("batchless", aliases=("batchless_norm", "batchless_normalization"))
class BatchlessNorm(NormMixin, nn.Module):
    """Batchless Normalization: learned per-channel mean and std, fitted by a Gaussian NLL.

    Output (training and eval alike; nothing depends on the other samples)::

        y = (x - sg(mean)) * sg(1 / sigma) * weight + bias

    with ``sg`` = stop-gradient (``detach``). ``mean`` and ``sigma`` are ordinary per-channel
    parameters, shared over the batch and all non-channel dimensions. The task loss never moves
    them; they are fitted by the auxiliary loss of the last training-mode forward, the Gaussian
    negative log-likelihood of the (detached) input, averaged over all its elements::

        nll = mean_c(log sigma_c) + 0.5 * mean_{elements}(((sg(x) - mean_c) / sigma_c)^2)

    (``log(2*pi)/2`` dropped, as in the official code). Upstream layers never receive gradient
    from it: it sees the input only through its per-channel batch mean ``m_c`` and biased
    variance ``v_c``, since ``mean_elements((x - mu)^2) = v_c + (m_c - mu)^2`` exactly. The
    forward stores these two detached ``(C,)`` tensors, and :meth:`aux_loss` builds the NLL from
    them and the current parameters. With ``gauge`` (the official default) the reported value is
    ``nll - sg(mean_c(log sigma_c)) - 0.5``: zero in expectation when the input follows
    ``N(mean, sigma^2)``, same gradient.

    Training loop::

        loss = task_loss + normlab.total_aux_loss(model)   # weight 1, as the official add_loss
        loss.backward()

    Because the NLL is a mean over elements and every quantity is per sample, the gradient of a
    batch of ``B`` equals the mean of ``B`` single-sample gradients (exact gradient accumulation;
    scale each micro-batch's ``task_loss + aux`` by ``1/k`` as usual). Under DDP each rank's NLL
    uses its local batch and gradient averaging gives the NLL of the global batch: nothing to sync.

    Standard-deviation parametrizations (the official code's ``std_parametrization``):

    - ``"log"`` (default): parameter ``log_std`` = ``log sigma``, init ``log(init_std)``;
      ``1/sigma = exp(-log_std)``. ``eps`` is not used.
    - ``"abs"``: parameter ``std``, init ``init_std - eps``; ``sigma = |std| + eps``.
    - ``"inv"``: parameter ``inv_std``, init ``1 / init_std``; the output multiplies by
      ``inv_std`` itself (its sign included), the NLL uses ``log sigma = -log(|inv_std| + eps)``.
      (The official init reads ``1&init_std``, a typo for ``1/init_std``.) Its NLL minimum is at
      ``inv_std = 1/sigma_data - eps/2 + O(eps^2)``, an offset of relative size ``eps * sigma``.

    The init, :meth:`set_statistics` and :func:`init_batchless` write the raw parameter so that
    sigma is exactly the value given (``std_value()`` returns it). For ``"abs"`` the official
    code writes the value itself into ``std``, making its sigma ``eps`` larger.

    Where this differs from the official code: the official computes an inference-time loss
    value (without gradient); here ``aux_loss()`` after an eval forward is 0, so evaluation costs
    no extra reduction. The NLL is written through ``(m_c, v_c)`` instead of elementwise, which
    is the same function and the same gradient but keeps only ``2 C`` numbers per layer alive
    between the forward and ``aux_loss()`` (no activation-sized graph; nothing carries a graph
    from one step to the next).

    Args:
        num_features: number of channels ``C``.
        eps: used by the ``"abs"``/``"inv"`` parametrizations and as the smallest std set by
            :func:`init_batchless`; > 0.
        std_parametrization: ``"log"``, ``"abs"`` or ``"inv"``, see above.
        init_mean: initial ``mean`` of every channel.
        init_std: initial ``sigma`` of every channel, > 0.
        gauge: report the NLL shifted to zero expectation (gradient unchanged).
        affine: learn ``weight`` (init 1) and, if ``bias``, ``bias`` (init 0).
        bias: learn ``bias`` (with ``affine``).
        channels_first: ``True`` (default, like BatchNorm): input ``(N, C, *)``; ``False``:
            channels are the last dimension, input ``(*, C)`` (tokens, the official Keras layout).

    Shape: ``(N, C, *)``, or ``(*, C)`` with ``channels_first=False`` -> same shape and dtype.
    """

    spec = NormSpec(
        paper="Berger & Uc Cetina 2022, arXiv:2212.14729",
        layout="channel",
        min_ndim=2,
        aux_params=("mean", "log_std", "std", "inv_std"),
    )

    weight: nn.Parameter | None
    bias: nn.Parameter | None
    # Per-channel (mean, biased variance) of the last training-mode input; no graph.
    _last_stats: tuple[Tensor, Tensor] | None

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        std_parametrization: StdParametrization = "log",
        init_mean: float = 0.0,
        init_std: float = 1.0,
        gauge: bool = True,
        affine: bool = True,
        bias: bool = True,
        channels_first: bool = True,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.num_features = check_num_features(owner, num_features)
        self.eps = check_eps(owner, eps)
        if std_parametrization not in _STD_PARAM_NAMES:
            valid = ", ".join(repr(k) for k in sorted(_STD_PARAM_NAMES))
            raise ValueError(
                f"{owner}: std_parametrization must be one of {valid}, got {std_parametrization!r}"
            )
        self.std_parametrization: StdParametrization = std_parametrization
        self.init_mean = _finite(owner, "init_mean", init_mean)
        self.init_std = _finite(owner, "init_std", init_std)
        if self.init_std <= 0:
            raise ValueError(f"{owner}: init_std must be > 0, got {init_std!r}")
        self.gauge = bool(gauge)
        self.affine = affine
        self.channels_first = channels_first
        self.mean = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
        self.register_parameter(
            self.std_param_name, nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
        )
        w, b = affine_parameters(num_features, weight=affine, bias=bias, device=device, dtype=dtype)
        self.register_parameter("weight", w)
        self.register_parameter("bias", b)
        self._last_stats = None
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------
    # Parameters

    @property
    def channel_dim(self) -> int:
        return 1 if self.channels_first else -1

    @property
    def std_param_name(self) -> str:
        """``"log_std"``, ``"std"`` or ``"inv_std"``: the parameter holding sigma."""
        return _STD_PARAM_NAMES[self.std_parametrization]

    @property
    def std_param(self) -> nn.Parameter:
        p: nn.Parameter = getattr(self, self.std_param_name)
        return p

    def _std_raw_from_sigma(self, sigma: Tensor) -> Tensor:
        """The raw parameter value whose sigma is ``sigma`` (``"abs"``: at least ``eps``)."""
        if self.std_parametrization == "log":
            return sigma.log()
        if self.std_parametrization == "abs":
            return (sigma - self.eps).clamp_min(0.0)
        return sigma.reciprocal()

    def reset_parameters(self) -> None:
        # Python floats, not a tensor: under `with torch.device("meta")` a tensor has no value.
        sigma = self.init_std
        raw = {"log": math.log(sigma), "abs": max(sigma - self.eps, 0.0), "inv": 1.0 / sigma}
        with torch.no_grad():
            self.mean.fill_(self.init_mean)
            self.std_param.fill_(raw[self.std_parametrization])
        reset_affine(self.weight, self.bias)

    def _inv_std(self, dtype: torch.dtype) -> Tensor:
        s = self.std_param.to(dtype)
        if self.std_parametrization == "log":
            return torch.exp(-s)
        if self.std_parametrization == "abs":
            return (s.abs() + self.eps).reciprocal()
        return s

    def _log_std(self, dtype: torch.dtype) -> Tensor:
        s = self.std_param.to(dtype)
        if self.std_parametrization == "log":
            return s
        if self.std_parametrization == "abs":
            return torch.log(s.abs() + self.eps)
        return -torch.log(s.abs() + self.eps)

    def std_value(self) -> Tensor:
        """The per-channel sigma the output divides by (``1 / inv_std`` for ``"inv"``), detached."""
        with torch.no_grad():
            return self._inv_std(NF.compute_dtype(self.mean)).reciprocal().to(self.mean.dtype)

    @torch.no_grad()
    def set_statistics(self, mean: Tensor | float, std: Tensor | float) -> None:
        """Set ``mean`` and sigma (> 0), written in this layer's parametrization."""
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float64).expand_as(self.mean))
        sigma = torch.as_tensor(std, dtype=torch.float64).expand_as(self.mean)
        if not bool((sigma > 0).all()):
            self._fail(f"set_statistics needs std > 0, got min {float(sigma.min())!r}")
        self.std_param.copy_(self._std_raw_from_sigma(sigma))

    # ----------------------------------------------------------------------------------------
    # Forward and auxiliary loss

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        dtype = NF.compute_dtype(x)
        xc = x.to(dtype)
        dim = self.channel_dim
        if self.training and x.numel() > 0:
            channel = dim % x.dim()
            dims = [d for d in range(x.dim()) if d != channel]
            var, m = torch.var_mean(xc.detach(), dim=dims, correction=0)
            self._last_stats = (m, var)
        else:
            self._last_stats = None
        scale = self._inv_std(dtype).detach()
        if self.weight is not None:
            scale = scale * self.weight.to(dtype)
        y = (xc - NF.channel_view(self.mean.detach().to(dtype), x, dim)) * NF.channel_view(scale, x, dim)
        if self.bias is not None:
            y = y + NF.channel_view(self.bias.to(dtype), x, dim)
        return y.to(x.dtype)

    def aux_loss(self) -> Tensor:
        """The Gaussian NLL of the last training-mode forward's input (a 0-dim tensor).

        Gradient reaches ``mean`` and sigma's parameter only. 0 (no gradient) before any
        forward, after an eval-mode forward and after an empty batch. Built when called, from
        the stored per-channel moments and the current parameters (exact for any parameter
        values), so nothing is kept from one step to the next; a second forward replaces the
        moments (the last forward counts, e.g. once per micro-batch).
        """
        stats = self._last_stats
        if stats is None:
            return torch.zeros((), device=self.mean.device, dtype=NF.compute_dtype(self.mean))
        m, var = stats
        dtype = torch.promote_types(m.dtype, NF.compute_dtype(self.mean))
        m, var = m.to(dtype), var.to(dtype)
        mean_sq_dev = var + (m - self.mean.to(dtype)).square()  # mean over elements of (x - mean)^2
        log_std = self._log_std(dtype).mean()
        nll = log_std + 0.5 * (mean_sq_dev * self._inv_std(dtype).square()).mean()
        if self.gauge:
            nll = nll - (log_std.detach() + 0.5)
        return nll

    def norm_info(self) -> NormInfo:
        return NormInfo(
            "batchless",
            self,
            (self.num_features,),
            channels_first=self.channels_first,
            eps=self.eps,
            weight=self.weight,
            bias=self.bias,
            extra={"mean": self.mean, "std": self.std_value()},
        )

    @classmethod
    def conversion_relation(cls, info: NormInfo, kwargs: Mapping[str, Any]) -> str:
        with_stats = info.running_mean is not None and info.running_var is not None
        return EVAL if info.kind == "batchnorm" and with_stats else NEW

    def statistics_from(self, info: NormInfo) -> list[tuple[str, Tensor | None, str, bool]]:
        """From a BatchNorm: ``mean = running_mean``, ``std = sqrt(running_var + eps)`` (equal in eval)."""
        if info.kind != "batchnorm" or info.running_mean is None or info.running_var is None:
            return super().statistics_from(info)
        assert info.eps is not None
        with torch.no_grad():
            self.set_statistics(
                info.running_mean.detach(), (info.running_var.detach().double() + info.eps).sqrt()
            )
        return [
            ("mean", None, "running_mean", True),
            (self.std_param_name, None, "sqrt(running_var + eps)", True),
        ]

    def extra_repr(self) -> str:
        s = f"{self.num_features}, eps={self.eps}, std_parametrization={self.std_parametrization!r}"
        if self.init_mean != 0.0 or self.init_std != 1.0:
            s += f", init_mean={self.init_mean}, init_std={self.init_std}"
        if not self.gauge:
            s += ", gauge=False"
        if not self.affine:
            s += ", affine=False"
        elif self.bias is None:
            s += ", bias=False"
        return s + ("" if self.channels_first else ", channels_first=False")


# --------------------------------------------------------------------------------------------
# Model-level helpers


def _default_forward(model: nn.Module, batch: Any) -> object:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    raise ValueError(
        f"init_batchless: a batch must be a Tensor, a (input, target, ...) tuple/list or a dict of "
        f"keyword inputs, got {type(batch).__name__}; pass forward=... for other batches"
    )


class _ChannelStats:
    """Per-channel count, mean and sum of squared deviations, merged over batches in float64.

    ``center=None``: single pass, Chan et al.'s pairwise merge of each batch's (count, mean,
    M2) (Welford's update for whole batches), free of the cancellation of sum(x^2) - n*mean^2.
    ``center=c``: the second pass of the two-pass method, accumulating ``sum((x - c)^2)``.
    """

    def __init__(self, center: Tensor | None) -> None:
        self.center = center
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, x: Tensor, channel_dim: int) -> None:
        x = x.detach().to(NF.compute_dtype(x))
        channel = channel_dim % x.dim()
        dims = [d for d in range(x.dim()) if d != channel]
        n = x.numel() // x.shape[channel]
        if n == 0:
            return
        if self.center is not None:
            c = NF.channel_view(self.center.to(x.device, x.dtype), x, channel_dim)
            sq = (x - c).square().mean(dim=dims).to("cpu", torch.float64) * n
            self.m2 = sq if self.m2 is None else self.m2 + sq
            self.count += n
            return
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        mean, m2 = mean.to("cpu", torch.float64), var.to("cpu", torch.float64) * n
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def variance(self) -> Tensor:
        assert self.m2 is not None
        return self.m2 / self.count


def _collect(
    model: nn.Module,
    layer: BatchlessNorm,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], object],
    stats: _ChannelStats,
) -> _ChannelStats:
    """Run ``model`` over ``batches``, feeding every input of ``layer`` to ``stats``."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs["x"]
        stats.update(x, layer.channel_dim)

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            forward(model, batch)
    finally:
        handle.remove()
    return stats


def _call_order(
    model: nn.Module, layers: list[BatchlessNorm], batch: Any, forward: Callable[[nn.Module, Any], object]
) -> list[BatchlessNorm]:
    order: list[BatchlessNorm] = []

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        if module not in order:
            order.append(module)  # type: ignore[arg-type]

    handles = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return order


@torch.no_grad()
def init_batchless(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    method: InitMethod = "two_pass",
    forward: Callable[[nn.Module, Any], object] | None = None,
) -> list[str]:
    """Data-driven init of every :class:`BatchlessNorm` in ``model`` (official ``init_bln``).

    Layers are processed one at a time in the order the model first calls them (found with one
    forward on the first batch). For each, the model runs over ``batches`` in eval mode and the
    layer's ``mean`` and sigma are set to the per-channel mean and (biased) std of its input over
    all batches, so a layer's statistics are those of the outputs of the already initialised
    earlier layers. ``method="two_pass"`` (official ``init_bln``): one run for the exact mean,
    a second for the mean squared deviation from it; 2 runs per layer. ``"single_pass"``
    (``init_bln_singlePass``): both from one run, 1 run per layer; batches are merged with
    Chan's pairwise update (stable), not the official ``var -= (mu_old - mu_new)^2`` shift.
    Accumulation is float64 on the CPU. A std below the layer's ``eps`` (a dead channel) is set
    to ``eps``, since a zero sigma would make ``1/sigma`` infinite.

    Runs under ``torch.no_grad()``; every module's ``training`` flag is restored afterwards.
    ``weight``/``bias`` are left alone.

    Args:
        model: any module containing ``BatchlessNorm`` layers.
        batches: a re-iterable (list, DataLoader) of batches; each is passed as ``model(batch)``
            for a Tensor, ``model(batch[0])`` for a tuple/list (``(input, target)``), or
            ``model(**batch)`` for a dict. It is iterated ``2 * layers`` (``layers``) times.
        method: ``"two_pass"`` or ``"single_pass"``.
        forward: ``forward(model, batch)`` replaces the rule above (devices, several inputs).

    Returns:
        The qualified names of the initialised layers, in the order they were initialised.
    """
    if method not in _INIT_METHODS:
        raise ValueError(f"init_batchless: method must be one of {_INIT_METHODS}, got {method!r}")
    if iter(batches) is batches:
        raise ValueError(
            "init_batchless: batches must be re-iterable (a list or a DataLoader), not an iterator: "
            "it is run once or twice per layer"
        )
    run = forward if forward is not None else _default_forward
    names = {m: name for name, m in model.named_modules() if isinstance(m, BatchlessNorm)}
    if not names:
        return []
    first = next(iter(batches), None)
    if first is None:
        raise ValueError("init_batchless: batches is empty")
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        done = []
        for layer in _call_order(model, list(names), first, run):
            stats = _collect(model, layer, batches, run, _ChannelStats(None))
            if stats.mean is None:
                continue  # it saw only empty inputs: nothing to fit
            mean = stats.mean
            if method == "two_pass":
                stats = _collect(model, layer, batches, run, _ChannelStats(mean))
            layer.set_statistics(mean, stats.variance().sqrt().clamp_min(layer.eps))
            done.append(names[layer])
    finally:
        for m, mode in modes.items():
            m.training = mode
    return done


__all__ = ["BatchlessNorm", "init_batchless"]
