"""BatchNorm's running statistics and its degenerate batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab


def _batch(seed: int, shape: tuple[int, ...] = (5, 3, 4, 2)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1


def test_one_step_from_defaults_matches_the_worked_values() -> None:
    """PyTorch convention: running_mean = 0.1·μ, running_var = 0.9 + 0.1·σ²·n/(n−1) after one step."""
    bn = normlab.BatchNorm(3, dtype=torch.float64)
    x = _batch(0)
    bn(x)
    n = x.numel() / 3
    mu = x.mean(dim=(0, 2, 3))
    var_biased = x.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(bn.running_mean, 0.1 * mu, atol=1e-15, rtol=1e-14)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * var_biased * n / (n - 1), atol=1e-15, rtol=1e-14)
    assert bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_running_stats_follow_torch_over_many_steps(momentum: float | None) -> None:
    ours = normlab.BatchNorm(3, momentum=momentum)
    theirs = nn.BatchNorm2d(3, momentum=momentum)
    for step in range(6):
        x = _batch(step).float()
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(ours.running_var, theirs.running_var, atol=1e-7, rtol=1e-6)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 6
    ours.eval()
    theirs.eval()
    x = _batch(99).float()
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)


def test_cumulative_average_is_the_mean_of_batch_statistics() -> None:
    bn = normlab.BatchNorm(3, momentum=None, dtype=torch.float64)
    batches = [_batch(s) for s in range(5)]
    for x in batches:
        bn(x)
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in batches]).mean(0)
    variances = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, means, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(bn.running_var, variances, atol=1e-12, rtol=1e-12)


def test_reset_running_stats() -> None:
    bn = normlab.BatchNorm(3)
    bn(_batch(0).float())
    bn(torch.full((2, 3), float("nan")))
    bn.reset_running_stats()
    assert torch.equal(bn.running_mean, torch.zeros(3))
    assert torch.equal(bn.running_var, torch.ones(3))
    assert bn.num_batches_tracked.item() == 0 and bn.skipped_updates.item() == 0


def test_without_running_stats_eval_uses_the_batch() -> None:
    bn = normlab.BatchNorm(3, track_running_stats=False).eval()
    assert bn.running_mean is None and "running_mean" not in bn.state_dict()
    x = _batch(0).float()
    torch.testing.assert_close(bn(x), nn.BatchNorm2d(3, track_running_stats=False).eval()(x))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, 3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_batch_leaves_the_running_stats_alone(bad: float) -> None:
    """torch's BN keeps a NaN forever (pytorch#1206); normlab skips the update and counts it."""
    bn = normlab.BatchNorm(3)
    bn(_batch(0).float())
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = _batch(1).float()
    x[2, 1, 0, 0] = bad
    out = bn(x)
    assert not torch.isfinite(out).all()  # the bad batch is not hidden from the caller
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert bn.skipped_updates.item() == 1
    bn(_batch(2).float())
    assert bn.num_batches_tracked.item() == 2
    assert torch.isfinite(bn.eval()(_batch(3).float())).all()


def test_overflowing_variance_is_skipped_too() -> None:
    bn = normlab.BatchNorm(2)
    bn(torch.tensor([[3e38, 0.0], [-3e38, 1.0]]))  # finite input, variance overflows fp32
    assert bn.skipped_updates.item() == 1 and torch.equal(bn.running_var, torch.ones(2))


def test_one_value_per_channel_raises_only_with_batch_statistics() -> None:
    bn = normlab.BatchNorm(4)
    with pytest.raises(ValueError, match=r"BatchNorm: expected more than 1 value per channel.*\(1, 4\)"):
        bn(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"\(1, 4, 1, 1\)"):
        bn(torch.randn(1, 4, 1, 1))
    assert bn.num_batches_tracked.item() == 0
    bn(torch.randn(1, 4, 2, 2))  # N·H·W = 4 values per channel: fine
    assert torch.isfinite(bn.eval()(torch.randn(1, 4))).all()


def test_old_checkpoint_without_num_batches_tracked_loads() -> None:
    bn = normlab.BatchNorm(3)
    state = bn.state_dict()
    del state["num_batches_tracked"]
    state._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    bn.load_state_dict(state)
    assert bn.num_batches_tracked.item() == 0


def test_running_stats_stay_fp32_under_low_precision_input() -> None:
    bn = normlab.BatchNorm(3)
    bn(_batch(0).bfloat16())
    assert bn.running_mean.dtype == torch.float32 and bn.running_var.dtype == torch.float32
    ref = normlab.BatchNorm(3)
    ref(_batch(0).bfloat16().float())
    torch.testing.assert_close(bn.running_mean, ref.running_mean)


def test_subclass_of_torch_batchnorm() -> None:
    """Tools that look for torch's _BatchNorm (fusers, SyncBN conversion, wd filters) see it."""
    bn = normlab.BatchNorm(3)
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    conv = nn.Conv2d(2, 3, 3).eval()
    bn.eval()
    bn(_batch(0).float())
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
    x = torch.randn(2, 2, 5, 5)
    torch.testing.assert_close(fused(x), bn(conv(x)), atol=1e-5, rtol=1e-5)
