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

The rules decide with confidence intervals at a stated ``level`` (default 95%;
:mod:`normlab.studies.stats`): :class:`Better` and :class:`Similar` with Welch's t interval of
the difference of means (or, ``paired``, the paired t interval over the seeds finished on both
sides), :class:`Exceeds` with the one-sample t interval, :class:`Rate` with Wilson's interval of
a rate of seeds with an event or Newcombe's interval of a difference of two rates. A claim
states the smallest effect it cares about (``min_effect``, ``tol``), and an interval wholly
inside it is a result too: "not reproduced". With 2 seeds a side the t quantile is large
(12.7 at one degree of freedom), which is what sequential seeding (``max_seeds``, see
:mod:`normlab.studies.runner`) is for.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from normlab.data.text import CORPORA
from normlab.data.user import check_text_file
from normlab.registry import Registry
from normlab.studies.overrides import apply_to_specs
from normlab.studies.stats import (
    newcombe_interval,
    paired_interval,
    t_interval,
    welch_interval,
    wilson_interval,
)
from normlab.train.config import RunConfig

Verdict = Literal["reproduced", "not reproduced", "inconclusive"]
Records = list[dict[str, Any]]


# --------------------------------------------------------------------------------------------
# The grid


SIZES = ("tiny", "small", "base")


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = Path(path).expanduser().stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _check_corpus_file(path: str, stamp: tuple[int, int] | None) -> None:
    """:func:`~normlab.data.user.check_text_file` once per file version (``stamp``: its size and
    modification time), not at every ``dataclasses.replace`` of the options."""
    check_text_file(path, owner="corpus")


@dataclass(frozen=True, kw_only=True)
class StudyOptions:
    """Command-line choices a grid may read.

    Attributes:
        seeds: seeds per cell to start with (``None``: the study's default).
        max_seeds: the cap of sequential seeding (``None``: the study's, by default ``seeds``,
            i.e. a fixed number of seeds): the runner adds one seed at a time to the cells of
            claims still inconclusive until every claim is conclusive or the cells hold
            ``max_seeds`` seeds (see :mod:`normlab.studies.runner`). At least 2.
        scale: multiplies every run's step count (``steps(n)``); 1 is the study as designed.
        size: ``"tiny"``, ``"small"`` or ``"base"``: a scale the study defines
            (:attr:`Study.sizes`; ``None``: the study as designed); multiplies ``scale``.
        corpus: the text corpus of language-model runs: a built-in name (``"shakespeare"``,
            ``"bible"``) or the path of a UTF-8 text file (checked here: it must exist, hold
            text and no NUL byte).
        images: the image data set (``"auto"``, ``"fashion-mnist"``, ``"mnist5k"``).
        sets: ``--set`` overrides, ``(key, value)`` pairs (:mod:`normlab.studies.overrides`),
            applied to every run of a registered study; a study file applies them to its text.
    """

    seeds: int | None = None
    max_seeds: int | None = None
    scale: float = 1.0
    size: str | None = None
    corpus: str = "shakespeare"
    images: str = "auto"
    sets: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.seeds is not None and (isinstance(self.seeds, bool) or self.seeds < 1):
            raise ValueError(f"StudyOptions: seeds must be >= 1, got {self.seeds!r}")
        if self.max_seeds is not None and (
            isinstance(self.max_seeds, bool) or not isinstance(self.max_seeds, int) or self.max_seeds < 2
        ):
            raise ValueError(
                f"StudyOptions: max_seeds must be an int >= 2 (a verdict needs 2 seeds a side), "
                f"got {self.max_seeds!r}"
            )
        if self.seeds is not None and self.max_seeds is not None and self.max_seeds < self.seeds:
            raise ValueError(
                f"StudyOptions: max_seeds {self.max_seeds} is below the {self.seeds} seeds to start with"
            )
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"StudyOptions: scale must be a finite number > 0, got {self.scale!r}")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"StudyOptions: size must be one of {', '.join(SIZES)}, got {self.size!r}")
        if self.corpus not in CORPORA:
            _check_corpus_file(self.corpus, _stamp(self.corpus))

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds or 1))

    def steps(self, n: int) -> int:
        """``n`` steps scaled by ``scale`` (at least 1)."""
        return max(1, round(n * self.scale))

    def corpus_fields(self) -> dict[str, Any]:
        """The fields of an :class:`~normlab.train.config.LMTask` for ``corpus``: ``{"corpus":
        NAME}`` for a built-in corpus, ``{"data": {"kind": "text", "path": ...}}`` for a file."""
        if self.corpus in CORPORA:
            return {"corpus": self.corpus}
        return {"data": {"kind": "text", "path": str(Path(self.corpus).expanduser().resolve())}}


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


DEFAULT_LEVEL = 0.95


class Rule:
    """A verdict rule: from the per-seed values of side A (and B) to a verdict.

    Every rule decides with a confidence interval at ``level`` (default 95%), never with the
    point estimates alone; a rule's ``k`` (the width in standard deviations of the rules before
    intervals) is deprecated: still accepted, so that an older ``plan.json`` or study file
    loads, and ignored.
    """

    kind: ClassVar[str]
    level: float

    def evaluate(self, a: Stats, b: Stats | None) -> Outcome:
        raise NotImplementedError

    def describe(self, metric: str, label_a: str, label_b: str | None) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        if d.get("k") is None:
            d.pop("k", None)
        return {"kind": self.kind, **d}

    def _check(self) -> None:
        if isinstance(self.level, bool) or not 0.0 < self.level < 1.0:
            raise ValueError(f"{type(self).__name__}: level must be in (0, 1), got {self.level!r}")


def _too_few(a: Stats, b: Stats | None, need: int = 2) -> Outcome | None:
    sides = [a] if b is None else [a, b]
    if any(s.n == 0 for s in sides):
        return Outcome("inconclusive", "no finished runs on a side", {})
    if any(s.n < need for s in sides):
        return Outcome("inconclusive", "fewer than 2 seeds on a side: the spread is unknown", {})
    return None


def _interval(a: Stats, b: Stats, *, paired: bool, level: float) -> tuple[float, float, float]:
    """``(mean_a - mean_b, low, high)``: Welch's interval, or the paired t interval of the
    per-seed differences (the report passes the seeds finished on both sides, in seed order)."""
    if paired:
        got = paired_interval(a.values, b.values, level=level)
    else:
        got = welch_interval(a.values, b.values, level=level)
    assert got is not None  # _too_few came first
    return got


def _ci(lo: float, hi: float, level: float) -> str:
    return f"{level:.0%} CI [{lo:.4g}, {hi:.4g}]"


def _effect_verdict(
    gain: float, lo: float, hi: float, min_effect: float, level: float, what: str
) -> tuple[Verdict, str]:
    """The three outcomes of a directional claim from the interval ``[lo, hi]`` of its ``gain``
    (positive: the claimed direction), shared by :class:`Better` and :class:`Rate`."""
    ci = _ci(lo, hi, level)
    if lo > 0 and gain >= min_effect:
        floor = f", {what} {gain:.4g} >= min_effect {min_effect:g}" if min_effect else ""
        return "reproduced", f"{what} {gain:.4g}, {ci} excludes 0{floor}"
    if hi < 0:
        return "not reproduced", f"{what} {gain:.4g}, {ci} lies entirely in the opposite direction"
    if min_effect > 0 and -min_effect < lo and hi < min_effect:
        return "not reproduced", f"{what} {gain:.4g}, {ci} lies inside +-min_effect {min_effect:g}: no effect"
    if lo > 0:
        return "inconclusive", f"{what} {gain:.4g} < min_effect {min_effect:g}, {ci} reaches past it"
    return "inconclusive", f"{what} {gain:.4g}, {ci} holds 0"


_EFFECT_RULE = (
    "reproduced if the {level:.0%} interval of the gain excludes 0 in the claimed direction "
    "and the gain is >= min_effect {min_effect:g}; not reproduced if the interval lies entirely in "
    "the opposite direction{equiv}; else inconclusive"
)


def _effect_text(level: float, min_effect: float) -> str:
    equiv = f", or entirely inside +-{min_effect:g} (no effect worth the claim)" if min_effect else ""
    return _EFFECT_RULE.format(level=level, min_effect=min_effect, equiv=equiv)


@dataclass(frozen=True)
class Better(Rule):
    """Side A beats side B by at least ``min_effect`` (the smallest effect the claim cares about).

    ``gain = mean_B - mean_A`` (``lower_is_better``) or ``mean_A - mean_B``, with its ``level``
    confidence interval ``[lo, hi]``: Welch's t interval of the difference of means
    (Welch-Satterthwaite degrees of freedom), or with ``paired`` the paired t interval of the
    per-seed differences over the seeds finished on both sides (``n - 1`` degrees of freedom).

    - reproduced: ``lo > 0`` (the interval excludes 0 in the claimed direction) and
      ``gain >= min_effect`` (the estimated effect is one the claim cares about);
    - not reproduced: ``hi < 0`` (the interval lies entirely in the opposite direction), or,
      with ``min_effect > 0``, ``-min_effect < lo`` and ``hi < min_effect`` (equivalence: the
      whole interval is inside ``+-min_effect``; a null result is a result);
    - otherwise inconclusive (also with fewer than 2 seeds on a side).

    A side without spread gives a point interval. ``k`` is deprecated and ignored (see
    :class:`Rule`).
    """

    lower_is_better: bool
    k: float | None = None
    min_effect: float = 0.0
    level: float = DEFAULT_LEVEL
    paired: bool = False
    kind: ClassVar[str] = "better"

    def __post_init__(self) -> None:
        self._check()
        if not (math.isfinite(self.min_effect) and self.min_effect >= 0):
            raise ValueError(f"Better: min_effect must be a finite number >= 0, got {self.min_effect!r}")

    def evaluate(self, a: Stats, b: Stats | None) -> Outcome:
        if b is None:
            raise ValueError("Better: needs two sides")
        early = _too_few(a, b)
        if early is not None:
            return early
        diff, lo, hi = _interval(a, b, paired=self.paired, level=self.level)
        gain, lo, hi = (-diff, -hi, -lo) if self.lower_is_better else (diff, lo, hi)
        verdict, why = _effect_verdict(gain, lo, hi, self.min_effect, self.level, "gain")
        numbers = {"gain": gain, "low": lo, "high": hi, "level": self.level, "min_effect": self.min_effect,
                   "pooled_sd": pooled_sd(a, b)}  # fmt: skip
        return Outcome(verdict, why, numbers)

    def describe(self, metric: str, label_a: str, label_b: str | None) -> str:
        sign = "lower" if self.lower_is_better else "higher"
        how = "paired t interval over the seeds of both sides" if self.paired else "Welch t interval"
        return (
            f"gain = how much {sign} {label_a}'s mean {metric} is than {label_b}'s ({how}); "
            + _effect_text(self.level, self.min_effect)
        )


@dataclass(frozen=True)
class Similar(Rule):
    """Side A is on par with side B, within ``tol`` (TOST-like equivalence).

    ``diff = mean_A - mean_B`` with its ``level`` interval ``[lo, hi]`` (Welch's, or with
    ``paired`` the paired t interval of the per-seed differences, for claims that two procedures
    give the same run from the same seed, where the seed-to-seed spread is not the question);
    ``tol_abs = tol * |mean_B|`` (``relative``) or ``tol``.

    - reproduced: ``-tol_abs <= lo`` and ``hi <= tol_abs`` (the whole interval is inside the
      tolerance: two one-sided tests, each at ``(1 - level) / 2``, hence conservative);
    - not reproduced: ``lo > tol_abs`` or ``hi < -tol_abs`` (the whole interval is outside);
    - otherwise inconclusive (also with fewer than 2 seeds on a side).
    """

    tol: float
    relative: bool = True
    k: float | None = None
    paired: bool = False
    level: float = DEFAULT_LEVEL
    kind: ClassVar[str] = "similar"

    def __post_init__(self) -> None:
        self._check()

    def evaluate(self, a: Stats, b: Stats | None) -> Outcome:
        if b is None:
            raise ValueError("Similar: needs two sides")
        early = _too_few(a, b)
        if early is not None:
            return early
        tol = self.tol * abs(b.mean) if self.relative else self.tol
        diff, lo, hi = _interval(a, b, paired=self.paired, level=self.level)
        numbers = {"diff": diff, "abs_diff": abs(diff), "low": lo, "high": hi, "tolerance": tol,
                   "level": self.level, "pooled_sd": pooled_sd(a, b)}  # fmt: skip
        ci = _ci(lo, hi, self.level)
        if -tol <= lo and hi <= tol:
            return Outcome("reproduced", f"diff {diff:.4g}, {ci} inside +-{tol:.3g}", numbers)
        if lo > tol or hi < -tol:
            return Outcome("not reproduced", f"diff {diff:.4g}, {ci} entirely outside +-{tol:.3g}", numbers)
        return Outcome("inconclusive", f"diff {diff:.4g}, {ci} crosses +-{tol:.3g}", numbers)

    def describe(self, metric: str, label_a: str, label_b: str | None) -> str:
        tol = f"{self.tol:.0%} of {label_b}'s mean" if self.relative else f"{self.tol:g}"
        what = (
            f"the mean per-seed difference of {metric}, {label_a} - {label_b} (paired t interval)"
            if self.paired
            else f"the difference of mean {metric}, {label_a} - {label_b} (Welch t interval)"
        )
        return (
            f"reproduced if the {self.level:.0%} interval of {what} lies inside +-{tol}; "
            "not reproduced if it lies entirely outside; else inconclusive"
        )


@dataclass(frozen=True)
class Exceeds(Rule):
    """Side A's metric is above (``above``) or below a fixed value.

    The one-sample t interval ``mean +- t_{(1+level)/2, n-1} sd / sqrt(n)``: reproduced if it
    lies entirely on the claimed side of ``value``, not reproduced if entirely on the other,
    otherwise inconclusive (also with fewer than 2 seeds).
    """

    value: float
    above: bool = True
    k: float | None = None
    level: float = DEFAULT_LEVEL
    kind: ClassVar[str] = "exceeds"

    def __post_init__(self) -> None:
        self._check()

    def evaluate(self, a: Stats, b: Stats | None) -> Outcome:
        early = _too_few(a, None)
        if early is not None:
            return early
        got = t_interval(a.values, level=self.level)
        assert got is not None
        mean, lo, hi = got
        numbers = {"mean": mean, "low": lo, "high": hi, "value": self.value, "level": self.level}
        yes, no = (lo > self.value, hi < self.value) if self.above else (hi < self.value, lo > self.value)
        ci = _ci(lo, hi, self.level)
        if yes:
            return Outcome("reproduced", f"mean {mean:.4g}, {ci} clears {self.value:g}", numbers)
        if no:
            return Outcome("not reproduced", f"mean {mean:.4g}, {ci} misses {self.value:g}", numbers)
        return Outcome("inconclusive", f"mean {mean:.4g}, {ci} contains {self.value:g}", numbers)

    def describe(self, metric: str, label_a: str, label_b: str | None) -> str:
        side = "above" if self.above else "below"
        return (
            f"reproduced if the {self.level:.0%} t interval of {label_a}'s mean {metric} lies entirely "
            f"{side} {self.value:g}; not reproduced if entirely on the other side; else inconclusive"
        )


@dataclass(frozen=True)
class Rate(Rule):
    """A stability claim: the rate of an event over seeds (a run diverged, left a plateau).

    A seed has the event when its metric is above ``threshold`` (``above``) or below it; with
    the default ``threshold = 0.5`` a 0/1 metric such as ``diverged`` is its own event. The
    claim is that side A's event rate is lower (``lower``) or higher:

    - than a fixed ``rate`` (no side B): Wilson's score interval of A's rate; reproduced if it
      lies entirely on the claimed side of ``rate``, not reproduced if entirely on the other;
    - than side B's rate (``rate`` is ``None``): Newcombe's hybrid score interval of the
      difference of the two rates, with the outcomes of :class:`Better` (``gain`` = the rate
      difference in the claimed direction, ``min_effect`` the smallest one that matters).

    Otherwise inconclusive (also with no seed on a side). One seed suffices for an interval.
    """

    threshold: float = 0.5
    above: bool = True
    lower: bool = True
    rate: float | None = None
    min_effect: float = 0.0
    level: float = DEFAULT_LEVEL
    kind: ClassVar[str] = "rate"

    def __post_init__(self) -> None:
        self._check()
        if self.rate is not None and not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"Rate: rate must be in [0, 1], got {self.rate!r}")
        if not 0.0 <= self.min_effect < 1.0:
            raise ValueError(f"Rate: min_effect must be in [0, 1), got {self.min_effect!r}")

    def events(self, s: Stats) -> int:
        return sum(1 for v in s.values if (v > self.threshold if self.above else v < self.threshold))

    def evaluate(self, a: Stats, b: Stats | None) -> Outcome:
        if (self.rate is None) != (b is not None):
            raise ValueError("Rate: compare side A with a rate, or with side B, not both")
        early = _too_few(a, b, need=1)
        if early is not None:
            return early
        ka = self.events(a)
        if b is None:
            assert self.rate is not None
            got = wilson_interval(ka, a.n, level=self.level)
            assert got is not None
            p, lo, hi = got
            numbers = {"rate": p, "events": ka, "n": a.n, "low": lo, "high": hi, "value": self.rate,
                       "level": self.level}  # fmt: skip
            yes, no = (hi < self.rate, lo > self.rate) if self.lower else (lo > self.rate, hi < self.rate)
            ci, head = _ci(lo, hi, self.level), f"rate {ka}/{a.n} = {p:.3g}"
            if yes:
                return Outcome("reproduced", f"{head}, {ci} clears {self.rate:g}", numbers)
            if no:
                return Outcome("not reproduced", f"{head}, {ci} misses {self.rate:g}", numbers)
            return Outcome("inconclusive", f"{head}, {ci} contains {self.rate:g}", numbers)
        kb = self.events(b)
        got = newcombe_interval(ka, a.n, kb, b.n, level=self.level)
        assert got is not None
        d, lo, hi = got
        gain, lo, hi = (-d, -hi, -lo) if self.lower else (d, lo, hi)
        verdict, why = _effect_verdict(gain, lo, hi, self.min_effect, self.level, "rate difference")
        numbers = {"gain": gain, "low": lo, "high": hi, "events_a": ka, "n_a": a.n, "events_b": kb,
                   "n_b": b.n, "level": self.level, "min_effect": self.min_effect}  # fmt: skip
        return Outcome(verdict, f"{ka}/{a.n} vs {kb}/{b.n}: {why}", numbers)

    def describe(self, metric: str, label_a: str, label_b: str | None) -> str:
        event = f"{metric} {'>' if self.above else '<'} {self.threshold:g}"
        sign = "lower" if self.lower else "higher"
        if self.rate is not None:
            return (
                f"event: {event}; reproduced if the {self.level:.0%} Wilson interval of {label_a}'s "
                f"event rate lies entirely {sign} than {self.rate:g}; not reproduced if entirely on "
                "the other side; else inconclusive"
            )
        return (
            f"event: {event}; gain = how much {sign} {label_a}'s event rate is than {label_b}'s "
            "(Newcombe interval of the difference); " + _effect_text(self.level, self.min_effect)
        )


RULES: dict[str, type[Rule]] = {"better": Better, "similar": Similar, "exceeds": Exceeds, "rate": Rate}


def rule_from_dict(d: Mapping[str, Any]) -> Rule:
    """The rule of a plan's claim (``to_dict``'s output; an older plan's ``k`` is accepted)."""
    kind = d.get("kind")
    if kind not in RULES:
        raise ValueError(f"rule: kind must be one of {sorted(RULES)}, got {kind!r}")
    return RULES[str(kind)](**{k: v for k, v in d.items() if k != "kind"})


# --------------------------------------------------------------------------------------------
# Claims


@dataclass(frozen=True, kw_only=True)
class Side:
    """The runs of a study whose ``group`` is ``group`` and whose params include ``where``.

    With ``minus``, a contrast: its value for a seed is this cell's value minus ``minus``'s
    (the seeds measured in both), so that a claim can compare two effects, for example
    "the gain of LNS over Pre-LN is larger at 24 blocks than at 4" (an interaction).
    """

    label: str
    group: str
    where: Mapping[str, Any] = field(default_factory=dict)
    minus: Side | None = None

    def __post_init__(self) -> None:
        if self.minus is not None and self.minus.minus is not None:
            raise ValueError(f"Side {self.label!r}: minus must be a plain side, not a contrast")

    def own(self, spec_group: str, params: Mapping[str, Any]) -> bool:
        """Whether the run is one of this side's own cell (not of ``minus``)."""
        return spec_group == self.group and all(params.get(k) == v for k, v in self.where.items())

    def selects(self, spec_group: str, params: Mapping[str, Any]) -> bool:
        """Whether the side reads the run (its own cell's or, for a contrast, ``minus``'s)."""
        return self.own(spec_group, params) or (self.minus is not None and self.minus.own(spec_group, params))

    def cells(self) -> tuple[Side, ...]:
        """The plain sides it reads: itself (without ``minus``), then ``minus``."""
        plain = dataclasses.replace(self, minus=None)
        return (plain,) if self.minus is None else (plain, self.minus)

    def to_dict(self) -> dict[str, Any]:
        d = {"label": self.label, "group": self.group, "where": dict(self.where)}
        return d if self.minus is None else {**d, "minus": self.minus.to_dict()}


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


@dataclass(frozen=True)
class Size:
    """A rung of a study's ``--size`` ladder: every run's steps times ``scale``, then ``sets``
    (``--set``-style overrides, ``("model.n_embd", 256)``) applied to every run whose task or model
    has that setting (a GPT's width leaves a CNN alone); ``note`` says what the rung is for."""

    scale: float = 1.0
    sets: tuple[tuple[str, Any], ...] = ()
    note: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"Size: scale must be a finite number > 0, got {self.scale!r}")

    def describe(self) -> str:
        parts = [f"scale {self.scale:g}", *(f"{k}={v!r}" for k, v in self.sets)]
        return ", ".join(parts) + (f": {self.note}" if self.note else "")


# The language-model studies' base rung: nanoGPT's shakespeare-char scale (width 384 over 256
# characters) brought to 256 over 128, 8 heads of 32.
BASE_GPT: tuple[tuple[str, Any], ...] = (
    ("model.n_embd", 256),
    ("model.n_head", 8),
    ("train.block_size", 128),
)


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
        default_seeds: seeds per cell to start with when ``--seeds`` is not given.
        max_seeds: the cap of sequential seeding when ``--max-seeds`` is not given (``None``:
            the start seeds, a fixed number); at least 2.
        sizes: the rungs ``--size`` names: a scale of the steps (``{"tiny": 0.01, "small": 1.0}``)
            or a :class:`Size` (a scale and the settings it changes, e.g. a wider model for
            ``base``); a size a study does not define is an error naming those it does.
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
    max_seeds: int | None = None
    sizes: Mapping[str, float | Size] = field(default_factory=lambda: {"small": 1.0})
    budget: str = ""
    rank: Mapping[str, Any] | None = None
    source: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.max_seeds is not None and self.max_seeds < max(2, self.default_seeds):
            raise ValueError(
                f"study {self.name!r}: max_seeds must be >= 2 and >= default_seeds "
                f"{self.default_seeds}, got {self.max_seeds!r}"
            )
        unknown = sorted(set(self.sizes) - set(SIZES))
        scales = [v.scale if isinstance(v, Size) else v for v in self.sizes.values()]
        if unknown or not all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in scales):
            raise ValueError(f"study {self.name!r}: sizes are {SIZES}, scales > 0; got {dict(self.sizes)}")

    def size(self, name: str) -> Size:
        """The rung ``name`` of the ladder as a :class:`Size`."""
        value = self.sizes[name]
        return value if isinstance(value, Size) else Size(scale=float(value))

    def resolve(self, options: StudyOptions) -> StudyOptions:
        """``options`` with ``seeds`` (the start) and ``max_seeds`` (the cap; ``None`` when it is the
        start: a fixed number of seeds) filled in from the study's defaults; a cap below the start,
        or a size the study does not define, is an error."""
        seeds = options.seeds if options.seeds is not None else self.default_seeds
        cap = options.max_seeds if options.max_seeds is not None else (self.max_seeds or seeds)
        cap = max(cap, seeds) if options.max_seeds is None else cap
        if cap < seeds:
            raise ValueError(f"study {self.name!r}: max_seeds {cap} is below the {seeds} seeds to start with")
        if options.size is not None and options.size not in self.sizes:
            raise ValueError(
                f"study {self.name!r} has no size {options.size!r}: it defines "
                f"{', '.join(sorted(self.sizes, key=SIZES.index))}"
            )
        return dataclasses.replace(options, seeds=seeds, max_seeds=cap if cap > seeds else None)

    def specs(self, options: StudyOptions) -> list[RunSpec]:
        """The grid with seeds resolved (``options.seeds`` of them per cell; the runner asks for
        ``max_seeds``), ``size`` applied to ``scale``, and ``options.sets`` applied (a TOML study
        applied them to its text already); keys are checked to be unique."""
        options = self.resolve(options)
        rung = self.size(options.size) if options.size is not None else Size()
        options = dataclasses.replace(options, scale=options.scale * rung.scale)
        specs = self.grid(options)
        if rung.sets:
            specs = apply_to_specs(specs, rung.sets, study=f"{self.name} --size {options.size}")
        if options.sets and not (self.source and self.source.get("format") == "toml"):
            specs = apply_to_specs(specs, options.sets, study=self.name)
        keys = [s.key for s in specs]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"study {self.name!r}: duplicate run keys {dup[:5]}")
        for claim in self.claims:
            for side in (claim.a, claim.b):
                for cell in side.cells() if side is not None else ():
                    if not any(cell.own(s.group, s.params) for s in specs):
                        raise ValueError(
                            f"study {self.name!r}: claim {claim.id!r} side {cell.label!r} selects no run"
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
