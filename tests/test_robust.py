"""``--robust``: a study rerun on a second corpus, runs that read no text copied, claims marked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from normlab.cli import main
from normlab.studies import Better, Claim, RunSpec, Side, Study, StudyOptions, grid
from normlab.studies.robust import NOT_ROBUST, ROBUST, SAME_DATA, compare, run_robust, second_corpus
from normlab.train import LMTask, RunConfig, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread_plain_torch")

OTHER_TEXT = "".join(f"verse {i % 11}: and the light shone in the darkness\n" for i in range(300))


def _robust_study() -> Study:
    """Two groups: ``lm`` trains on the study's corpus, ``fixed`` always on Shakespeare (it reads
    no corpus option, as an image run would not)."""

    def make_grid(options: StudyOptions) -> list[RunSpec]:
        def make(*, seed: int, placement: str, on_corpus: bool) -> RunConfig:
            task = LMTask(
                **(options.corpus_fields() if on_corpus else {"corpus": "shakespeare"}),
                block_size=16,
                gpt={"n_layer": 2, "n_embd": 16, "n_head": 2, "placement": placement},
                eval_batches=1,
                eval_batch_size=4,
            )
            train = TrainConfig(steps=4, batch_size=4, lr=3e-3, seed=seed, log_every=2, eval_every=4)
            return RunConfig(task=task, train=train)

        specs = grid("lm", make, seeds=options.seed_list, placement=["pre", "post"], on_corpus=[True])
        specs += grid("fixed", make, seeds=options.seed_list, placement=["pre", "post"], on_corpus=[False])
        return specs

    def claim(group: str) -> Claim:
        return Claim(
            id=f"{group}-pre-beats-post",
            text=f"{group}: Pre-LN has a lower validation loss than Post-LN",
            paper="Xiong et al. 2020 (arXiv:2002.04745)",
            metric="val_loss",
            a=Side(label="Pre-LN", group=group, where={"placement": "pre"}),
            b=Side(label="Post-LN", group=group, where={"placement": "post"}),
            rule=Better(lower_is_better=True),
        )

    return Study(
        name="robust-toy",
        title="Robust toy",
        question="Do verdicts survive another corpus?",
        grid=make_grid,
        claims=(claim("lm"), claim("fixed")),
        default_seeds=2,
    )


def test_robust_reruns_on_the_second_corpus_and_copies_runs_that_read_no_text(
    tmp_path: Path, data_dir: Path
) -> None:
    other = tmp_path / "other.txt"
    other.write_text(OTHER_TEXT)
    out = tmp_path / "study"
    lines: list[str] = []
    results = run_robust(
        _robust_study(), out, options=StudyOptions(), corpus2=str(other), data_dir=data_dir,
        progress=False, plots=False, echo=lines.append,
    )  # fmt: skip
    robust = json.loads((out / "robust.json").read_text())
    assert robust["corpus2"] == str(other)
    marks = {c["id"]: c["robust"]["mark"] for c in results["claims"]}
    assert marks["fixed-pre-beats-post"] == SAME_DATA
    assert marks["lm-pre-beats-post"] in (ROBUST, NOT_ROBUST)
    # the fixed group's runs were copied, bit for bit, not retrained; the lm runs read the other text
    for key in ("fixed.placement-pre.on_corpus-False-s0", "fixed.placement-post.on_corpus-False-s1"):
        first, second = out / "runs" / key, out / "robust" / "runs" / key
        assert (second / "metrics.jsonl").read_bytes() == (first / "metrics.jsonl").read_bytes()
    key = "lm.placement-pre.on_corpus-True-s0"
    assert (out / "robust" / "runs" / key / "metrics.jsonl").read_bytes() != (
        out / "runs" / key / "metrics.jsonl"
    ).read_bytes()
    report = (out / "report.md").read_text()
    assert f"on {other}" in report and "Robustness (`--robust`)" in report and SAME_DATA in report
    # a rewritten report keeps the column
    assert main(["report", str(out)]) == 0
    assert "Robustness (`--robust`)" in (out / "report.md").read_text()


def test_a_claim_whose_verdict_flips_is_not_robust() -> None:
    def results(verdict: str) -> dict[str, Any]:
        return {"claims": [{"id": "c", "verdict": verdict, "measured": "m", "why": "w", "n": [2, 2]}]}

    def mark(first: str, second: str, same: set[str]) -> str:
        got = compare(results(first), results(second), same_data=same, corpora=("a", "b"))
        return str(got["claims"]["c"]["mark"])

    assert mark("reproduced", "reproduced", set()) == ROBUST
    assert mark("reproduced", "inconclusive", set()) == NOT_ROBUST
    assert mark("reproduced", "not reproduced", {"c"}) == SAME_DATA


def test_second_corpus_defaults_and_refuses_the_same_one() -> None:
    assert second_corpus("shakespeare", None) == "bible"
    assert second_corpus("bible", None) == "shakespeare"
    with pytest.raises(ValueError, match="is the corpus of the first run"):
        second_corpus("shakespeare", "shakespeare")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--corpus2", "bible"], "--corpus2 names the corpus of --robust; pass --robust too"),
        (["--robust", "--corpus2", "shakespeare"], "is the corpus of the first run"),
        (["--robust", "--corpus2", "/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
    ],
)
def test_robust_bad_input_is_one_error_before_any_run(
    tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["study", "quick", "--out", str(out), "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("normlab: error: ") and message in err[-1], err
    assert not out.exists()
