"""Run configurations: frozen, keyword-only dataclasses that serialize to JSON and hash.

A run is ``RunConfig(task=LMTask(...) | ImageTask(...), train=TrainConfig(...))``. Grids are
built in code with :func:`dataclasses.replace`; :func:`config_hash` identifies a run, so a
checkpoint made for one configuration never resumes another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from torch import nn

import normlab.convert.zoo  # noqa: F401  (registers the "hf" and "factory" models)
from normlab.data.images import image_set_names
from normlab.data.text import CORPORA
from normlab.data.user import TEXT_KINDS, check_source
from normlab.models import MODELS, ConvNetConfig, GPTConfig, ModelEntry
from normlab.models.zoo import convnet_config, gpt_config
from normlab.train.schedules import SCHEDULES, ScheduleName


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The optimization of one run.

    Attributes:
        steps: optimizer steps.
        batch_size: samples per step (the global batch: over every micro-batch and process).
        accum_steps: micro-batches per step: each step's batch is split into ``accum_steps``
            equal slices, run forward and backward one at a time with their gradients summed
            (loss divided by ``accum_steps``), then one optimizer step. Peak activation
            memory is that of one micro-batch; batch-statistics norms see micro-batches.
        lr: peak learning rate.
        optimizer: ``"adamw"`` (decoupled weight decay, Loshchilov & Hutter 2019,
            arXiv:1711.05101), ``"adam"`` (L2 penalty in the gradient, as torch's Adam) or
            ``"sgd"`` (with ``momentum``, optionally ``nesterov``).
        betas, eps: Adam's moment decays and epsilon.
        weight_decay: applied to weight matrices and conv kernels only (``dim >= 2``), not to
            norm parameters, biases or scalars (nanoGPT's grouping).
        momentum, nesterov: SGD.
        schedule, warmup, min_lr_ratio: see :mod:`normlab.train.schedules`.
        grad_clip: clip the global gradient norm to this value; ``None``: no clipping.
        seed: seeds the init, dropout and the batch order.
        log_every: steps between training-loss records.
        eval_every: steps between evaluations; 0 evaluates at the end only.
        ckpt_every: steps between checkpoints; 0 never checkpoints (no mid-run resume).
        aux_loss_weight: weight of ``normlab.total_aux_loss(model)`` (Batchless's NLL and any
            other norm's auxiliary loss), added to the task loss automatically.
        deterministic: ``torch.use_deterministic_algorithms(True)`` during the run.
        monitor_every: run a :class:`normlab.monitor.NormMonitor` measuring every this many
            steps into the run's ``monitor.jsonl`` (``normlab report-monitor`` plots it); 0: none.
            It only reads the forward and backward: the run trains bit for bit as without it.
        lr_mult: parameter name -> multiplier of the learning rate: every parameter whose name
            is the key or ends with ``"." + key`` (``{"alpha": 20.0}``: every DyT's ``alpha``)
            trains at ``lr * multiplier`` in its own parameter group, under the same schedule;
            a key that names no parameter of the model is an error.
    """

    steps: int
    batch_size: int
    lr: float
    accum_steps: int = 1
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    schedule: ScheduleName = "cosine"
    warmup: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float | None = None
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    ckpt_every: int = 100
    aux_loss_weight: float = 1.0
    deterministic: bool = True
    monitor_every: int = 0
    lr_mult: dict[str, float] | None = None
    ADDED_FIELDS: ClassVar[tuple[str, ...]] = ("monitor_every", "lr_mult")

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in ("steps", "batch_size", "log_every", "accum_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{owner}: {name} must be a positive int, got {v!r}")
        for name in ("warmup", "eval_every", "ckpt_every", "seed", "monitor_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{owner}: {name} must be an int >= 0, got {v!r}")
        if self.batch_size % self.accum_steps:
            raise ValueError(
                f"{owner}: batch_size={self.batch_size} is not divisible by accum_steps={self.accum_steps}"
            )
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"{owner}: lr must be a finite number > 0, got {self.lr!r}")
        if self.optimizer not in ("adamw", "adam", "sgd"):
            raise ValueError(f"{owner}: optimizer must be 'adamw', 'adam' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{owner}: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"{owner}: grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"{owner}: min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.lr_mult is not None:
            if not isinstance(self.lr_mult, Mapping) or not self.lr_mult:
                raise ValueError(
                    f"{owner}: lr_mult must be a non-empty mapping name -> multiplier, got {self.lr_mult!r}"
                )
            for key, mult in self.lr_mult.items():
                ok = (
                    isinstance(mult, (int, float))
                    and not isinstance(mult, bool)
                    and math.isfinite(mult)
                    and mult > 0
                )
                if not (isinstance(key, str) and key and ok):
                    raise ValueError(
                        f"{owner}: lr_mult[{key!r}] must be a finite number > 0 (for a parameter name), "
                        f"got {mult!r}"
                    )
            object.__setattr__(self, "lr_mult", {str(k): float(v) for k, v in self.lr_mult.items()})


@dataclass(frozen=True, kw_only=True)
class LMTask:
    """Next-token prediction with :class:`normlab.models.GPT` on a real text corpus.

    Attributes:
        corpus: a registered corpus (``"shakespeare"``, ``"bible"``; ``normlab.data.CORPORA``);
            ``level``: ``"char"`` or ``"byte"`` tokens.
        data: the user's own text instead of ``corpus``: a source of :mod:`normlab.data.user`
            (``{"kind": "text", "path": ...}``, ``"tokens"``, ``"hf_dataset"``); empty: ``corpus``.
        block_size: tokens per training window.
        model: a registered model of language-model tasks (``normlab.models.MODELS``), by
            default ``"gpt"``, normlab's GPT.
        gpt: the model's options: for the GPT, :class:`~normlab.models.GPTConfig` fields
            (``n_layer``, ``norm``, ``placement``, ...); ``vocab_size`` comes from the corpus and
            ``block_size`` from this task.
        eval_batches, eval_batch_size: the fixed validation windows (evenly spaced over the
            validation split, the same for every seed).
        probes: probes run at the end of training (:mod:`normlab.train.probes`); the default
            logs per-layer residual variance and angular distances.
    """

    corpus: str = "shakespeare"
    level: Literal["char", "byte"] = "char"
    block_size: int = 64
    model: str = "gpt"
    gpt: Mapping[str, Any] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)
    ADDED_FIELDS: ClassVar[tuple[str, ...]] = ("model", "data")
    eval_batches: int = 8
    eval_batch_size: int = 32
    probes: tuple[str, ...] = ("residual",)

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.corpus not in CORPORA:
            raise ValueError(f"{owner}: corpus must be one of {tuple(CORPORA.names())}, got {self.corpus!r}")
        if self.level not in ("char", "byte"):
            raise ValueError(f"{owner}: level must be 'char' or 'byte', got {self.level!r}")
        if self.data:
            check_source(self.data, owner=f"{owner}.data")
            if self.data["kind"] not in TEXT_KINDS:
                raise ValueError(f"{owner}.data: kind must be one of {TEXT_KINDS}, got {self.data['kind']!r}")
        _model_entry(owner, self.model, "lm").validate(self.gpt)  # now, with a clear error

    def gpt_config(self, *, vocab_size: int) -> GPTConfig:
        return gpt_config(self.gpt, vocab_size=vocab_size, block_size=self.block_size)

    def build_model(self, *, vocab_size: int) -> nn.Module:
        """The task's model (``model`` with the options ``gpt``) for a vocabulary of ``vocab_size``."""
        return MODELS.get(self.model).make(self.gpt, vocab_size=vocab_size, block_size=self.block_size)


@dataclass(frozen=True, kw_only=True)
class ImageTask:
    """Classification with :class:`normlab.models.ConvNet` on real images.

    Attributes:
        dataset: ``"auto"`` or a registered image set (``"fashion-mnist"``, ``"mnist5k"``; see
            :mod:`normlab.data.images`).
        n_train: train on a fixed subset of this many images (``None``: all).
        n_test: evaluate on a fixed subset of this many test images.
        data: the user's own images instead of ``dataset``: ``{"kind": "images", "path": ...}``
            (an ImageFolder layout, see :mod:`normlab.data.user`); empty: ``dataset``.
        model: a registered model of image tasks (``normlab.models.MODELS``), by default
            ``"convnet"``, normlab's ConvNet.
        convnet: the model's options: for the ConvNet, :class:`~normlab.models.ConvNetConfig`
            fields (``arch``, ``norm``, ...); ``in_channels`` and ``num_classes`` come from the data.
        eval_batch_size: images per evaluation forward (eval mode: running statistics).
        probes: probes run at the end of training; the default logs per-layer activation variance.
    """

    dataset: str = "auto"
    n_train: int | None = None
    n_test: int = 2000
    model: str = "convnet"
    convnet: Mapping[str, Any] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)
    ADDED_FIELDS: ClassVar[tuple[str, ...]] = ("model", "data")
    eval_batch_size: int = 500
    probes: tuple[str, ...] = ("activations",)

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.dataset not in image_set_names():
            raise ValueError(f"{owner}: dataset must be one of {image_set_names()}, got {self.dataset!r}")
        if self.n_train is not None and self.n_train < 1:
            raise ValueError(f"{owner}: n_train must be >= 1 or None, got {self.n_train!r}")
        if self.n_test < 1:
            raise ValueError(f"{owner}: n_test must be >= 1, got {self.n_test!r}")
        if self.data:
            check_source(self.data, owner=f"{owner}.data")
            if self.data["kind"] != "images":
                raise ValueError(f"{owner}.data: kind must be 'images', got {self.data['kind']!r}")
        _model_entry(owner, self.model, "image").validate(self.convnet)

    def convnet_config(self, *, in_channels: int, num_classes: int) -> ConvNetConfig:
        return convnet_config(self.convnet, in_channels=in_channels, num_classes=num_classes)

    def build_model(
        self, *, in_channels: int, num_classes: int, image_size: tuple[int, int] | None = None
    ) -> nn.Module:
        """The task's model (``model`` with the options ``convnet``) for the data's shape."""
        facts: dict[str, Any] = {"in_channels": in_channels, "num_classes": num_classes}
        if image_size is not None:
            facts["image_size"] = image_size
        return MODELS.get(self.model).make(self.convnet, **facts)


def _model_entry(owner: str, name: str, kind: str) -> ModelEntry:
    entry = MODELS.get(name)  # an unknown name fails here, with suggestions
    if entry.task != kind:
        raise ValueError(f"{owner}: model {name!r} is a model of {entry.task!r} tasks, not {kind!r}")
    return entry


Task = LMTask | ImageTask
TASK_KINDS: dict[str, type[LMTask] | type[ImageTask]] = {"lm": LMTask, "image": ImageTask}


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One training run: a task and its optimization."""

    task: Task
    train: TrainConfig

    @property
    def kind(self) -> str:
        return "lm" if isinstance(self.task, LMTask) else "image"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "task": _plain(self.task), "train": _plain(self.train)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        kind = d.get("kind")
        if kind not in TASK_KINDS:
            raise ValueError(f"RunConfig: kind must be one of {sorted(TASK_KINDS)}, got {kind!r}")
        fields = dict(d["task"])
        fields["probes"] = tuple(fields.get("probes", ()))
        task = TASK_KINDS[kind](**fields)
        train = dict(d["train"])
        train["betas"] = tuple(train["betas"])
        return cls(task=task, train=TrainConfig(**train))

    def with_train(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, train=dataclasses.replace(self.train, **changes))


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        # fields added since 0.1 are written only when set, so existing configs keep their hash
        later: tuple[str, ...] = getattr(obj, "ADDED_FIELDS", ())
        return {
            f.name: _plain(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not (f.name in later and getattr(obj, f.name) == f.default)
        }
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def config_hash(config: RunConfig) -> str:
    """SHA-256 of the canonical JSON of ``config``."""
    text = json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
