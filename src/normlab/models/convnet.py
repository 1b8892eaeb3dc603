"""Small image classifiers whose norm is chosen by name: a VGG-like plain CNN and a CIFAR ResNet.

- ``arch="plain"``: stages of ``conv3x3 -> norm -> ReLU`` (a stride-2 conv opens every stage
  after the first), global average pooling, a linear head: the VGG-like nets of Lubana et al.
  2021 (arXiv:2106.05956) at toy width.
- ``arch="resnet"``: the CIFAR ResNet of He et al. 2016 (arXiv:1512.03385, section 4.2): a
  3x3 stem, stages of BasicBlocks ``relu(norm(conv(relu(norm(conv x)))) + shortcut(x))``, the
  shortcut a strided ``conv1x1 -> norm`` where the shape changes. ``skipinit=True`` multiplies
  every residual branch by a learned scalar initialised to 0 (SkipInit, De & Smith 2020,
  arXiv:2002.10444), so that each block starts as the identity.

Norms are built with :func:`normlab.create_norm` on ``(N, C, H, W)`` feature maps: norms of the
``"channel"`` layout as they are, norms with a ``channels_first`` option (DyT, Derf, ...) with
it set, and ``"layernorm"`` as the original CNN LayerNorm over ``(C, H, W)``, which is
``GroupNorm(num_groups=1)`` (Wu & He 2018, arXiv:1803.08494). GroupNorm defaults to
``num_groups=min(8, C)`` (the paper's 32 groups do not divide the widths of these toys);
``norm_kwargs={"group_size": g}`` fixes the channels per group instead (``num_groups = C / g`` in
every layer, as Lubana et al.'s ``p_grouping < 1``): ``g = 1`` is InstanceNorm.

A Cross-Iteration BatchNorm (``"cbn"``, Yao et al. 2021, arXiv:2002.05712) is attached to the
conv right before it, whose weight its Taylor compensation needs.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.norms import NORMS, CrossIterationBatchNorm, create_norm
from normlab.norms._base import Device, DType


def make_conv_norm(
    norm: str, num_channels: int, *, device: Device = None, dtype: DType = None, **kwargs: Any
) -> nn.Module:
    """A norm for ``(N, C, *)`` feature maps, by registered name (see the module docstring)."""
    name = NORMS.resolve(norm)
    cls = NORMS.get(name)
    opts: dict[str, Any] = {"device": device, "dtype": dtype, **kwargs}
    if name == "layernorm":
        # the original LayerNorm of a CNN normalizes over (C, H, W): GroupNorm with one group
        return create_norm("groupnorm", num_channels, num_groups=1, **opts)
    if "group_size" in opts:
        size = opts.pop("group_size")
        if name != "groupnorm":
            raise ValueError(f"ConvNet: group_size is a GroupNorm option, got norm {norm!r}")
        if "num_groups" in opts:
            raise ValueError("ConvNet: give group_size or num_groups, not both")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or num_channels % size:
            raise ValueError(
                f"ConvNet: group_size must be a positive int dividing every width, got {size!r} "
                f"for {num_channels} channels"
            )
        opts["num_groups"] = num_channels // size
    if name == "groupnorm" and "num_groups" not in opts:
        opts["num_groups"] = min(8, num_channels)
    if cls.spec.layout == "channel":  # type: ignore[attr-defined]
        return create_norm(name, num_channels, **opts)
    if "channels_first" in inspect.signature(cls.__init__).parameters:
        return create_norm(name, num_channels, channels_first=True, **opts)
    raise ValueError(
        f"ConvNet: norm {norm!r} normalizes the last dimension and has no channels_first option, "
        "so it cannot normalize (N, C, H, W) feature maps; use a channel norm "
        "(batchnorm, groupnorm, instancenorm, layernorm as GroupNorm(1), dyt, ...)"
    )


@dataclass(frozen=True, kw_only=True)
class ConvNetConfig:
    """Attributes:
    arch: ``"plain"`` (VGG-like) or ``"resnet"`` (CIFAR ResNet with BasicBlocks).
    in_channels: image channels (1 for Fashion-MNIST).
    num_classes: outputs of the linear head.
    widths: channels of each stage; every stage after the first halves the resolution.
    depth: conv layers per stage (plain) or BasicBlocks per stage (resnet).
    norm: a registered norm name; ``norm_kwargs`` are passed to every norm.
    skipinit: resnet only: a residual-branch gain initialised to 0 (SkipInit).
    """

    arch: Literal["plain", "resnet"] = "plain"
    in_channels: int = 1
    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32, 64)
    depth: int = 2
    norm: str = "batchnorm"
    norm_kwargs: Mapping[str, Any] = field(default_factory=dict)
    skipinit: bool = False

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.arch not in ("plain", "resnet"):
            raise ValueError(f"{owner}: arch must be 'plain' or 'resnet', got {self.arch!r}")
        for name in ("in_channels", "num_classes", "depth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{owner}: {name} must be a positive int, got {v!r}")
        if not self.widths or any(
            isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in self.widths
        ):
            raise ValueError(
                f"{owner}: widths must be a non-empty tuple of positive ints, got {self.widths!r}"
            )
        if self.skipinit and self.arch != "resnet":
            raise ValueError(f"{owner}: skipinit needs arch='resnet', got arch={self.arch!r}")
        NORMS.resolve(self.norm)  # unknown names fail here, with suggestions


def _conv3x3(c_in: int, c_out: int, stride: int, bias: bool, dd: dict[str, Any]) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias, **dd)


def _paired(conv: nn.Conv2d, norm: nn.Module) -> nn.Module:
    """``norm``, attached to ``conv`` if it is a CBN (its compensation needs the conv's weight)."""
    if isinstance(norm, CrossIterationBatchNorm):
        norm.attach(conv)
    return norm


class BasicBlock(nn.Module):
    """``relu(gain * norm2(conv2(relu(norm1(conv1 x)))) + shortcut(x))`` (He et al. 2016).

    ``gain`` is a learned scalar initialised to 0 with ``skipinit`` (De & Smith 2020), else
    absent (1). The shortcut is the identity, or ``norm(conv1x1(x))`` when the stride or the
    width changes ("option B").
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        *,
        stride: int,
        cfg: ConvNetConfig,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__()
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        conv_bias = NORMS.resolve(cfg.norm) == "identity"
        self.conv1 = _conv3x3(c_in, c_out, stride, conv_bias, dd)
        self.norm1 = _paired(self.conv1, make_conv_norm(cfg.norm, c_out, **dd, **cfg.norm_kwargs))
        self.conv2 = _conv3x3(c_out, c_out, 1, conv_bias, dd)
        self.norm2 = _paired(self.conv2, make_conv_norm(cfg.norm, c_out, **dd, **cfg.norm_kwargs))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            short = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=conv_bias, **dd)
            self.shortcut = nn.Sequential(
                short, _paired(short, make_conv_norm(cfg.norm, c_out, **dd, **cfg.norm_kwargs))
            )
        self.gain = nn.Parameter(torch.zeros((), **dd)) if cfg.skipinit else None

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        if self.gain is not None:
            h = h * self.gain
        return F.relu(h + self.shortcut(x))


class ConvNet(nn.Module):
    """An image classifier: ``ConvNet(ConvNetConfig(arch="resnet", norm="groupnorm"))``.

    ``forward(x)`` takes ``(N, in_channels, H, W)`` and returns logits ``(N, num_classes)``.
    ``features`` is the convolutional trunk (a ``Sequential`` of layers/blocks), so hooks can
    probe each stage. Convs use Kaiming-normal init (fan-in, ReLU gain), as Lubana et al.
    """

    def __init__(self, config: ConvNetConfig, *, device: Device = None, dtype: DType = None) -> None:
        super().__init__()
        self.config = cfg = config
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        conv_bias = NORMS.resolve(cfg.norm) == "identity"
        layers: list[nn.Module] = []
        c_in = cfg.in_channels
        if cfg.arch == "plain":
            for i, width in enumerate(cfg.widths):
                for j in range(cfg.depth):
                    stride = 2 if i > 0 and j == 0 else 1
                    conv = _conv3x3(c_in, width, stride, conv_bias, dd)
                    layers += [
                        conv,
                        _paired(conv, make_conv_norm(cfg.norm, width, **dd, **cfg.norm_kwargs)),
                        nn.ReLU(),
                    ]
                    c_in = width
        else:
            w0 = cfg.widths[0]
            stem = _conv3x3(c_in, w0, 1, conv_bias, dd)
            layers += [stem, _paired(stem, make_conv_norm(cfg.norm, w0, **dd, **cfg.norm_kwargs)), nn.ReLU()]
            c_in = w0
            for i, width in enumerate(cfg.widths):
                for j in range(cfg.depth):
                    stride = 2 if i > 0 and j == 0 else 1
                    layers.append(BasicBlock(c_in, width, stride=stride, cfg=cfg, **dd))
                    c_in = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, cfg.num_classes, **dd)
        self.init_weights()

    def init_weights(self) -> None:
        """Kaiming-normal convs (fan-in, ReLU), zero conv biases, norms reset, SkipInit gains 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, BasicBlock) and m.gain is not None:
                with torch.no_grad():
                    m.gain.zero_()
            elif m is not self and hasattr(m, "spec"):
                reset = getattr(m, "reset_parameters", None)
                if callable(reset):
                    reset()
        self.head.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"ConvNet: expected input (N, {self.config.in_channels}, H, W), got shape {tuple(x.shape)}"
            )
        h = self.features(x)
        out: Tensor = self.head(h.mean(dim=(2, 3)))
        return out
