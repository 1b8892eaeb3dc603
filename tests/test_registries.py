"""Data sets, models and probes are registries like norms and placements: a new one is one
registration, and then the tasks, the Trainer and the command line take its name."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from normlab.data import (
    CORPORA,
    IMAGE_SETS,
    Corpus,
    DataNotFoundError,
    ImageSource,
    load_corpus,
    load_images,
    register_corpus,
    register_image_set,
)
from normlab.models import MODELS, register_model
from normlab.train import ImageTask, LMTask, RunConfig, TrainConfig, config_hash, train

pytestmark = pytest.mark.usefixtures("one_thread_plain_torch")


def test_a_registered_corpus_loads_and_a_task_takes_it(tmp_path: Path) -> None:
    register_corpus(
        Corpus(
            name="test-verses",
            title="Test verses",
            install="pip install test-verses",
            package="normlab_no_such_package",
            files=lambda pkg: [],
            read=lambda files: "",
        )
    )
    try:
        with pytest.raises(
            DataNotFoundError, match=r"Test verses not found: install it with `pip install test-verses`"
        ):
            load_corpus("test-verses", data_dir=tmp_path)
        (tmp_path / "text").mkdir()
        (tmp_path / "text" / "test-verses.txt").write_text("abcabc\n" * 200)
        corpus = load_corpus("test-verses", data_dir=tmp_path)
        assert corpus.vocab == ("\n", "a", "b", "c") and len(corpus.train) + len(corpus.val) == 1400
        assert LMTask(corpus="test-verses").corpus == "test-verses"
    finally:
        CORPORA.unregister("test-verses")
    with pytest.raises(ValueError, match="corpus must be one of"):
        LMTask(corpus="test-verses")


def test_a_registered_image_set_loads(tmp_path: Path) -> None:
    gen = np.random.default_rng(0)
    arrays = {
        "x_train": gen.integers(0, 256, (20, 6, 6), dtype=np.uint8),
        "y_train": np.arange(20) % 3,
        "x_test": gen.integers(0, 256, (6, 6, 6), dtype=np.uint8),
        "y_test": np.arange(6) % 3,
    }
    register_image_set(
        ImageSource(
            name="test-tiles",
            title="Test tiles",
            find=lambda root: root if (root / "tiles").is_dir() else None,
            read=lambda found: arrays,
            install=lambda root: f"mkdir {root / 'tiles'}",
            classes=("a", "b", "c"),
        )
    )
    try:
        with pytest.raises(DataNotFoundError, match="Test tiles not found: mkdir"):
            load_images("test-tiles", data_dir=tmp_path)
        (tmp_path / "tiles").mkdir()
        images = load_images("test-tiles", data_dir=tmp_path)
        assert images.name == "test-tiles" and images.num_classes == 3 and images.image_shape == (1, 6, 6)
        again = load_images("test-tiles", data_dir=tmp_path)  # from the cache now
        assert "cache" in again.source and np.array_equal(again.x_train, arrays["x_train"])
        assert ImageTask(dataset="test-tiles").dataset == "test-tiles"
    finally:
        IMAGE_SETS.unregister("test-tiles")


class _Out(NamedTuple):
    logits: Tensor
    loss: Tensor | None


class Bigram(nn.Module):
    """The smallest language model: the next token's logits from the current token alone."""

    def __init__(self, vocab_size: int, scale: float) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab_size, vocab_size)
        nn.init.normal_(self.table.weight, std=scale)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> _Out:
        logits = self.table(idx)
        loss = (
            None if targets is None else nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        )
        return _Out(logits, loss)


def test_a_registered_model_trains_in_a_task(tmp_path: Path) -> None:
    def check(options: Mapping[str, Any]) -> None:
        if set(options) - {"scale"}:
            raise ValueError(f"bigram: unknown options {sorted(set(options) - {'scale'})}")

    @register_model("test-bigram", task="lm", check=check)
    def bigram(options: Mapping[str, Any], *, vocab_size: int, block_size: int) -> nn.Module:
        return Bigram(vocab_size, float(options.get("scale", 0.02)))

    try:
        from normlab.data import TextCorpus
        from normlab.train import LMRuntime

        with pytest.raises(ValueError, match=r"bigram: unknown options \['depth'\]"):
            LMTask(model="test-bigram", gpt={"depth": 2})
        with pytest.raises(ValueError, match="model 'test-bigram' is a model of 'lm' tasks, not 'image'"):
            ImageTask(model="test-bigram")
        options = {"block_size": 8, "eval_batches": 1, "eval_batch_size": 2, "probes": ()}
        task = LMTask(model="test-bigram", gpt={"scale": 0.1}, **options)  # type: ignore[arg-type]
        config = RunConfig(task=task, train=TrainConfig(steps=6, batch_size=4, lr=0.1, ckpt_every=0))
        runtime = LMRuntime(task, TextCorpus.from_text("abcd" * 60), seed=0, batch_size=4)
        summary = train(config, tmp_path, task=runtime)
        assert summary["final"]["val_loss"] < np.log(4)  # learnt something in 6 steps
        state = torch.load(tmp_path / "final.pt", weights_only=True)
        assert list(state) == ["table.weight"]
        assert config.to_dict()["task"]["model"] == "test-bigram"
    finally:
        MODELS.unregister("test-bigram")
    with pytest.raises(ValueError, match="unknown model 'test-bigram'"):
        LMTask(model="test-bigram")


def test_fields_added_later_leave_the_config_hash_as_it_was() -> None:
    """A config that does not set ``model`` serializes as before it existed (a study planned with
    0.1 resumes): the key is written only when it is set."""
    config = RunConfig(task=LMTask(gpt={"n_layer": 2}), train=TrainConfig(steps=1, batch_size=1, lr=1.0))
    assert "model" not in config.to_dict()["task"]
    assert config_hash(config) == config_hash(RunConfig.from_dict(config.to_dict()))
    explicit = RunConfig(task=LMTask(gpt={"n_layer": 2}, model="gpt"), train=config.train)
    assert config_hash(explicit) == config_hash(config)  # the default, however it is spelled
