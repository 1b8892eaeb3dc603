"""The image studies ``small-batch`` and ``groupsize``: grids, probes, norm hooks, tiny end-to-end runs."""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normlab
from normlab.data.images import ImageSet
from normlab.models import BasicBlock, ConvNet, ConvNetConfig
from normlab.models.convnet import make_conv_norm
from normlab.studies import StudyOptions, get_study, run_study
from normlab.studies import groupsize as gs
from normlab.studies import small_batch as sb
from normlab.studies.framework import Study
from normlab.studies.plan import make_plan
from normlab.train import ImageTask, RunConfig, TrainConfig, train
from normlab.train.tasks import ImageRuntime

pytestmark = pytest.mark.usefixtures("one_thread_plain_torch")


def _images(n_train: int = 64, n_test: int = 32, seed: int = 0) -> tuple[np.ndarray, ...]:
    """28x28 images whose class is where a bright square sits, plus noise."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    y = np.arange(n) % 10
    x = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(y):
        r, col = divmod(int(c), 5)
        x[i, 4 + 10 * r : 12 + 10 * r, 1 + 5 * col : 5 + 5 * col] = 230
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data directory holding a tiny Fashion-MNIST in the original IDX ``.gz`` format."""
    root = tmp_path / "data"
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True)
    x_train, y_train, x_test, y_test = _images()
    for name, x, y in (("train", x_train, y_train), ("t10k", x_test, y_test)):
        with gzip.open(folder / f"{name}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, len(x), 28, 28) + x.tobytes())
        with gzip.open(folder / f"{name}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, len(y)) + y.astype(np.uint8).tobytes())
    return root


def _runtime(config: RunConfig) -> ImageRuntime:
    images = ImageSet.from_arrays(*_images())
    assert isinstance(config.task, ImageTask)
    return ImageRuntime(config.task, images, seed=config.train.seed, batch_size=config.train.batch_size)


def _config(norm: str, *, steps: int, batch_size: int = 8, lr: float = 0.05, **kwargs: Any) -> RunConfig:
    task = ImageTask(n_test=16, convnet={"widths": (4, 8), "depth": 1, "norm": norm, "norm_kwargs": kwargs})
    return RunConfig(
        task=task, train=TrainConfig(steps=steps, batch_size=batch_size, lr=lr, log_every=1, ckpt_every=0)
    )


# --------------------------------------------------------------------------------------------
# Grids


def test_small_batch_grid_is_well_formed() -> None:
    study = get_study("small-batch")
    specs = study.specs(StudyOptions())
    assert len(specs) == 8 * 4 * 2 and len({s.cell for s in specs}) == 32
    for spec in specs:
        cfg, b = spec.config, spec.params["batch_size"]
        assert isinstance(cfg.task, ImageTask)
        assert cfg.train.lr == pytest.approx(sb.LR_PER_IMAGE * b)
        assert cfg.train.steps * b == sb.EPOCHS * sb.N_TRAIN  # equal epochs: the same images
        assert cfg.task.convnet["norm"] == spec.params["norm"]
        assert dict(cfg.task.convnet["norm_kwargs"]) == sb.norm_kwargs(spec.params["norm"], b)
    assert sb.norm_kwargs("bln", 8) == {"batch_size": 8}
    for claim in study.claims:  # every side selects both seeds of one cell
        for side in (claim.a, claim.b):
            assert side is not None
            chosen = [s for s in specs if side.selects(s.group, s.params)]
            assert len(chosen) == 2 and len({s.cell for s in chosen}) == 1, claim.id
    json.dumps(make_plan(study, StudyOptions(seeds=2), specs), allow_nan=False)
    # every cell's model builds, with its method's options
    for spec in specs[::2]:
        assert isinstance(spec.config.task, ImageTask)
        ConvNet(spec.config.task.convnet_config(in_channels=1, num_classes=10))
    # --scale shrinks the training subset, so every run still lasts whole epochs
    small = study.specs(StudyOptions(scale=0.25))
    assert all(getattr(s.config.task, "n_train", None) == 256 for s in small)
    assert all(s.config.train.steps * s.params["batch_size"] == 512 for s in small)


def test_groupsize_grid_is_well_formed() -> None:
    study = get_study("groupsize")
    specs = study.specs(StudyOptions())
    groups = {g: [s for s in specs if s.group == g] for g in ("init", "train", "highlr")}
    assert [len(v) for v in groups.values()] == [12, 12, 6]
    assert all(s.config.train.steps == 1 and s.config.train.lr == gs.INIT_LR for s in groups["init"])
    assert all(s.config.train.lr == gs.HIGH_LR for s in groups["highlr"])
    for spec in specs:
        task = spec.config.task
        assert isinstance(task, ImageTask) and task.probes == (gs.PROBE,)
        model = ConvNet(task.convnet_config(in_channels=1, num_classes=10))
        sizes = {m.num_channels // m.num_groups for m in model.modules() if isinstance(m, normlab.GroupNorm)}
        g = spec.params["group_size"]
        assert sizes == ({g} if g is not None else {16, 32, 64})  # LayerNorm: one group a layer
    for claim in study.claims:
        for side in (claim.a, claim.b):
            assert side is not None
            assert len([s for s in specs if side.selects(s.group, s.params)]) == 2, claim.id
    json.dumps(make_plan(study, StudyOptions(seeds=2), specs), allow_nan=False)


# --------------------------------------------------------------------------------------------
# ConvNet: group size and CBN attachment


def test_group_size_sets_the_channels_per_group() -> None:
    norm = make_conv_norm("groupnorm", 32, group_size=4)
    assert isinstance(norm, normlab.GroupNorm) and norm.num_groups == 8
    assert make_conv_norm("gn", 16, group_size=1).num_groups == 16
    model = ConvNet(ConvNetConfig(widths=(8, 16), depth=1, norm="groupnorm", norm_kwargs={"group_size": 2}))
    assert [m.num_groups for m in model.modules() if isinstance(m, normlab.GroupNorm)] == [4, 8]
    with pytest.raises(ValueError, match="group_size must be a positive int dividing every width"):
        make_conv_norm("groupnorm", 12, group_size=8)
    with pytest.raises(ValueError, match="group_size is a GroupNorm option"):
        make_conv_norm("batchnorm", 16, group_size=4)
    with pytest.raises(ValueError, match="group_size or num_groups, not both"):
        make_conv_norm("groupnorm", 16, group_size=4, num_groups=4)


@pytest.mark.parametrize("arch", ["plain", "resnet"])
def test_cbn_is_attached_to_the_conv_before_it(arch: str) -> None:
    model = ConvNet(ConvNetConfig(arch=arch, widths=(4, 8), depth=1, norm="cbn"))  # type: ignore[arg-type]
    pairs = []
    for module in model.modules():
        children = list(module.children())
        pairs += [
            (a, b) for a, b in itertools.pairwise(children) if isinstance(b, normlab.CrossIterationBatchNorm)
        ]
    cbns = [m for m in model.modules() if isinstance(m, normlab.CrossIterationBatchNorm)]
    assert cbns and all(m.weight_source is not None for m in cbns)
    assert all(b.weight_source is a for a, b in pairs)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert all(b.norm1.weight_source is b.conv1 and b.norm2.weight_source is b.conv2 for b in blocks)
    assert not any("weight_source" in k for k in model.state_dict())  # referenced, not registered


# --------------------------------------------------------------------------------------------
# The runtime's hooks: BLN epochs, MBN's second forward


def test_bln_epochs_are_closed_at_every_epoch_end() -> None:
    task = ImageTask(
        n_train=32,
        n_test=16,
        convnet={"widths": (4,), "depth": 1, "norm": "bln", "norm_kwargs": {"batch_size": 8}},
    )
    runtime = ImageRuntime(task, ImageSet.from_arrays(*_images()), seed=0, batch_size=8)
    assert runtime.steps_per_epoch == 4
    torch.manual_seed(0)
    model = runtime.build_model()
    hooks = normlab.norms.TrainingHooks(model, steps_per_epoch=runtime.steps_per_epoch)
    bln = next(m for m in model.modules() if isinstance(m, normlab.BatchLayerNorm))
    assert isinstance(model, ConvNet)
    conv = model.features[0]
    first_epoch = []
    for step in range(6):  # one epoch and a half, weights fixed
        x, y = runtime.batch(step)
        runtime.loss(model, (x, y))
        runtime.loss(model, (x, y))  # two micro-batches of one step
        hooks.after_step(model, step + 1)
        if step < 4:
            first_epoch.append(torch.var_mean(conv(x).detach(), dim=0, correction=0))
        want = 0 if step == 3 else 2 * (step - 3) if step > 3 else 2 * (step + 1)
        assert int(bln.batches_accumulated) == want, step
    means = torch.stack([m for _, m in first_epoch]).mean(0)
    torch.testing.assert_close(bln.moving_batch_mean, means)  # the first epoch, closed after step 4
    runtime.evaluate(model.eval())  # mid-epoch: the open epoch stays open
    assert int(bln.batches_accumulated) == 4
    for step in (6, 7):
        runtime.loss(model.train(), runtime.batch(step))
        hooks.after_step(model, step + 1)
    assert int(bln.batches_accumulated) == 0 and not torch.equal(bln.moving_batch_mean, means)  # type: ignore[arg-type]


def test_a_bln_run_evaluates_with_its_last_epoch(tmp_path: Path) -> None:
    task = ImageTask(
        n_train=32,
        n_test=16,
        convnet={"widths": (4,), "depth": 1, "norm": "bln", "norm_kwargs": {"batch_size": 8}},
    )
    config = RunConfig(task=task, train=TrainConfig(steps=8, batch_size=8, lr=0.01, ckpt_every=0))
    runtime = ImageRuntime(task, ImageSet.from_arrays(*_images()), seed=0, batch_size=8)
    summary = train(config, tmp_path / "bln", task=runtime)
    state = torch.load(tmp_path / "bln" / "final.pt", weights_only=True)
    assert int(state["features.1.batches_accumulated"]) == 0
    assert float(state["features.1.moving_batch_var"].abs().sum()) > 0
    assert 0.0 <= summary["final"]["test_acc"] <= 1.0


@pytest.mark.parametrize("accum", [1, 2])
def test_mbn_double_forward_records_every_batch_under_the_updated_weights(tmp_path: Path, accum: int) -> None:
    task = ImageTask(
        n_test=16,
        convnet={
            "widths": (4,),
            "depth": 1,
            "norm": "mbn",
            "norm_kwargs": {"double_forward": True, "eval_stats": "memory"},
        },
    )
    steps = 5
    config = RunConfig(
        task=task, train=TrainConfig(steps=steps, batch_size=8, accum_steps=accum, lr=0.1, ckpt_every=0)
    )
    runtime = _runtime(config)
    train(config, tmp_path / "run", task=runtime)
    state = torch.load(tmp_path / "run" / "final.pt", weights_only=True)
    # one second pass per micro-batch of every step, right after its optimizer step
    assert int(state["features.1.num_batches_tracked"]) == steps * accum
    model = runtime.build_model()
    assert isinstance(model, ConvNet)
    model.load_state_dict(state)
    x, _ = runtime.batch(steps - 1)
    last = x[len(x) - len(x) // accum :]  # the last micro-batch, seen by the final weights
    want = model.features[0](last).detach().mean(dim=(0, 2, 3))
    torch.testing.assert_close(state["features.1.memory_mean"][0], want)


def test_models_without_these_norms_are_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hooks are keyed on the layers: a BatchNorm run is the same with them switched off."""
    config = _config("batchnorm", steps=4)
    train(config, tmp_path / "hooks", task=_runtime(config))
    monkeypatch.setattr(normlab.norms.TrainingHooks, "after_step", lambda self, model, done: None)
    train(config, tmp_path / "none", task=_runtime(config))
    a = torch.load(tmp_path / "hooks" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "none" / "final.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------
# The group-size probe


def _small(group_size: int | None) -> ConvNet:
    opts = gs.convnet_options(group_size)
    opts["widths"] = (4, 8)
    opts["depth"] = 1
    torch.manual_seed(0)
    return ConvNet(ConvNetConfig(**opts)).eval()


def test_probe_identical_samples_are_perfectly_correlated() -> None:
    x = torch.randn(1, 1, 12, 12).expand(6, 1, 12, 12).contiguous()
    with torch.no_grad():  # as the loop calls it
        out = gs.probe_groupsize(_small(2), x)
    assert len(out["act_corr"]) == 2 and len(out["grad_norm"]) == 2
    assert out["act_corr"] == pytest.approx([1.0, 1.0], abs=1e-6)


def test_probe_gradient_norms_match_autograd_and_leave_the_model_alone() -> None:
    model = _small(1)
    x = torch.randn(5, 1, 12, 12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out = gs.probe_groupsize(model, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    outputs: list[Tensor] = []
    handles = [c.register_forward_hook(lambda m, a, o: outputs.append(o)) for c in convs]
    y = torch.randint(0, 10, (5,), generator=torch.Generator().manual_seed(0))
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, outputs)
    for h in handles:
        h.remove()
    assert out["grad_norm"] == pytest.approx([float(g.norm()) for g in grads], rel=1e-5)
    summary = {"probe": out}
    assert gs.grad_ratio([], summary) == pytest.approx(out["grad_norm"][0] / out["grad_norm"][1])
    assert gs.act_corr([], summary) == pytest.approx(sum(out["act_corr"]) / 2)
    assert (
        gs.act_corr([], {"probe": {}}) is None and gs.grad_ratio([], {"probe": {"grad_norm": [1.0]}}) is None
    )
    with pytest.raises(ValueError, match="needs a normlab ConvNet"):
        gs.probe_groupsize(nn.Linear(3, 3), x)


# --------------------------------------------------------------------------------------------
# Tiny end-to-end studies on synthetic images


def _toy(study: Study, keep: Any, claim_ids: set[str]) -> Study:
    return dataclasses.replace(
        study,
        name=f"toy-{study.name}",
        grid=lambda options: [s for s in study.grid(options) if keep(s)],
        claims=tuple(c for c in study.claims if c.id in claim_ids),
    )


def test_small_batch_end_to_end(tmp_path: Path, data_dir: Path) -> None:
    study = _toy(
        get_study("small-batch"),
        lambda s: (
            s.params["batch_size"] == 2
            and s.params["norm"] in ("batchnorm", "groupnorm", "bln", "mbn", "cbn")
        ),
        {"gn-beats-bn-batch2", "bln-beats-bn-batch2", "mbn-beats-bn-batch2", "cbn-beats-bn-batch2"},
    )
    options = StudyOptions(scale=1 / 64, images="fashion-mnist", max_seeds=2)  # 16 images, 2 epochs
    results = run_study(
        study, tmp_path / "out", options=options, data_dir=data_dir, progress=False, echo=lambda s: None
    )
    assert len(results["runs"]) == 10 and not results.get("failed_runs")
    assert {c["verdict"] for c in results["claims"]} <= {"reproduced", "not reproduced", "inconclusive"}
    assert len(results["claims"]) == 4 and all(c["a"]["n"] == 2 for c in results["claims"])
    assert (tmp_path / "out" / "plots").is_dir() and list((tmp_path / "out" / "plots").glob("*.png"))


def test_groupsize_end_to_end(tmp_path: Path, data_dir: Path) -> None:
    study = _toy(
        get_study("groupsize"),
        lambda s: s.params["group_size"] in (1, 4, None),
        {c.id for c in get_study("groupsize").claims} - {"corr-rises-with-size"},
    )
    options = StudyOptions(scale=0.01, images="fashion-mnist", max_seeds=2)  # 3 training steps
    results = run_study(
        study,
        tmp_path / "out",
        options=options,
        data_dir=data_dir,
        progress=False,
        plots=False,
        echo=lambda s: None,
    )
    assert not results.get("failed_runs") and len(results["claims"]) == len(study.claims)
    by_id = {c["id"]: c for c in results["claims"]}
    assert all(math.isfinite(v) for v in by_id["corr-ln-above-in"]["a"]["values"])
    assert all(v > 0 for v in by_id["grad-ratio-in-above-ln"]["a"]["values"])
