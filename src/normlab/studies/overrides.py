"""``--set key=value``: change one setting of a study without editing it (torchtitan's job-config
overrides, nanoGPT's configurator).

The value is TOML (``--set train.lr=3e-4``, ``--set 'sweep.norm=["dyt", "rmsnorm"]'``); a value
that is not TOML is a string (``--set model.norm=dyt``). For a study file the key is a path into
the file (``train.steps``, ``sweep.norm``, ``data.level``) and is applied before the file is read;
for a registered study (its grid is code) it changes every run's configuration:

``train.K``, ``model.K`` (and the shorthands ``norm``, ``placement``, ``norm_kwargs.K``) or
``data.K``, the keys of a study file's ``[sweep]`` (:class:`Changes` says what each sets). A key
that names a setting of some runs only (``model.n_embd`` in a study of GPTs and ConvNets) changes
those.

An override that would make two cells of the grid the same run is refused: it sets what the study
varies. Every override is written into ``plan.json``.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from normlab.convert.zoo import FACTORY_MODELS, HF_MODELS
from normlab.train.config import ImageTask, LMTask, RunConfig, TrainConfig, config_hash

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the same parser, from PyPI
    import tomli as tomllib

TOMLDecodeError = tomllib.TOMLDecodeError
toml_loads = tomllib.loads

__all__ = [
    "DATA_FIELDS",
    "Changes",
    "TOMLDecodeError",
    "apply_to_document",
    "apply_to_specs",
    "parse_set",
    "set_path",
    "toml_loads",
    "train_keys",
]

Set = tuple[str, Any]


class NotApplicableError(ValueError):
    """The key names no setting of this run's task or model (it may name one of another run's)."""


# the task fields that say which data a run reads; the rest of the task's fields are [train]'s
DATA_FIELDS = {"corpus", "level", "dataset", "n_train", "n_test", "data"}
SHORTHANDS = ("norm", "placement", "norm_kwargs", "placement_kwargs")


def parse_set(text: str) -> Set:
    """``"train.lr=3e-4"`` -> ``("train.lr", 0.0003)``; a value that is not TOML stays a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"--set {text!r}: expected KEY=VALUE with a dotted KEY, e.g. train.steps=2000")
    try:
        value: Any = toml_loads(f"v = {raw.strip()}")["v"]
    except TOMLDecodeError:
        value = raw.strip()
    return key, value


def apply_to_document(doc: Mapping[str, Any], sets: Iterable[Set], *, where: str) -> dict[str, Any]:
    """A copy of the study document with each ``(key, value)`` set (tables made as needed)."""
    out: dict[str, Any] = _copy(doc)
    for key, value in sets:
        try:
            set_path(out, key.split("."), value)
        except ValueError as e:
            raise ValueError(f"{where}: --set {key}: {e}") from None
    return out


def set_path(node: dict[str, Any], parts: Sequence[str], value: Any) -> None:
    """``node[p0][p1]...[pn] = value``, making the tables on the way; a non-table on the way is a
    ``ValueError`` naming it."""
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"{'.'.join(parts[: i + 1])} is {child!r}, not a table")
        node = child
    node[parts[-1]] = value


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def train_keys(task: type[LMTask] | type[ImageTask]) -> set[str]:
    """The task fields a ``train.K`` key sets besides TrainConfig's (``block_size``, ``probes``...):
    those that say neither which data nor which model."""
    return _fields(task) - DATA_FIELDS - {"model", "gpt", "convnet"}


def _tuple_fields(value: Any, name: str) -> Any:
    return tuple(value) if name in ("betas", "probes") and isinstance(value, list) else value


class Changes:
    """A run's configuration as plain fields, changed key by key, then built (and checked) at once:
    two keys that only make sense together (``train.batch_size`` and ``train.accum_steps``) are
    checked together. :meth:`of` starts from a configuration; a study file starts from its tables.

    The keys, shared by ``--set`` and a study file's ``[sweep]``:

    - ``train.K``: a :class:`~normlab.train.TrainConfig` field or a task field of :func:`train_keys`;
    - ``model.K[.SUB...]`` and the shorthands ``norm``, ``placement``, ``norm_kwargs.K``,
      ``placement_kwargs.K``: an option of the model. normlab's GPT and ConvNet: a config field;
      a Hugging Face model (``"hf"``): ``norm``, ``norm_kwargs``, else a field of its config; a
      factory: ``norm``, ``norm_kwargs``, else an argument of the function;
    - ``data.K``: an option of the user's data source (``val_fraction``, ``size``, ...), the text
      ``level``, an image task's ``n_train`` / ``n_test``, or the built-in ``corpus`` /
      ``dataset`` of a task without user data.

    :meth:`add` raises :class:`NotApplicableError` for a key that names no setting of this run
    (it may name one of another run's) and ``ValueError`` for a malformed one; :meth:`build` raises
    what the configuration's own checks raise.
    """

    def __init__(
        self, task_cls: type[LMTask] | type[ImageTask], *, task: Mapping[str, Any], train: Mapping[str, Any]
    ) -> None:
        self.task_cls = task_cls
        self.options_field = "gpt" if task_cls is LMTask else "convnet"
        self.task: dict[str, Any] = _copy(dict(task))
        self.task.setdefault(self.options_field, {})
        self.task.setdefault("data", {})
        self.train: dict[str, Any] = dict(train)

    @classmethod
    def of(cls, config: RunConfig) -> Changes:
        def fields(obj: Any) -> dict[str, Any]:
            return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}

        return cls(type(config.task), task=fields(config.task), train=fields(config.train))

    @property
    def model(self) -> str:
        return str(self.task.get("model", self.options_field))

    def add(self, key: str, value: Any) -> None:
        head, _, rest = key.partition(".")
        if head in SHORTHANDS:
            head, rest = "model", key
        if not rest or head not in ("train", "model", "data"):
            raise ValueError(f"keys are train.NAME, model.NAME, data.NAME, or {', '.join(SHORTHANDS)}")
        {"train": self._train, "model": self._model, "data": self._data}[head](rest, value)

    def _train(self, name: str, value: Any) -> None:
        tasks = train_keys(self.task_cls)
        if name in _fields(TrainConfig):
            self.train[name] = _tuple_fields(value, name)
        elif name in tasks:
            self.task[name] = _tuple_fields(value, name)
        else:
            raise NotApplicableError(
                f"{name!r} is not a training setting; known: {sorted(_fields(TrainConfig) | tasks)}"
            )

    def _data(self, name: str, value: Any) -> None:
        from normlab.data.user import SOURCE_OPTIONS

        data = self.task["data"]
        source = data.get("kind")
        lm = self.task_cls is LMTask
        # the task's own data fields: which built-in set, the text level, the image subsets
        task_fields = {"level"} if lm and source != "tokens" else set()
        task_fields |= set() if lm else {"n_train", "n_test"}
        task_fields |= {"corpus" if lm else "dataset"} if source is None else set()
        if source is not None and name in SOURCE_OPTIONS[source]:
            data[name] = value
        elif name in task_fields:
            self.task[name] = value
        else:
            what = source or ("a built-in corpus" if lm else "a built-in image set")
            raise NotApplicableError(f"no run of {what} data reads {name!r}")

    def _model(self, path: str, value: Any) -> None:
        model = self.model
        parts = path.split(".")
        name = parts[0]
        target = self.task[self.options_field]
        if model in ("gpt", "convnet"):
            known = _model_options(model)
            if name not in known:
                raise NotApplicableError(f"{name!r} is not an option of {model}; options: {sorted(known)}")
        elif model in (*HF_MODELS, *FACTORY_MODELS):
            if name in ("placement", "placement_kwargs"):
                raise NotApplicableError(f"placement applies to normlab's GPT; a {model} model keeps its own")
            if name not in ("norm", "norm_kwargs") and model in HF_MODELS:
                from normlab.models.hf import hf_config

                target = target["config"]
                if name not in set(hf_config(target["model_type"]).to_dict()) | set(target):
                    raise NotApplicableError(f"{name!r} is not a field of {target['model_type']}'s config")
            elif name not in ("norm", "norm_kwargs"):
                target = target.setdefault("kwargs", {})
        set_path(target, parts, value)

    def build(self) -> RunConfig:
        """The configuration, checked by its own classes (``TypeError``/``ValueError``)."""
        return RunConfig(task=self.task_cls(**_copy(self.task)), train=TrainConfig(**self.train))


def _model_options(model: str) -> set[str]:
    """The options of normlab's own models: their config fields less the data's facts."""
    from normlab.models import ConvNetConfig, GPTConfig

    if model == "gpt":
        return _fields(GPTConfig) - {"vocab_size", "block_size"}
    return _fields(ConvNetConfig) - {"in_channels", "num_classes"}


def apply_to_specs(specs: Sequence[Any], sets: Iterable[Set], *, study: str) -> list[Any]:
    """The grid of a registered study with every run's configuration overridden. A key that names
    a setting of some runs only (``model.n_embd`` in a study of GPTs and ConvNets) changes those.

    Raises:
        ValueError: a key that is a setting of no run, a value its field refuses, or an override
            that makes two cells one run (it sets what the study varies).
    """
    sets = list(sets)
    if not sets:
        return list(specs)
    out = []
    applied: set[str] = set()
    refused: dict[str, str] = {}
    for spec in specs:
        changes = Changes.of(spec.config)
        for key, value in sets:
            try:
                changes.add(key, value)
            except NotApplicableError as e:
                refused.setdefault(key, f"--set {key}: {e}")
                continue
            except ValueError as e:
                raise ValueError(f"study {study!r}: --set {key}: {e}") from None
            applied.add(key)
        try:
            config = changes.build()
        except (TypeError, ValueError) as e:
            raise ValueError(f"study {study!r}: run {spec.key}: {e}") from None
        out.append(dataclasses.replace(spec, config=config))
    for key, _ in sets:
        if key not in applied:
            raise ValueError(f"study {study!r}: {refused[key]}")
    seen: dict[str, str] = {}
    for spec in out:
        digest = config_hash(spec.config)
        if digest in seen and seen[digest] != spec.key:
            what = ", ".join(f"{k}={v!r}" for k, v in sets)
            raise ValueError(
                f"study {study!r}: --set {what} makes runs {seen[digest]} and {spec.key} identical: "
                "it sets what the study varies"
            )
        seen[digest] = spec.key
    return out
