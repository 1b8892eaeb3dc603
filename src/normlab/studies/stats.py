"""Confidence intervals of the verdict rules, in plain Python: Student's t quantiles, Welch's
interval of a difference of means, the one-sample and paired t intervals, Wilson's interval of a
rate and Newcombe's interval of a difference of two rates.

``t_ppf`` inverts the t CDF, ``F(t) = 1 - I_x(df/2, 1/2) / 2`` with ``x = df / (df + t^2)``
(``t > 0``), by bisection; the regularized incomplete beta ``I_x(a, b)`` is evaluated with its
continued fraction (modified Lentz). Accurate to about 1e-10 (tests check published table
values); non-integer ``df`` (Welch-Satterthwaite) is fine.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = [
    "betainc",
    "newcombe_interval",
    "paired_interval",
    "t_cdf",
    "t_interval",
    "t_ppf",
    "welch_interval",
    "wilson_interval",
]


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"t_cdf: df must be > 0, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``t_ppf(0.975, 1) = 12.706``)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_ppf: p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def welch_interval(
    a: Sequence[float], b: Sequence[float], *, level: float = 0.95
) -> tuple[float, float, float] | None:
    """``(mean_a - mean_b, low, high)``: Welch's ``level`` confidence interval for the difference of
    means of two samples of unequal variance; ``None`` when a side has fewer than 2 values."""
    if len(a) < 2 or len(b) < 2:
        return None
    ma, mb = math.fsum(a) / len(a), math.fsum(b) / len(b)
    va = math.fsum((x - ma) ** 2 for x in a) / (len(a) - 1)
    vb = math.fsum((x - mb) ** 2 for x in b) / (len(b) - 1)
    qa, qb = va / len(a), vb / len(b)
    diff = ma - mb
    if qa + qb == 0.0:
        return diff, diff, diff
    df = (qa + qb) ** 2 / (qa**2 / (len(a) - 1) + qb**2 / (len(b) - 1))
    half = t_ppf(0.5 + level / 2.0, df) * math.sqrt(qa + qb)
    return diff, diff - half, diff + half


def _mean_var(values: Sequence[float]) -> tuple[float, float]:
    mean = math.fsum(values) / len(values)
    return mean, math.fsum((x - mean) ** 2 for x in values) / (len(values) - 1)


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level!r}")


def t_interval(values: Sequence[float], *, level: float = 0.95) -> tuple[float, float, float] | None:
    """``(mean, low, high)``: the one-sample Student t ``level`` confidence interval of the mean,
    ``mean +- t_{(1+level)/2, n-1} * sd / sqrt(n)``; ``None`` with fewer than 2 values. A sample
    without spread gives the point interval ``(mean, mean, mean)``."""
    _check_level(level)
    if len(values) < 2:
        return None
    mean, var = _mean_var(values)
    if var == 0.0:
        return mean, mean, mean
    half = t_ppf(0.5 + level / 2.0, len(values) - 1) * math.sqrt(var / len(values))
    return mean, mean - half, mean + half


def paired_interval(
    a: Sequence[float], b: Sequence[float], *, level: float = 0.95
) -> tuple[float, float, float] | None:
    """``(mean_d, low, high)``: the paired t interval of the mean of ``d_i = a_i - b_i`` (the
    values of the same seeds on both sides, in the same order), ``n - 1`` degrees of freedom."""
    if len(a) != len(b):
        raise ValueError(f"paired_interval: {len(a)} values on side A, {len(b)} on side B")
    return t_interval([x - y for x, y in zip(a, b, strict=True)], level=level)


def _z(level: float) -> float:
    return statistics.NormalDist().inv_cdf(0.5 + level / 2.0)


def wilson_interval(successes: int, n: int, *, level: float = 0.95) -> tuple[float, float, float] | None:
    """``(p, low, high)``: the rate ``p = successes / n`` and its Wilson score ``level`` interval,
    ``(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)`` with ``z`` the normal
    ``(1 + level) / 2`` quantile (Wilson 1927); ``None`` when ``n`` is 0."""
    _check_level(level)
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return None
    z, p = _z(level), successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, max(0.0, centre - half), min(1.0, centre + half)


def newcombe_interval(
    successes_a: int, n_a: int, successes_b: int, n_b: int, *, level: float = 0.95
) -> tuple[float, float, float] | None:
    """``(p_a - p_b, low, high)``: Newcombe's hybrid score interval of a difference of two
    independent rates (Newcombe 1998, method 10), built from the two Wilson intervals
    ``(l_a, u_a)``, ``(l_b, u_b)``: ``d - sqrt((p_a - l_a)^2 + (u_b - p_b)^2)`` to
    ``d + sqrt((u_a - p_a)^2 + (p_b - l_b)^2)``; ``None`` when a side has no value."""
    wa = wilson_interval(successes_a, n_a, level=level)
    wb = wilson_interval(successes_b, n_b, level=level)
    if wa is None or wb is None:
        return None
    (pa, la, ua), (pb, lb, ub) = wa, wb
    d = pa - pb
    return d, d - math.sqrt((pa - la) ** 2 + (ub - pb) ** 2), d + math.sqrt((ua - pa) ** 2 + (pb - lb) ** 2)
