"""``--set key=value``: change one setting of a study without editing it (torchtitan's job-config
overrides, nanoGPT's configurator).

The value is TOML (``--set train.lr=3e-4``, ``--set 'sweep.norm=["dyt", "rmsnorm"]'``); a value
that is not TOML is a string (``--set model.norm=dyt``). For a study file the key is a path into
the file (``train.steps``, ``sweep.norm``, ``data.level``) and is applied before the file is read;
for a registered study (its grid is code) it changes every run's configuration:

- ``train.K``: a field of :class:`~normlab.train.TrainConfig` (``steps``, ``lr``, ...) or of the task
  (``block_size``, ``eval_batches``, ...);
- ``model.K`` (and the shorthands ``norm``, ``placement``, ``norm_kwargs.K``): an option of the model
  (a :class:`~normlab.models.GPTConfig` / :class:`~normlab.models.ConvNetConfig` field);
- ``data.K``: a data field of the task (``corpus``, ``level``, ``dataset``, ``n_train``, ``n_test``).

An override that would make two cells of the grid the same run is refused: it sets what the study
varies. Every override is written into ``plan.json``.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from normlab.train.config import ImageTask, LMTask, RunConfig, TrainConfig, config_hash

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the same parser, from PyPI
    import tomli as tomllib

TOMLDecodeError = tomllib.TOMLDecodeError
toml_loads = tomllib.loads

__all__ = [
    "DATA_FIELDS",
    "TOMLDecodeError",
    "apply_to_document",
    "apply_to_specs",
    "override_config",
    "parse_set",
    "toml_loads",
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
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(
                    f"{where}: --set {key}: {'.'.join(parts[: i + 1])} is {child!r}, not a table"
                )
            node = child
        node[parts[-1]] = value
    return out


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def override_config(config: RunConfig, key: str, value: Any) -> RunConfig:
    """``config`` with one ``--set`` applied (see the module docstring)."""
    task = config.task
    head, _, rest = key.partition(".")
    options_field = "gpt" if isinstance(task, LMTask) else "convnet"
    if head in SHORTHANDS:
        head, rest = "model", key
    if head == "train" and rest:
        if rest in _fields(TrainConfig):
            if rest == "betas":
                value = tuple(value)
            return config.with_train(**{rest: value})
        task_fields = _fields(type(task)) - DATA_FIELDS - {"model", options_field}
        if rest in task_fields:
            return dataclasses.replace(config, task=dataclasses.replace(task, **{rest: value}))
        raise NotApplicableError(
            f"--set {key}: {rest!r} is not a training setting; "
            f"known: {sorted(_fields(TrainConfig) | task_fields)}"
        )
    if head == "data" and rest:
        known = sorted(DATA_FIELDS & _fields(type(task)) - {"data"})
        if rest not in known:
            raise ValueError(
                f"--set {key}: {rest!r} is not a data setting of a {config.kind} task; known: {known}"
            )
        return dataclasses.replace(config, task=dataclasses.replace(task, **{rest: value}))
    if head == "model" and rest:
        options = _copy(dict(getattr(task, options_field)))
        name, _, sub = rest.partition(".")
        known_options = _model_fields(task.model)
        if known_options is not None and name not in known_options:
            raise NotApplicableError(
                f"--set {key}: {name!r} is not an option of model {task.model!r}; "
                f"known: {sorted(known_options)}"
            )
        if sub:
            table = options.setdefault(name, {})
            if not isinstance(table, dict):
                raise ValueError(f"--set {key}: model option {name!r} is {table!r}, not a table")
            table[sub] = value
        else:
            options[name] = value
        new_task: LMTask | ImageTask = dataclasses.replace(task, **{options_field: options})
        return dataclasses.replace(config, task=new_task)
    raise ValueError(
        f"--set {key}: keys are train.NAME, model.NAME, data.NAME, or {', '.join(SHORTHANDS)}"
        " (seeds and scale have their own flags)"
    )


def _model_fields(model: str) -> set[str] | None:
    """The options normlab's own models take (``None``: a model whose options are not a dataclass)."""
    from normlab.models import ConvNetConfig, GPTConfig

    fields = {"gpt": GPTConfig, "convnet": ConvNetConfig}.get(model)
    return None if fields is None else _fields(fields)


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
        config = spec.config
        for key, value in sets:
            try:
                config = override_config(config, key, value)
            except NotApplicableError as e:
                refused.setdefault(key, str(e))
                continue
            except (TypeError, ValueError) as e:
                raise ValueError(f"study {study!r}: run {spec.key}: {e}") from None
            applied.add(key)
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
