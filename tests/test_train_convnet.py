"""The image models of the studies: plain CNN and CIFAR ResNet with the norm chosen by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab
from normlab.models import BasicBlock, ConvNet, ConvNetConfig
from normlab.models.convnet import make_conv_norm

CHANNEL_NORMS = ["batchnorm", "groupnorm", "instancenorm", "layernorm", "dyt", "identity", "batchless", "frn"]


@pytest.mark.parametrize("arch", ["plain", "resnet"])
@pytest.mark.parametrize("norm", CHANNEL_NORMS)
def test_every_channel_norm_trains_a_step(arch: str, norm: str) -> None:
    model = ConvNet(ConvNetConfig(arch=arch, widths=(8, 16), depth=1, norm=norm))
    x = torch.randn(4, 1, 12, 12)
    out = model(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    # Batchless's statistics learn from its auxiliary loss only, which the runner adds
    (out.logsumexp(dim=1).mean() + normlab.total_aux_loss(model)).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_layernorm_of_a_cnn_is_groupnorm_with_one_group() -> None:
    norm = make_conv_norm("layernorm", 16)
    assert isinstance(norm, normlab.GroupNorm) and norm.num_groups == 1
    assert make_conv_norm("gn", 16).num_groups == 8  # type: ignore[union-attr]
    assert make_conv_norm("groupnorm", 4).num_groups == 4  # type: ignore[union-attr]
    assert make_conv_norm("dyt", 16).channels_first  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="cannot normalize \\(N, C, H, W\\)"):
        make_conv_norm("lns", 16)


def test_structure_and_skipinit() -> None:
    plain = ConvNet(ConvNetConfig(widths=(8, 16, 32), depth=2))
    convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6 and [c.stride[0] for c in convs] == [1, 1, 2, 1, 2, 1]
    assert all(c.bias is None for c in convs)  # a norm follows every conv
    assert all(isinstance(m, nn.Conv2d) for m in [plain.features[0]])
    res = ConvNet(ConvNetConfig(arch="resnet", widths=(8, 16), depth=2, skipinit=True))
    blocks = [m for m in res.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 4 and all(b.gain is not None and float(b.gain.detach()) == 0.0 for b in blocks)
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(blocks[1](x), torch.relu(x))  # SkipInit: the block starts as the identity (+ReLU)
    assert not isinstance(blocks[2].shortcut, nn.Identity)  # width change: conv1x1 + norm


def test_bad_configs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="arch must be 'plain' or 'resnet'"):
        ConvNetConfig(arch="vgg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="skipinit needs arch='resnet'"):
        ConvNetConfig(skipinit=True)
    with pytest.raises(ValueError, match="unknown norm"):
        ConvNetConfig(norm="batchnrm")
    with pytest.raises(ValueError, match=r"expected input \(N, 1, H, W\)"):
        ConvNet(ConvNetConfig())(torch.randn(2, 3, 8, 8))


def test_batchnorm_at_batch_one_names_the_layer() -> None:
    model = ConvNet(ConvNetConfig(widths=(4,), depth=1))
    normlab.label_modules(model)
    model.train()
    model(torch.randn(1, 1, 4, 4))  # spatial positions give BatchNorm enough values per channel
    with pytest.raises(ValueError, match=r"features\.1"):
        model(torch.randn(1, 1, 1, 1))
