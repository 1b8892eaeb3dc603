"""What the Trainer needs from a task: a model, batch ``step``, a loss, an evaluation, an epoch length.

Every batch is a pure function of ``(seed, step)`` (language models: random windows from a
generator seeded by both; images: epoch permutations seeded by ``(seed, epoch)``), so the data
position of a run is its step and a resumed run reads the same batches.
"""

from __future__ import annotations

import math
import os
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.data.images import ImageSet, epoch_order, load_images, subset
from normlab.data.text import TextCorpus, lm_batch, lm_eval_batches, load_corpus
from normlab.data.user import load_user_images, load_user_text, source_label
from normlab.train.config import ImageTask, LMTask, RunConfig
from normlab.train.probes import get_probe

Batch = tuple[Tensor, Tensor]


def _device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _run_probes(names: tuple[str, ...], model: nn.Module, batch: Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with torch.no_grad():
        for name in names:
            out.update(get_probe(name)(model, batch.to(_device(model))))
    return out


class TaskRuntime(Protocol):
    """A task bound to its data."""

    def build_model(self) -> nn.Module: ...
    def batch(self, step: int) -> Batch: ...
    def loss(self, model: nn.Module, batch: Batch) -> Tensor: ...
    @property
    def steps_per_epoch(self) -> int: ...
    def evaluate(self, model: nn.Module) -> dict[str, float]: ...
    def probe(self, model: nn.Module) -> dict[str, Any]: ...
    def fallback(self) -> dict[str, float]: ...
    def describe(self) -> dict[str, Any]: ...


class LMRuntime:
    """:class:`~normlab.train.config.LMTask` on a loaded :class:`~normlab.data.TextCorpus`."""

    def __init__(self, task: LMTask, corpus: TextCorpus, *, seed: int, batch_size: int) -> None:
        self.task, self.corpus, self.seed, self.batch_size = task, corpus, seed, batch_size
        self._eval = lm_eval_batches(
            corpus.val,
            n_batches=task.eval_batches,
            batch_size=task.eval_batch_size,
            block_size=task.block_size,
        )

    def build_model(self) -> nn.Module:
        return self.task.build_model(vocab_size=self.corpus.vocab_size)

    def batch(self, step: int) -> Batch:
        return lm_batch(
            self.corpus.train,
            step=step,
            seed=self.seed,
            batch_size=self.batch_size,
            block_size=self.task.block_size,
        )

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        loss: Tensor = model(batch[0], batch[1]).loss
        return loss

    @property
    def steps_per_epoch(self) -> int:
        """Steps of one pass over the training tokens (windows are drawn at random, so an epoch
        is a count: the norms' ``on_epoch_end`` runs after each)."""
        return max(1, len(self.corpus.train) // (self.batch_size * self.task.block_size))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        dev = _device(model)
        total = sum(float(model(x.to(dev), y.to(dev)).loss) for x, y in self._eval)
        return {"val_loss": total / len(self._eval)}

    def probe_batch(self) -> Batch:
        """The fixed batch of the end-of-run probes: the first validation batch, ``(x, y)``."""
        return self._eval[0]

    def probe(self, model: nn.Module) -> dict[str, Any]:
        return _run_probes(self.task.probes, model, self.probe_batch()[0])

    def fallback(self) -> dict[str, float]:
        # a diverged language model is counted as the uniform predictor, the loss it can
        # always fall back to; its logged NaN would otherwise drop out of every mean
        return {"val_loss": math.log(self.corpus.vocab_size)}

    def describe(self) -> dict[str, Any]:
        level = "token ids" if self.corpus.level == "tokens" else f"{self.corpus.level}-level"
        return {
            "data": f"{self.corpus.name} ({level})",
            "vocab_size": self.corpus.vocab_size,
            "train_tokens": len(self.corpus.train),
            "val_tokens": len(self.corpus.val),
        }


class ImageRuntime:
    """:class:`~normlab.train.config.ImageTask` on a loaded :class:`~normlab.data.ImageSet`.

    An epoch is a pass over the fixed training subset in the order of :func:`~normlab.data.epoch_order`
    (the last partial batch dropped); a norm whose paper prescribes work at its end (BLN) gets it
    from the Trainer's :class:`~normlab.norms.TrainingHooks`, so a run should last whole epochs.
    """

    def __init__(self, task: ImageTask, images: ImageSet, *, seed: int, batch_size: int) -> None:
        self.task, self.images, self.seed, self.batch_size = task, images, seed, batch_size
        n = len(images.x_train) if task.n_train is None else min(task.n_train, len(images.x_train))
        self.train_idx = subset(n, len(images.x_train))
        if len(self.train_idx) < batch_size:
            raise ValueError(f"ImageTask: {len(self.train_idx)} training images < batch_size={batch_size}")
        test_idx = subset(task.n_test, len(images.x_test))
        self.x_test = images.to_tensor(np.asarray(images.x_test)[test_idx])
        self.y_test = torch.from_numpy(np.asarray(images.y_test)[test_idx])
        self._epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_idx) // self.batch_size  # the last partial batch is dropped

    def build_model(self) -> nn.Module:
        c, h, w = self.images.image_shape
        return self.task.build_model(in_channels=c, num_classes=self.images.num_classes, image_size=(h, w))

    def batch(self, step: int) -> Batch:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._order = self.train_idx[epoch_order(len(self.train_idx), seed=self.seed, epoch=epoch)]
            self._epoch = epoch
        idx = np.sort(self._order[pos * self.batch_size : (pos + 1) * self.batch_size])
        x = self.images.to_tensor(np.asarray(self.images.x_train[idx]))
        return x, torch.from_numpy(np.asarray(self.images.y_train[idx]))

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        correct, total_loss = 0, 0.0
        bs = self.task.eval_batch_size
        dev = _device(model)
        for i in range(0, len(self.x_test), bs):
            logits = model(self.x_test[i : i + bs].to(dev))
            y = self.y_test[i : i + bs].to(dev)
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
        n = len(self.x_test)
        return {"test_acc": correct / n, "test_loss": total_loss / n}

    def probe_batch(self) -> Batch:
        """The fixed batch of the end-of-run probes: the first ``eval_batch_size`` test images and labels."""
        n = self.task.eval_batch_size
        return self.x_test[:n], self.y_test[:n]

    def probe(self, model: nn.Module) -> dict[str, Any]:
        return _run_probes(self.task.probes, model, self.probe_batch()[0])

    def fallback(self) -> dict[str, float]:
        k = self.images.num_classes
        return {"test_acc": 1.0 / k, "test_loss": math.log(k)}  # chance level

    def describe(self) -> dict[str, Any]:
        return {
            "data": self.images.name,
            "data_source": self.images.source,
            "train_images": len(self.train_idx),
            "test_images": len(self.x_test),
        }


def _text(task: LMTask, data_dir: str | os.PathLike[str] | None) -> TextCorpus:
    if task.data:
        return load_user_text(task.data, level=task.level)
    return load_corpus(task.corpus, level=task.level, data_dir=data_dir)


def _images(task: ImageTask, data_dir: str | os.PathLike[str] | None, *, quiet: bool) -> ImageSet:
    if task.data:
        return load_user_images(task.data)
    return load_images(task.dataset, data_dir=data_dir, quiet=quiet)


def make_task(config: RunConfig, *, data_dir: str | os.PathLike[str] | None = None) -> TaskRuntime:
    """Load the data of ``config.task`` and bind it."""
    seed, bs = config.train.seed, config.train.batch_size
    task = config.task
    if isinstance(task, LMTask):
        return LMRuntime(task, _text(task, data_dir), seed=seed, batch_size=bs)
    return ImageRuntime(task, _images(task, data_dir, quiet=True), seed=seed, batch_size=bs)


def prepare_data(config: RunConfig, *, data_dir: str | os.PathLike[str] | None = None) -> str:
    """Load (and cache) the data a run needs, failing early (data too short for a window, a
    token id beyond the model's vocabulary); returns a one-line description."""
    task = config.task
    name = source_label(task.data) if task.data else None
    if isinstance(task, LMTask):
        corpus = _text(task, data_dir)
        n_train, n_val = len(corpus.train), len(corpus.val)
        for split, n in (("training", n_train), ("validation", n_val)):
            if n <= task.block_size + 1:
                raise ValueError(
                    f"data {name or corpus.name}: the {split} split has {n} tokens, too few for "
                    f"block_size={task.block_size} (it needs more than {task.block_size + 1})"
                )
        level = "token ids" if corpus.level == "tokens" else f"{corpus.level}-level"
        return f"{name or corpus.name} {level}: {n_train:,} train / {n_val:,} val tokens"
    images = _images(task, data_dir, quiet=False)
    return (
        f"{name or images.name}: {len(images.x_train):,} train / {len(images.x_test):,} test images, "
        f"{images.num_classes} classes ({images.source})"
    )
