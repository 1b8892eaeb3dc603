"""The models a training task builds by name: ``MODELS``, like the norm and placement registries.

An entry says which task it serves (``"lm"``: token ids in, next-token logits and loss out;
``"image"``: images in, class logits out), how to build it from the task's options and the
data's facts (``vocab_size`` and ``block_size``; ``in_channels`` and ``num_classes``), and how to
check those options before any data is loaded. A new model is one ``@register_model`` function::

    @register_model("my_lm", task="lm")
    def my_lm(options, *, vocab_size, block_size):
        return MyLM(vocab_size, block_size, **options)

then ``LMTask(model="my_lm", gpt={...its options...})``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from normlab.models.convnet import ConvNet, ConvNetConfig
from normlab.models.gpt import GPT, GPTConfig
from normlab.registry import Registry

__all__ = ["MODELS", "ModelEntry", "build_convnet", "build_gpt", "register_model"]

TaskKind = Literal["lm", "image"]
# the data facts each kind of task passes to the builder
FACTS: dict[str, tuple[str, ...]] = {
    "lm": ("vocab_size", "block_size"),
    "image": ("in_channels", "num_classes"),
}
# facts a builder gets only when its signature names them (older builders do not)
OPTIONAL_FACTS: dict[str, tuple[str, ...]] = {"lm": (), "image": ("image_size",)}
# facts that checking the options assumes, before the data is loaded
_CHECK_FACTS: dict[str, dict[str, int]] = {
    "lm": {"vocab_size": 256, "block_size": 64},
    "image": {"in_channels": 1, "num_classes": 10},
}


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: ``build(options, **facts) -> nn.Module`` for tasks of kind ``task``;
    ``check(options)`` raises a ``ValueError`` for options the model cannot take."""

    name: str
    task: TaskKind
    build: Callable[..., nn.Module]
    check: Callable[[Mapping[str, Any]], object] | None = None

    def validate(self, options: Mapping[str, Any]) -> None:
        for reserved in FACTS[self.task]:
            if reserved in options:
                raise ValueError(
                    f"model {self.name!r}: options must not set {reserved!r} (it comes from the data)"
                )
        if self.check is not None:
            self.check(options)

    def make(self, options: Mapping[str, Any], **facts: Any) -> nn.Module:
        """``build(options, **facts)``, passing an optional fact only to a builder that takes it."""
        optional = [k for k in OPTIONAL_FACTS[self.task] if k in facts]
        if optional:
            params = inspect.signature(self.build).parameters
            takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
            facts = {k: v for k, v in facts.items() if k not in optional or k in params or takes_all}
        return self.build(options, **facts)


MODELS: Registry[ModelEntry] = Registry("model")


def register_model(
    name: str, *, task: TaskKind, check: Callable[[Mapping[str, Any]], object] | None = None
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a builder ``fn(options, **facts)`` as model ``name`` for ``task``."""
    if task not in FACTS:
        raise ValueError(f"register_model: task must be one of {sorted(FACTS)}, got {task!r}")

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS.register(name)(ModelEntry(name, task, fn, check))
        return fn

    return decorator


def gpt_config(options: Mapping[str, Any], *, vocab_size: int, block_size: int) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, block_size=block_size, **dict(options))


def convnet_config(options: Mapping[str, Any], *, in_channels: int, num_classes: int) -> ConvNetConfig:
    opts = dict(options)
    if "widths" in opts:
        opts["widths"] = tuple(opts["widths"])
    return ConvNetConfig(in_channels=in_channels, num_classes=num_classes, **opts)


@register_model("gpt", task="lm", check=lambda options: gpt_config(options, **_CHECK_FACTS["lm"]))
def build_gpt(options: Mapping[str, Any], *, vocab_size: int, block_size: int) -> nn.Module:
    """normlab's GPT; the options are :class:`~normlab.models.GPTConfig` fields."""
    return GPT(gpt_config(options, vocab_size=vocab_size, block_size=block_size))


@register_model(
    "convnet", task="image", check=lambda options: convnet_config(options, **_CHECK_FACTS["image"])
)
def build_convnet(options: Mapping[str, Any], *, in_channels: int, num_classes: int) -> nn.Module:
    """normlab's ConvNet; the options are :class:`~normlab.models.ConvNetConfig` fields."""
    return ConvNet(convnet_config(options, in_channels=in_channels, num_classes=num_classes))
