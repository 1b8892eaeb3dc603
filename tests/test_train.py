"""The training loop: schedules, JSONL logs, configs, determinism, in-process resume, aux losses."""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import normlab
from normlab.data import ImageSet, TextCorpus
from normlab.train import (
    ImageRuntime,
    ImageTask,
    JsonlLogger,
    LMRuntime,
    LMTask,
    RunConfig,
    SingleProcess,
    TrainConfig,
    Trainer,
    config_hash,
    load_state,
    lr_factor,
    read_jsonl,
    summarize,
    train,
)
from normlab.train import state as state_mod

TEXT = "".join(f"LINE {i % 7}: the quick brown fox jumps over the lazy dog\n" for i in range(400))
TINY_GPT = {"n_layer": 2, "n_embd": 16, "n_head": 2}


pytestmark = pytest.mark.usefixtures("one_thread_plain_torch")


def lm_config(*, dropout: float = 0.0, **train: Any) -> RunConfig:
    opts: dict[str, Any] = {"steps": 12, "batch_size": 4, "lr": 3e-3, "log_every": 1, "eval_every": 6}
    opts.update(train)
    gpt = {**TINY_GPT, "dropout": dropout}  # dropout draws from torch's RNG: resume must restore it
    task = LMTask(block_size=16, gpt=gpt, eval_batches=2, eval_batch_size=4)
    return RunConfig(task=task, train=TrainConfig(**opts))


def lm_runtime(config: RunConfig) -> LMRuntime:
    assert isinstance(config.task, LMTask)
    corpus = TextCorpus.from_text(TEXT)
    return LMRuntime(config.task, corpus, seed=config.train.seed, batch_size=config.train.batch_size)


def train_records(path: Path) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(path / "metrics.jsonl") if r["kind"] in ("train", "eval")]


# --------------------------------------------------------------------------------------------


def test_schedules() -> None:
    kw: dict[str, Any] = {"total": 101, "warmup": 10}
    assert lr_factor(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(9, schedule="cosine", **kw) == 1.0
    assert lr_factor(10, schedule="cosine", min_ratio=0.1, **kw) == 1.0
    assert lr_factor(100, schedule="cosine", min_ratio=0.1, **kw) == pytest.approx(0.1)
    assert lr_factor(55, schedule="cosine", min_ratio=0.0, **kw) == pytest.approx(0.5, abs=0.02)
    assert lr_factor(100, schedule="linear", min_ratio=0.0, **kw) == pytest.approx(0.0)
    assert lr_factor(39, schedule="inverse_sqrt", **kw) == pytest.approx(0.5)  # sqrt(10 / 40)
    assert lr_factor(0, schedule="constant", total=5) == 1.0  # warmup 0: full lr at once
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_factor(0, schedule="step", total=5)


def test_jsonl_tolerates_a_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    with JsonlLogger.open(path) as log:
        log.log({"kind": "train", "step": 1, "loss": 2.0})
        log.log({"kind": "train", "step": 2, "loss": float("nan")})
        assert len(read_jsonl(path)) == 2  # flushed at every write, readable while open
    with path.open("a") as f:
        f.write('{"kind": "train", "step": 3, "lo')  # a kill mid-write
    records = read_jsonl(path)
    assert [r["step"] for r in records] == [1, 2] and records[1]["loss"] is None
    with JsonlLogger.open(path, keep_until_step=1) as log:  # resume from step 1: drop 2 and the stub
        log.log({"kind": "train", "step": 2, "loss": 1.5})
    assert [(r["step"], r["loss"]) for r in read_jsonl(path)] == [(1, 2.0), (2, 1.5)]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_jsonl(path)


def test_configs_serialize_hash_and_validate() -> None:
    config = lm_config()
    again = RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and config_hash(again) == config_hash(config)
    assert config_hash(config.with_train(seed=1)) != config_hash(config)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        TrainConfig(steps=1, batch_size=1, lr=0.0)
    with pytest.raises(ValueError, match="unknown placement"):
        LMTask(gpt={"placement": "sideways"})
    with pytest.raises(ValueError, match="must not set 'vocab_size'"):
        LMTask(gpt={"vocab_size": 3})
    with pytest.raises(ValueError, match="dataset must be one of"):
        ImageTask(dataset="cifar10")


def test_same_seed_same_run_other_seed_other_run(tmp_path: Path) -> None:
    config = lm_config()
    a = train(config, tmp_path / "a", task=lm_runtime(config))
    b = train(config, tmp_path / "b", task=lm_runtime(config))
    other = config.with_train(seed=1)
    c = train(other, tmp_path / "c", task=lm_runtime(other))
    assert train_records(tmp_path / "a") == train_records(tmp_path / "b")
    assert train_records(tmp_path / "a") != train_records(tmp_path / "c")
    assert a["final"]["val_loss"] == b["final"]["val_loss"] != c["final"]["val_loss"]
    assert a["steps"] == 12 and not a["diverged"] and len(a["probe"]["resid_var"]) == 3
    assert (tmp_path / "a" / "result.json").is_file() and not (tmp_path / "a" / "checkpoint.pt").exists()
    # a finished run is not trained again
    assert train(config, tmp_path / "a", task=lm_runtime(config)) == json.loads(
        (tmp_path / "a" / "result.json").read_text()
    )


class _CrashError(RuntimeError):
    pass


def test_in_process_resume_is_bit_exact(tmp_path: Path) -> None:
    config = lm_config(steps=20, ckpt_every=5, log_every=1, eval_every=5, dropout=0.1)
    train(config, tmp_path / "straight", task=lm_runtime(config))

    def crash_at_13(step: int) -> None:
        if step == 13:
            raise _CrashError

    with pytest.raises(_CrashError):
        train(config, tmp_path / "resumed", task=lm_runtime(config), on_step=crash_at_13)
    state = load_state(tmp_path / "resumed" / "checkpoint.pt", config_hash=config_hash(config))
    assert state["step"] == 10
    with pytest.raises(ValueError, match="configuration changed"):
        load_state(tmp_path / "resumed" / "checkpoint.pt", config_hash="0" * 64)
    train(config, tmp_path / "resumed", task=lm_runtime(config))
    assert train_records(tmp_path / "resumed") == train_records(tmp_path / "straight")
    a = torch.load(tmp_path / "straight" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "final.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kinds = [r["kind"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")]
    assert kinds.count("start") == 1 and kinds.count("resume") == 1


def test_other_config_in_same_dir_is_refused(tmp_path: Path) -> None:
    config = lm_config(steps=2)
    train(config, tmp_path, task=lm_runtime(config))
    with pytest.raises(ValueError, match="another configuration"):
        train(config.with_train(lr=1e-3), tmp_path, task=lm_runtime(config))


def test_failed_checkpoint_write_keeps_the_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "ckpt.pt"
    state_mod.save_state(path, model=model, optimizer=opt, step=1, config_hash="h")

    def broken_save(obj: Any, f: Any) -> None:
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(state_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        state_mod.save_state(path, model=model, optimizer=opt, step=2, config_hash="h")
    monkeypatch.undo()
    assert load_state(path, config_hash="h")["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind
    (tmp_path / ".ckpt.pt.x.tmp").write_bytes(b"stale")
    assert state_mod.clean_stale_temps(tmp_path) == 1


def test_rng_state_round_trip() -> None:
    state_mod.seed_everything(5)
    saved = state_mod.rng_state()
    first = (torch.rand(3), np.random.rand(3), __import__("random").random())
    state_mod.set_rng_state(saved)
    second = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


class _NaNFromCall5(LMRuntime):
    calls = 0

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        self.calls += 1
        loss = super().loss(model, batch)
        return loss * float("nan") if self.calls >= 5 else loss


def test_divergence_stops_the_run_and_uses_the_fallback(tmp_path: Path) -> None:
    config = lm_config(steps=10)
    base = lm_runtime(config)
    runtime = _NaNFromCall5(base.task, base.corpus, seed=0, batch_size=4)
    summary = train(config, tmp_path, task=runtime)
    assert summary["diverged"] and summary["diverged_at"] == 5
    assert summary["final"]["val_loss"] == pytest.approx(math.log(base.corpus.vocab_size))
    assert summarize(read_jsonl(tmp_path / "metrics.jsonl"))["diverged"]


def _image_runtime(config: RunConfig) -> ImageRuntime:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 12, 12)).astype(np.uint8)
    y = rng.integers(0, 3, 64)
    y[:3] = [0, 1, 2]
    images = ImageSet.from_arrays(x[:48], y[:48], x[48:], y[48:])
    assert isinstance(config.task, ImageTask)
    return ImageRuntime(config.task, images, seed=config.train.seed, batch_size=config.train.batch_size)


def test_aux_losses_are_added_automatically(tmp_path: Path) -> None:
    """Batchless norm's mean/std are trained only by its auxiliary NLL (arXiv:2212.14729)."""

    def run(weight: float, name: str) -> dict[str, Tensor]:
        task = ImageTask(n_test=16, convnet={"widths": (4,), "depth": 1, "norm": "batchless"})
        config = RunConfig(
            task=task, train=TrainConfig(steps=3, batch_size=8, lr=0.01, aux_loss_weight=weight, log_every=1)
        )
        summary = train(config, tmp_path / name, task=_image_runtime(config))
        assert 0.0 <= summary["final"]["test_acc"] <= 1.0 and len(summary["probe"]["act_var"]) == 1
        return torch.load(tmp_path / name / "final.pt", weights_only=True)

    with_aux, without = run(1.0, "aux"), run(0.0, "noaux")
    init = normlab.create_norm("batchless", 4).state_dict()
    key = next(k for k in with_aux if k.endswith(".mean"))
    assert torch.equal(without[key], init["mean"])  # nothing else moves them
    assert not torch.equal(with_aux[key], init["mean"])


def test_a_run_being_trained_elsewhere_is_refused(tmp_path: Path) -> None:
    fcntl = pytest.importorskip("fcntl", reason="run locks use fcntl (POSIX)")
    config = lm_config(steps=2)
    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".lock", "w") as other:  # what a surviving process of a killed study holds
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="being trained by another process"):
            train(config, tmp_path, task=lm_runtime(config))
    assert train(config, tmp_path, task=lm_runtime(config))["steps"] == 2


def test_probes_are_named_and_extensible(tmp_path: Path) -> None:
    from normlab.train.probes import PROBES, register_probe

    @register_probe("test-width")
    def width(model: nn.Module, batch: Tensor) -> dict[str, Any]:
        return {"width": model.config.n_embd, "batch": list(batch.shape)}  # type: ignore[union-attr]

    try:
        base = lm_config(steps=2)
        config = RunConfig(
            task=LMTask(**{**base.task.__dict__, "probes": ("residual", "test-width")}), train=base.train
        )
        summary = train(config, tmp_path / "a", task=lm_runtime(config))
        assert summary["probe"]["width"] == 16 and summary["probe"]["batch"] == [4, 16]
        assert len(summary["probe"]["angular"]) == 3  # identity, 2 blocks: a 3 x 3 matrix
        with pytest.raises(ValueError, match="already registered"):
            register_probe("test-width")(width)
        bad = RunConfig(task=LMTask(**{**base.task.__dict__, "probes": ("nope",)}), train=base.train)
        with pytest.raises(ValueError, match="unknown probe 'nope'"):
            train(bad, tmp_path / "b", task=lm_runtime(bad))
    finally:
        PROBES.unregister("test-width")


@pytest.mark.parametrize(("norm", "exact"), [("layernorm", True), ("batchless", True), ("batchnorm", False)])
def test_gradient_accumulation_equals_the_whole_batch(tmp_path: Path, norm: str, exact: bool) -> None:
    """``accum_steps=4`` of 2 images = one batch of 8 for per-sample and Batchless norms (whose
    statistics are parameters, arXiv:2212.14729); BatchNorm sees micro-batch statistics."""

    def run(accum: int) -> dict[str, Tensor]:
        task = ImageTask(n_test=16, convnet={"widths": (4,), "depth": 1, "norm": norm})
        train_cfg = TrainConfig(steps=3, batch_size=8, accum_steps=accum, lr=0.05, log_every=1)
        config = RunConfig(task=task, train=train_cfg)
        train(config, tmp_path / f"{norm}-{accum}", task=_image_runtime(config))
        return torch.load(tmp_path / f"{norm}-{accum}" / "final.pt", weights_only=True)

    whole, accumulated = run(1), run(4)
    diff = max(
        float((whole[k].double() - accumulated[k].double()).abs().max())
        for k in whole
        if whole[k].is_floating_point()
    )
    if exact:
        assert diff < 1e-6, diff
    else:
        assert diff > 1e-4, diff


def test_accum_steps_must_divide_the_batch() -> None:
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by accum_steps=4"):
        TrainConfig(steps=1, batch_size=6, lr=0.1, accum_steps=4)


def test_norm_epoch_hooks_run_on_language_models_too(tmp_path: Path) -> None:
    """BLN closes its epoch after every pass over the training tokens, whatever the task: an
    encoder GPT (batch statistics need bidirectional attention) on 720 training characters,
    batch 4 x 16: 11 steps an epoch, so after 12 steps one batch of the second epoch is open."""
    gpt = {**TINY_GPT, "encoder": True, "norm": "bln", "norm_kwargs": {"batch_size": 4}}
    task = LMTask(block_size=16, gpt=gpt, eval_batches=2, eval_batch_size=4)
    config = RunConfig(task=task, train=TrainConfig(steps=12, batch_size=4, lr=3e-3, ckpt_every=0))
    runtime = LMRuntime(task, TextCorpus.from_text(TEXT[:800]), seed=0, batch_size=4)
    assert runtime.steps_per_epoch == 11
    train(config, tmp_path, task=runtime)
    state = torch.load(tmp_path / "final.pt", weights_only=True)
    counts = {k: int(v) for k, v in state.items() if k.endswith("batches_accumulated")}
    assert len(counts) == 5 and set(counts.values()) == {1}
    assert all(
        float(state[k.replace("batches_accumulated", "moving_batch_var")].abs().sum()) > 0 for k in counts
    )


def test_the_trainer_takes_a_strategy_and_runs_in_its_steps(tmp_path: Path) -> None:
    config = lm_config(steps=4, eval_every=0)
    whole = train(config, tmp_path / "a", task=lm_runtime(config))
    trainer = Trainer(config, tmp_path / "b", task=lm_runtime(config), strategy=SingleProcess())
    assert trainer.run()["final"] == whole["final"]
    assert (
        Trainer(config, tmp_path / "b", task=lm_runtime(config)).run()["final"] == whole["final"]
    )  # finished
    with pytest.raises(ValueError, match="steps_per_epoch must be an int >= 1, got 0"):
        normlab.norms.TrainingHooks(torch.nn.Linear(2, 2), steps_per_epoch=0)


def test_lr_mult_trains_the_named_parameters_at_a_multiple_of_the_lr(tmp_path: Path) -> None:
    task = LMTask(block_size=16, gpt={**TINY_GPT, "norm": "dyt"}, eval_batches=1, eval_batch_size=4)
    train_cfg = TrainConfig(steps=1, batch_size=4, lr=0.5, optimizer="sgd", momentum=0.0, schedule="constant",
                            lr_mult={"alpha": 10.0}, ckpt_every=0)  # fmt: skip
    config = RunConfig(task=task, train=train_cfg)
    trainer = Trainer(config, tmp_path / "run", task=lm_runtime(config))
    trainer.run_dir.mkdir()
    with ExitStack() as stack:
        trainer.setup(stack)
        before = {n: p.detach().clone() for n, p in trainer.net.named_parameters()}
        assert trainer.step(0)
    names = {id(p): n for n, p in trainer.net.named_parameters()}
    groups = trainer.optimizer.param_groups
    assert [(g.get("lr_mult", 1.0), g["lr"]) for g in groups] == [(1.0, 0.5), (1.0, 0.5), (10.0, 5.0)]
    alphas = sorted(names[id(p)] for p in groups[2]["params"])
    assert alphas == sorted(n for n in names.values() if n.endswith(".alpha"))
    assert len(alphas) == 2 * TINY_GPT["n_layer"] + 1  # two per block and the final norm
    for group in groups:  # plain SGD: each parameter moved by -(its group's lr) x its gradient
        for p in group["params"]:
            assert p.grad is not None
            moved = p.detach() - before[names[id(p)]]
            torch.testing.assert_close(moved, -group["lr"] * p.grad, rtol=1e-4, atol=1e-6)  # float32 steps
    params = dict(trainer.net.named_parameters())
    assert max(float((params[n].detach() - before[n]).abs().max()) for n in alphas) > 1e-4
    again = RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and "lr_mult" not in lm_config().to_dict()["train"]  # older hashes kept
    with pytest.raises(ValueError, match=r"lr_mult: \['gamma'\] name no trainable parameter of GPT"):
        normlab.train.optim.make_optimizer(trainer.net, lm_config(lr_mult={"gamma": 2.0}).train)
    for bad in ({"alpha": 0.0}, {"alpha": float("nan")}, {}, {"": 2.0}):
        with pytest.raises(ValueError, match="lr_mult"):
            TrainConfig(steps=1, batch_size=1, lr=1e-3, lr_mult=bad)
