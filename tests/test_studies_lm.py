"""The language-model studies ``depth`` and ``warmup``: grids, metrics, probes, tiny end-to-end runs."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from normlab.models import GPT, GPTConfig
from normlab.studies import Study, StudyOptions, get_study, grid, run_study
from normlab.studies import depth as depth_mod
from normlab.studies import warmup as warmup_mod
from normlab.studies.depth import deep_angular, probe_removal, removal_deep_share
from normlab.studies.metrics import count_spikes, loss_spikes
from normlab.studies.warmup import last_fc2_grad_at_init, probe_init_grads
from normlab.train.probes import get_probe

pytestmark = pytest.mark.usefixtures("one_thread_plain_torch")


def _train(losses: list[float]) -> list[dict[str, Any]]:
    return [{"kind": "train", "step": 5 * (i + 1), "loss": v} for i, v in enumerate(losses)]


# --------------------------------------------------------------------------------------------
# Grids


def test_depth_grid_is_well_formed() -> None:
    study = get_study("depth")
    specs = study.specs(StudyOptions())
    assert len(specs) == 42 and len({s.cell for s in specs}) == 21
    assert Counter(s.group for s in specs) == {"L4": 16, "L12": 16, "L24": 10}
    assert {s.params["arch"] for s in specs if s.group == "L24"} == set(depth_mod.DEEP_ARCHS)
    for spec in specs:
        gpt = spec.config.task.gpt  # type: ignore[union-attr]
        assert gpt["n_layer"] == int(spec.group[1:])
        assert (gpt["placement"], gpt["norm"]) == depth_mod.ARCHS[spec.params["arch"]]
        assert "depth_removal" in spec.config.task.probes and spec.config.train.steps == depth_mod.STEPS
    assert {s.params["arch"] for s in specs} == {
        "pre",
        "lns",
        "post",
        "deepnorm",
        "mixln",
        "subln",
        "b2t",
        "dyt",
    }
    for claim in study.claims:  # each side picks one cell (a contrast two), all its seeds
        for side in (claim.a, claim.b):
            assert side is not None
            assert len([s for s in specs if side.selects(s.group, s.params)]) == 2 * len(side.cells())
            for cell in side.cells():
                assert len([s for s in specs if cell.own(s.group, s.params)]) == 2
    gain = next(c for c in study.claims if c.id == "lns-gain-grows")
    assert gain.a.minus is not None and gain.a.group == "L24" and gain.b is not None and gain.b.group == "L4"
    json.dumps({"claims": [c.to_dict() for c in study.claims], "runs": [s.config.to_dict() for s in specs]})
    scaled = study.specs(StudyOptions(scale=0.02, seeds=1))
    assert len(scaled) == 21 and {s.config.train.steps for s in scaled} == {round(0.02 * depth_mod.STEPS)}
    assert {s.config.train.warmup for s in scaled} == {1}
    with pytest.raises(ValueError, match="arch must be one of"):
        depth_mod._lm(StudyOptions(), 4)(seed=0, arch="nope")


def test_warmup_grid_is_well_formed() -> None:
    study = get_study("warmup")
    specs = study.specs(StudyOptions())
    assert len(specs) == 24 and len({s.cell for s in specs}) == 12
    lrs = {s.group: s.config.train.lr for s in specs}
    assert lrs == {"lr1e-03": warmup_mod.LR_LOW, "lr3e-03": warmup_mod.LR_HIGH}
    assert {s.config.train.warmup for s in specs} == {0, warmup_mod.WARMUP_SHORT, warmup_mod.WARMUP_LONG}
    for spec in specs:
        assert spec.config.train.warmup == spec.params["warmup"]
        assert spec.config.task.gpt["placement"] == spec.params["placement"]  # type: ignore[union-attr]
    for claim in study.claims:
        for side in (claim.a, claim.b):
            assert side is not None
            assert len([s for s in specs if side.selects(s.group, s.params)]) == 2
    json.dumps({"claims": [c.to_dict() for c in study.claims], "runs": [s.config.to_dict() for s in specs]})
    scaled = study.specs(StudyOptions(scale=0.1, seeds=1))
    short, long = (round(0.1 * w) for w in (warmup_mod.WARMUP_SHORT, warmup_mod.WARMUP_LONG))
    assert {s.config.train.warmup for s in scaled} == {0, short, long}  # warm-up scales with the run


# --------------------------------------------------------------------------------------------
# Metrics


def test_spikes_count_episodes_above_the_running_minimum() -> None:
    assert count_spikes([4.0, 3.0, 2.5, 2.4, 2.45, 2.3], threshold=0.3) == 0  # descent and noise
    assert count_spikes([3.0, 3.0, 3.0], threshold=0.3) == 0  # a plateau is no spike
    assert count_spikes([3.0, 2.0, 2.5, 2.6, 2.55, 2.0], threshold=0.3) == 1  # one episode, 3 records
    assert count_spikes([3.0, 2.0, 2.5, 2.0, 1.9, 2.5, 1.8], threshold=0.3) == 2
    assert count_spikes([2.0, 2.3], threshold=0.3) == 0  # exactly at the line: not above it
    assert count_spikes([], threshold=0.3) == 0
    with pytest.raises(ValueError, match="threshold must be > 0"):
        count_spikes([1.0], threshold=0.0)
    records = [{"kind": "start"}, *_train([3.0, 2.0, 2.9, 2.0]), {"kind": "eval", "val_loss": 9.0}]
    records.append({"kind": "train", "step": 99, "loss": math.nan})
    assert loss_spikes(records, {}) == 1.0
    assert loss_spikes([{"kind": "start"}], {}) is None


def test_removal_share_and_deep_angular_from_a_summary() -> None:
    summary = {"probe": {"removal_delta": [2.0, 1.0, 0.5, 0.5, -0.1, 0.0]}}
    assert removal_deep_share([], summary) == pytest.approx(0.5 / 4.0)
    assert removal_deep_share([], {"probe": {"removal_delta": [-1.0, 0.0]}}) is None
    assert removal_deep_share([], {"probe": {"removal_delta": [1.0, math.nan]}}) is None
    assert removal_deep_share([], {}) is None
    ang = [[0.0] * 5 for _ in range(5)]
    for i in range(4):
        ang[i][i + 1] = ang[i + 1][i] = 0.1 * (i + 1)
    assert deep_angular([], {"probe": {"angular": ang}}) == pytest.approx((0.3 + 0.4) / 2)
    assert deep_angular([], {}) is None
    assert last_fc2_grad_at_init([], {"probe": {"init_fc2_grad": [3.0, 1.5]}}) == 1.5
    assert last_fc2_grad_at_init([], {}) is None


# --------------------------------------------------------------------------------------------
# Probes


def _gpt(placement: str, n_layer: int = 3, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(
        GPTConfig(vocab_size=32, block_size=16, n_layer=n_layer, n_embd=32, n_head=4, placement=placement)
    )


def test_removal_probe_gives_zero_for_an_identity_block() -> None:
    model = _gpt("pre").eval()
    with torch.no_grad():  # both branches of block 1 output 0: x + 0 + 0 is the identity
        for name in ("attn.out_proj", "mlp.fc2"):
            layer = model.blocks[1].get_submodule(name)
            assert isinstance(layer, torch.nn.Linear) and layer.bias is not None
            layer.weight.zero_()
            layer.bias.zero_()
    idx = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(1))
    out = get_probe("depth_removal")(model, idx)
    assert get_probe("depth_removal") is probe_removal
    delta = out["removal_delta"]
    assert len(delta) == 3 and abs(delta[1]) < 1e-6
    assert abs(delta[0]) > 1e-4 and abs(delta[2]) > 1e-4
    with torch.no_grad():
        base = float(model(idx[:, :-1], idx[:, 1:]).loss)
    assert out["removal_base"] == pytest.approx(base, rel=1e-6)
    with pytest.raises(ValueError, match="needs a normlab GPT"):
        probe_removal(torch.nn.Linear(2, 2), idx)


def test_init_grads_probe_measures_a_fresh_init_and_leaves_the_model_alone() -> None:
    idx = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(2))
    model = _gpt("post", n_layer=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    out = probe_init_grads(model, idx)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    grads = out["init_fc2_grad"]
    assert len(grads) == 4 and all(math.isfinite(g) and g > 0 for g in grads)
    assert probe_init_grads(model, idx) == out  # the init is seeded by the model itself
    with torch.no_grad():
        model.wte.weight.add_(1.0)
    assert probe_init_grads(model, idx) != out  # another run's weights: another init
    with pytest.raises(ValueError, match="needs a normlab GPT"):
        probe_init_grads(torch.nn.Linear(2, 2), idx)


# --------------------------------------------------------------------------------------------
# Tiny end-to-end runs (the studies' own factories, scaled down, on a tiny corpus)


def test_depth_factory_runs_end_to_end(tmp_path: Path, data_dir: Path) -> None:
    real = depth_mod.STUDY

    def make_grid(options: StudyOptions) -> list[Any]:  # 2 blocks, named L4 / L24 so the claims apply
        specs = grid("L4", depth_mod._lm(options, 2), seeds=options.seed_list, arch=["pre", "lns"])
        return specs + grid("L24", depth_mod._lm(options, 2), seeds=options.seed_list, arch=["pre", "lns"])

    ids = ("lns-val-loss-24", "lns-gain-grows", "lns-deep-blocks-matter")
    toy = Study(
        name="depth-toy",
        title="toy",
        question="toy",
        grid=make_grid,
        claims=tuple(c for c in real.claims if c.id in ids),
        plots=real.plots[3:],
        metrics=real.metrics,
    )
    out = tmp_path / "depth"
    results = run_study(
        toy,
        out,
        options=StudyOptions(scale=0.005, seeds=2),
        data_dir=data_dir,
        progress=False,
        echo=lambda s: None,
    )
    assert results["run_counts"] == {"finished": 8, "unfinished": 0, "failed": 0}
    claims = {c["id"]: c for c in results["claims"]}
    assert tuple(claims) == ids
    runs = results["runs"]

    def val(group: str, arch: str, seed: int) -> float:
        return float(runs[f"{group}.arch-{arch}-s{seed}"]["metrics"]["val_loss"])

    # the contrast of contrasts, per seed: (Pre - LNS) at L24 against (Pre - LNS) at L4
    gains = {g: [val(g, "pre", s) - val(g, "lns", s) for s in (0, 1)] for g in ("L24", "L4")}
    grows = claims["lns-gain-grows"]
    assert grows["a"]["values"] == pytest.approx(gains["L24"]) and grows["b"]["values"] == pytest.approx(
        gains["L4"]
    )
    assert grows["n"] == [2, 2] and grows["a"]["runs"] == 4
    diff = [a - b for a, b in zip(gains["L24"], gains["L4"], strict=True)]
    assert grows["numbers"]["gain"] == pytest.approx(sum(diff) / 2)
    run = runs["L24.arch-lns-s1"]
    assert (
        run["steps"] == StudyOptions(scale=0.005).steps(depth_mod.STEPS)
        and len(run["probe"]["removal_delta"]) == 2
        and len(run["probe"]["resid_var"]) == 3
    )
    cell = results["cells"]["L24.arch-pre"]["metrics"]
    assert cell["loss_spikes"]["n"] == 2 and cell["val_loss"]["n"] == 2
    assert "removal_deep_share" in (out / "report.md").read_text()


def test_warmup_factory_runs_end_to_end(tmp_path: Path, data_dir: Path) -> None:
    real = warmup_mod.STUDY

    def make_grid(options: StudyOptions) -> list[Any]:
        return grid(
            "lr3e-03",
            warmup_mod._lm(options, warmup_mod.LR_HIGH),
            seeds=options.seed_list,
            placement=["post", "pre"],
            warmup=[0],
        )

    toy = Study(
        name="warmup-toy",
        title="toy",
        question="toy",
        grid=make_grid,
        claims=tuple(
            c for c in real.claims if c.id in ("pre-beats-post-no-warmup", "post-large-last-grad-at-init")
        ),
        metrics=real.metrics,
    )
    results = run_study(
        toy,
        tmp_path / "warmup",
        options=StudyOptions(scale=0.005, seeds=2),
        data_dir=data_dir,
        progress=False,
        plots=False,
        echo=lambda s: None,
    )
    assert results["run_counts"]["finished"] == 4
    grads = results["cells"]["lr3e-03.placement-post.warmup-0"]["metrics"]["last_fc2_grad_at_init"]
    assert grads["n"] == 2 and grads["values"][0] != grads["values"][1]  # two seeds, two inits
    assert len(results["claims"]) == 2 and all(c["verdict"] for c in results["claims"])
