"""Batch Layer Normalization (Ziaee & Cano 2022, arXiv:2209.08898) and Cross-Iteration BatchNorm
(Yao et al. 2021, arXiv:2002.05712): their own behaviour.

The generic suites (contract, fp64 reference, compile, properties) cover both through the
registry; here: BLN's closed form at m = 1, its per-epoch moving statistics and the four inference
switches; CBN's equivalence with BatchNorm (window 1, frozen weights), its Taylor compensation
against recomputed statistics, the per-channel dropping of negative variances, burn-in, the
weight-attachment API and state that survives a checkpoint. Float64 unless a test says otherwise.

Run with ``-s`` to see the measured compensation errors.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import Tensor, nn
from torch.autograd import gradcheck

import normlab
from normlab import BatchLayerNorm, CBNConv, CrossIterationBatchNorm

from reference import batch_layer_norm as bln_reference
from reference import cross_iteration_batch_norm as cbn_reference

F64 = torch.float64


def gaussian(*shape: int, seed: int, mean: float = 0.3, std: float = 1.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64) * std + mean


def randomize_affine(module: nn.Module, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


# ================================================================================================
# BLN


def feature_normalized(x: Tensor, dim: int = -1, eps: float = 1e-3) -> Tensor:
    mean = x.mean(dim, keepdim=True)
    var = ((x - mean) ** 2).mean(dim, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


@pytest.mark.parametrize("shape", [(1, 8), (1, 5, 8), (1, 3, 4, 8)])
def test_bln_batch_of_one_is_the_closed_form(shape: tuple[int, ...]) -> None:
    """m = 1, one sample: x_b = 0, so y = w * (1 - 1e-4) * x_f / sqrt(d) + b, by hand."""
    d = shape[-1]
    bln = randomize_affine(BatchLayerNorm(d, batch_size=1, dtype=F64)).train()
    x = gaussian(*shape, seed=3, std=2.0)
    expected = bln.weight * (1 - 1e-4) * feature_normalized(x) / math.sqrt(d) + bln.bias
    torch.testing.assert_close(bln(x), expected, rtol=1e-13, atol=1e-13)


def test_bln_mixing_weights_use_the_configured_batch_size() -> None:
    """(1/m - 1e-4) x_f + (1 - (1/m + 1e-4)) x_b with m = 25 although the batch holds 3 samples."""
    bln = BatchLayerNorm(6, batch_size=25, dtype=F64)
    assert bln.feature_weight == pytest.approx(0.04 - 1e-4, abs=1e-15)
    assert bln.batch_weight == pytest.approx(1 - 0.04 - 1e-4, abs=1e-15)
    assert bln.eps == 1e-3
    x = gaussian(3, 6, seed=4)
    x_b = (x - x.mean(0)) / torch.sqrt(x.var(0, correction=0) + 1e-3)
    x_f = feature_normalized(x)
    expected = ((1 / 25 - 1e-4) * x_f + (1 - (1 / 25 + 1e-4)) * x_b) / math.sqrt(6)
    torch.testing.assert_close(bln(x), expected, rtol=1e-13, atol=1e-13)


def run_epoch(bln: BatchLayerNorm, batches: list[Tensor]) -> None:
    bln.train()
    for x in batches:
        bln(x)
    assert normlab.bln_new_epoch(bln) == 1


def test_bln_moving_statistics_are_per_epoch_averages_and_reset_every_epoch() -> None:
    m = 4
    bln = BatchLayerNorm(6, batch_size=m, dtype=F64)
    epoch1 = [gaussian(m, 5, 6, seed=s) for s in range(3)]
    epoch2 = [gaussian(m, 5, 6, seed=10 + s, mean=-2.0, std=3.0) for s in range(2)]
    for epoch in (epoch1, epoch2):
        run_epoch(bln, epoch)
        stack = torch.stack(epoch)  # (batches, m, 5, 6)
        torch.testing.assert_close(bln.moving_batch_mean, stack.mean(1).mean(0))
        torch.testing.assert_close(bln.moving_batch_var, stack.var(1, correction=0).mean(0) * m / (m - 1))
        torch.testing.assert_close(bln.moving_feature_mean, stack.mean(-1, keepdim=True).mean((0, 1)))
        f_var = stack.var(-1, correction=0, keepdim=True).mean((0, 1))
        torch.testing.assert_close(bln.moving_feature_var, f_var * m / (m - 1))  # the official factor
        assert int(bln.batches_accumulated) == 0 and bool((bln.batch_mean_sum == 0).all())
    # Epoch 2's statistics only: epoch 1's data (mean 0.3) left no trace in the mean ~ -2.
    assert bln.moving_batch_mean.mean() < -1.5
    assert not bln.new_epoch()  # no batch since the last call: nothing changes
    torch.testing.assert_close(bln.moving_batch_mean, torch.stack(epoch2).mean(1).mean(0))


def test_bln_eval_before_any_epoch_uses_zero_statistics_and_mid_epoch_the_last_closed_one() -> None:
    bln = randomize_affine(BatchLayerNorm(6, batch_size=4, dtype=F64)).eval()
    x = gaussian(4, 6, seed=5)
    x_b = x / math.sqrt(1e-3)  # moving mean 0, moving var 0 (the official initial values)
    expected = (bln.feature_weight * feature_normalized(x) + bln.batch_weight * x_b) / math.sqrt(6)
    torch.testing.assert_close(bln(x), expected * bln.weight + bln.bias)
    run_epoch(bln, [gaussian(4, 6, seed=s) for s in range(2)])
    closed = {k: v.clone() for k, v in bln.named_buffers()}
    bln.train()(gaussian(4, 6, seed=9, mean=5.0))  # an unfinished epoch
    y_mid = bln.eval()(x)
    for name in ("moving_batch_mean", "moving_batch_var"):
        assert torch.equal(bln.get_buffer(name), closed[name])
    torch.testing.assert_close(y_mid, bln_reference(x, bln))


SWITCHES = ("batch_moving_mean", "batch_moving_var", "feature_moving_mean", "feature_moving_var")


@pytest.mark.parametrize("channels_first", [False, True])
def test_bln_inference_switches_each_select_moving_or_current_statistics(channels_first: bool) -> None:
    """All 16 combinations against a hand-written eval path; flipping any one switch changes the output."""
    m = 3
    shape = (m, 6, 4, 5) if channels_first else (m, 4, 5, 6)
    fdim = 1 if channels_first else -1
    base = randomize_affine(BatchLayerNorm(6, batch_size=m, channels_first=channels_first, dtype=F64))
    run_epoch(base, [gaussian(*shape, seed=s, mean=1.0, std=2.0) for s in range(3)])
    x = gaussian(*shape, seed=20, mean=-0.5)
    current = {
        "batch_moving_mean": x.mean(0, keepdim=True),
        "batch_moving_var": x.var(0, correction=0, keepdim=True),
        "feature_moving_mean": x.mean(fdim, keepdim=True),
        "feature_moving_var": x.var(fdim, correction=0, keepdim=True),
    }
    moving = {
        "batch_moving_mean": base.moving_batch_mean,
        "batch_moving_var": base.moving_batch_var,
        "feature_moving_mean": base.moving_feature_mean,
        "feature_moving_var": base.moving_feature_var,
    }
    view = (-1, 1, 1) if channels_first else (-1,)
    outputs = {}
    for flags in itertools.product((False, True), repeat=4):
        bln = copy.deepcopy(base)
        for name, flag in zip(SWITCHES, flags, strict=True):
            setattr(bln, name, flag)
        s = {
            name: moving[name] if flag else current[name] for name, flag in zip(SWITCHES, flags, strict=True)
        }
        x_b = (x - s["batch_moving_mean"]) / torch.sqrt(s["batch_moving_var"] + 1e-3)
        x_f = (x - s["feature_moving_mean"]) / torch.sqrt(s["feature_moving_var"] + 1e-3)
        y = ((1 / m - 1e-4) * x_f + (1 - (1 / m + 1e-4)) * x_b) / math.sqrt(6)
        expected = y * base.weight.view(view) + base.bias.view(view)
        outputs[flags] = bln.eval()(x)
        torch.testing.assert_close(outputs[flags], expected, rtol=1e-12, atol=1e-12)
    for flags in outputs:
        for i in range(4):
            flipped = tuple(not f if j == i else f for j, f in enumerate(flags))
            assert (outputs[flags] - outputs[flipped]).abs().max() > 1e-4, (flags, SWITCHES[i])
    default = BatchLayerNorm(6, batch_size=m)
    assert [getattr(default, n) for n in SWITCHES] == [True, True, False, False]


def test_bln_channels_first_is_channels_last_permuted() -> None:
    x = gaussian(3, 6, 4, 5, seed=7).requires_grad_(True)
    first = randomize_affine(BatchLayerNorm(6, batch_size=3, channels_first=True, dtype=F64))
    last = copy.deepcopy(first)
    last.channels_first = False
    x_last = x.detach().permute(0, 2, 3, 1).contiguous().requires_grad_(True)
    g = gaussian(3, 6, 4, 5, seed=8)
    y_first, y_last = first(x), last(x_last)
    torch.testing.assert_close(y_first, y_last.permute(0, 3, 1, 2))
    (y_first * g).sum().backward()
    (y_last * g.permute(0, 2, 3, 1)).sum().backward()
    torch.testing.assert_close(x.grad, x_last.grad.permute(0, 3, 1, 2))
    for p, q in zip(first.parameters(), last.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    torch.testing.assert_close(first.batch_mean_sum, last.batch_mean_sum.permute(2, 0, 1))


def test_bln_gradients_match_the_reference_and_pass_gradcheck_in_eval() -> None:
    bln = randomize_affine(BatchLayerNorm(6, batch_size=4, dtype=F64))
    run_epoch(bln, [gaussian(4, 5, 6, seed=s) for s in range(2)])
    bln.batch_moving_var = False
    bln.feature_moving_mean = True
    for mode in (True, False):
        bln.train(mode)
        x = gaussian(4, 5, 6, seed=11).requires_grad_(True)
        g = gaussian(4, 5, 6, seed=12)
        ref = copy.deepcopy(bln)
        grads = torch.autograd.grad(bln(x), [x, *bln.parameters()], g)
        want = torch.autograd.grad(bln_reference(x, ref), [x, *ref.parameters()], g)
        for a, b in zip(grads, want, strict=True):
            assert torch.isfinite(a).all() and a.abs().sum() > 0
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    bln.eval()
    assert gradcheck(lambda inp: bln(inp), (gaussian(3, 5, 6, seed=13).requires_grad_(True),))


def test_bln_batch_size_one_variance_factor_stays_finite() -> None:
    """The official m / (m - 1) divides by zero at m = 1; here the factor is 1."""
    bln = BatchLayerNorm(4, batch_size=1, dtype=F64)
    run_epoch(bln, [gaussian(1, 4, seed=s) for s in range(3)])
    assert bln.variance_correction == 1.0
    assert all(torch.isfinite(bln.get_buffer(n)).all() for n in ("moving_batch_var", "moving_feature_var"))
    assert torch.equal(bln.moving_batch_var, torch.zeros(4, dtype=F64))  # one sample: no batch spread


def test_bln_positions_are_fixed_until_reset_and_checkpoints_carry_them() -> None:
    bln = BatchLayerNorm(6, batch_size=2, dtype=F64)
    run_epoch(bln, [gaussian(2, 5, 6, seed=1)])
    with pytest.raises(
        ValueError, match=r"BatchLayerNorm: its statistics are kept per position.*\(2, 7, 6\)"
    ):
        bln.eval()(gaussian(2, 7, 6, seed=2))
    bln.train()(gaussian(2, 5, 6, seed=3))
    fresh = BatchLayerNorm(6, batch_size=2, dtype=F64)
    fresh.load_state_dict(bln.state_dict())
    x = gaussian(2, 5, 6, seed=4)
    assert torch.equal(fresh.eval()(x), bln.eval()(x))
    assert fresh.new_epoch() and bln.new_epoch()
    assert torch.equal(fresh.moving_batch_mean, bln.moving_batch_mean)
    bln.reset_running_stats()
    assert bln.moving_batch_mean.shape == (0,)
    bln.train()(gaussian(2, 7, 6, seed=5))  # a new shape after the reset


def test_bln_non_finite_batch_is_not_accumulated() -> None:
    bln = BatchLayerNorm(3, batch_size=2, dtype=F64)
    bln(gaussian(2, 3, seed=1))
    bad = gaussian(2, 3, seed=2)
    bad[0, 1] = float("nan")
    bln(bad)
    assert int(bln.batches_accumulated) == 1 and int(bln.skipped_updates) == 1
    assert torch.isfinite(bln.batch_mean_sum).all()


def test_bln_option_validation() -> None:
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="BatchLayerNorm: batch_size must be an int >= 1"):
            BatchLayerNorm(4, batch_size=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        BatchLayerNorm(4)  # type: ignore[call-arg]


# ================================================================================================
# CBN


def make_conv(c_in: int = 3, c_out: int = 4, k: int = 3, seed: int = 0) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False, dtype=F64)
    with torch.no_grad():
        conv.weight.copy_(gaussian(*conv.weight.shape, seed=seed, mean=0.0, std=0.3))
    return conv


def batch_norm_of(y: Tensor, eps: float = 1e-5) -> Tensor:
    """BatchNorm (train, biased variance, eps inside) of ``y`` over every dim but 1, no affine."""
    bn = normlab.BatchNorm(y.shape[1], eps=eps, affine=False, dtype=F64)
    return bn(y)


def test_cbn_window_one_is_batchnorm() -> None:
    """Outputs, input and parameter grads bitwise equal to normlab.BatchNorm, with and without an
    attached conv (nothing is stored with window=1); running statistics equal to fp64 rounding
    (BatchNorm updates them inside torch's fused kernel, CBN from its own ``var_mean``)."""
    for attach in (False, True):
        conv = make_conv()
        cbn = randomize_affine(CrossIterationBatchNorm(4, window=1, eps_mode="inside", dtype=F64))
        bn = normlab.BatchNorm(4, dtype=F64)
        bn.load_state_dict(cbn.state_dict(), strict=False)
        if attach:
            cbn.attach(conv)
        for step in range(4):
            x = gaussian(5, 3, 6, 6, seed=step)
            outs = []
            for norm in (cbn, bn):
                y_in = conv(x).detach().requires_grad_(True)
                y = norm(y_in)
                grads = torch.autograd.grad(y, [y_in, *norm.parameters()], gaussian(*y.shape, seed=50 + step))
                outs.append((y, grads))
            assert torch.equal(outs[0][0], outs[1][0])
            for a, b in zip(outs[0][1], outs[1][1], strict=True):
                assert torch.equal(a, b)
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(cbn.get_buffer(key), bn.get_buffer(key), rtol=1e-14, atol=1e-15)
        assert int(cbn.hist_len) == 0
        x = gaussian(5, 4, 6, 6, seed=9)
        torch.testing.assert_close(cbn.eval()(x), bn.eval()(x), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("attach", [False, True])
def test_cbn_frozen_weights_pool_the_window_like_batchnorm_on_the_concatenation(attach: bool) -> None:
    """Weights unchanged between iterations, equal-size batches: the window's statistics are
    mu = mean of the k per-iteration means = the pooled mean, and sigma^2 = mean of the k
    per-iteration E[x^2] - mu^2 = the pooled biased variance; so the output on the last batch is
    BatchNorm (train) applied to the concatenation of the last k batches, sliced to that batch."""
    k = 4
    conv = make_conv()
    cbn = CrossIterationBatchNorm(4, window=k, eps_mode="inside", affine=False, dtype=F64)
    if attach:
        cbn.attach(conv)
    ys = []
    for t in range(6):
        x = gaussian(3, 3, 5, 5, seed=t, mean=0.2 * t)
        y = conv(x)
        ys.append(y.detach())
        out = cbn(y)
        window = torch.cat(ys[-k:])
        expected = batch_norm_of(window)[-y.shape[0] :]
        torch.testing.assert_close(out, expected, rtol=1e-11, atol=1e-11)
        assert int(cbn.hist_len) == min(t + 1, k - 1)


def sgd_run(
    rho: float, steps: int, lr: float, window: int = 4
) -> tuple[CBNConv, list[Tensor], list[tuple[Tensor, Tensor, Tensor]]]:
    """CBNConv trained with SGD; before each forward (from the window's fill on), the window's
    stored moments compensated to the current weight, uncompensated, and recomputed exactly."""
    model = CBNConv(make_conv(seed=1), window=window, rho=rho, eps_mode="inside")
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    target = gaussian(4, 4, 6, 6, seed=99, mean=0.0)
    inputs, records = [], []
    for t in range(steps):
        x = gaussian(4, 3, 6, 6, seed=t)
        if int(model.norm.hist_len) == window - 1:
            with torch.no_grad():
                comp_mu, comp_nu, _ = model.norm.past_moments(model.conv.weight)
                true = [model.conv(inputs[-1 - i]) for i in range(window - 1)]
                true_mu = torch.stack([y.mean((0, 2, 3)) for y in true])
                true_nu = torch.stack([(y * y).mean((0, 2, 3)) for y in true])
            records.append(
                (
                    torch.stack([comp_mu, comp_nu]),
                    torch.stack([model.norm.hist_mean, model.norm.hist_sqmean]),
                    torch.stack([true_mu, true_nu]),
                )
            )
        inputs.append(x)
        opt.zero_grad()
        loss = ((model(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
    return model, inputs, records


def test_cbn_taylor_compensation_is_closer_to_the_recomputed_statistics() -> None:
    """SGD on a conv: the compensated past statistics are closer to the statistics recomputed with
    the current weight than the stored (naive) ones. The conv has no bias, so its output mean is
    linear in the weight and first-order compensation of mu is exact; E[x^2] is quadratic, so
    the compensated nu keeps a second-order error only."""
    _, _, records = sgd_run(rho=1.0, steps=10, lr=0.5)
    assert len(records) >= 5
    comp = torch.stack([(c - t).abs().amax((1, 2)) for c, _, t in records])  # (records, 2): mu, nu
    naive = torch.stack([(n - t).abs().amax((1, 2)) for _, n, t in records])
    print(
        f"\nCBN window statistics vs recomputed (max abs over channels and past iterations, {len(records)} "
        f"iterations): mu compensated {comp[:, 0].max():.2e} / naive {naive[:, 0].max():.2e}; "
        f"nu=E[x^2] compensated {comp[:, 1].max():.2e} / naive {naive[:, 1].max():.2e}"
    )
    assert (naive > 1e-3).all()  # the weights did move
    assert comp[:, 0].max() < 1e-12  # mu: exact
    assert (comp[:, 1] < 0.2 * naive[:, 1]).all()

    def pooled_var(moments: Tensor) -> Tensor:  # of the stored iterations: mean(nu) - mean(mu)^2
        return moments[1].mean(0) - moments[0].mean(0) ** 2

    var_comp = max(float((pooled_var(c) - pooled_var(t)).abs().max()) for c, _, t in records)
    var_naive = max(float((pooled_var(n) - pooled_var(t)).abs().max()) for _, n, t in records)
    print(f"pooled variance of the stored iterations: compensated {var_comp:.2e} / naive {var_naive:.2e}")
    assert var_comp < 0.2 * var_naive


def test_cbn_stored_derivatives_are_the_directional_derivatives_of_the_batch_moments() -> None:
    """dmu/dtheta and dnu/dtheta (the official autograd.grad of the batch moments) vs central differences."""
    conv = make_conv(seed=2)
    cbn = CrossIterationBatchNorm(4, window=2, weight_source=conv, dtype=F64)
    x = gaussian(3, 3, 5, 5, seed=4)
    cbn(conv(x))
    direction = gaussian(*conv.weight.shape, seed=5, mean=0.0)
    h = 1e-5

    def moments(w: Tensor) -> tuple[Tensor, Tensor]:
        y = torch.nn.functional.conv2d(x, w, padding=1)
        return y.mean((0, 2, 3)), (y * y).mean((0, 2, 3))

    w = conv.weight.detach()
    (mu_p, nu_p), (mu_m, nu_m) = moments(w + h * direction), moments(w - h * direction)
    d_mu = (cbn.hist_dmean[0] * direction).flatten(1).sum(1)
    d_nu = (cbn.hist_dsqmean[0] * direction).flatten(1).sum(1)
    torch.testing.assert_close(d_mu, (mu_p - mu_m) / (2 * h), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(d_nu, (nu_p - nu_m) / (2 * h), rtol=1e-7, atol=1e-9)
    assert torch.equal(cbn.hist_weight[0], w)


def test_cbn_negative_compensated_variance_is_dropped_per_channel() -> None:
    """A 1x1 conv whose channel-0 weight flips sign: the compensated E[x^2] of the stored iteration
    is E[x^2] (1 - 4) < 0 for channel 0, which falls back to the current batch alone; channel 1
    (unchanged weight) pools both iterations."""
    conv = nn.Conv2d(1, 2, 1, bias=False, dtype=F64)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    cbn = CrossIterationBatchNorm(2, window=2, eps_mode="inside", affine=False, weight_source=conv, dtype=F64)
    y1 = conv(gaussian(4, 1, 3, 3, seed=1, mean=1.0))
    cbn(y1)
    with torch.no_grad():
        conv.weight[0].fill_(-1.0)
    mu, nu, filled = cbn.past_moments()
    assert bool(filled[0]) and nu[0, 0] - mu[0, 0] ** 2 < 0 < nu[0, 1] - mu[0, 1] ** 2
    torch.testing.assert_close(nu[0, 0], -3 * (y1[:, 0] ** 2).mean())
    y2 = conv(gaussian(4, 1, 3, 3, seed=2, mean=1.0))
    out = cbn(y2)
    torch.testing.assert_close(out[:, 0], batch_norm_of(y2)[:, 0], rtol=1e-11, atol=1e-11)
    pooled = batch_norm_of(torch.cat([y1.detach(), y2.detach()]))[4:]
    torch.testing.assert_close(out[:, 1], pooled[:, 1], rtol=1e-11, atol=1e-11)
    assert not torch.allclose(out[:, 1], batch_norm_of(y2)[:, 1])


@pytest.mark.parametrize("attach", [False, True])
def test_cbn_two_stage_burnin_is_plain_batchnorm_then_the_window_fills_one_iteration_at_a_time(
    attach: bool,
) -> None:
    conv = make_conv()
    cbn = CrossIterationBatchNorm(4, window=3, burnin=3, eps_mode="inside", affine=False, dtype=F64)
    if attach:
        cbn.attach(conv)
    ys, lengths = [], []
    for t in range(1, 8):
        y = conv(gaussian(3, 3, 4, 4, seed=t, mean=0.5 * t))
        ys.append(y.detach())
        out = cbn(y)
        pooled_from = max(3, t - 3)  # iterations 1..3 are burn-in; then the window covers <= 3
        expected = batch_norm_of(torch.cat(ys[pooled_from:]))[-3:] if t > 3 else batch_norm_of(y)
        torch.testing.assert_close(out, expected, rtol=1e-11, atol=1e-11)
        lengths.append(int(cbn.hist_len))
    assert lengths == [0, 0, 0, 1, 2, 2, 2]
    assert int(cbn.iteration) == 7


def test_cbn_linear_burnin_grows_the_allowed_window_as_the_official_formula() -> None:
    cbn = CrossIterationBatchNorm(4, window=4, burnin=4, two_stage=False, dtype=F64)
    allowed, lengths = [], []
    for t in range(1, 7):
        allowed.append(int(cbn.stored_iterations_allowed(t)))
        cbn(gaussian(3, 4, 5, seed=t))
        lengths.append(int(cbn.hist_len))
    assert allowed == [int(3 * min(t / 4, 1.0)) for t in range(1, 7)] == [0, 1, 2, 3, 3, 3]
    assert lengths == [0, 1, 2, 3, 3, 3]


def test_cbn_without_a_weight_averages_the_window_without_compensation() -> None:
    """No weight: the same as an attached weight with rho = 0 (naive averaging), while the conv changes."""
    conv = make_conv()
    naive = CrossIterationBatchNorm(4, window=3, dtype=F64)
    rho0 = CrossIterationBatchNorm(4, window=3, rho=0.0, weight_source=conv, dtype=F64)
    comp = CrossIterationBatchNorm(4, window=3, weight_source=conv, dtype=F64)
    for t in range(5):
        y = conv(gaussian(3, 3, 4, 4, seed=t))
        outs = [m(y) for m in (naive, rho0, comp)]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
        if t >= 1:
            assert not torch.allclose(outs[0], outs[2], rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            conv.weight.add_(0.05 * gaussian(*conv.weight.shape, seed=100 + t, mean=0.0))
    assert naive.hist_dmean.numel() == 0 and comp.hist_dmean.shape == (2, *conv.weight.shape)


def test_cbn_output_and_grads_match_the_reference_and_reach_only_the_current_batch() -> None:
    """After SGD steps with a full, compensated window: output, grad w.r.t. the norm input and the
    affine grads against the fp64 reference; the stored iterations are detached, so earlier
    inputs get no gradient from the current loss."""
    model, inputs, _ = sgd_run(rho=1.0, steps=4, lr=0.1, window=3)
    norm = randomize_affine(model.norm)
    x_old = inputs[-1].clone().requires_grad_(True)
    x = gaussian(4, 3, 6, 6, seed=77)
    y_old = model.conv(x_old)  # a previous batch through the current graph: must get no gradient
    y = model.conv(x) + 0 * y_old.sum()
    ref_norm = copy.deepcopy(norm)
    ref_norm.attach(model.conv)
    out = norm(y, weight=model.conv.weight)
    g = gaussian(*out.shape, seed=78)
    # autograd.grad, not y.retain_grad(): the layer's own derivative passes run through y too
    # (as in the official code), so a retained y.grad would also collect them.
    got = torch.autograd.grad(out, [y, x_old, *norm.parameters()], g)
    y_ref = y.detach().requires_grad_(True)
    out_ref = cbn_reference(y_ref, ref_norm)
    want = torch.autograd.grad(out_ref, [y_ref, *ref_norm.parameters()], g)
    torch.testing.assert_close(out, out_ref, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    for p, w in zip(got[2:], want[1:], strict=True):
        torch.testing.assert_close(p, w, rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(got[1]) == 0


def test_cbn_gradcheck_through_a_full_window() -> None:
    """First derivatives of the windowed, compensated layer (a fresh copy per call, so the window
    seen by every finite-difference evaluation is the same)."""
    model, _, _ = sgd_run(rho=1.0, steps=4, lr=0.1, window=3)
    randomize_affine(model.norm)

    def fn(inp: Tensor) -> Tensor:
        return copy.deepcopy(model)(inp)

    assert gradcheck(fn, (gaussian(2, 3, 4, 4, seed=5).requires_grad_(True),), fast_mode=True)


def test_cbn_running_statistics_follow_the_current_batch_and_eval_uses_them() -> None:
    cbn = randomize_affine(CrossIterationBatchNorm(4, window=3, dtype=F64))
    bn = normlab.BatchNorm(4, dtype=F64)
    for t in range(5):
        y = gaussian(3, 4, 5, seed=t, mean=float(t))
        cbn(y)
        bn(y)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(cbn.get_buffer(key), bn.get_buffer(key), rtol=1e-14, atol=1e-14)
    state = {k: v.clone() for k, v in cbn.state_dict().items()}
    x = gaussian(2, 4, 5, seed=9)
    out = cbn.eval()(x)
    view = (1, -1, 1)
    expected = (x - cbn.running_mean.view(view)) / (cbn.running_var.view(view).sqrt() + cbn.eps)
    torch.testing.assert_close(out, expected * cbn.weight.view(view) + cbn.bias.view(view))
    for k, v in cbn.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_cbn_ways_to_give_the_weight_agree() -> None:
    """Per-call weight, attach(conv), attach(tensor), weight_source=conv and CBNConv: same outputs."""
    base = make_conv(seed=3)
    variants: list[tuple[nn.Conv2d, CrossIterationBatchNorm, str]] = []
    for how in ("call", "attach", "tensor", "kwarg", "wrapper"):
        conv = copy.deepcopy(base)
        kwargs = {"weight_source": conv} if how == "kwarg" else {}
        cbn = CrossIterationBatchNorm(4, window=3, dtype=F64, **kwargs)  # type: ignore[arg-type]
        if how == "attach":
            cbn.attach(conv)
        elif how == "tensor":
            cbn.attach(conv.weight)
        variants.append((conv, cbn, how))
    wrapper = CBNConv(variants[-1][0], variants[-1][1])
    for t in range(4):
        x = gaussian(3, 3, 5, 5, seed=t)
        outs = []
        for conv, cbn, how in variants:
            if how == "call":
                out = cbn(conv(x), weight=conv.weight)
            elif how == "wrapper":
                out = wrapper(x)
            else:
                out = cbn(conv(x))
            out.pow(2).mean().backward()
            with torch.no_grad():
                conv.weight.sub_(0.3 * conv.weight.grad)
                conv.weight.grad = None
            outs.append(out.detach())
        for out in outs[1:]:
            assert torch.equal(out, outs[0])
    assert all(int(cbn.hist_len) == 2 and cbn.hist_dmean.numel() > 0 for _, cbn, _ in variants)
    assert list(dict(wrapper.named_children())) == ["conv", "norm"]
    built = CBNConv(make_conv(), window=2)
    assert built.norm.num_features == 4 and built.norm.window == 2


def test_cbn_nn_sequential_with_an_attached_conv_and_deepcopy_keeps_the_pair() -> None:
    conv = make_conv()
    model = nn.Sequential(conv, CrossIterationBatchNorm(4, window=2, weight_source=conv, dtype=F64))
    clone = copy.deepcopy(model)
    assert clone[1].weight_source is clone[0]
    assert "1.hist_weight" in model.state_dict() and not any(k.startswith("1.0") for k in model.state_dict())
    model(gaussian(2, 3, 4, 4, seed=1)).sum().backward()
    assert model[1].hist_weight.shape == (1, *conv.weight.shape)


def test_cbn_no_derivatives_means_current_batch_only_and_nothing_stored() -> None:
    """With a weight whose derivatives cannot be taken (frozen conv, no_grad): plain BatchNorm of the
    current batch, as the official ``input.requires_grad`` branch; running stats still update."""
    conv = make_conv()
    conv.weight.requires_grad_(False)
    cbn = CrossIterationBatchNorm(4, window=3, eps_mode="inside", affine=False, weight_source=conv, dtype=F64)
    for t in range(3):
        y = conv(gaussian(3, 3, 4, 4, seed=t))
        torch.testing.assert_close(cbn(y), batch_norm_of(y), rtol=1e-12, atol=1e-12)
    conv.weight.requires_grad_(True)
    with torch.no_grad():
        y = conv(gaussian(3, 3, 4, 4, seed=5))
        torch.testing.assert_close(cbn(y), batch_norm_of(y), rtol=1e-12, atol=1e-12)
    assert int(cbn.hist_len) == 0 and int(cbn.iteration) == 4 and int(cbn.num_batches_tracked) == 4


def test_cbn_errors_name_the_problem() -> None:
    cbn = CrossIterationBatchNorm(4, window=2, dtype=F64)
    with pytest.raises(ValueError, match=r"num_features=4 rows .* got shape \(5, 3, 3, 3\)"):
        cbn.attach(nn.Conv2d(3, 5, 3))
    with pytest.raises(ValueError, match="ConvTranspose"):
        cbn.attach(nn.ConvTranspose2d(4, 4, 3))
    with pytest.raises(ValueError, match="ConvTranspose"):
        CBNConv(nn.ConvTranspose2d(4, 4, 3))
    unrelated = make_conv()
    y = make_conv(seed=4)(gaussian(2, 3, 4, 4, seed=1))
    with pytest.raises(ValueError, match="did not produce this input"):
        cbn(y, weight=unrelated.weight)
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(1, 4\)"):
        cbn(torch.randn(1, 4, dtype=F64))
    for kwargs, match in (
        ({"window": 0}, "window"),
        ({"rho": float("nan")}, "rho"),
        ({"burnin": -1}, "burnin"),
        ({"eps_mode": "middle"}, "eps_mode"),
        ({"momentum": 2.0}, "momentum"),
    ):
        with pytest.raises(ValueError, match=f"CrossIterationBatchNorm: {match}"):
            CrossIterationBatchNorm(4, **kwargs)  # type: ignore[arg-type]


def test_cbn_window_survives_a_checkpoint() -> None:
    """The window (moments, derivatives, weights, lengths) is in the state_dict: a fresh module
    loading it continues bitwise like the original."""
    model, _, _ = sgd_run(rho=1.0, steps=4, lr=0.1, window=3)
    fresh = CBNConv(make_conv(seed=7), window=3, eps_mode="inside")
    assert fresh.norm.hist_weight.numel() == 0
    fresh.load_state_dict(model.state_dict())
    for t in range(2):
        x = gaussian(4, 3, 6, 6, seed=40 + t)
        assert torch.equal(fresh(x), model(x))
    fresh.norm.reset_window()
    assert int(fresh.norm.hist_len) == 0 and fresh.norm.hist_weight.numel() == 0


def test_cbn_weight_free_window_compiles_without_graph_breaks() -> None:
    """window=3, no weight: fullgraph compile (eager backend) matches eager over 5 steps, buffers included."""
    import torch._dynamo

    torch._dynamo.reset()
    eager = randomize_affine(CrossIterationBatchNorm(4, window=3, burnin=1))
    module = copy.deepcopy(eager)
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    for t in range(5):
        x = gaussian(3, 4, 5, seed=t, mean=float(t)).float()
        ys = []
        for m in (compiled, eager):
            x_in = x.clone().requires_grad_(True)
            y = m(x_in)
            y.pow(2).sum().backward()
            ys.append((y.detach(), x_in.grad))
        torch.testing.assert_close(ys[0][0], ys[1][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ys[0][1], ys[1][1], rtol=1e-5, atol=1e-5)
    for key, buf in module.named_buffers():
        torch.testing.assert_close(buf, eager.get_buffer(key), rtol=1e-6, atol=1e-6, msg=key)
    assert int(module.hist_len) == 2
    torch._dynamo.reset()


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_cbn_window_path_in_low_precision_matches_the_fp64_reference(input_dtype: torch.dtype) -> None:
    """An fp32 module with a filled window: fp32 or bf16 input against the fp64 reference on the same
    (rounded) input; statistics are computed in fp32 for bf16."""
    cbn = randomize_affine(CrossIterationBatchNorm(6, window=3))
    for t in range(3):
        cbn(gaussian(4, 6, 5, seed=t, mean=0.5).to(input_dtype))
    x = gaussian(4, 6, 5, seed=9, mean=0.5).to(input_dtype).requires_grad_(True)
    ref = copy.deepcopy(cbn).double()
    y = cbn(x)
    assert y.dtype == input_dtype
    x64 = x.detach().double().requires_grad_(True)
    y_ref = cbn_reference(x64, ref)
    g = gaussian(*y.shape, seed=10)
    dx = torch.autograd.grad(y, x, g.to(input_dtype))[0]
    dx_ref = torch.autograd.grad(y_ref, x64, g)[0]
    tol = 1e-5 if input_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dx.double(), dx_ref, rtol=tol, atol=tol * dx_ref.abs().max().item())


def test_bln_compiles_in_eval_with_moving_statistics() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    eager = randomize_affine(BatchLayerNorm(6, batch_size=3, feature_moving_var=True))
    run_epoch(eager, [gaussian(3, 4, 6, seed=s).float() for s in range(2)])
    eager.eval()
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True, backend="eager")
    for t in range(2):
        x = gaussian(2 + t, 4, 6, seed=10 + t).float()
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()
