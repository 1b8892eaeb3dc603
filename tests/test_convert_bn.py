"""BatchNorm conversions on a plain torch ResNet: GroupNorm, Batchless, CrossBatchNorm, back; fold; freeze."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import Tensor, nn

import normlab
from normlab.convert import (
    convert_norms,
    convert_sync,
    fold_batchnorm,
    freeze_batchnorm,
    revert,
    revert_sync,
    unfreeze_batchnorm,
)
from normlab.convert.batchnorm import FrozenBatchNorm2d


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: conv-bn-relu-conv-bn plus a (conv-bn) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 16, 2))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10), nn.BatchNorm1d(10)
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.layers(self.stem(x)))
        return out


def _trained_resnet() -> ResNet:
    """Running statistics and affine away from their init, as in a trained model."""
    model = ResNet()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
        model.train()
        for _ in range(3):
            model(torch.randn(8, 3, 8, 8, generator=gen) * 2 + 0.5)
    return model.eval()


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


X = torch.randn(4, 3, 8, 8)


def test_batchnorm_to_groupnorm_runs_and_reverts() -> None:
    model = _trained_resnet()
    before = _state(model)
    report = convert_norms(model, "groupnorm", where=nn.BatchNorm2d, num_groups=4)
    assert len(report) == 6 and all(r.target == "GroupNorm" for r in report.replaced)
    rec = report.replaced[0]
    assert rec.copied == {"weight": "weight", "bias": "bias"} and rec.relation == "approximate: new function"
    assert rec.dropped == ["running_mean", "running_var", "num_batches_tracked"]
    assert type(model.head[3]) is nn.BatchNorm1d  # not selected
    model(X).sum().backward()
    assert model.layers[1].bn2.weight.grad is not None
    revert(model, report)
    assert _same(before, _state(model))
    # without num_groups: the paper's 32 where it divides the channels, else gcd(32, C)
    report = convert_norms(model, "groupnorm", dry_run=True)
    assert {r.options["num_groups"] for r in report.replaced} == {8, 16, 2}


def test_batchnorm_to_batchless_is_equal_in_eval() -> None:
    model = _trained_resnet()
    ref = model(X)
    report = convert_norms(model, "batchless")
    assert len(report) == 7 and {r.relation for r in report.replaced} == {"exact in eval"}
    assert report.replaced[0].copied["log_std"] == "sqrt(running_var + eps)"
    assert model.head[3].channels_first is True  # BatchNorm1d on (N, C): channel layout kept
    torch.testing.assert_close(model(X), ref, rtol=1e-5, atol=1e-5)
    model.train()
    loss = model(X).square().mean() + normlab.total_aux_loss(model)
    loss.backward()
    assert torch.isfinite(loss)


def test_batchnorm_to_cross_process_batchnorm_and_back() -> None:
    model = _trained_resnet()
    before = _state(model)
    ref_eval = model(X)
    report = convert_norms(model, "crossbn")
    assert {r.relation for r in report.replaced} == {"exact"} and len(report) == 7
    assert set(report.replaced[0].shared) == {
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    assert torch.equal(model(X), ref_eval)  # no process group: BatchNorm exactly
    revert(model, report)
    assert _same(before, _state(model)) and type(model.stem[1]) is nn.BatchNorm2d
    # a training step in the converted model reaches the reverted one (the same tensors)
    report = convert_norms(model, "crossbn")
    model.train()
    model(X)
    trained = _state(model)
    revert(model, report)
    assert _same(trained, _state(model)) and model.training
    # the same through convert_sync / revert_sync (shared with the cross-process BN)
    model = convert_sync(model)
    assert isinstance(model.layers[0].bn1, normlab.CrossBatchNorm)
    model = revert_sync(model)
    assert type(model.layers[0].bn1) is nn.BatchNorm2d and _same(trained, _state(model))


def test_fold_batchnorm_into_the_resnet_convs() -> None:
    model = _trained_resnet()
    ref = model(X)
    report = fold_batchnorm(model)
    assert report.folded["layers.0.bn1"] == ("layers.0.conv1",)  # found by tracing BasicBlock.forward
    assert report.folded["layers.1.downsample.1"] == ("layers.1.downsample.0",)  # a Sequential
    assert report.folded["head.3"] == ("head.2",) and report.refused == {}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(X), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (nn.Conv1d(4, 6, 3, bias=True), (2, 4, 9)),
        (nn.Conv2d(4, 8, 3, groups=2, bias=False), (2, 4, 7, 7)),  # grouped
        (nn.Conv2d(6, 6, 3, groups=6, bias=True), (2, 6, 7, 7)),  # depthwise
        (nn.Conv3d(2, 4, 2, bias=False), (2, 2, 4, 4, 4)),
        (nn.Linear(5, 6), (3, 5)),
    ],
)
def test_fold_batchnorm_conv_kinds(conv: nn.Module, shape: tuple[int, ...]) -> None:
    out = conv.weight.shape[0]
    bn = {3: nn.BatchNorm1d, 2: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)](out)
    with torch.no_grad():
        bn.running_mean.normal_(0, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_(1, 0.3)
        bn.bias.normal_(0, 0.3)
    model = nn.Sequential(conv, bn).eval()
    x = torch.randn(shape)
    ref = model(x)
    report = fold_batchnorm(model)
    assert report.folded == {"1": ("0",)} and isinstance(model[1], nn.Identity)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_refusals_and_errors() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 3, 2), nn.BatchNorm2d(3)).eval()
    report = fold_batchnorm(model)
    assert report.folded == {}
    assert "first layer" in report.refused["0"] and "weight dimension 1" in report.refused["2"]
    training = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match=r"BatchNorm2d '1' is in training mode.*nothing was folded"):
        fold_batchnorm(training)
    stats_free = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match=r"BatchNorm2d '1' has no running statistics"):
        fold_batchnorm(stats_free)


def test_freeze_survives_train_and_unfreezes() -> None:
    model = _trained_resnet()
    model.layers[0].bn1.weight.requires_grad_(False)  # a flag the user set: unfreeze keeps it
    before = _state(model)
    frozen = freeze_batchnorm(model, where="layers")
    assert frozen == ["layers.0.bn1", "layers.0.bn2", "layers.1.bn1", "layers.1.bn2", "layers.1.downsample.1"]
    bn = model.layers[0].bn2
    assert type(bn) is FrozenBatchNorm2d and isinstance(bn, nn.BatchNorm2d)
    model.train()
    assert not bn.training and model.stem[1].training
    model(X * 3 + 2).sum().backward()
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("layers."))
    assert not torch.equal(before["stem.1.running_mean"], after["stem.1.running_mean"])
    assert bn.weight.grad is None and not bn.weight.requires_grad
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone.train()
        assert not clone.layers[0].bn2.training
    assert freeze_batchnorm(model, where="layers") == []  # already frozen
    thawed = unfreeze_batchnorm(model)
    assert len(thawed) == 5 and type(bn) is nn.BatchNorm2d and bn.training and bn.weight.requires_grad
    assert not model.layers[0].bn1.weight.requires_grad
    model.eval()
    assert not bn.training
