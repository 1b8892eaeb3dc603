"""A study from the user's own file: their data, their model, their question.

``normlab study my.toml`` runs the grid a TOML file describes with the runner, resume, report,
plots and verdict rules of the built-in studies; ``normlab study my.py`` runs the ``STUDY`` a
Python file defines (``STUDY = Study(...)`` or ``STUDY = study_from_dict({...})``)::

    name = "my-norms"            # the study's name (letters, digits, - and _)
    title = "Which norm for my text?"
    seeds = 2                    # seeds per cell to start with
    max_seeds = 6                # optional: add seeds to inconclusive claims' cells, up to 6
    metric = "val_loss"          # what the report ranks the cells by (default: val_loss / test_acc)

    [data]                       # exactly one source:
    text = "corpus.txt"          #   a UTF-8 file or a folder of them (level = "char" | "byte")
    # tokens = "data/"           #   nanoGPT's train.bin / val.bin (uint16)
    # hf_dataset = "saved/"      #   datasets' save_to_disk folder (column = "text")
    # images = "photos/"         #   an ImageFolder (class sub-folders of PNG/JPEG)
    # corpus = "shakespeare"     #   or a built-in set; images = "fashion-mnist"

    [model]                      # exactly one model:
    gpt = { n_layer = 4, n_embd = 64, n_head = 4 }
    # convnet = { arch = "plain", widths = [16, 32] }
    # hf_config = "config.json"  #   any causal-LM / image-classification config, random weights
    # hf = "llama"               #   or a model_type's default config (config = { ... } overrides)
    # factory = "mypkg.models:build"   # a function returning an nn.Module

    [train]                      # TrainConfig fields, and the task's (block_size, eval_batches)
    steps = 300
    batch_size = 16
    lr = 3e-3

    [sweep]                      # the grid: the product of these lists, times the seeds
    norm = ["layernorm", "rmsnorm", "dyt"]
    placement = ["pre", "peri"]

    [[claim]]                    # optional; without claims the report ranks the cells
    id = "dyt-on-par"
    text = "DyT is on par with LayerNorm"
    metric = "val_loss"
    a = { norm = "dyt" }
    b = { norm = "layernorm" }
    rule = { similar = 0.02 }    # or { better = MIN_EFFECT }, { exceeds = VALUE }, { rate = R },
                                 # { rate_diff = MIN_EFFECT }; level = 0.95 (see _rule)

Sweep keys: ``norm``, ``placement``, ``norm_kwargs.K``, ``placement_kwargs.K``, ``model.K`` (an
option of the model: a GPTConfig field, a config.json field, a factory argument), ``train.K``,
``data.K``. Paths are relative to the file's folder. Every mistake (a misspelt key, an unknown
norm, a sweep key no run uses, a missing or unreadable data path, a config ``convert_norms``
refuses) is a :class:`StudyFileError` naming the file, the key and the value, raised before any
run starts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from normlab.blocks import PLACEMENTS
from normlab.convert.zoo import FACTORY_MODELS, HF_MODELS, check_factory, meta_build
from normlab.data.images import image_set_names
from normlab.data.text import CORPORA
from normlab.data.user import check_source
from normlab.models import MODELS
from normlab.models.hf import hf_config
from normlab.norms import NORMS
from normlab.studies.framework import (
    DEFAULT_LEVEL,
    RESERVED_NAMES,
    Better,
    Claim,
    Exceeds,
    Rate,
    Rule,
    RunSpec,
    Side,
    Similar,
    Study,
    StudyOptions,
    grid,
)
from normlab.studies.overrides import Changes, Set, TOMLDecodeError, apply_to_document, toml_loads, train_keys
from normlab.train.config import ImageTask, LMTask, RunConfig, TrainConfig

__all__ = ["GROUP", "StudyFileError", "load_study_file", "study_from_dict"]

GROUP = "sweep"  # the one grid group of a user study
TOP_KEYS = (
    "name",
    "title",
    "question",
    "seeds",
    "max_seeds",
    "budget",
    "metric",
    "data",
    "model",
    "train",
    "sweep",
    "claim",
)
TEXT_SOURCES = ("text", "tokens", "hf_dataset", "corpus")
IMAGE_SOURCES = ("images",)
DATA_OPTIONS = {
    "lm": ("level", "val_fraction", "vocab_size", "dtype", "column"),
    "image": ("size", "test_fraction", "n_train", "n_test"),
}
MODEL_KINDS = ("gpt", "convnet", "hf_config", "hf", "factory")
TASKS = {"lm": LMTask, "image": ImageTask}
LOWER_IS_BETTER = re.compile(r"(loss|diverged|perplexity|ppl|error|err)$")
HIGHER_IS_BETTER = re.compile(r"(acc|accuracy)$")


class StudyFileError(ValueError):
    """A mistake in a study file: the message names the file, the key, the value, what is allowed."""


def _fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


class _Compiler:
    """Reads a study document (a TOML file's tables) into a :class:`Study`."""

    def __init__(self, doc: Mapping[str, Any], *, where: str, base: Path) -> None:
        self.doc, self.where, self.base = doc, where, base

    def fail(self, key: str, message: str) -> StudyFileError:
        return StudyFileError(f"{self.where}: {key}: {message}")

    def table(self, key: str, *, required: bool = True) -> dict[str, Any]:
        value = self.doc.get(key)
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            raise self.fail(f"[{key}]", "missing" if value is None else f"must be a table, got {value!r}")
        return dict(value)

    def path(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"must be a path, got {value!r}")
        path = (self.base / Path(value).expanduser()).resolve()
        if not path.exists():
            raise self.fail(key, f"{value!r} does not exist (looked for {str(path)!r})")
        return str(path)

    # ---- the parts of the file -----------------------------------------------------------

    def header(self) -> tuple[str, str, str, int]:
        """``(name, title, question, seeds)``; ``max_seeds`` is checked here, read by the caller."""
        unknown = sorted(set(self.doc) - set(TOP_KEYS))
        if unknown:
            raise self.fail(f"{unknown[0]!r}", f"unknown key; the keys are {list(TOP_KEYS)}")
        name = self.doc.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
            raise self.fail("name", f"must be letters, digits, '-' or '_', got {name!r}")
        if name in RESERVED_NAMES:
            raise self.fail("name", f"{name!r} is reserved for `normlab study {name}`")
        seeds = self.doc.get("seeds", 2)
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise self.fail("seeds", f"must be a positive int, got {seeds!r}")
        cap = self.doc.get("max_seeds")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < max(2, seeds)):
            raise self.fail(
                "max_seeds",
                f"must be an int >= 2 and >= seeds = {seeds} (the cap of sequential seeding), got {cap!r}",
            )
        title = self.doc.get("title", name)
        question = self.doc.get("question", "")
        for key, value in (("title", title), ("question", question), ("budget", self.doc.get("budget", ""))):
            if not isinstance(value, str):
                raise self.fail(key, f"must be a string, got {value!r}")
        return name, title, question, seeds

    def data(self) -> tuple[str, dict[str, Any]]:
        """``(task kind, task fields)``: ``corpus``/``dataset`` or ``data`` and the options."""
        table = self.table("data")
        sources = [k for k in (*TEXT_SOURCES, *IMAGE_SOURCES) if k in table]
        if len(sources) != 1:
            raise self.fail(
                "[data]", f"needs exactly one of {[*TEXT_SOURCES, *IMAGE_SOURCES]}, got {sources or 'none'}"
            )
        source = sources[0]
        kind = "image" if source in IMAGE_SOURCES else "lm"
        allowed = (source, *DATA_OPTIONS[kind])
        unknown = sorted(set(table) - set(allowed))
        if unknown:
            raise self.fail(
                f"data.{unknown[0]}", f"unknown key for {source} data; the keys are {list(allowed)}"
            )
        value = table[source]
        fields: dict[str, Any] = {}
        if source == "corpus":
            if value not in CORPORA:
                raise self.fail("data.corpus", f"{value!r} is not a built-in corpus: {CORPORA.names()}")
            fields["corpus"] = value
        elif source == "images" and isinstance(value, str) and value in image_set_names():
            fields["dataset"] = value
        else:
            spec: dict[str, Any] = {"kind": source, "path": self.path(f"data.{source}", value)}
            for k in ("val_fraction", "vocab_size", "dtype", "column", "size", "test_fraction"):
                if k in table:
                    spec[k] = (
                        float(table[k]) if k.endswith("fraction") and isinstance(table[k], int) else table[k]
                    )
            try:
                check_source(spec, owner="data")
            except ValueError as e:
                raise self.fail("[data]", str(e).removeprefix("data: ")) from None
            fields["data"] = spec
        if kind == "lm" and "level" in table:
            if source == "tokens":
                raise self.fail("data.level", "token files hold ids of your own tokenizer: no level")
            fields["level"] = table["level"]
        for k in ("n_train", "n_test"):
            if k in table:
                fields[k] = table[k]
        if ("val_fraction" in table or "column" in table) and source == "corpus":
            raise self.fail(
                "[data]", "val_fraction and column apply to your own text, not to a built-in corpus"
            )
        return kind, fields

    def model(self, kind: str) -> tuple[str, dict[str, Any]]:
        """``(registered model name, its options)`` of ``[model]``."""
        table = self.table("model")
        kinds = [k for k in MODEL_KINDS if k in table]
        if len(kinds) != 1:
            raise self.fail("[model]", f"needs exactly one of {list(MODEL_KINDS)}, got {kinds or 'none'}")
        which = kinds[0]
        allowed = {
            "gpt": ("norm", "placement", "norm_kwargs", "placement_kwargs"),
            "convnet": ("norm", "norm_kwargs"),
            "hf_config": ("norm", "norm_kwargs", "config"),
            "hf": ("norm", "norm_kwargs", "config"),
            "factory": ("norm", "norm_kwargs", "kwargs", "path"),
        }[which]
        unknown = sorted(set(table) - {which, *allowed})
        if unknown:
            raise self.fail(
                f"model.{unknown[0]}", f"unknown key with {which}; the keys are {[which, *allowed]}"
            )
        extras = {k: table[k] for k in allowed if k in table}
        if which in ("gpt", "convnet"):
            want = "lm" if which == "gpt" else "image"
            if kind != want:
                raise self.fail(
                    f"model.{which}",
                    f"is a model of {'text' if want == 'lm' else 'images'}, the data are not",
                )
            options = table[which]
            if not isinstance(options, dict):
                raise self.fail(f"model.{which}", f"must be a table of options, got {options!r}")
            return which, {**options, **extras}
        for k in ("norm_kwargs", "kwargs", "config"):
            if k in extras and not isinstance(extras[k], dict):
                raise self.fail(f"model.{k}", f"must be a table, got {extras[k]!r}")
        suffix = "" if kind == "lm" else "-image"
        if which == "hf":
            if not isinstance(table["hf"], str):
                raise self.fail(
                    "model.hf", f"must be a Hugging Face model_type such as 'llama', got {table['hf']!r}"
                )
            try:
                config = hf_config(table["hf"], extras.pop("config", {})).to_dict()
            except (TypeError, ValueError) as e:
                raise self.fail("model.hf", str(e)) from None
            return "hf" + suffix, {"config": config, **extras}
        if which == "hf_config":
            path = Path(self.path("model.hf_config", table["hf_config"]))
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise self.fail("model.hf_config", f"{str(path)!r} is not a JSON config ({e})") from None
            if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
                raise self.fail(
                    "model.hf_config", f"{str(path)!r} has no model_type: not a Hugging Face config.json"
                )
            try:
                hf_config(config["model_type"])
            except ValueError as e:
                raise self.fail("model.hf_config", str(e)) from None
            config.update(extras.pop("config", {}))
            return "hf" + suffix, {"config": config, **extras}
        target = table["factory"]
        paths = extras.pop("path", ["."])
        paths = [paths] if isinstance(paths, str) else paths
        options = {"target": target, "path": [str((self.base / p).resolve()) for p in paths], **extras}
        try:
            check_factory(options, where="model.factory")
        except ValueError as e:
            raise self.fail("model.factory", str(e).removeprefix("model.factory: ")) from None
        return "factory" + suffix, options

    def train(self, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(TrainConfig fields, task fields)`` of ``[train]``."""
        table = self.table("train")
        train_fields, task_fields = _fields(TrainConfig), tuple(sorted(train_keys(TASKS[kind])))
        unknown = sorted(set(table) - set(train_fields) - set(task_fields) - {"seed"})
        if "seed" in table:
            raise self.fail("train.seed", "seeds are set by the top-level seeds = N (seeds 0 .. N-1)")
        if unknown:
            raise self.fail(
                f"train.{unknown[0]}",
                f"unknown key; the keys are {sorted(set(train_fields) - {'seed'} | set(task_fields))}",
            )
        missing = [k for k in ("steps", "batch_size", "lr") if k not in table]
        if missing:
            raise self.fail(
                "[train]", f"needs {missing} (the optimizer steps, samples per step, peak learning rate)"
            )
        train = {k: v for k, v in table.items() if k in train_fields}
        if "betas" in train:
            train["betas"] = tuple(train["betas"])
        task = {k: v for k, v in table.items() if k in task_fields}
        if "probes" in task:
            task["probes"] = tuple(task["probes"])
        return train, task

    def sweep(self) -> dict[str, list[Any]]:
        table = self.table("sweep", required=False)
        out: dict[str, list[Any]] = {}

        def flatten(prefix: str, node: Mapping[str, Any]) -> None:
            for k, v in node.items():
                key = f"{prefix}{k}"
                if not re.fullmatch(r"[A-Za-z0-9_-]+", k):
                    raise self.fail(f"sweep.{key}", "keys are letters, digits, '_' and '-', joined by dots")
                if isinstance(v, dict):
                    flatten(key + ".", v)
                elif isinstance(v, list) and v:
                    if len({json.dumps(x, sort_keys=True) for x in v}) != len(v):
                        raise self.fail(f"sweep.{key}", f"lists a value twice: {v!r}")
                    out[key] = v
                else:
                    raise self.fail(f"sweep.{key}", f"must be a non-empty list of values, got {v!r}")

        flatten("", table)
        return out


def _default_metric(kind: str) -> str:
    return "val_loss" if kind == "lm" else "test_acc"


def _lower_is_better(metric: str, given: Any, fail: Callable[[str, str], StudyFileError], key: str) -> bool:
    if isinstance(given, bool):
        return given
    if given is not None:
        raise fail(key, f"lower_is_better must be true or false, got {given!r}")
    if LOWER_IS_BETTER.search(metric):
        return True
    if HIGHER_IS_BETTER.search(metric):
        return False
    raise fail(key, f"cannot tell whether a lower {metric!r} is better: add lower_is_better = true or false")


METRICS = {
    "lm": ("val_loss", "train_loss", "diverged"),
    "image": ("test_acc", "test_loss", "train_loss", "diverged"),
}


def _number(value: Any, key: str, fail: Callable[[str, str], StudyFileError]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(key, f"must be a number, got {value!r}")
    return float(value)


RULE_KINDS = ("better", "similar", "exceeds", "rate", "rate_diff")
RULE_OPTIONS = {
    "better": {"k", "lower_is_better", "level", "paired"},
    "similar": {"k", "relative", "paired", "level"},
    "exceeds": {"k", "above", "level"},
    "rate": {"threshold", "above", "lower", "level"},
    "rate_diff": {"threshold", "above", "lower", "level"},
}


def _rule(table: Any, metric: str, key: str, fail: Callable[[str, str], StudyFileError]) -> tuple[Rule, bool]:
    """``(rule, needs side b)`` of a claim's ``rule = {...}``.

    ``{ better = MIN_EFFECT }``, ``{ similar = TOL }``, ``{ exceeds = VALUE }`` (the rules of
    :mod:`normlab.studies.framework`), ``{ rate = R }`` (side a's rate of an event, ``metric >
    threshold`` per seed, is below R: ``lower = false`` for above) and ``{ rate_diff =
    MIN_EFFECT }`` (side a's event rate is lower than side b's). ``level`` is the confidence of
    the interval (default 0.95); ``k`` is deprecated and ignored.
    """
    if not isinstance(table, dict):
        raise fail(key, f"must be a table such as {{ better = 0.01 }}, got {table!r}")
    kinds = [k for k in RULE_KINDS if k in table]
    if len(kinds) != 1:
        raise fail(key, f"needs exactly one of {', '.join(RULE_KINDS)}; got {sorted(table)}")
    which = kinds[0]
    options = {k: v for k, v in table.items() if k != which}
    allowed = RULE_OPTIONS[which]
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise fail(f"{key}.{unknown[0]}", f"unknown option of {which}; options: {sorted(allowed)}")
    k = _number(options["k"], f"{key}.k", fail) if "k" in options else None
    level = _number(options.get("level", DEFAULT_LEVEL), f"{key}.level", fail)
    if not 0.0 < level < 1.0:
        raise fail(f"{key}.level", f"the confidence level must be in (0, 1), such as 0.95; got {level!r}")
    for flag in ("paired", "relative", "above", "lower", "lower_is_better"):
        if flag in options and not isinstance(options[flag], bool):
            raise fail(f"{key}.{flag}", f"must be true or false, got {options[flag]!r}")
    value = _number(table[which], f"{key}.{which}", fail)
    if which == "better":
        if value < 0:
            raise fail(f"{key}.better", f"the minimum effect must be >= 0, got {value!r}")
        lower = _lower_is_better(metric, options.get("lower_is_better"), fail, key)
        paired = bool(options.get("paired", False))
        return Better(lower_is_better=lower, k=k, min_effect=value, level=level, paired=paired), True
    if which == "similar":
        if value <= 0:
            raise fail(f"{key}.similar", f"the tolerance must be > 0, got {value!r}")
        return Similar(
            tol=value,
            relative=bool(options.get("relative", True)),
            k=k,
            paired=bool(options.get("paired", False)),
            level=level,
        ), True
    if which in ("rate", "rate_diff"):
        if not 0.0 <= value <= 1.0 or (which == "rate_diff" and value == 1.0):
            raise fail(f"{key}.{which}", f"must be a rate in [0, 1], got {value!r}")
        threshold = _number(options.get("threshold", 0.5), f"{key}.threshold", fail)
        shared: dict[str, Any] = {
            "threshold": threshold,
            "above": bool(options.get("above", True)),
            "lower": bool(options.get("lower", True)),
            "level": level,
        }
        if which == "rate":
            return Rate(rate=value, **shared), False
        return Rate(min_effect=value, **shared), True
    return Exceeds(value=value, above=bool(options.get("above", True)), k=k, level=level), False


def _label(where: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in where.items()) or "all runs"


def study_from_dict(
    doc: Mapping[str, Any],
    *,
    base_dir: str | Path = ".",
    where: str = "study",
    source: Mapping[str, Any] | None = None,
    narrowed: Sequence[str] = (),
) -> Study:
    """The :class:`Study` a study document describes (a TOML file's tables; see the module
    docstring). Relative paths are relative to ``base_dir``; ``where`` names the document in
    errors. ``narrowed``: sweep keys whose values a ``--set`` replaced; a claim about a value
    they no longer hold is left out (and listed in the plan's ``source.dropped_claims``), not an
    error, so that ``--set 'sweep.norm=["dyt"]'`` runs a file whose claims compare norms.

    Raises:
        StudyFileError: a mistake in the document, before any data is read or any run starts.
    """
    c = _Compiler(doc, where=where, base=Path(base_dir))
    name, title, question, seeds = c.header()
    kind, data_fields = c.data()
    entry, model_options = c.model(kind)
    train_base, task_base = c.train(kind)
    sweep = c.sweep()
    metric = doc.get("metric", _default_metric(kind))
    if metric not in METRICS[kind]:
        raise c.fail("metric", f"{metric!r} is not a metric of these runs: {list(METRICS[kind])}")

    for key in ("norm", "model.norm"):
        for value in sweep.get(key, []) + ([model_options["norm"]] if "norm" in model_options else []):
            if not isinstance(value, str) or value not in NORMS:
                raise c.fail(
                    f"sweep.{key}" if key in sweep else "model.norm",
                    f"{value!r} is not a normlab norm; norms: {NORMS.names()}",
                )
    for value in sweep.get("placement", []) + (
        [model_options["placement"]] if "placement" in model_options else []
    ):
        if not isinstance(value, str) or value not in PLACEMENTS:
            raise c.fail("sweep.placement", f"{value!r} is not a placement; placements: {PLACEMENTS.names()}")
    if "train.seed" in sweep:
        raise c.fail("sweep.train.seed", "seeds come from the top-level seeds = N")

    probes = {"gpt": ("residual",), "convnet": ("activations",)}.get(entry, ("blocks",))
    options_field = "gpt" if kind == "lm" else "convnet"
    base_task = {"model": entry, options_field: model_options, "probes": probes, **task_base, **data_fields}
    points = [dict(zip(sweep, combo, strict=True)) for combo in itertools.product(*sweep.values())] or [{}]
    configs: dict[str, RunConfig] = {}
    checked: set[str] = set()
    for point in points:
        changes = Changes(TASKS[kind], task=base_task, train={**train_base, "seed": 0})
        for key, value in point.items():
            try:
                changes.add(key, value)
            except ValueError as e:
                raise c.fail(f"sweep.{key}", str(e)) from None
        cell = _label(point)
        try:
            config = _with_token_vocab(changes.build(), given="vocab_size" in data_fields.get("data", {}))
        except (TypeError, ValueError) as e:
            raise c.fail(f"cell {cell}" if point else "[model]/[train]", str(e)) from None
        ident = json.dumps([entry, getattr(config.task, options_field)], sort_keys=True)
        if ident not in checked and entry not in FACTORY_MODELS:
            checked.add(ident)
            _check_builds(config, fail=c.fail, cell=cell)
        configs[json.dumps(point, sort_keys=True)] = config

    def build_grid(options: StudyOptions) -> list[RunSpec]:
        def make(*, seed: int, **params: Any) -> RunConfig:
            config = configs[json.dumps(params, sort_keys=True)]
            return config.with_train(seed=seed, steps=options.steps(config.train.steps))

        return grid(GROUP, make, seeds=options.seed_list, points=points)

    dropped: list[dict[str, str]] = []
    claims = _claims(
        doc.get("claim", []),
        sweep=sweep,
        metric_names=METRICS[kind],
        fail=c.fail,
        narrowed=set(narrowed),
        dropped=dropped,
    )
    if dropped:
        source = {**(source or {}), "dropped_claims": dropped}
    rank_lower = _lower_is_better(metric, None, c.fail, "metric")
    return Study(
        name=name,
        title=title,
        question=question or f"Which setting of {', '.join(sweep) or 'the model'} gives the best {metric}?",
        grid=build_grid,
        claims=claims,
        default_seeds=seeds,
        max_seeds=doc.get("max_seeds"),
        budget=str(doc.get("budget", "")),
        rank={"metric": metric, "lower_is_better": rank_lower, "group": GROUP},
        source=dict(source) if source is not None else None,
    )


def _with_token_vocab(config: RunConfig, *, given: bool) -> RunConfig:
    """A Hugging Face model trained on token files keeps its config's vocabulary: the data's
    ``vocab_size`` (unless the file gave one) is the config's, so that an id beyond it is refused."""
    task = config.task
    if task.model not in HF_MODELS or task.data.get("kind") != "tokens" or given:
        return config
    vocab = task.gpt["config"].get("vocab_size") if isinstance(task, LMTask) else None
    if vocab is None:
        return config
    return dataclasses.replace(
        config, task=dataclasses.replace(task, data={**task.data, "vocab_size": vocab})
    )


def _check_builds(config: RunConfig, *, fail: Callable[[str, str], StudyFileError], cell: str) -> None:
    """Build the cell's model on the meta device: a norm, placement or conversion the model
    refuses fails here, before any data is read."""
    task = config.task
    entry = MODELS.get(task.model)
    try:
        if isinstance(task, LMTask):
            vocab = int(task.data.get("vocab_size", 256)) if task.data else 256
            meta_build(lambda: entry.make(task.gpt, vocab_size=vocab, block_size=task.block_size))
        else:
            meta_build(lambda: entry.make(task.convnet, in_channels=1, num_classes=2))
    except (TypeError, ValueError, NotImplementedError) as e:
        raise fail(
            f"cell {cell}" if cell != "all runs" else "[model]", f"the model cannot be built: {e}"
        ) from None


def _claims(
    raw: Any,
    *,
    sweep: Mapping[str, list[Any]],
    metric_names: Sequence[str],
    fail: Callable[[str, str], StudyFileError],
    narrowed: set[str],
    dropped: list[dict[str, str]],
) -> tuple[Claim, ...]:
    if not isinstance(raw, list):
        raise fail("claim", "claims are [[claim]] tables")
    out, ids = [], set()
    for i, table in enumerate(raw):
        key = f"claim[{i}]"
        if not isinstance(table, dict):
            raise fail(key, f"must be a table, got {table!r}")
        unknown = sorted(set(table) - {"id", "text", "paper", "metric", "a", "b", "rule"})
        if unknown:
            raise fail(f"{key}.{unknown[0]}", "unknown key; the keys are id, text, paper, metric, a, b, rule")
        cid = table.get("id")
        if not isinstance(cid, str) or not cid or cid in ids:
            raise fail(f"{key}.id", f"must be a unique non-empty string, got {cid!r}")
        ids.add(cid)
        metric = table.get("metric", metric_names[0])
        if metric not in metric_names:
            raise fail(f"{key}.metric", f"{metric!r} is not a metric of these runs: {list(metric_names)}")
        rule, needs_b = _rule(table.get("rule"), metric, f"{key}.rule", fail)
        sides = [
            _side(table.get(s), s, key, needs_b=needs_b, sweep=sweep, narrowed=narrowed, fail=fail)
            for s in "ab"
        ]
        gone = [why for why in sides if isinstance(why, str)]
        if gone:
            dropped.append({"id": cid, "why": gone[0]})
            continue
        text = table.get("text", cid)
        side_a, side_b = sides
        assert isinstance(side_a, Side) and not isinstance(side_b, str)
        out.append(
            Claim(
                id=cid,
                text=str(text),
                paper=str(table.get("paper", "")),
                metric=metric,
                a=side_a,
                b=side_b,
                rule=rule,
            )
        )
    return tuple(out)


def _side(
    where: Any,
    side: str,
    key: str,
    *,
    needs_b: bool,
    sweep: Mapping[str, list[Any]],
    narrowed: set[str] | None = None,
    fail: Callable[[str, str], StudyFileError],
) -> Side | str | None:
    """Side ``a`` or ``b`` of a claim; ``None`` for an absent side ``b``; a reason (a string)
    when a ``--set`` took the side's value out of the sweep."""
    if side == "b" and not needs_b:
        if where is not None:
            raise fail(f"{key}.b", "an exceeds or rate rule compares side a with a value: no side b")
        return None
    if not isinstance(where, dict):
        raise fail(
            f"{key}.{side}", f'must be a table of sweep values such as {{ norm = "dyt" }}, got {where!r}'
        )
    flat = _flatten(where)
    for k, v in flat.items():
        if k not in sweep:
            raise fail(f"{key}.{side}.{k}", f"not a sweep key; the sweep keys are {list(sweep)}")
        if v not in sweep[k] and narrowed is not None and k in narrowed:
            return f"--set sweep.{k}={sweep[k]!r} leaves out its side {side} ({k}={v!r})"
        if v not in sweep[k]:
            raise fail(f"{key}.{side}.{k}", f"{v!r} is not a value of the sweep: {sweep[k]!r}")
    return Side(label=_label(flat), group=GROUP, where=flat)


def _flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_study_file(path: str | Path, *, sets: Sequence[Set] = ()) -> Study:
    """The study of a ``.toml`` or ``.py`` file (``--set`` pairs applied to a TOML file's text;
    a Python study gets them on its runs, like a registered study).

    Raises:
        StudyFileError: the file is missing, is not TOML / Python, or describes a study wrongly.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise StudyFileError(f"{path}: no such study file")
    if path.suffix == ".toml":
        text = path.read_text(encoding="utf-8")
        try:
            doc = toml_loads(text)
        except TOMLDecodeError as e:
            raise StudyFileError(f"{path}: not valid TOML: {e}") from None
        doc = apply_to_document(doc, sets, where=str(path))
        source = {"file": str(path), "format": "toml", "text": text, "sets": [list(s) for s in sets]}
        narrowed = [key.removeprefix("sweep.") for key, _ in sets if key.startswith("sweep.")]
        return study_from_dict(doc, base_dir=path.parent, where=str(path), source=source, narrowed=narrowed)
    if path.suffix == ".py":
        study = _exec_study(path)
        source = {
            "file": str(path),
            "format": "py",
            "text": path.read_text(encoding="utf-8"),
            "sets": [list(s) for s in sets],
        }
        return dataclasses.replace(study, source=source)
    raise StudyFileError(f"{path}: a study file is .toml or .py, not {path.suffix or 'no suffix'}")


def _exec_study(path: Path) -> Study:
    module_name = f"normlab_user_study_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise StudyFileError(f"{path}: cannot be loaded as Python")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # the file's own modules (a factory next to it) import
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except StudyFileError:
        raise
    except Exception as e:
        raise StudyFileError(f"{path}: running it raised {type(e).__name__}: {e}") from None
    study = getattr(module, "STUDY", None)
    if not isinstance(study, Study):
        raise StudyFileError(
            f"{path}: defines no STUDY = Study(...) (got {type(study).__name__}); see normlab.studies.Study"
        )
    return study
