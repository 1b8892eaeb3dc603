"""Independent float64 reference implementations of every registered norm, written from the papers.

Each function takes ``(x, module)``: ``x`` is a float64 tensor and ``module`` only supplies
parameters and options, read as attributes (``weight``, ``eps``, ``training``, ...); the
module's ``forward`` is never called. The math is plain torch ops on float64 (no
``torch.nn.functional`` norm kernel, nothing imported from normlab), transcribed from the
papers' formulas and the official code each docstring names, so a shared bug between a layer
and this file would have to be written twice.

Parameters are upcast to float64 here, so a reference built from a half-precision module
uses exactly that module's (rounded) parameters. Tests that need parameter gradients pass
a float64 copy of the module: its parameters are then leaves of the reference graph.

``input_dtype`` (keyword, default ``x.dtype``) is the dtype of the input the layer under test
received; only RMSNorm's ``eps=None`` (meaning ``torch.finfo(input dtype).eps``) depends on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

F64 = torch.float64


class Reference(Protocol):
    def __call__(self, x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor: ...


def _f64(t: Tensor | None) -> Tensor | None:
    """``t`` as float64 (a differentiable cast; a float64 tensor is returned unchanged)."""
    return None if t is None else t.to(F64)


def _check(x: Tensor) -> None:
    if x.dtype != F64:
        raise TypeError(f"reference implementations take float64 input, got {x.dtype}")


def _channel_view(p: Tensor | None, ndim: int) -> Tensor | None:
    """A per-channel ``(C,)`` tensor viewed as ``(C, 1, ..., 1)`` for an ``(N, C, *)`` input."""
    return None if p is None else p.reshape(-1, *([1] * (ndim - 2)))


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


# ------------------------------------------------------------------------------------------------
# Core formulas (trailing feature dimensions)


def layer_norm_core(x: Tensor, ndim: int, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm: ``(x - mean) * rsqrt(var_biased + eps) * weight + bias`` over the last ``ndim`` dims."""
    dims = tuple(range(-ndim, 0))
    mu = x.mean(dim=dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=dims, keepdim=True)  # biased: divide by the element count
    return _affine((x - mu) / torch.sqrt(var + eps), weight, bias)


def rms_norm_core(
    x: Tensor,
    ndim: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    eps_inside: bool = True,
    p: float | None = None,
) -> Tensor:
    """RMSNorm, both eps placements, over the last ``ndim`` dims.

    Inside (LLaMA / ``torch.nn.RMSNorm``): ``x * rsqrt(mean(x^2) + eps)``.
    Outside (official ``bzhangGo/rmsnorm``): ``x / (||x_p||_2 * d_p^-1/2 + eps)``, where ``x_p`` is
    the first ``int(d * p)`` features of the flattened normalized dims (all of them without ``p``).
    The norm is ``torch.linalg.vector_norm`` as in the official code (``x.norm(2)``): its gradient
    at an all-zero row is the subgradient 0, so the layer is differentiable there (``y ~ x / eps``).
    """
    d = math.prod(x.shape[x.dim() - ndim :])
    flat = x.flatten(x.dim() - ndim)  # (..., d)
    # Fewer than one feature is undefined in the official code (0/0); use at least one.
    k = d if p is None else max(int(d * p), 1)
    part = flat[..., :k]
    stat_shape = (*x.shape[: x.dim() - ndim], *([1] * ndim))
    if eps_inside:
        ms = (part * part).mean(dim=-1)
        y = x * torch.rsqrt(ms.reshape(stat_shape) + eps)
    else:
        rms = torch.linalg.vector_norm(part, ord=2, dim=-1) * k**-0.5
        y = x / (rms.reshape(stat_shape) + eps)
    return _affine(y, weight, bias)


def _per_channel_stats_norm(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * w_c + b_c`` with mean/var already broadcastable to ``x``."""
    y = (x - mean) / torch.sqrt(var + eps)
    return _affine(y, _channel_view(weight, x.dim()), _channel_view(bias, x.dim()))


# ------------------------------------------------------------------------------------------------
# One reference per registered norm


def layer_norm(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """LayerNorm (Ba et al. 2016, arXiv:1607.06450); ``channels_first`` normalizes dim 1 of ``(N, C, *)``
    (ConvNeXt LN2d)."""
    _check(x)
    shape: Sequence[int] = tuple(module.normalized_shape)
    w, b = _f64(module.weight), _f64(module.bias)
    if getattr(module, "channels_first", False):
        return layer_norm_core(x.movedim(1, -1), len(shape), w, b, module.eps).movedim(-1, 1)
    return layer_norm_core(x, len(shape), w, b, module.eps)


def rms_norm(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467): ``eps_mode``, partial ``p``, optional
    ``bias``, ``eps=None`` = finfo(input).eps."""
    _check(x)
    shape: Sequence[int] = tuple(module.normalized_shape)
    eps = module.eps if module.eps is not None else torch.finfo(input_dtype or x.dtype).eps
    w, b = _f64(module.weight), _f64(getattr(module, "bias", None))
    eps_inside = getattr(module, "eps_mode", "inside") == "inside"
    p = getattr(module, "p", None)
    channels_first = getattr(module, "channels_first", False)
    h = x.movedim(1, -1) if channels_first else x
    y = rms_norm_core(h, len(shape), w, b, eps, eps_inside=eps_inside, p=p)
    return y.movedim(-1, 1) if channels_first else y


def batch_norm(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """BatchNorm (Ioffe & Szegedy 2015, arXiv:1502.03167): batch stats (biased var) over every dim
    but 1, or the running stats in eval."""
    _check(x)
    use_batch = module.training or not module.track_running_stats or module.running_mean is None
    view = (1, -1, *([1] * (x.dim() - 2)))
    if use_batch:
        dims = (0, *range(2, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    else:
        mean = module.running_mean.to(F64).reshape(view)
        var = module.running_var.to(F64).reshape(view)
    return _per_channel_stats_norm(x, mean, var, _f64(module.weight), _f64(module.bias), module.eps)


def group_norm(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """GroupNorm (Wu & He 2018, arXiv:1803.08494): per-sample stats over the ``C / G`` channels of a
    group and all positions."""
    _check(x)
    n, c = x.shape[:2]
    g = module.num_groups
    xg = x.reshape(n, g, c // g, *x.shape[2:])
    dims = tuple(range(2, xg.dim()))
    mean = xg.mean(dim=dims, keepdim=True)
    var = ((xg - mean) ** 2).mean(dim=dims, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + module.eps)).reshape(x.shape)
    return _affine(y, _channel_view(_f64(module.weight), x.dim()), _channel_view(_f64(module.bias), x.dim()))


def instance_norm(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """InstanceNorm (Ulyanov et al. 2016, arXiv:1607.08022): stats per sample and channel over the
    spatial dims (running stats in eval)."""
    _check(x)
    use_input = module.training or not module.track_running_stats or module.running_mean is None
    if use_input:
        dims = tuple(range(2, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    else:
        view = (1, -1, *([1] * (x.dim() - 2)))
        mean = module.running_mean.to(F64).reshape(view)
        var = module.running_var.to(F64).reshape(view)
    return _per_channel_stats_norm(x, mean, var, _f64(module.weight), _f64(module.bias), module.eps)


def _pointwise(x: Tensor, module: Any, u: Tensor) -> Tensor:
    """``weight * u + bias`` with per-feature params on the last dim, or dim 1 with ``channels_first``."""
    w, b = _f64(module.weight), _f64(module.bias)
    if getattr(module, "channels_first", False):
        w, b = _channel_view(w, x.dim()), _channel_view(b, x.dim())
    return _affine(u, w, b)


def dyt(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """DyT (Zhu et al. 2025, arXiv:2503.10622): ``weight * tanh(alpha * x) + bias``, one scalar ``alpha``."""
    _check(x)
    return _pointwise(x, module, torch.tanh(_f64(module.alpha) * x))  # type: ignore[operator]


def derf(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """Derf (Chen et al. 2025, arXiv:2512.10938): ``weight * erf(alpha * x + shift) + bias`` with
    scalars ``alpha`` and ``shift``."""
    _check(x)
    return _pointwise(x, module, torch.erf(_f64(module.alpha) * x + _f64(module.shift)))  # type: ignore[operator]


def layer_norm_scaling(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """LNS (Sun et al. 2025, arXiv:2502.05795): the base norm's output (after its affine) times
    ``1 / sqrt(layer_idx + 1)``."""
    _check(x)
    scale = 1.0 / math.sqrt(module.layer_idx + 1)
    w, b = _f64(module.weight), _f64(module.bias)
    if module.base == "layernorm":
        y = layer_norm_core(x, 1, w, b, module.eps)
    elif module.base == "rmsnorm":
        y = rms_norm_core(x, 1, w, b, module.eps, eps_inside=True)  # LLaMA-style base
    else:
        raise ValueError(f"unknown LNS base {module.base!r}")
    return y * scale


def identity(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """The no-norm baseline: ``y = x``."""
    _check(x)
    return x


# ------------------------------------------------------------------------------------------------
# Beyond BatchNorm (Lubana et al. 2021, arXiv:2106.05956): FRN, EvoNorm-B0/S0, Variance Normalization


def _channel_affine(y: Tensor, module: Any) -> Tensor:
    """``y * weight_c + bias_c`` on dim 1 (either may be absent)."""
    w = _channel_view(_f64(getattr(module, "weight", None)), y.dim())
    b = _channel_view(_f64(getattr(module, "bias", None)), y.dim())
    return _affine(y, w, b)


def _spatial_dims(x: Tensor) -> tuple[int, ...]:
    return tuple(range(2, x.dim()))


def _batch_or_running_var(x: Tensor, module: Any) -> Tensor:
    """Biased per-channel batch variance (over every dim but 1) in training, ``running_var`` in eval."""
    view = (1, -1, *([1] * (x.dim() - 2)))
    if module.training:
        dims = (0, *_spatial_dims(x))
        mean = x.mean(dim=dims, keepdim=True)
        return ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    return module.running_var.to(F64).reshape(view)


def frn(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """FRN + TLU (Singh & Krishnan, arXiv 1911.09737): ``max(w * x / sqrt(nu2 + |eps|) + b, tau)``,
    ``nu2`` the mean of ``x^2`` over the spatial dims of one sample and channel."""
    _check(x)
    nu2 = (x * x).mean(dim=_spatial_dims(x), keepdim=True)
    eps = module.eps
    eps = eps.to(F64).abs() if isinstance(eps, Tensor) else abs(float(eps))
    y = _channel_affine(x / torch.sqrt(nu2 + eps), module)
    if module.tau is not None:
        y = torch.maximum(y, _channel_view(_f64(module.tau), x.dim()))  # type: ignore[arg-type]
    return y


def evonorm_b0(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """EvoNorm-B0 (Liu et al., arXiv 2004.02967):
    ``x / max(sqrt(var_B + eps), v * x + sqrt(var_I + eps)) * w + b``, biased variances."""
    _check(x)
    var_b = _batch_or_running_var(x, module)
    dims = _spatial_dims(x)
    mean_i = x.mean(dim=dims, keepdim=True)
    var_i = ((x - mean_i) ** 2).mean(dim=dims, keepdim=True)
    v = _channel_view(_f64(module.v), x.dim())
    den = torch.maximum(torch.sqrt(var_b + module.eps), v * x + torch.sqrt(var_i + module.eps))
    return _channel_affine(x / den, module)


def evonorm_s0(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """EvoNorm-S0 (Liu et al., arXiv 2004.02967): ``x * sigmoid(v * x) / sqrt(var_G + eps) * w + b``,
    ``var_G`` the biased variance of one sample over a group of channels and all positions."""
    _check(x)
    n, c = x.shape[:2]
    g = module.num_groups
    xg = x.reshape(n, g, c // g, *x.shape[2:])
    dims = tuple(range(2, xg.dim()))
    mean = xg.mean(dim=dims, keepdim=True)
    var = ((xg - mean) ** 2).mean(dim=dims, keepdim=True)
    std = torch.sqrt(var + module.eps).expand_as(xg).reshape(x.shape)
    v = _channel_view(_f64(module.v), x.dim())
    return _channel_affine(x * torch.sigmoid(v * x) / std, module)  # type: ignore[operator]


def var_norm(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """Variance Normalization (BeyondBN ``VN_self``): ``x / sqrt(var_B + eps) * w + b``, ``x`` not centred."""
    _check(x)
    return _channel_affine(x / torch.sqrt(_batch_or_running_var(x, module) + module.eps), module)


# ------------------------------------------------------------------------------------------------
# Batchless Normalization (Berger & Uc Cetina 2022, arXiv:2212.14729; official
# ichteltelch/Batchless:batchless_normalization.py)


def _batchless_std(module: Any, dtype: torch.dtype = F64) -> tuple[Tensor, Tensor]:
    """``(1/sigma, log sigma)`` per channel from the module's std parameter, per parametrization."""
    p = module.std_parametrization
    if p == "log":
        s = module.log_std.to(dtype)
        return torch.exp(-s), s
    if p == "abs":
        sigma = module.std.to(dtype).abs() + module.eps
        return 1.0 / sigma, torch.log(sigma)
    if p == "inv":
        s = module.inv_std.to(dtype)
        return s, -torch.log(s.abs() + module.eps)
    raise ValueError(p)


def _batchless_view(p: Tensor, x: Tensor, module: Any) -> Tensor:
    return _channel_view(p, x.dim()) if module.channels_first else p  # type: ignore[return-value]


def batchless(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """Batchless: ``(x - sg(mean)) * sg(1/sigma) * weight + bias``; the same in train and eval."""
    _check(x)
    inv_std, _ = _batchless_std(module)
    mean = _batchless_view(module.mean.detach().to(F64), x, module)
    y = (x - mean) * _batchless_view(inv_std.detach(), x, module)
    w, b = _f64(module.weight), _f64(module.bias)
    return _affine(
        y,
        None if w is None else _batchless_view(w, x, module),
        None if b is None else _batchless_view(b, x, module),
    )


def batchless_nll(x: Tensor, module: Any) -> Tensor:
    """Batchless NLL, elementwise: ``mean_c(log sigma) + 0.5 * mean(((sg(x) - mean) / sigma)^2)``, minus
    ``sg(mean_c(log sigma)) + 0.5`` with ``gauge``. Gradient reaches ``mean`` and sigma only."""
    _check(x)
    inv_std, log_std = _batchless_std(module)
    z = (x.detach() - _batchless_view(module.mean.to(F64), x, module)) * _batchless_view(inv_std, x, module)
    nll = log_std.mean() + 0.5 * (z**2).mean()
    if module.gauge:
        nll = nll - (log_std.mean().detach() + 0.5)
    return nll


def memorized_batch_norm(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """MBN (Guo et al. 2018, arXiv:2010.04947): moments pooled over the current batch and the memory,
    newest first.

    Training: the current batch's mean and biased variance (age 0) and the recorded rows of
    ``memory_mean``/``memory_var`` (ages 1..k-1), weights ``memory_weights`` renormalized over the
    ages present; pooled variance ``sum w E[x^2] - mean^2``. Eval: the running statistics, or with
    ``eval_stats="memory"`` the pooled recorded rows (running statistics while none is recorded).
    """
    _check(x)
    dims = (0, *range(2, x.dim()))
    view = (1, -1, *([1] * (x.dim() - 2)))
    k = module.memory_size
    eta = torch.tensor(module.memory_weights, dtype=F64)
    recorded = int(module.memory_count)
    mem_mean = module.memory_mean.to(F64)
    mem_sq = module.memory_var.to(F64) + mem_mean**2  # E[x^2] of each recorded batch

    def pooled(means: Tensor, squares: Tensor, n: int) -> tuple[Tensor, Tensor]:
        w = eta[:n] / eta[:n].sum()
        mean = (w[:, None] * means[:n]).sum(0)
        return mean, (w[:, None] * squares[:n]).sum(0) - mean**2

    if module.training:
        cur_mean = x.mean(dim=dims)
        cur_sq = (x**2).mean(dim=dims)
        n = 1 + min(recorded, k - 1)
        mean, var = pooled(torch.cat([cur_mean[None], mem_mean]), torch.cat([cur_sq[None], mem_sq]), n)
    elif module.eval_stats == "memory" and recorded > 0:
        mean, var = pooled(mem_mean, mem_sq, min(recorded, k))
    else:
        mean, var = module.running_mean.to(F64), module.running_var.to(F64)
    return _per_channel_stats_norm(
        x, mean.reshape(view), var.reshape(view), _f64(module.weight), _f64(module.bias), module.eps
    )


def compound_batch_norm(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """Compound BN (Cheng et al. 2022, arXiv:2212.01007): a per-channel K-component Gaussian mixture.

    ``r_k`` = posterior of component k under the moving mixture (``mixture_weight``,
    ``running_mean``, ``running_var + eps``); ``y = sum_k r_k (x - m_k) / sqrt(s_k + eps)``, with
    ``m_k, s_k`` the r-weighted batch mean and biased variance in training (the moving ones for a
    component with batch mass sum(r_k) <= 1.5, and always in eval).
    """
    _check(x)
    dims = (0, *range(2, x.dim()))
    view = (module.num_components, 1, x.shape[1], *([1] * (x.dim() - 2)))  # (K, 1, C, 1, ...) vs x[None]
    pi = module.mixture_weight.to(F64).reshape(view)
    mu = module.running_mean.to(F64).reshape(view)
    var = module.running_var.to(F64).reshape(view)
    xs = x[None]
    v = var + module.eps
    log_density = -0.5 * torch.log(2 * math.pi * v) - (xs - mu) ** 2 / (2 * v)
    r = torch.softmax(torch.log(pi.clamp_min(1e-12)) + log_density, dim=0)
    if module.training:
        sum_dims = tuple(d + 1 for d in dims)
        mass = r.sum(dim=sum_dims, keepdim=True)
        enough = mass > 1.5
        safe = torch.where(enough, mass, torch.ones_like(mass))
        m_hat = (r * xs).sum(dim=sum_dims, keepdim=True) / safe
        s_hat = (r * (xs - m_hat) ** 2).sum(dim=sum_dims, keepdim=True) / safe
        m, s = torch.where(enough, m_hat, mu), torch.where(enough, s_hat, var)
    else:
        m, s = mu, var
    y = (r * (xs - m) / torch.sqrt(s + module.eps)).sum(0)
    return _affine(y, _channel_view(_f64(module.weight), x.dim()), _channel_view(_f64(module.bias), x.dim()))


# ------------------------------------------------------------------------------------------------
# Batch Layer Normalization (Ziaee & Cano 2022, arXiv:2209.08898; official A2Amir/Batch-Layer-Normalization)
# and Cross-Iteration BatchNorm (Yao et al. 2021, arXiv:2002.05712; official Howal/Cross-iterationBatchNorm)


def batch_layer_norm(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """BLN as the official code: ``w * ((1/m - 1e-4) x_f + (1 - (1/m + 1e-4)) x_b) / sqrt(d) + b``.

    ``x_b`` uses the biased statistics over the batch dim 0 only (per position and feature),
    ``x_f`` those over the feature dim only; ``m`` is the configured ``batch_size``. In eval each
    statistic whose switch is set is the module's moving one (0 before the first closed epoch).
    """
    _check(x)
    feature_dim = 1 if module.channels_first else -1
    m, d, eps = module.batch_size, module.num_features, module.eps

    def moments(dim: int) -> tuple[Tensor, Tensor]:
        mean = x.mean(dim=dim, keepdim=True)
        return mean, ((x - mean) ** 2).mean(dim=dim, keepdim=True)

    b_mean, b_var = moments(0)
    f_mean, f_var = moments(feature_dim)
    if not module.training:

        def moving(name: str) -> Tensor:
            t = getattr(module, name)
            return t.to(F64) if t.numel() else torch.zeros((), dtype=F64)

        if module.batch_moving_mean:
            b_mean = moving("moving_batch_mean")
        if module.batch_moving_var:
            b_var = moving("moving_batch_var")
        if module.feature_moving_mean:
            f_mean = moving("moving_feature_mean")
        if module.feature_moving_var:
            f_var = moving("moving_feature_var")
    x_b = (x - b_mean) / torch.sqrt(b_var + eps)
    x_f = (x - f_mean) / torch.sqrt(f_var + eps)
    y = (x_f * (1 / m - 1e-4) + x_b * (1 - (1 / m + 1e-4))) / math.sqrt(d)
    w, b = _f64(module.weight), _f64(module.bias)
    if module.channels_first:
        w, b = _channel_view(w, x.dim()), _channel_view(b, x.dim())
    return _affine(y, w, b)


def cross_iteration_batch_norm(x: Tensor, module: Any, *, input_dtype: torch.dtype | None = None) -> Tensor:
    """CBN as the official code: the current batch plus the module's stored iterations.

    Each stored ``(mu_i, nu_i)`` is Taylor-compensated to the attached weight's current value,
    entries with ``nu - mu^2 < 0`` are dropped per channel (the current one is always kept), and
    ``mu = mean(mu_i)``, ``var = mean(nu_i) - mu^2`` over the kept ones. Eval: running statistics.
    ``eps`` outside the square root unless ``eps_mode == "inside"``.
    """
    _check(x)
    dims = (0, *range(2, x.dim()))
    view = (1, -1, *([1] * (x.dim() - 2)))
    c = module.num_features
    if not module.training and module.track_running_stats:
        mean, var = module.running_mean.to(F64), module.running_var.to(F64)
    else:
        mean = x.mean(dim=dims)
        nu = (x * x).mean(dim=dims)
        mus, nus = [mean], [nu]
        k1, burnin, it = module.window - 1, module.burnin, int(module.iteration) + 1
        if burnin == 0:
            allowed = k1
        elif module.two_stage:
            allowed = k1 if it > burnin else 0
        else:
            allowed = int(k1 * min(it / burnin, 1.0))
        source = module.weight_source if module.training else None
        theta = getattr(source, "weight", source)
        if module.training and allowed > 0:
            for i in range(int(module.hist_len)):
                mu_i, nu_i = module.hist_mean[i].to(F64), module.hist_sqmean[i].to(F64)
                if theta is not None and module.hist_dmean.numel():
                    delta = (theta.detach().to(F64) - module.hist_weight[i].to(F64)).reshape(c, -1)
                    mu_i = mu_i + module.rho * (module.hist_dmean[i].to(F64).reshape(c, -1) * delta).sum(1)
                    nu_i = nu_i + module.rho * (module.hist_dsqmean[i].to(F64).reshape(c, -1) * delta).sum(1)
                mus.append(mu_i)
                nus.append(nu_i)
        mu_all, nu_all = torch.stack(mus), torch.stack(nus)
        keep = (nu_all - mu_all**2 >= 0).to(F64)
        keep[0] = 1.0  # the current batch (its one-pass variance may round below 0 for a constant channel)
        mean = (mu_all * keep).sum(0) / keep.sum(0)
        var = (nu_all * keep).sum(0) / keep.sum(0) - mean**2
    if module.eps_mode == "inside":
        y = (x - mean.reshape(view)) / torch.sqrt(var.reshape(view) + module.eps)
    else:
        y = (x - mean.reshape(view)) / (torch.sqrt(var.reshape(view)) + module.eps)
    return _affine(y, _channel_view(_f64(module.weight), x.dim()), _channel_view(_f64(module.bias), x.dim()))


REFERENCES: dict[str, Reference] = {
    "bln": batch_layer_norm,
    "batchless": batchless,
    "batchnorm": batch_norm,
    "cbn": cross_iteration_batch_norm,
    "compoundbn": compound_batch_norm,
    # Cross-process BN is BatchNorm on the global batch; without a process group (as in the
    # generic suites) that is the local batch. Its distributed path: tests/test_cross_bn.py.
    "crossbn": batch_norm,
    "derf": derf,
    "dyt": dyt,
    "evonorm_b0": evonorm_b0,
    "evonorm_s0": evonorm_s0,
    "frn": frn,
    "groupnorm": group_norm,
    "identity": identity,
    "instancenorm": instance_norm,
    "layernorm": layer_norm,
    "lns": layer_norm_scaling,
    "mbn": memorized_batch_norm,
    "rmsnorm": rms_norm,
    "varnorm": var_norm,
}
