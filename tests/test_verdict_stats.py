"""Verdict statistics: the interval rules against hand-computed values, the equivalence branch,
the success-rate rule, sequential seeding (with a fake training function) and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from normlab.cli import main
from normlab.studies import (
    Better,
    Claim,
    Exceeds,
    Rate,
    RunSpec,
    Side,
    Similar,
    Stats,
    Study,
    StudyOptions,
    get_study,
    grid,
    run_study,
)
from normlab.studies import runner as runner_mod
from normlab.studies.framework import rule_from_dict
from normlab.studies.stats import newcombe_interval, paired_interval, t_interval, wilson_interval
from normlab.train import LMTask, RunConfig, TrainConfig

# Student t quantiles from the published tables (two-sided 95% and 90%)
T975 = {2: 4.302653, 3: 3.182446, 4: 2.776445}
T95_4 = 2.131847


# --------------------------------------------------------------------------------------------
# Intervals


def test_t_interval_is_mean_plus_minus_t_se() -> None:
    mean, lo, hi = t_interval([1.0, 2.0, 3.0, 4.0]) or (0.0, 0.0, 0.0)
    se = math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3 / 4)  # sd 1.29099 / sqrt(4)
    assert mean == 2.5 and hi - mean == pytest.approx(T975[3] * se, abs=1e-5)
    assert lo == pytest.approx(2.5 - T975[3] * se, abs=1e-5)
    assert t_interval([5.0, 5.0]) == (5.0, 5.0, 5.0)  # no spread: a point interval
    assert t_interval([1.0]) is None
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\)"):
        t_interval([1.0, 2.0], level=95)


def test_paired_interval_is_the_t_interval_of_the_differences() -> None:
    d, _, hi = paired_interval([1.1, 2.11, 3.09], [1.0, 2.0, 3.0]) or (0.0, 0.0, 0.0)
    assert d == pytest.approx(0.1) and hi - d == pytest.approx(T975[2] * 0.01 / math.sqrt(3), abs=1e-6)
    with pytest.raises(ValueError, match="3 values on side A, 2 on side B"):
        paired_interval([1.0, 2.0, 3.0], [1.0, 2.0])


def test_wilson_and_newcombe_match_published_values() -> None:
    # Newcombe (1998), Stat. Med. 17:857, table I (Wilson) and table II example (a), method 10
    assert wilson_interval(81, 263)[1:] == pytest.approx((0.2553, 0.3662), abs=1e-4)  # type: ignore[index]
    assert wilson_interval(0, 10)[1:] == pytest.approx((0.0, 0.2775), abs=1e-4)  # type: ignore[index]
    assert wilson_interval(1, 10)[1:] == pytest.approx((0.0179, 0.4042), abs=1e-4)  # type: ignore[index]
    d, lo, hi = newcombe_interval(56, 70, 48, 80) or (0.0, 0.0, 0.0)
    assert d == pytest.approx(0.2) and (lo, hi) == pytest.approx((0.0524, 0.3339), abs=1e-4)
    assert wilson_interval(0, 0) is None
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        wilson_interval(3, 2)


# --------------------------------------------------------------------------------------------
# Better: the interval, min_effect, the equivalence branch

LOW, HIGH = Stats((1.0, 1.2, 1.1)), Stats((2.0, 2.2, 2.1))
# Welch: means 1.1 and 2.1, sd 0.1 each, se = sqrt(2 * 0.01 / 3) = 0.08165, df = 4
HALF = T975[4] * math.sqrt(2 * 0.01 / 3)  # 0.2267


def test_better_reproduced_when_the_welch_interval_excludes_zero() -> None:
    outcome = Better(lower_is_better=True).evaluate(LOW, HIGH)
    assert outcome.verdict == "reproduced"
    assert outcome.numbers["gain"] == pytest.approx(1.0)
    assert (outcome.numbers["low"], outcome.numbers["high"]) == pytest.approx((1 - HALF, 1 + HALF), abs=1e-5)
    assert "95% CI [0.7733, 1.227] excludes 0" in outcome.why
    assert Better(lower_is_better=False).evaluate(HIGH, LOW).verdict == "reproduced"
    # a 90% interval is narrower: t(4, 0.95) instead of t(4, 0.975)
    ninety = Better(lower_is_better=True, level=0.9).evaluate(LOW, HIGH)
    assert ninety.numbers["high"] - 1.0 == pytest.approx(T95_4 * math.sqrt(2 * 0.01 / 3), abs=1e-5)


def test_better_opposite_direction_is_not_reproduced() -> None:
    outcome = Better(lower_is_better=True).evaluate(HIGH, LOW)
    assert outcome.verdict == "not reproduced" and "opposite direction" in outcome.why


def test_better_min_effect_and_the_equivalence_branch() -> None:
    # the gain 1.0 has the interval [0.773, 1.227]
    assert Better(lower_is_better=True, min_effect=0.9).evaluate(LOW, HIGH).verdict == "reproduced"
    too_small = Better(lower_is_better=True, min_effect=1.1).evaluate(LOW, HIGH)
    assert too_small.verdict == "inconclusive" and "< min_effect 1.1" in too_small.why  # 1.227 > 1.1
    null = Better(lower_is_better=True, min_effect=1.3).evaluate(LOW, HIGH)
    assert null.verdict == "not reproduced" and "inside +-min_effect 1.3" in null.why

    a, b = Stats((1.0, 1.01, 1.02)), Stats((1.005, 1.015, 1.025))  # gain 0.005, CI [-0.0177, 0.0277]
    half = T975[4] * math.sqrt(2 * 1e-4 / 3)
    outcome = Better(lower_is_better=True, min_effect=0.05).evaluate(a, b)
    assert outcome.verdict == "not reproduced"  # a null result: the whole interval is inside +-0.05
    assert outcome.numbers["low"] == pytest.approx(0.005 - half, abs=1e-6)
    assert Better(lower_is_better=True, min_effect=0.02).evaluate(a, b).verdict == "inconclusive"
    assert Better(lower_is_better=True).evaluate(a, b).verdict == "inconclusive"  # holds 0


def test_better_needs_two_seeds_a_side_and_a_valid_rule() -> None:
    assert Better(lower_is_better=True).evaluate(Stats((1.0,)), HIGH).verdict == "inconclusive"
    assert Better(lower_is_better=True).evaluate(Stats(()), HIGH).verdict == "inconclusive"
    with pytest.raises(ValueError, match="min_effect must be"):
        Better(lower_is_better=True, min_effect=-0.1)
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\)"):
        Better(lower_is_better=True, level=1.0)


def test_paired_better_compares_seed_by_seed() -> None:
    b = Stats((1.0, 2.0, 3.0))  # a large seed-to-seed spread
    a = Stats((0.9, 1.89, 2.91))  # each seed 0.1 lower (+-0.01)
    assert Better(lower_is_better=True).evaluate(a, b).verdict == "inconclusive"
    paired = Better(lower_is_better=True, paired=True).evaluate(a, b)
    assert paired.verdict == "reproduced"
    assert paired.numbers["high"] - paired.numbers["gain"] == pytest.approx(T975[2] * 0.01 / math.sqrt(3))


# --------------------------------------------------------------------------------------------
# Similar and Exceeds


def test_similar_is_an_equivalence_test_on_the_interval() -> None:
    a, b = Stats((1.0, 1.01, 1.02)), Stats((1.005, 1.015, 1.025))  # diff -0.005, CI +-0.0227
    assert Similar(tol=0.03, relative=False).evaluate(a, b).verdict == "reproduced"
    assert Similar(tol=0.02, relative=False).evaluate(a, b).verdict == "inconclusive"
    far = Stats((1.2, 1.21, 1.22))  # diff 0.195, CI [0.172, 0.218]
    assert Similar(tol=0.1, relative=False).evaluate(far, b).verdict == "not reproduced"
    assert Similar(tol=0.2, relative=False).evaluate(far, b).verdict == "inconclusive"
    outcome = Similar(tol=0.03).evaluate(a, b)  # relative: 3% of b's mean 1.015
    assert outcome.numbers["tolerance"] == pytest.approx(0.03 * 1.015)
    assert outcome.numbers["diff"] == pytest.approx(-0.005)


def test_exceeds_uses_the_one_sample_t_interval() -> None:
    values = Stats((0.5, 0.55, 0.6))  # mean 0.55, sd 0.05, CI 0.55 +- 4.303 * 0.05 / sqrt(3)
    half = T975[2] * 0.05 / math.sqrt(3)
    outcome = Exceeds(value=0.4).evaluate(values, None)
    assert outcome.verdict == "reproduced" and outcome.numbers["low"] == pytest.approx(0.55 - half)
    assert Exceeds(value=0.45).evaluate(values, None).verdict == "inconclusive"  # 0.426 < 0.45
    assert Exceeds(value=0.7).evaluate(values, None).verdict == "not reproduced"
    assert Exceeds(value=0.7, above=False).evaluate(values, None).verdict == "reproduced"


# --------------------------------------------------------------------------------------------
# Rate


def test_rate_against_a_value_uses_wilson() -> None:
    stable = Stats((0.0,) * 10)  # diverged = 0 in 10 seeds: Wilson [0, 0.2775]
    outcome = Rate(rate=0.3).evaluate(stable, None)
    assert outcome.verdict == "reproduced" and outcome.numbers["high"] == pytest.approx(0.2775, abs=1e-4)
    assert Rate(rate=0.25).evaluate(stable, None).verdict == "inconclusive"
    assert Rate(rate=0.3).evaluate(Stats((1.0,) * 9 + (0.0,)), None).verdict == "not reproduced"
    # an event from a threshold: a final loss above 2.0 (left the plateau: below)
    losses = Stats((2.5, 2.6, 1.0, 2.7, 2.4, 2.8, 2.9, 2.5, 2.6, 2.7))
    assert Rate(threshold=2.0, rate=0.5, lower=False).evaluate(losses, None).numbers["events"] == 9
    assert Rate(threshold=2.0, above=False, rate=0.5).evaluate(losses, None).numbers["events"] == 1
    with pytest.raises(ValueError, match="rate must be in"):
        Rate(rate=1.5)


def test_rate_between_two_sides_uses_newcombe() -> None:
    a = Stats((1.0,) * 48 + (0.0,) * 32)  # 48 / 80 events
    b = Stats((1.0,) * 56 + (0.0,) * 14)  # 56 / 70 events
    outcome = Rate().evaluate(a, b)  # claim: a's rate is lower
    assert outcome.verdict == "reproduced"
    assert (outcome.numbers["low"], outcome.numbers["high"]) == pytest.approx((0.0524, 0.3339), abs=1e-4)
    assert Rate(lower=False).evaluate(a, b).verdict == "not reproduced"
    assert Rate(min_effect=0.25).evaluate(a, b).verdict == "inconclusive"  # gain 0.2 < 0.25
    same = Stats((1.0, 0.0, 0.0, 0.0))
    assert Rate().evaluate(same, same).verdict == "inconclusive"
    assert Rate().evaluate(Stats(()), same).verdict == "inconclusive"
    with pytest.raises(ValueError, match="not both"):
        Rate(rate=0.2).evaluate(same, same)


# --------------------------------------------------------------------------------------------
# The plan: rules round-trip, and older rules still load


def test_rules_round_trip_and_old_plans_load() -> None:
    rules = (Better(lower_is_better=True, paired=True, level=0.9), Rate(rate=0.1), Rate(min_effect=0.2))
    for rule in rules:
        assert rule_from_dict(json.loads(json.dumps(rule.to_dict()))) == rule
        assert "reproduced if" in rule.describe("diverged", "A", "B")
    old = rule_from_dict({"kind": "better", "lower_is_better": True, "k": 2.0, "min_effect": 0.01})
    assert isinstance(old, Better) and old.level == 0.95 and old.min_effect == 0.01
    assert old.evaluate(LOW, HIGH).verdict == "reproduced"  # evaluated with the interval


# --------------------------------------------------------------------------------------------
# Sequential seeding, with a fake run function

# the val_loss of each (placement, seed): pre vs post separate at 3 seeds, not at 2;
# peri is far from post at 2 seeds already; "flat" never separates from pre
VALUES = {
    "pre": [1.0, 1.1, 1.05, 1.0, 1.1],
    "post": [1.2, 1.3, 1.25, 1.2, 1.3],
    "peri": [5.0, 5.1, 5.05, 5.0, 5.1],
    "flat": [1.1, 1.0, 1.05, 1.09, 1.01],
}


def _make(*, seed: int, placement: str) -> RunConfig:
    task = LMTask(block_size=16, gpt={"n_layer": 1, "n_embd": 16, "n_head": 2}, eval_batches=1)
    return RunConfig(task=task, train=TrainConfig(steps=2, batch_size=2, lr=1e-3, seed=seed))


def _claim(cid: str, a: str, b: str) -> Claim:
    return Claim(
        id=cid,
        text=f"{a} beats {b}",
        paper="",
        metric="val_loss",
        a=Side(label=a, group="g", where={"placement": a}),
        b=Side(label=b, group="g", where={"placement": b}),
        rule=Better(lower_is_better=True),
    )


def _study(claims: tuple[Claim, ...], placements: list[str], **kw: Any) -> Study:
    def make_grid(options: StudyOptions) -> list[RunSpec]:
        return grid("g", _make, seeds=options.seed_list, placement=placements)

    return Study(name="seq", title="Sequential", question="?", grid=make_grid, claims=claims, **kw)


@pytest.fixture
def fake_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace training by writing the run's VALUES; returns the keys trained, in order."""
    trained: list[str] = []

    def fake(spec: RunSpec, directory: str, *args: Any) -> tuple[str, dict[str, Any], None, float]:
        study_dir = Path(directory).parents[1]
        plan = json.loads((study_dir / "plan.json").read_text())
        assert "sequential" in plan  # the stopping rule is on disk before any run
        # and the round's schedule before its runs (a resume goes on with the same round)
        assert spec.seed < json.loads((study_dir / "seeds.json").read_text())["cells"][spec.cell]
        value = VALUES[spec.params["placement"]][spec.seed]
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 2, "val_loss": value}) + "\n")
        (path / "result.json").write_text("{}")
        trained.append(spec.key)
        return spec.key, {"final": {"val_loss": value}}, None, 0.0

    monkeypatch.setattr(runner_mod, "_run_one", fake)
    monkeypatch.setattr(runner_mod, "_prepare_data", lambda specs, data_dir, echo: None)
    return trained


QUIET: dict[str, Any] = {"progress": False, "plots": False, "echo": lambda s: None}


def test_sequential_seeding_stops_when_every_claim_is_conclusive(
    tmp_path: Path, fake_runs: list[str]
) -> None:
    claims = (_claim("pre-post", "pre", "post"), _claim("post-peri", "post", "peri"))
    study = _study(claims, ["pre", "post", "peri"])
    out = tmp_path / "s"
    results = run_study(study, out, options=StudyOptions(seeds=2, max_seeds=5), **QUIET)
    verdicts = {c["id"]: (c["verdict"], c["n"]) for c in results["claims"]}
    # post-peri is conclusive at 2 seeds; pre-post needs a third seed on pre and post, and peri
    # (a cell of post-peri only) is not grown
    assert verdicts == {"pre-post": ("reproduced", [3, 3]), "post-peri": ("reproduced", [3, 2])}
    assert sorted(fake_runs[6:]) == ["g.placement-post-s2", "g.placement-pre-s2"] and len(fake_runs) == 8
    assert json.loads((out / "seeds.json").read_text())["cells"] == {
        "g.placement-pre": 3,
        "g.placement-post": 3,
        "g.placement-peri": 2,
    }
    plan = json.loads((out / "plan.json").read_text())
    assert plan["sequential"]["start_seeds"] == 2 and plan["sequential"]["max_seeds"] == 5
    levels = {c["id"]: c["level"] for c in plan["sequential"]["claims"]}
    assert levels == {"pre-post": 0.95, "post-peri": 0.95}
    assert len(plan["runs"]) == 15  # every run the cap allows is planned
    assert results["run_counts"] == {"finished": 8, "unfinished": 0, "failed": 0, "not needed": 7}
    measured = results["claims"][0]["measured"]
    assert "pre 1.05 ± 0.05 (n=3) vs post 1.25 ± 0.05 (n=3)" in measured  # "not needed" is not unfinished
    report = (out / "report.md").read_text()
    assert "- **pre-post**: gain = how much lower" in report
    assert "Here: n = 3 vs 3; gain 0.2, 95% CI" in report
    assert "start_seeds = 2, max_seeds = 5" in report

    # resume: nothing to train, the same verdicts
    fake_runs.clear()
    again = run_study(study, out, options=StudyOptions(seeds=2, max_seeds=5), resume=True, **QUIET)
    assert fake_runs == [] and again["claims"] == results["claims"]
    # an interrupted round: a run of seed 2 lost its result; resume trains it alone
    (out / "runs" / "g.placement-pre-s2" / "result.json").unlink()
    run_study(study, out, options=StudyOptions(seeds=2, max_seeds=5), resume=True, **QUIET)
    assert fake_runs == ["g.placement-pre-s2"]
    with pytest.raises(ValueError, match="stopping rule of sequential seeding changed"):
        run_study(study, out, options=StudyOptions(seeds=3, max_seeds=5), resume=True, **QUIET)


def test_sequential_seeding_stops_at_the_cap(tmp_path: Path, fake_runs: list[str]) -> None:
    study = _study((_claim("pre-flat", "pre", "flat"),), ["pre", "flat"], max_seeds=4)
    results = run_study(study, tmp_path / "s", **QUIET)  # the study's own cap
    claim = results["claims"][0]
    assert claim["verdict"] == "inconclusive" and claim["n"] == [4, 4] and len(fake_runs) == 8
    assert results["run_counts"]["not needed"] == 0


def test_fixed_seeds_train_once(tmp_path: Path, fake_runs: list[str]) -> None:
    study = _study((_claim("pre-flat", "pre", "flat"),), ["pre", "flat"])
    results = run_study(study, tmp_path / "s", options=StudyOptions(seeds=2), **QUIET)
    assert len(fake_runs) == 4 and results["claims"][0]["n"] == [2, 2]
    assert results["run_counts"] == {"finished": 4, "unfinished": 0, "failed": 0}


def test_a_seeds_cap_below_two_is_refused_before_any_run(tmp_path: Path, fake_runs: list[str]) -> None:
    with pytest.raises(ValueError, match="max_seeds must be an int >= 2"):
        StudyOptions(max_seeds=1)
    with pytest.raises(ValueError, match="max_seeds 2 is below the 3 seeds"):
        StudyOptions(seeds=3, max_seeds=2)
    with pytest.raises(ValueError, match="max_seeds must be >= 2"):
        _study((), ["pre"], max_seeds=1)
    study = _study((), ["pre"], default_seeds=3)
    with pytest.raises(ValueError, match="max_seeds 2 is below the 3 seeds"):
        run_study(study, tmp_path / "s", options=StudyOptions(max_seeds=2), **QUIET)
    assert fake_runs == [] and not (tmp_path / "s").exists()


# --------------------------------------------------------------------------------------------
# Command line: --corpus FILE, --max-seeds, --size


def test_corpus_file_is_a_text_source(tmp_path: Path) -> None:
    text = tmp_path / "mine.txt"
    text.write_text("To be, or not to be: that is the question.\n" * 20, encoding="utf-8")
    specs = get_study("quick").specs(StudyOptions(seeds=1, corpus=str(text)))
    lm = [s for s in specs if s.config.kind == "lm"]
    assert lm and all(s.config.task.data == {"kind": "text", "path": str(text.resolve())} for s in lm)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "is neither a built-in corpus nor an existing file"),
        (b"", "holds no text"),
        (b"abc\x00def", "a NUL byte at offset 3"),
        (b"caf\xe9 au lait", "is not UTF-8 text"),
    ],
)
def test_cli_bad_corpus_file_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, message: str
) -> None:
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "out"
    assert main(["study", "quick", "--corpus", str(path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_seeds_cap_and_size_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["study", "quick", "--max-seeds", "1", "--out", str(out)]) == 2
    assert "max_seeds must be an int >= 2" in capsys.readouterr().err
    assert main(["study", "quick", "--size", "huge", "--out", str(out)]) == 2
    assert "size must be one of tiny, small, base, got 'huge'" in capsys.readouterr().err
    assert main(["study", "dyt", "--size", "tiny", "--out", str(out)]) == 2
    assert "study 'dyt' has no size 'tiny': it defines small, base" in capsys.readouterr().err
    assert not out.exists()


def test_size_names_a_scale_the_study_defines(capsys: pytest.CaptureFixture[str]) -> None:
    quick = get_study("quick")
    tiny = quick.specs(StudyOptions(seeds=1, size="tiny"))
    assert [s.config for s in tiny] == [s.config for s in quick.specs(StudyOptions(seeds=1, scale=0.1))]
    both = quick.specs(StudyOptions(seeds=1, size="tiny", scale=0.5))  # size and scale multiply
    assert [s.config for s in both] == [s.config for s in quick.specs(StudyOptions(seeds=1, scale=0.05))]
    with pytest.raises(ValueError, match="study 'dyt' has no size 'tiny': it defines small, base"):
        get_study("dyt").specs(StudyOptions(size="tiny"))
    assert main(["study", "list"]) == 0
    printed = capsys.readouterr().out
    assert "--size: tiny (scale 0.1); small (scale 1); base (scale 12.5, model.n_embd=256" in printed


def test_a_plan_with_the_former_k_rule_is_reported_with_the_interval_rule(
    tmp_path: Path, fake_runs: list[str]
) -> None:
    from normlab.studies import collect

    study = _study((_claim("pre-post", "pre", "post"),), ["pre", "post"])
    out = tmp_path / "s"
    run_study(study, out, options=StudyOptions(seeds=3), **QUIET)
    plan = json.loads((out / "plan.json").read_text())
    plan["claims"][0]["rule"] = {"kind": "better", "lower_is_better": True, "k": 2.0, "min_effect": 0.0}
    plan["claims"][0]["rule_text"] = "by more than 2 x pooled sd"
    del plan["sequential"]  # an older plan has no stopping rule
    (out / "plan.json").write_text(json.dumps(plan))
    claim = collect(out)["claims"][0]
    assert claim["verdict"] == "reproduced" and claim["n"] == [3, 3]
    assert "used the deprecated k x sd margin; evaluated with the interval rule" in claim["rule"]
    assert "'by more than 2 x pooled sd'" in claim["rule"]


def test_the_cli_names_the_sizes_of_the_framework() -> None:
    from normlab.cli import study as cli_study
    from normlab.studies.framework import SIZES

    assert cli_study.SIZES == SIZES
