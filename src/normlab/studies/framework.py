"""What a study is: a grid of runs, claims with verdict rules fixed before the run, plots.

A study is one file in ``normlab/studies/`` that builds a :class:`Study` and registers it with
:func:`register_study`, plus its name in the import of ``normlab/studies/__init__.py``::

    STUDY = register_study(Study(name="warmup", title=..., question=..., grid=_grid,
                                 claims=(Claim(...),), plots=(PlotSpec(...),)))

The grid is code: a function of :class:`StudyOptions` returning :class:`RunSpec` s, usually
built with :func:`grid`. Each :class:`Claim` compares a metric between two sides of the grid
(or one side with a threshold) under a :class:`Rule` whose three outcomes (reproduced / not
reproduced / inconclusive) are decided by numbers only; the rules are written into the study's
``plan.json`` before the first run starts, and the report evaluates those stored rules.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from normlab.registry import Registry
from normlab.studies.overrides import apply_to_specs
from normlab.train.config import RunConfig

Verdict = Literal["reproduced", "not reproduced", "inconclusive"]
Records = list[dict[str, Any]]


# --------------------------------------------------------------------------------------------
# The grid


@dataclass(frozen=True, kw_only=True)
class StudyOptions:
    """Command-line choices a grid may read.

    Attributes:
        seeds: seeds per cell (``None``: the study's default).
        scale: multiplies every run's step count (``steps(n)``); 1 is the study as designed.
        corpus: the text corpus of language-model runs (``"shakespeare"`` or ``"bible"``).
        images: the image data set (``"auto"``, ``"fashion-mnist"``, ``"mnist5k"``).
        sets: ``--set`` overrides, ``(key, value)`` pairs (:mod:`normlab.studies.overrides`),
            applied to every run of a registered study; a study file applies them to its text.
    """

    seeds: int | None = None
    scale: float = 1.0
    corpus: str = "shakespeare"
    images: str = "auto"
    sets: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.seeds is not None and (isinstance(self.seeds, bool) or self.seeds < 1):
            raise ValueError(f"StudyOptions: seeds must be >= 1, got {self.seeds!r}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"StudyOptions: scale must be a finite number > 0, got {self.scale!r}")

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds or 1))

    def steps(self, n: int) -> int:
        """``n`` steps scaled by ``scale`` (at least 1)."""
        return max(1, round(n * self.scale))


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One run of a study: the cell it belongs to (all its seeds), its coordinates, its config."""

    group: str
    cell: str
    params: Mapping[str, Any]
    seed: int
    config: RunConfig

    @property
    def key(self) -> str:
        return f"{self.cell}-s{self.seed}"


def _fmt(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]", "", text) or "x"


def grid(
    group: str,
    make: Callable[..., RunConfig],
    *,
    seeds: Sequence[int],
    points: Sequence[Mapping[str, Any]] | None = None,
    **axes: Sequence[Any],
) -> list[RunSpec]:
    """Runs ``make(seed=s, **params)`` for every grid point and seed.

    The points are every combination of ``axes``, or the explicit ``points`` (dicts of params)
    for grids that are not a full product.
    ``grid("warmup", make, seeds=[0, 1], placement=["pre", "post"], warmup=[0, 100])`` gives 8
    runs in 4 cells named ``warmup.placement-pre.warmup-0`` and so on.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]+", group):
        raise ValueError(f"grid: group must be letters, digits, '_' or '-', got {group!r}")
    if points is not None and axes:
        raise ValueError(f"grid {group!r}: give either points or axes, not both")
    if points is None:
        names = list(axes)
        points = [
            dict(zip(names, combo, strict=True))
            for combo in itertools.product(*(list(v) for v in axes.values()))
        ]
    specs = []
    for point in points:
        params = dict(point)
        cell = ".".join([group] + [f"{k}-{_fmt(v)}" for k, v in params.items()])
        for seed in seeds:
            config = make(seed=seed, **params)
            if config.train.seed != seed:
                raise ValueError(
                    f"grid {group!r}: make(seed={seed}) returned a config with seed {config.train.seed}"
                )
            specs.append(RunSpec(group=group, cell=cell, params=params, seed=seed, config=config))
    return specs


# --------------------------------------------------------------------------------------------
# Statistics and verdict rules


@dataclass(frozen=True)
class Stats:
    """Mean, sample standard deviation (``ddof=1``; 0 for one value) and count."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def sd(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean if self.values else None,
            "sd": self.sd if self.values else None,
            "n": self.n,
            "min": min(self.values) if self.values else None,
            "max": max(self.values) if self.values else None,
            "values": list(self.values),
        }


def pooled_sd(a: Stats, b: Stats) -> float:
    """``sqrt((sd_a^2 + sd_b^2) / 2)``: the spread of one run, pooled over the two sides."""
    return math.sqrt((a.sd**2 + b.sd**2) / 2.0)


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    why: str
    numbers: dict[str, float]


class Rule:
    """A verdict rule: from the per-seed values of side A (and B) to a verdict."""

    kind: ClassVar[str]

    def evaluate(self, a: Stats, b: Stats | None) -> Outcome:
        raise NotImplementedError

    def describe(self, metric: str, label_a: str, label_b: str | None) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}  # type: ignore[call-overload]


def _too_few(a: Stats, b: Stats | None) -> Outcome | None:
    sides = [a] if b is None else [a, b]
    if any(s.n == 0 for s in sides):
        return Outcome("inconclusive", "no finished runs on a side", {})
    if any(s.n < 2 for s in sides):
        return Outcome("inconclusive", "fewer than 2 seeds on a side: the spread is unknown", {})
    return None


@dataclass(frozen=True)
class Better(Rule):
    """Side A beats side B.

    ``gain = mean_B - mean_A`` (``lower_is_better``) or ``mean_A - mean_B``; ``margin =
    max(k * pooled_sd, min_effect)``. Reproduced if ``gain > margin``; not reproduced if
    ``gain < -margin`` (B beats A by the same margin); otherwise inconclusive. Needs 2 seeds a side.
    """

    lower_is_better: bool
    k: float = 2.0
    min_effect: float = 0.0
    kind: ClassVar[str] = "better"

    def evaluate(self, a: Stats, b: Stats | None) -> Outcome:
        if b is None:
            raise ValueError("Better: needs two sides")
        early = _too_few(a, b)
        if early is not None:
            return early
        gain = (b.mean - a.mean) if self.lower_is_better else (a.mean - b.mean)
        spread = pooled_sd(a, b)
        margin = max(self.k * spread, self.min_effect)
        numbers = {"gain": gain, "pooled_sd": spread, "margin": margin}
        if gain > margin:
            return Outcome("reproduced", f"gain {gain:.4g} > margin {margin:.3g}", numbers)
        if gain < -margin:
            return Outcome("not reproduced", f"gain {gain:.4g} < -margin {-margin:.3g}", numbers)
        return Outcome("inconclusive", f"|gain| {abs(gain):.4g} <= margin {margin:.3g}", numbers)

    def describe(self, metric: str, label_a: str, label_b: str | None) -> str:
        sign = "lower" if self.lower_is_better else "higher"
        floor = f" and > {self.min_effect:g}" if self.min_effect else ""
        return (
            f"reproduced if {label_a} has a {sign} mean {metric} than {label_b} by more than "
            f"{self.k:g} x pooled sd{floor}; not reproduced if {label_b} is {sign} by that margin; "
            "else inconclusive"
        )


@dataclass(frozen=True)
class Similar(Rule):
    """Side A is on par with side B.

    ``diff = |mean_A - mean_B|``, ``tol_abs = tol * |mean_B|`` (``relative``) or ``tol``.
    Reproduced if ``diff + k * pooled_sd <= tol_abs``; not reproduced if ``diff - k * pooled_sd
    > tol_abs``; otherwise inconclusive.

    ``paired``: the two sides are compared seed by seed (the report passes the values of the
    seeds finished on both sides, in seed order): ``diff = |mean_s (A_s - B_s)|`` and the
    spread is the sd of the per-seed differences, for claims that two procedures give the
    same run from the same seed, where the seed-to-seed spread is not the question.
    """

    tol: float
    relative: bool = True
    k: float = 2.0
    paired: bool = False
    kind: ClassVar[str] = "similar"

    def evaluate(self, a: Stats, b: Stats | None) -> Outcome:
        if b is None:
            raise ValueError("Similar: needs two sides")
        early = _too_few(a, b)
        if early is not None:
            return early
        tol = self.tol * abs(b.mean) if self.relative else self.tol
        if self.paired:
            if a.n != b.n:
                raise ValueError(f"Similar(paired=True): {a.n} values on side A, {b.n} on side B")
            diffs = Stats(tuple(x - y for x, y in zip(a.values, b.values, strict=True)))
            diff, spread = abs(diffs.mean), diffs.sd
        else:
            diff, spread = abs(a.mean - b.mean), pooled_sd(a, b)
        numbers = {"abs_diff": diff, "tolerance": tol, "pooled_sd": spread}
        if diff + self.k * spread <= tol:
            return Outcome("reproduced", f"|diff| {diff:.4g} + {self.k:g} sd <= tolerance {tol:.3g}", numbers)
        if diff - self.k * spread > tol:
            return Outcome(
                "not reproduced", f"|diff| {diff:.4g} - {self.k:g} sd > tolerance {tol:.3g}", numbers
            )
        return Outcome(
            "inconclusive", f"|diff| {diff:.4g} within {self.k:g} sd of tolerance {tol:.3g}", numbers
        )

    def describe(self, metric: str, label_a: str, label_b: str | None) -> str:
        tol = f"{self.tol:.0%} of {label_b}'s mean" if self.relative else f"{self.tol:g}"
        if self.paired:
            return (
                f"reproduced if |mean per-seed difference of {metric}, {label_a} - {label_b}| + "
                f"{self.k:g} x its sd <= {tol}; not reproduced if |mean difference| - {self.k:g} x sd "
                f"> {tol}; else inconclusive"
            )
        return (
            f"reproduced if |mean {metric} of {label_a} - {label_b}| + {self.k:g} x pooled sd <= {tol}; "
            f"not reproduced if |difference| - {self.k:g} x pooled sd > {tol}; else inconclusive"
        )


@dataclass(frozen=True)
class Exceeds(Rule):
    """Side A's metric is above (``above``) or below a fixed value.

    Reproduced if ``mean - k * sd > value`` (above) or ``mean + k * sd < value`` (below); not
    reproduced if the whole band ``mean +- k * sd`` is on the other side; otherwise inconclusive.
    """

    value: float
    above: bool = True
    k: float = 2.0
    kind: ClassVar[str] = "exceeds"

    def evaluate(self, a: Stats, b: Stats | None) -> Outcome:
        early = _too_few(a, None)
        if early is not None:
            return early
        lo, hi = a.mean - self.k * a.sd, a.mean + self.k * a.sd
        numbers = {"low": lo, "high": hi, "value": self.value}
        yes, no = (lo > self.value, hi < self.value) if self.above else (hi < self.value, lo > self.value)
        if yes:
            return Outcome("reproduced", f"band [{lo:.4g}, {hi:.4g}] clears {self.value:g}", numbers)
        if no:
            return Outcome("not reproduced", f"band [{lo:.4g}, {hi:.4g}] misses {self.value:g}", numbers)
        return Outcome("inconclusive", f"band [{lo:.4g}, {hi:.4g}] contains {self.value:g}", numbers)

    def describe(self, metric: str, label_a: str, label_b: str | None) -> str:
        side = ">" if self.above else "<"
        return (
            f"reproduced if mean {metric} of {label_a} {side} {self.value:g} by more than {self.k:g} sd; "
            "not reproduced if it is on the other side by that much; else inconclusive"
        )


RULES: dict[str, type[Rule]] = {"better": Better, "similar": Similar, "exceeds": Exceeds}


def rule_from_dict(d: Mapping[str, Any]) -> Rule:
    kind = d.get("kind")
    if kind not in RULES:
        raise ValueError(f"rule: kind must be one of {sorted(RULES)}, got {kind!r}")
    return RULES[str(kind)](**{k: v for k, v in d.items() if k != "kind"})


# --------------------------------------------------------------------------------------------
# Claims


@dataclass(frozen=True, kw_only=True)
class Side:
    """The runs of a study whose ``group`` is ``group`` and whose params include ``where``."""

    label: str
    group: str
    where: Mapping[str, Any] = field(default_factory=dict)

    def selects(self, spec_group: str, params: Mapping[str, Any]) -> bool:
        return spec_group == self.group and all(params.get(k) == v for k, v in self.where.items())

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "group": self.group, "where": dict(self.where)}


@dataclass(frozen=True, kw_only=True)
class Claim:
    """A paper's claim, the metric that echoes it, and the rule that decides it.

    Attributes:
        id: short identifier (``"lns-beats-pre"``).
        text: the claim as measured here, in its claimed direction (``"Pre-LN + LNS reaches a
            lower validation loss than Pre-LN"``).
        paper: the source and what it reports, as a direction or ratio (never the paper's
            absolute numbers as a target).
        metric: a run metric: a key of the final evaluation (``"val_loss"``, ``"test_acc"``),
            ``"train_loss"``, ``"diverged"`` (1 or 0), or a name in :attr:`Study.metrics`.
        a, b: the two sides (``b`` is ``None`` for a threshold rule).
        rule: the verdict rule.
    """

    id: str
    text: str
    paper: str
    metric: str
    a: Side
    b: Side | None = None
    rule: Rule

    def to_dict(self) -> dict[str, Any]:
        label_b = self.b.label if self.b is not None else None
        return {
            "id": self.id,
            "text": self.text,
            "paper": self.paper,
            "metric": self.metric,
            "a": self.a.to_dict(),
            "b": self.b.to_dict() if self.b is not None else None,
            "rule": self.rule.to_dict(),
            "rule_text": self.rule.describe(self.metric, self.a.label, label_b),
        }


# --------------------------------------------------------------------------------------------
# Plots and the study


@dataclass(frozen=True, kw_only=True)
class PlotSpec:
    """A figure of the report.

    Attributes:
        kind: ``"curves"`` (``metric`` against step, mean +- sd over seeds, one line per cell;
            ``metric="loss"`` is the training loss, else an evaluation metric); ``"xy"``
            (final ``metric`` against the param ``x``, one line per value of ``series``);
            ``"layers"`` (a per-layer probe, ``metric`` = ``"resid_var"``/``"act_var"``, against
            the layer index, one line per cell); ``"heatmap"`` (the ``"angular"`` probe matrix,
            one panel per cell, averaged over seeds).
        group: the grid group the figure shows.
        title: the figure title; ``logx``/``logy``: log axes.
    """

    kind: Literal["curves", "xy", "layers", "heatmap"]
    group: str
    metric: str
    x: str | None = None
    series: str | None = None
    title: str = ""
    logx: bool = False
    logy: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MetricFn = Callable[[Records, Mapping[str, Any]], float | None]


@dataclass(frozen=True, kw_only=True)
class Study:
    """A registered study.

    Attributes:
        name: the ``normlab study NAME``.
        title, question: what it asks, in a researcher's words.
        grid: ``StudyOptions -> list[RunSpec]`` (``options.seeds`` is already resolved).
        claims: the claims and their rules.
        plots: figures beyond the default training-loss curves of every group.
        metrics: extra run metrics, ``name -> fn(records, summary)``.
        default_seeds: seeds per cell when ``--seeds`` is not given.
        budget: the expected wall time, said in ``normlab study list``.
        rank: rank the cells by a metric in the report: ``{"metric": ..., "lower_is_better":
            ...}`` (user studies; ``None``: no ranking).
        source: where a study file came from (``{"file", "format", "text", "sets"}``), written
            into the plan; ``None`` for a registered study.
    """

    name: str
    title: str
    question: str
    grid: Callable[[StudyOptions], list[RunSpec]]
    claims: tuple[Claim, ...]
    plots: tuple[PlotSpec, ...] = ()
    metrics: Mapping[str, MetricFn] = field(default_factory=dict)
    default_seeds: int = 2
    budget: str = ""
    rank: Mapping[str, Any] | None = None
    source: Mapping[str, Any] | None = None

    def specs(self, options: StudyOptions) -> list[RunSpec]:
        """The grid with seeds resolved and ``options.sets`` applied (a TOML study applied them
        to its text already); keys are checked to be unique."""
        if options.seeds is None:
            options = dataclasses.replace(options, seeds=self.default_seeds)
        specs = self.grid(options)
        if options.sets and not (self.source and self.source.get("format") == "toml"):
            specs = apply_to_specs(specs, options.sets, study=self.name)
        keys = [s.key for s in specs]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"study {self.name!r}: duplicate run keys {dup[:5]}")
        for claim in self.claims:
            for side in (claim.a, claim.b):
                if side is not None and not any(side.selects(s.group, s.params) for s in specs):
                    raise ValueError(
                        f"study {self.name!r}: claim {claim.id!r} side {side.label!r} selects no run"
                    )
        return specs


STUDIES: Registry[Study] = Registry("study")
RESERVED_NAMES = ("list", "init")


def register_study(study: Study) -> Study:
    """Register ``study`` under its name; returns it (``STUDY = register_study(Study(...))``)."""
    if study.name in RESERVED_NAMES:
        raise ValueError(f"register_study: {study.name!r} is reserved for `normlab study {study.name}`")
    STUDIES.register(study.name)(study)
    return study


def get_study(name: str) -> Study:
    return STUDIES.get(name)


def list_studies() -> list[str]:
    return STUDIES.names()
