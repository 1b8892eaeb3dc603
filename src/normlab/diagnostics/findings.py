"""Turn a :class:`~normlab.diagnostics.results.Diagnosis` into short findings a person can
act on. Each finding states its numbers and the paper behind the rule; the thresholds are
explicit (:class:`Thresholds`) and every rule is a plain comparison, so a finding can be
checked by hand against ``diagnostics.json``.

Rules (in order):

* ``nonfinite``: a NaN/inf activation, with the module that first produced it.
* ``wasted_depth`` (Curse of Depth, Sun et al. 2025, arXiv:2502.05795): a run of blocks in
  the deeper half whose angular distance ``d(l, l+1)`` (last token) is below
  ``small_angular`` and whose removal changes the loss by less than ``small_removal``.
  LayerNorm Scaling is suggested when the residual variance also grows (the Pre-LN signature).
* ``residual_growth`` (same paper): residual-stream variance ``var_L / var_1 >= residual_growth``
  (measured from the first block's output, so a small embedding init does not count).
* ``geometric_variance`` (Lubana et al. 2021, arXiv:2106.05956, principle i): per-layer
  ``act_var`` grows geometrically: total ratio ``>= geometric_total``, log-linear fit
  ``R^2 >= geometric_r2`` and better than a linear fit, growth per layer ``>= geometric_step``.
* ``sample_collapse`` (same paper, principle ii): ``act_corr`` of the last measured layer
  ``>= collapse_corr``.
* ``vanishing_gradients`` / ``exploding_gradients`` (Xiong et al. 2020, arXiv:2002.04745;
  Takase et al. 2022, arXiv:2206.00330; Lubana et al. principle iii): mean weight-gradient
  norm of the first quarter of layers over the last quarter ``< vanishing_ratio`` or
  ``> exploding_ratio``.
* ``dyt_saturation`` (Zhu et al. 2025, arXiv:2503.10622): ``alpha * std(input) >= dyt_saturation``.
* ``model_update`` (Wang et al. 2022, arXiv:2203.00555): ``||F_t - F_0|| / ||F_0||``
  above ``update_relative``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from normlab.diagnostics import metrics
from normlab.diagnostics.results import Diagnosis, Finding, Thresholds

CURSE_OF_DEPTH = "Sun et al. 2025, arXiv:2502.05795"
BEYOND_BN = "Lubana et al. 2021, arXiv:2106.05956"
POST_LN_GRADS = "Xiong et al. 2020, arXiv:2002.04745; Takase et al. 2022, arXiv:2206.00330"
DYT = "Zhu et al. 2025, arXiv:2503.10622"
DEEPNET = "Wang et al. 2022, arXiv:2203.00555"


def _finite(xs: Sequence[float]) -> list[tuple[int, float]]:
    return [(i, x) for i, x in enumerate(xs) if math.isfinite(x)]


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def quarter_ratio(values: Sequence[float]) -> float:
    """Mean of the first quarter of ``values`` over the mean of the last quarter (at least
    one value each; finite values only); NaN with fewer than 2 values."""
    vals = [v for _, v in _finite(values)]
    if len(vals) < 2:
        return math.nan
    k = max(1, len(vals) // 4)
    first, last = sum(vals[:k]) / k, sum(vals[-k:]) / k
    return first / last if last > 0 else math.inf


def _residual_growth(report: Diagnosis) -> float:
    if report.residual is None or len(report.residual.variance) < 3:
        return math.nan
    v1, vl = report.residual.variance[1], report.residual.variance[-1]
    return vl / v1 if v1 > 0 else math.nan


def _wasted_depth(report: Diagnosis, th: Thresholds) -> Finding | None:
    if report.angular is None:
        return None
    d = report.angular.adjacent("last_token")
    num = len(d)
    removal = report.removal.delta if report.removal is not None else None
    small = [
        i
        for i in range(num // 2, num)
        if math.isfinite(d[i])
        and d[i] < th.small_angular
        and (removal is None or (math.isfinite(removal[i]) and abs(removal[i]) < th.small_removal))
    ]
    runs = [r for r in _runs(small) if r[1] - r[0] + 1 >= th.min_run]
    if not runs:
        return None
    a, b = max(runs, key=lambda r: r[1] - r[0])
    max_d = max(d[a : b + 1])
    numbers: dict[str, float | int | str] = {"first_block": a, "last_block": b, "max_angular": max_d}
    msg = (
        f"blocks {a}-{b} (of {num}) change the residual stream by less than {max_d:.3g} "
        "(angular distance d(l, l+1), last token)"
    )
    if removal is not None:
        max_r = max(abs(x) for x in removal[a : b + 1])
        numbers["max_abs_removal_delta"] = max_r
        msg += f"; removing any of them changes the loss by < {max_r:.3g}"
    growth = _residual_growth(report)
    if math.isfinite(growth) and growth >= th.residual_growth:
        numbers["residual_variance_ratio"] = growth
        msg += (
            f"; the residual variance grows x{growth:.3g} with depth: deep Pre-LN blocks are "
            "close to the identity (Curse of Depth), consider LayerNorm Scaling (placement 'lns')"
        )
    else:
        msg += ": the deep blocks are close to the identity (their branches are small next to the stream)"
    return Finding("wasted_depth", "warning", msg, numbers, CURSE_OF_DEPTH)


def _residual_finding(report: Diagnosis, th: Thresholds) -> Finding | None:
    growth = _residual_growth(report)
    if not (math.isfinite(growth) and growth >= th.residual_growth) or report.residual is None:
        return None
    var = report.residual.variance
    slope, _, _ = metrics.linear_fit(
        range(1, len(var)), [math.log(v) if v > 0 else math.nan for v in var[1:]]
    )
    return Finding(
        "residual_growth",
        "warning",
        f"residual-stream variance grows x{growth:.3g} from block 0's output ({var[1]:.3g}) to the last "
        f"block's ({var[-1]:.3g}), x{math.exp(slope):.3g} per block: the Pre-LN growth that makes deep "
        "blocks near-identity; LayerNorm Scaling (1/sqrt(l) on each pre-norm output) bounds it",
        {"ratio": growth, "var_first": var[1], "var_last": var[-1], "growth_per_block": math.exp(slope)},
        CURSE_OF_DEPTH,
    )


def _geometric(report: Diagnosis, th: Thresholds) -> Finding | None:
    pts = [(i, v) for i, v in _finite([s.act_var for s in report.layers]) if v > 0]
    if len(pts) < 4:
        return None
    xs, vs = [float(i) for i, _ in pts], [v for _, v in pts]
    total = vs[-1] / vs[0]
    slope, _, r2_log = metrics.linear_fit(xs, [math.log(v) for v in vs])
    _, _, r2_lin = metrics.linear_fit(xs, vs)
    step = math.exp(slope)
    if (
        total >= th.geometric_total
        and r2_log >= th.geometric_r2
        and r2_log > r2_lin
        and step >= th.geometric_step
    ):
        return Finding(
            "geometric_variance",
            "warning",
            f"activation variance grows geometrically with depth: x{step:.3g} per layer, x{total:.3g} "
            f"over {len(vs)} layers (log-linear R^2 {r2_log:.2f} vs linear {r2_lin:.2f}): a parametric "
            "normalizer without a residual remedy? use an activation-based norm (BN/GN/LN) or "
            "down-scale the residual branches (SkipInit)",
            {"growth_per_layer": step, "total_ratio": total, "r2_log": r2_log, "r2_linear": r2_lin},
            BEYOND_BN,
        )
    return None


def _collapse(report: Diagnosis, th: Thresholds) -> Finding | None:
    rows = [s for s in report.layers if math.isfinite(s.act_corr)]
    if not rows:
        return None
    last = rows[-1]
    if last.act_corr < th.collapse_corr:
        return None
    n = last.shape[0] if last.shape else 0
    return Finding(
        "sample_collapse",
        "warning",
        f"outputs of different samples are nearly parallel at {last.name}: mean cosine {last.act_corr:.3f}, "
        f"stable rank {last.stable_rank:.3g} of {n}: rank collapse, which large normalization groups "
        "(LayerNorm, GroupNorm with many channels per group) and unnormalized deep nets produce; "
        "smaller groups keep samples apart",
        {"layer": last.name, "act_corr": last.act_corr, "stable_rank": last.stable_rank, "batch": n},
        BEYOND_BN,
    )


def _gradients(report: Diagnosis, th: Thresholds) -> Finding | None:
    rows = [s for s in report.layers if s.num_params > 0 and math.isfinite(s.weight_grad_norm)]
    if len(rows) < 2:
        return None
    ratio = quarter_ratio([s.weight_grad_norm for s in rows])
    numbers: dict[str, float | int | str] = {
        "first_quarter_over_last": ratio,
        "first": rows[0].weight_grad_norm,
        "last": rows[-1].weight_grad_norm,
    }
    if ratio < th.vanishing_ratio:
        return Finding(
            "vanishing_gradients",
            "warning",
            f"weight-gradient norms fall toward the lower layers: first quarter / last quarter = {ratio:.3g} "
            f"({rows[0].name}: {rows[0].weight_grad_norm:.3g}, "
            f"{rows[-1].name}: {rows[-1].weight_grad_norm:.3g}): "
            "the Post-LN vanishing-gradient pattern; Pre-LN, B2T or DeepNorm keep the lower layers trainable",
            numbers,
            POST_LN_GRADS,
        )
    if ratio > th.exploding_ratio:
        return Finding(
            "exploding_gradients",
            "warning",
            f"weight-gradient norms in the first layers are {ratio:.3g}x those of the last quarter "
            f"({rows[0].name}: {rows[0].weight_grad_norm:.3g}, "
            f"{rows[-1].name}: {rows[-1].weight_grad_norm:.3g}): "
            "unstable backward propagation, as small normalization groups (InstanceNorm) give; use "
            "larger groups or a smaller learning rate",
            numbers,
            BEYOND_BN,
        )
    return None


def _dyt(report: Diagnosis, th: Thresholds) -> Finding | None:
    if report.dyt is None or not report.dyt.layers:
        return None
    worst = max(
        report.dyt.layers, key=lambda s: s.alpha_times_std if math.isfinite(s.alpha_times_std) else -1
    )
    if not (math.isfinite(worst.alpha_times_std) and worst.alpha_times_std >= th.dyt_saturation):
        return None
    return Finding(
        "dyt_saturation",
        "warning",
        f"DyT {worst.name} saturates: alpha {worst.alpha:.3g} x std(input) {worst.input_std:.3g} = "
        f"{worst.alpha_times_std:.3g}, so most inputs fall in tanh's flat tails; alpha should track "
        "1/std(input): lower alpha_init",
        {
            "layer": worst.name,
            "alpha": worst.alpha,
            "input_std": worst.input_std,
            "pearson": report.dyt.pearson,
        },
        DYT,
    )


def _update(report: Diagnosis, th: Thresholds) -> Finding | None:
    hist = report.model_update
    if hist is None or not hist.points:
        return None
    top = max(hist.points, key=lambda p: p.relative)
    if not top.relative > th.update_relative:
        return None
    return Finding(
        "model_update",
        "warning",
        f"the output moved by {top.relative:.3g}x its initial norm by step {top.step} "
        f"(||F_t - F_0|| = {top.norm:.3g}): the early model-update explosion of Post-LN; DeepNorm "
        "or a learning-rate warm-up bounds it",
        {"step": top.step, "relative": top.relative, "norm": top.norm},
        DEEPNET,
    )


def verdicts(report: Diagnosis, thresholds: Thresholds | None = None) -> list[Finding]:
    """Every rule that fires, most severe first (see the module docstring)."""
    th = thresholds or Thresholds()
    found: list[Finding] = []
    if report.nonfinite is not None:
        nf = report.nonfinite
        where = "produced by" if nf.where == "output" else "arriving at the input of"
        found.append(
            Finding(
                "nonfinite",
                "error",
                f"first non-finite activation {where} {nf.name or 'the model'} ({nf.module_type}), "
                f"shape {nf.shape}: {nf.num_nan} NaN, {nf.num_inf} inf",
                {"module": nf.name, "where": nf.where, "num_nan": nf.num_nan, "num_inf": nf.num_inf},
            )
        )
    for rule in (_wasted_depth, _residual_finding, _geometric, _collapse, _gradients, _dyt, _update):
        f = rule(report, th)
        if f is not None:
            found.append(f)
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(found, key=lambda f: order.get(f.severity, 3))
