"""The per-layer quantities, as plain functions of tensors (no hooks, no model).

Definitions, with their sources:

* ``act_var`` (Lubana et al. 2021, "Beyond BatchNorm", arXiv:2106.05956, ``Activs_prober``):
  the per-channel variance over the batch and every position, averaged over channels,
  ``M.var(dim=[0, 2, 3]).mean()`` for ``(N, C, H, W)``; for token tensors ``(B, T, d)`` the
  channel is the last dimension.
* ``act_corr`` (same probe): rows ``m_i`` = the flattened activation of sample ``i``, unit-normed;
  ``G = M M^T``; ``act_corr = mean_i (sum_j G_ij - 1) / (N - 1)``, the mean cosine similarity
  between different samples (principle ii, "informative forward propagation").
* ``stable_rank`` (same probe): ``tr(G) / ||G||_2 = N / lambda_max(G)``: ``N`` for orthogonal
  samples, ``1`` for identical ones.
* angular distance (Gromov et al. 2024, arXiv:2403.17887, used by Sun et al. 2025,
  arXiv:2502.05795): ``d(a, b) = arccos(cos(a, b)) / pi``: 0 identical, 0.5 orthogonal,
  1 opposite; an undefined cosine (a zero vector) counts as 0.5, as in their ``block_influence``.
* block influence (ShortGPT, Men et al. 2024, arXiv:2403.03853): ``BI = 1 - cos(x_l, x_{l+1})``
  averaged over every token.
* residual-stream variance (Sun et al. 2025): ``x_l.float().var()`` over every element.

Reductions run in float64, so the known answers (0 / 0.5 / 1, ``N`` / 1) hold to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _rows(x: Tensor) -> Tensor:
    """``(N, *)`` -> ``(N, prod(*))`` in float64."""
    if x.dim() == 0:
        raise ValueError("expected a tensor with a sample dimension, got a scalar")
    return x.detach().reshape(x.shape[0], -1).double()


def cosine_rows(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of matching rows of ``a`` and ``b`` (``(N, *)`` each), float64;
    NaN where a row is zero."""
    if a.shape != b.shape:
        raise ValueError(f"cosine_rows: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    ra, rb = _rows(a), _rows(b)
    cos: Tensor = (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))
    return cos


def angular_distance(a: Tensor, b: Tensor) -> Tensor:
    """Per-row ``arccos(cos(a_i, b_i)) / pi`` in ``[0, 1]``; undefined cosines count as 0.5.

    ``a``, ``b``: ``(N, *)``; rows are flattened. Returns ``(N,)`` float64.
    """
    cos = cosine_rows(a, b)
    d = torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi
    return torch.where(torch.isnan(cos), torch.full_like(d, 0.5), d)


def mean_angular_distance(a: Tensor, b: Tensor) -> float:
    """Mean of :func:`angular_distance` over rows."""
    return float(angular_distance(a, b).mean())


def block_influence(a: Tensor, b: Tensor) -> float:
    """``1 - mean_i cos(a_i, b_i)`` over rows (ShortGPT's BI); undefined cosines count as 0."""
    cos = cosine_rows(a, b)
    return float(1.0 - torch.nan_to_num(cos, nan=0.0).mean())


def channel_dim_for(x: Tensor, *, channels_first: bool) -> int:
    """The channel dimension: 1 for ``(N, C, *)`` feature maps, else the last one."""
    return 1 if channels_first and x.dim() >= 2 else x.dim() - 1


def act_var(x: Tensor, *, channel_dim: int = 1) -> float:
    """Per-channel variance (unbiased) over every other dimension, averaged over channels.

    ``M.var(dim=[0, 2, 3]).mean()`` for ``(N, C, H, W)`` with ``channel_dim=1``; for
    ``(B, T, d)`` pass ``channel_dim=-1``. A single value per channel gives NaN.
    """
    x = x.detach().double()
    cd = channel_dim % x.dim()
    dims = [d for d in range(x.dim()) if d != cd]
    if not dims:
        return float(x.var())
    return float(x.var(dim=dims).mean())


def gram(x: Tensor) -> Tensor:
    """Cosine-similarity Gram matrix between samples: rows of ``x`` flattened and unit-normed
    (a zero row stays zero). ``(N, *)`` -> ``(N, N)`` float64."""
    r = _rows(x)
    r = r / r.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    g: Tensor = r @ r.T
    return g


def act_corr(x: Tensor) -> float:
    """Mean cosine similarity between different samples, ``mean_i (sum_j G_ij - 1)/(N - 1)``.

    ``x``: ``(N, *)``, one sample per row. NaN for ``N < 2``.
    """
    n = x.shape[0]
    if n < 2:
        return math.nan
    g = gram(x)
    return float(((g.sum(1) - g.diagonal()) / (n - 1)).mean())


def stable_rank(x: Tensor) -> float:
    """``tr(G) / lambda_max(G)`` of the sample Gram matrix: ``N`` orthogonal, 1 identical."""
    g = gram(x)
    if not bool(torch.isfinite(g).all()):
        return math.nan
    top = torch.linalg.eigvalsh(g)[-1]
    return float(g.diagonal().sum() / top) if top > 0 else math.nan


def token_corr(x: Tensor) -> float:
    """For token tensors ``(B, T, d)``: the mean cosine similarity between different tokens of
    the same sequence, averaged over sequences (the rank-collapse measure of Dong et al. 2021,
    arXiv:2103.03404). NaN for ``T < 2``."""
    if x.dim() != 3 or x.shape[1] < 2:
        return math.nan
    return float(sum(act_corr(seq) for seq in x) / x.shape[0])


def residual_variance(x: Tensor) -> float:
    """``x.float().var()`` over every element (Sun et al. 2025, arXiv:2502.05795)."""
    return float(x.detach().double().var())


def fro_norm(tensors: Sequence[Tensor | None]) -> float:
    """Frobenius norm of the concatenation of ``tensors`` (``None`` entries are skipped)."""
    total = sum(float(t.detach().double().pow(2).sum()) for t in tensors if t is not None)
    return math.sqrt(total)


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation; NaN with fewer than 3 finite pairs or a constant side."""
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return math.nan
    t = torch.tensor(pairs, dtype=torch.float64)
    c = t - t.mean(0)
    denom = c[:, 0].norm() * c[:, 1].norm()
    return float((c[:, 0] * c[:, 1]).sum() / denom) if denom > 0 else math.nan


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares line ``y = a + b x``: returns ``(b, a, r2)`` (NaN if under-determined)."""
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 2:
        return math.nan, math.nan, math.nan
    t = torch.tensor(pairs, dtype=torch.float64)
    x, y = t[:, 0], t[:, 1]
    xc, yc = x - x.mean(), y - y.mean()
    sxx = float((xc * xc).sum())
    if sxx == 0:
        return math.nan, math.nan, math.nan
    slope = float((xc * yc).sum()) / sxx
    intercept = float(y.mean()) - slope * float(x.mean())
    syy = float((yc * yc).sum())
    resid = float(((y - (intercept + slope * x)) ** 2).sum())
    r2 = 1.0 - resid / syy if syy > 0 else 1.0
    return slope, intercept, r2
