"""Memorized BN (MBN, arXiv:2010.04947) and Compound BN (arXiv:2212.01007): layer-specific checks.

Both papers' method sections could not be read and no official code is known: each choice documented
in the modules' docstrings is pinned here as a property, against hand computations in float64.
The generic suites (contract, fp64 reference, gradcheck, compile) cover the rest.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch._dynamo
from torch import Tensor, nn

import normlab
from normlab.norms.compound_bn import CompoundBatchNorm
from normlab.norms.mbn import MemorizedBatchNorm, double_forward_pass

F64 = torch.float64
C = 3


def batch(seed: int, n: int = 4, c: int = C, extent: tuple[int, ...] = (5,), scale: float = 2.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, c, *extent), generator=g, dtype=F64) * scale + 0.7


def moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and E[x²] over every dim but 1."""
    dims = (0, *range(2, x.dim()))
    return x.mean(dim=dims), (x**2).mean(dim=dims)


Norm = MemorizedBatchNorm | CompoundBatchNorm


def set_affine(module: Norm, seed: int = 9) -> None:
    g = torch.Generator().manual_seed(seed)
    weight, bias = module.get_parameter("weight"), module.get_parameter("bias")
    with torch.no_grad():
        weight.copy_(1 + 0.5 * torch.randn(weight.shape, generator=g, dtype=F64))
        bias.copy_(0.5 * torch.randn(bias.shape, generator=g, dtype=F64))


def normalize(x: Tensor, mean: Tensor, var: Tensor, module: Norm) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` per channel (dim 1)."""
    view = (1, -1, *([1] * (x.dim() - 2)))
    w, b = module.get_parameter("weight").detach(), module.get_parameter("bias").detach()
    return (x - mean.view(view)) / torch.sqrt(var.view(view) + module.eps) * w.view(view) + b.view(view)


def close(a: Tensor, b: Tensor, tol: float = 1e-12) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def step(module: nn.Module, x: Tensor, seed: int = 0) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Forward + backward of ``sum(y * g)``; returns ``(y, dx, param grads)``."""
    x = x.detach().clone().requires_grad_(True)
    for p in module.parameters():
        p.grad = None
    y = module(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    (y * g).sum().backward()
    assert x.grad is not None
    return y.detach(), x.grad, [p.grad.clone() for p in module.parameters() if p.grad is not None]


# =============================================================================================
# MBN


def test_mbn_memory_size_one_is_batchnorm() -> None:
    """k = 1: outputs, input and parameter grads, running statistics and eval are BatchNorm's."""
    mbn = MemorizedBatchNorm(C, memory_size=1, dtype=F64)
    bn = normlab.BatchNorm(C, dtype=F64)
    set_affine(mbn)
    bn.load_state_dict(mbn.state_dict(), strict=False)
    for t, n in enumerate((4, 2, 7, 3)):
        x = batch(t, n)
        y, dx, dps = step(mbn, x, seed=t)
        y_bn, dx_bn, dps_bn = step(bn, x, seed=t)
        close(y, y_bn)
        close(dx, dx_bn)
        for a, b in zip(dps, dps_bn, strict=True):
            close(a, b)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        close(mbn.get_buffer(key).double(), bn.get_buffer(key).double())
    x = batch(99)
    close(mbn.eval()(x), bn.eval()(x))


def pooled(history: list[tuple[Tensor, Tensor]], weights: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """Hand-computed MBN statistics: ``history`` newest first, weights renormalized over it."""
    w = torch.tensor(weights[: len(history)], dtype=F64)
    w = w / w.sum()
    mean = sum(wj * m for wj, (m, _) in zip(w, history, strict=True))
    square = sum(wj * s for wj, (_, s) in zip(w, history, strict=True))
    return mean, square - mean**2


def test_mbn_statistics_are_the_weighted_pool_of_the_last_k_batches() -> None:
    """Weights (3, 2, 1) newest first over batches of different sizes, including the warm-up."""
    k, eta = 3, (3.0, 2.0, 1.0)
    mbn = MemorizedBatchNorm(C, memory_size=k, memory_weights=eta, dtype=F64)
    set_affine(mbn)
    assert mbn.memory_weights == (0.5, 1 / 3, 1 / 6)
    history: list[tuple[Tensor, Tensor]] = []
    for t, n in enumerate((4, 2, 6, 3, 5)):
        x = batch(t, n)
        history.insert(0, moments(x))
        mean, var = pooled(history[:k], eta)
        close(mbn(x), normalize(x, mean, var, mbn))
        # The memory holds each batch's own moments, newest first; memorized_statistics() pools them.
        stored = min(t + 1, k)
        for row in range(stored):
            m, s = history[row]
            close(mbn.memory_mean[row], m)
            close(mbn.memory_var[row], s - m**2)
        close(torch.stack(mbn.memorized_statistics()), torch.stack([mean, var]))
    assert int(mbn.memory_count) == 5


def test_mbn_uniform_weights_equal_batchnorm_over_the_concatenated_batches() -> None:
    """Equal batch sizes, uniform weights: the pooled moments are those of the union."""
    mbn = MemorizedBatchNorm(C, memory_size=3, dtype=F64)
    xs = [batch(t, 4) for t in range(5)]
    for t, x in enumerate(xs):
        y = mbn(x)
        union = torch.cat(xs[max(0, t - 2) : t + 1])
        dims = (0, 2)
        mean = union.mean(dims)
        var = union.var(dims, correction=0)
        close(y, normalize(x, mean, var, mbn))


def test_mbn_gradients_reach_only_the_current_batch() -> None:
    """Earlier batches are constants: no grad reaches them, and the input grad is that of the
    pooled formula with the memory as fixed numbers (not BatchNorm's)."""
    mbn = MemorizedBatchNorm(C, memory_size=3, memory_weights=(2.0, 1.0, 1.0), dtype=F64)
    set_affine(mbn)
    x1 = batch(1).requires_grad_(True)
    x2 = batch(2).requires_grad_(True)
    mbn(x1)
    mbn(x2)
    assert not mbn.memory_mean.requires_grad and not mbn.memory_var.requires_grad
    past = [(mbn.memory_mean[i].clone(), mbn.memory_var[i].clone()) for i in range(2)]
    x3 = batch(3).requires_grad_(True)
    y3 = mbn(x3)
    g = torch.randn(y3.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    (y3 * g).sum().backward()
    assert x1.grad is None and x2.grad is None  # the graph of earlier batches is not kept

    x = x3.detach().clone().requires_grad_(True)
    cur_mean, cur_sq = moments(x)
    history = [(cur_mean, cur_sq), *((m, v + m**2) for m, v in past)]
    mean, var = pooled(history, (2.0, 1.0, 1.0))
    expected = normalize(x, mean, var, mbn)
    close(y3.detach(), expected.detach())
    (dx,) = torch.autograd.grad(expected, x, g)
    assert x3.grad is not None
    close(x3.grad, dx)
    bn = normlab.BatchNorm(C, dtype=F64)
    bn.load_state_dict(mbn.state_dict(), strict=False)
    _, dx_bn, _ = step(bn, x3.detach(), seed=4)
    assert (x3.grad - dx_bn).abs().max() > 1e-3  # the memory changes the gradient too


def test_mbn_eval_with_memory_reproduces_the_last_training_step() -> None:
    """``eval_stats="memory"``: the paper's consistent inference; an empty memory uses running stats."""
    fresh = MemorizedBatchNorm(C, memory_size=3, eval_stats="memory").eval()
    x = batch(0).float()
    close(fresh(x), normlab.BatchNorm(C).eval()(x), tol=1e-6)
    with pytest.raises(ValueError, match="memory is empty"):
        fresh.memorized_statistics()

    mbn = MemorizedBatchNorm(C, memory_size=3, eval_stats="memory")
    for t in range(4):
        x = batch(t).float()
        y_train = mbn.train()(x)
    before = {k: v.clone() for k, v in mbn.state_dict().items()}
    y_eval = mbn.eval()(x)
    torch.testing.assert_close(y_eval, y_train, rtol=0, atol=1e-6)
    for k, v in mbn.state_dict().items():
        assert torch.equal(v, before[k]), k  # eval changes nothing
    running = MemorizedBatchNorm(C, memory_size=3)
    running.load_state_dict(mbn.state_dict())
    assert not torch.allclose(running.eval()(x), y_eval)  # the default eval rule is BN's running stats


def test_mbn_running_statistics_follow_batchnorm_from_the_current_batch() -> None:
    """Running stats: PyTorch momentum convention, unbiased var, current batch only (any k)."""
    for momentum in (0.1, None):
        mbn = MemorizedBatchNorm(C, memory_size=4, momentum=momentum, dtype=F64)
        bn = normlab.BatchNorm(C, momentum=momentum, dtype=F64)
        for t in range(5):
            x = batch(t, 3 + t)
            mbn(x)
            bn(x)
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            close(mbn.get_buffer(key).double(), bn.get_buffer(key).double())


def _df_model(double_forward: bool) -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(4, C, dtype=F64),
        MemorizedBatchNorm(C, memory_size=2, double_forward=double_forward, dtype=F64),
    )


def test_mbn_double_forward_records_the_moments_after_the_update() -> None:
    """1st pass: normalizes with memory + batch, records nothing. 2nd pass (after the SGD step):
    records the batch's moments under the updated weights and normalizes with them."""
    model = _df_model(True)
    twin = _df_model(False)  # same init, records in its only pass
    mbn, lin, twin_mbn = model[1], model[0], twin[1]
    assert isinstance(mbn, MemorizedBatchNorm) and isinstance(twin_mbn, MemorizedBatchNorm)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, 4, generator=g, dtype=F64) + 0.5 for _ in range(3)]
    target = torch.randn(6, C, generator=g, dtype=F64)  # a loss that moves the linear weights
    recorded: list[tuple[Tensor, Tensor]] = []
    for t, x in enumerate(xs):
        state = {k: v.clone() for k, v in mbn.state_dict().items()}
        h = lin(x)
        y1 = model(x)
        mean, var = pooled([moments(h.detach()[..., None]), *recorded[:1]], mbn.memory_weights)
        close(y1.detach(), normalize(h.detach()[..., None], mean, var, mbn)[..., 0])
        for k, v in mbn.state_dict().items():
            assert torch.equal(v, state[k]), f"first pass changed {k}"
        opt.zero_grad()
        (y1 * target).sum().backward()
        opt.step()
        opt_twin.zero_grad()
        (twin(x) * target).sum().backward()
        opt_twin.step()
        with torch.no_grad():
            h_new = lin(x)
            with double_forward_pass(model):
                y2 = model(x)
        recorded.insert(0, moments(h_new[..., None]))
        mean, var = pooled(recorded[:2], mbn.memory_weights)
        close(y2, normalize(h_new[..., None], mean, var, mbn)[..., 0])
        close(mbn.memory_mean[0], recorded[0][0])
        assert int(mbn.memory_count) == int(mbn.num_batches_tracked) == t + 1
        assert not mbn._second_pass
        if t == 0:  # same weights so far: the twin recorded the moments from before the update
            close(twin_mbn.memory_mean[0], moments(h.detach()[..., None])[0])
            assert (twin_mbn.memory_mean[0] - mbn.memory_mean[0]).abs().max() > 1e-3
    close(mbn.running_mean, sum(0.1 * 0.9 ** (2 - i) * recorded[2 - i][0] for i in range(3)))  # type: ignore[arg-type]


def test_mbn_double_forward_pass_errors_and_flag_reset() -> None:
    with pytest.raises(ValueError, match="no MemorizedBatchNorm"), double_forward_pass(nn.Linear(2, 2)):
        pass
    needs = r"MemorizedBatchNorm: double_forward_pass\(\) needs"
    with pytest.raises(ValueError, match=needs), double_forward_pass(_df_model(False)):
        pass
    model = _df_model(True)
    with pytest.raises(RuntimeError, match="boom"), double_forward_pass(model):
        raise RuntimeError("boom")
    assert not model[1]._second_pass


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_mbn_non_finite_batch_records_nothing(bad: float) -> None:
    mbn = MemorizedBatchNorm(C, memory_size=3)
    mbn(batch(0).float())
    before = {k: v.clone() for k, v in mbn.state_dict().items()}
    x = batch(1).float()
    x[1, 2, 3] = bad
    assert not torch.isfinite(mbn(x)).all()
    for k, v in mbn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert int(mbn.skipped_updates) == 1
    mbn(batch(2).float())
    assert int(mbn.memory_count) == 2 and torch.isfinite(mbn.memory_var).all()
    mbn.reset_running_stats()
    assert int(mbn.memory_count) == 0 and int(mbn.skipped_updates) == 0
    assert torch.equal(mbn.memory_var, torch.ones(3, C))


def test_mbn_low_precision_input_keeps_fp32_state() -> None:
    mbn = MemorizedBatchNorm(C, memory_size=2)
    x = batch(0).bfloat16()
    y = mbn(x)
    assert y.dtype == torch.bfloat16 and mbn.memory_mean.dtype == torch.float32
    m, s = moments(x.double())
    torch.testing.assert_close(mbn.memory_mean[0].double(), m, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mbn.memory_var[0].double(), s - m**2, rtol=1e-5, atol=1e-6)


def test_mbn_argument_and_batch_errors() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"MemorizedBatchNorm: memory_size must be an int >= 1"):
            MemorizedBatchNorm(C, memory_size=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"memory_weights needs memory_size=3 values .* got 2"):
        MemorizedBatchNorm(C, memory_size=3, memory_weights=(1.0, 1.0))
    for weights in ((1.0, -1.0), (1.0, float("nan"))):
        with pytest.raises(ValueError, match="finite numbers >= 0"):
            MemorizedBatchNorm(C, memory_size=2, memory_weights=weights)
    with pytest.raises(ValueError, match=r"memory_weights\[0\] \(the current batch\) must be > 0"):
        MemorizedBatchNorm(C, memory_size=2, memory_weights=(0.0, 1.0))
    with pytest.raises(ValueError, match="eval_stats must be 'running' or 'memory', got 'ema'"):
        MemorizedBatchNorm(C, eval_stats="ema")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="momentum must be in"):
        MemorizedBatchNorm(C, momentum=1.5)
    model = nn.Sequential(nn.Linear(2, C), MemorizedBatchNorm(C))
    normlab.label_modules(model)
    with pytest.raises(
        ValueError, match=r"MemorizedBatchNorm '1': expected more than 1 value per channel.*\(1, 3\)"
    ):
        model(torch.randn(1, 2))
    assert torch.isfinite(model.eval()(torch.randn(1, 2))).all()
    assert normlab.get_norm_layer("memorized_batch_norm") is MemorizedBatchNorm


def test_mbn_double_forward_compiles_without_graph_breaks() -> None:
    """The memory paths (eval from memory, both passes of double forward) under fullgraph compile."""
    torch._dynamo.reset()
    eager = MemorizedBatchNorm(C, memory_size=3, double_forward=True, eval_stats="memory")
    module = copy.deepcopy(eager)
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    for t in range(3):
        x = batch(t).float()
        for fn, m in ((compiled, module), (eager, eager)):
            y1 = fn(x)
            with double_forward_pass(m):
                y2 = fn(x)
            if fn is compiled:
                got = (y1, y2)
            else:
                torch.testing.assert_close(got, (y1, y2), rtol=1e-6, atol=1e-6)
        for key, buf in module.named_buffers():
            torch.testing.assert_close(buf, eager.get_buffer(key), msg=key)
    module.eval()
    eager.eval()
    x = batch(7).float()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


# =============================================================================================
# Compound BN


def test_compound_one_component_is_batchnorm() -> None:
    """K = 1: r = 1, so outputs, grads, running statistics and eval are BatchNorm's."""
    cbn = CompoundBatchNorm(C, num_components=1, dtype=F64)
    bn = normlab.BatchNorm(C, dtype=F64)
    set_affine(cbn)
    bn.load_state_dict({"weight": cbn.weight, "bias": cbn.bias}, strict=False)
    for t, n in enumerate((4, 2, 7, 3)):
        x = batch(t, n, extent=(3, 2))
        y, dx, dps = step(cbn, x, seed=t)
        y_bn, dx_bn, dps_bn = step(bn, x, seed=t)
        close(y, y_bn)
        close(dx, dx_bn)
        for a, b in zip(dps, dps_bn, strict=True):
            close(a, b)
    close(cbn.running_mean[0], bn.get_buffer("running_mean"))
    close(cbn.running_var[0], bn.get_buffer("running_var"))
    assert torch.equal(cbn.mixture_weight, torch.ones(1, C, dtype=F64))
    assert int(cbn.num_batches_tracked) == 4
    x = batch(99)
    close(cbn.eval()(x), bn.eval()(x))


def test_compound_initial_mixture() -> None:
    for k, means in ((1, [0.0]), (2, [-0.6745, 0.6745]), (3, [-0.9674, 0.0, 0.9674])):
        cbn = CompoundBatchNorm(C, num_components=k)
        torch.testing.assert_close(
            cbn.running_mean, torch.tensor(means)[:, None].expand(k, C), atol=1e-4, rtol=0
        )
        assert torch.equal(cbn.running_var, torch.ones(k, C))
        torch.testing.assert_close(cbn.mixture_weight, torch.full((k, C), 1 / k))


def set_mixture(cbn: CompoundBatchNorm, pi: list[float], mu: list[float], var: list[float]) -> None:
    with torch.no_grad():
        cbn.mixture_weight.copy_(torch.tensor(pi, dtype=F64)[:, None].expand_as(cbn.mixture_weight))
        cbn.running_mean.copy_(torch.tensor(mu, dtype=F64)[:, None].expand_as(cbn.running_mean))
        cbn.running_var.copy_(torch.tensor(var, dtype=F64)[:, None].expand_as(cbn.running_var))


def posterior(x: Tensor, cbn: CompoundBatchNorm) -> Tensor:
    """Bayes' rule with explicit Gaussian densities (float64), shape (K, *x.shape)."""
    view = (-1, 1, C, *([1] * (x.dim() - 2)))
    pi, mu = cbn.mixture_weight.double().view(view), cbn.running_mean.double().view(view)
    v = cbn.running_var.double().view(view) + cbn.eps
    dens = pi * torch.exp(-((x[None] - mu) ** 2) / (2 * v)) / torch.sqrt(2 * math.pi * v)
    return dens / dens.sum(0, keepdim=True)


def test_compound_responsibilities_sum_to_one_and_are_the_posterior() -> None:
    cbn = CompoundBatchNorm(C, num_components=3)
    set_mixture(cbn, [0.2, 0.5, 0.3], [-2.0, 0.0, 3.0], [0.5, 1.0, 2.0])
    for scale in (1.0, 10.0, 1e3):
        x = batch(5, extent=(4, 3), scale=scale).float()
        r = cbn.responsibilities(x)
        assert r.shape == (3, *x.shape) and (r >= 0).all()
        torch.testing.assert_close(r.sum(0), torch.ones_like(x), rtol=0, atol=1e-6)
        if scale == 1.0:  # the explicit densities do not underflow here
            torch.testing.assert_close(r.double(), posterior(x.double(), cbn), rtol=0, atol=1e-6)


def test_compound_eval_uses_the_moving_mixture_and_changes_nothing() -> None:
    cbn = CompoundBatchNorm(C, num_components=2, dtype=F64)
    set_affine(cbn)
    set_mixture(cbn, [0.3, 0.7], [-1.5, 1.0], [0.4, 1.3])
    before = {k: v.clone() for k, v in cbn.state_dict().items()}
    x = batch(4, extent=(6,))
    y = cbn.eval()(x)
    r = posterior(x, cbn)
    view = (-1, 1, C, 1)
    z = (x[None] - cbn.running_mean.view(view)) / torch.sqrt(cbn.running_var.view(view) + cbn.eps)
    close(y, normalize((r * z).sum(0), torch.zeros(C, dtype=F64), torch.ones(C, dtype=F64) - cbn.eps, cbn))
    for k, v in cbn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.allclose(cbn.train()(x), y)


def test_compound_training_step_is_one_moving_average_em_step() -> None:
    """Output with the r-weighted batch moments; M-step blended with momentum 0.3 (PyTorch convention)."""
    cbn = CompoundBatchNorm(C, num_components=2, momentum=0.3, dtype=F64)
    set_affine(cbn)
    set_mixture(cbn, [0.4, 0.6], [-1.0, 1.5], [0.8, 1.2])
    old = {k: v.clone() for k, v in cbn.state_dict().items()}
    x = batch(6, n=8, extent=(5,), scale=1.5)
    y = cbn(x)
    r = posterior(x, _with_state(cbn, old))
    dims = (1, 3)
    mass = r.sum(dims)  # (K, C)
    m_hat = (r * x[None]).sum(dims) / mass
    s_hat = (r * (x[None] - m_hat[:, None, :, None]) ** 2).sum(dims) / mass
    assert (mass > 1.5).all()
    z = (x[None] - m_hat[:, None, :, None]) / torch.sqrt(s_hat[:, None, :, None] + cbn.eps)
    ones = torch.ones(C, dtype=F64)
    close(y.detach(), normalize((r * z).sum(0), 0 * ones, ones - cbn.eps, cbn))
    n = x.shape[0] * x.shape[2]
    close(cbn.mixture_weight, 0.7 * old["mixture_weight"] + 0.3 * mass / n)
    close(cbn.running_mean, 0.7 * old["running_mean"] + 0.3 * m_hat)
    close(cbn.running_var, 0.7 * old["running_var"] + 0.3 * s_hat * mass / (mass - 1))
    close(cbn.mixture_weight.sum(0), ones)


def _with_state(cbn: CompoundBatchNorm, state: dict[str, Tensor]) -> CompoundBatchNorm:
    other = copy.deepcopy(cbn)
    other.load_state_dict(state)
    return other


def test_compound_em_recovers_a_two_component_mixture() -> None:
    """A stream from a known 1-D mixture per channel: the moving EM finds it.

    Measured (seeded, 300 batches of 512, momentum 0.1): max |mean err| 0.024, max rel var err
    1.9%, max |weight err| 0.005. Asserted: 0.05, 10%, 0.02.
    """
    pi = torch.tensor([[0.3, 0.5, 0.8], [0.7, 0.5, 0.2]], dtype=F64)
    mu = torch.tensor([[-2.0, -1.0, -0.5], [1.5, 3.0, 2.5]], dtype=F64)
    sd = torch.tensor([[0.5, 0.7, 0.6], [0.8, 1.0, 0.4]], dtype=F64)
    cbn = CompoundBatchNorm(C, num_components=2, dtype=F64)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        comp = (torch.rand(512, C, generator=g, dtype=F64) > pi[0]).long()  # 0 w.p. pi[0]
        noise = torch.randn(512, C, generator=g, dtype=F64)
        x = mu.gather(0, comp) + sd.gather(0, comp) * noise
        cbn(x)
    order = cbn.running_mean.argsort(0)  # components in increasing mean, per channel
    got_mu, got_var, got_pi = (
        t.gather(0, order) for t in (cbn.running_mean, cbn.running_var, cbn.mixture_weight)
    )
    mean_err = (got_mu - mu).abs().max().item()
    var_err = ((got_var - sd**2) / sd**2).abs().max().item()
    pi_err = (got_pi - pi).abs().max().item()
    print(f"EM recovery: |mean err| {mean_err:.3g}, rel var err {var_err:.3g}, |weight err| {pi_err:.3g}")
    assert mean_err < 0.05 and var_err < 0.10 and pi_err < 0.02


def test_compound_collapsed_component_stays_finite() -> None:
    """A component far from every input gets mass 0: its moving mean/var stay, its weight decays,
    and neither output nor grads see a 0/0. A constant channel never gives NaN either."""
    cbn = CompoundBatchNorm(C, num_components=2)
    set_mixture(cbn, [0.5, 0.5], [0.0, 1e4], [1.0, 1.0])
    x = batch(1).float()
    y, dx, dps = step(cbn, x)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all() and all(torch.isfinite(p).all() for p in dps)
    assert torch.equal(cbn.running_mean[1], torch.full((C,), 1e4))
    assert torch.equal(cbn.running_var[1], torch.ones(C))
    torch.testing.assert_close(cbn.mixture_weight[1], torch.full((C,), 0.45))
    assert not torch.equal(cbn.running_mean[0], torch.zeros(C))

    const = CompoundBatchNorm(C, num_components=2)
    x = torch.full((4, C, 5), 0.25)
    for _ in range(200):  # the component variances decay towards 0; eps keeps the densities finite
        y = const(x)
    assert torch.isfinite(y).all() and torch.isfinite(const.running_var).all()
    torch.testing.assert_close(y, torch.zeros_like(y))  # x - mean = 0: the output is the bias
    assert torch.isfinite(const.eval()(x)).all()


@pytest.mark.parametrize("bad", [float("nan"), -float("inf")])
def test_compound_non_finite_batch_updates_nothing(bad: float) -> None:
    cbn = CompoundBatchNorm(C)
    cbn(batch(0).float())
    before = {k: v.clone() for k, v in cbn.state_dict().items()}
    x = batch(1).float()
    x[0, 1, 2] = bad
    cbn(x)
    for k, v in cbn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert int(cbn.skipped_updates) == 1
    cbn.reset_running_stats()
    assert int(cbn.skipped_updates) == 0 and int(cbn.num_batches_tracked) == 0


def test_compound_argument_and_batch_errors() -> None:
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=r"CompoundBatchNorm: num_components must be an int >= 1"):
            CompoundBatchNorm(C, num_components=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="momentum must be in"):
        CompoundBatchNorm(C, momentum=-0.1)
    with pytest.raises(
        ValueError, match=r"CompoundBatchNorm: expected more than 1 value per channel.*\(1, 3, 1\)"
    ):
        CompoundBatchNorm(C)(torch.randn(1, C, 1))
    assert torch.isfinite(CompoundBatchNorm(C).eval()(torch.randn(1, C))).all()
    assert normlab.get_norm_layer("compound_batch_norm") is CompoundBatchNorm


# =============================================================================================
# The fp64 references of tests/reference.py on states the generic sweeps do not reach


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_references_agree_with_filled_memory_and_a_three_component_mixture(mode: str) -> None:
    """The generic sweeps build fresh modules (empty memory, default options): here the MBN
    reference's memory branches and a K = 3 mixture are checked against the layers, with grads."""
    from reference import REFERENCES

    mbn = MemorizedBatchNorm(C, memory_size=3, memory_weights=(1.0, 2.0, 0.5), eval_stats="memory", dtype=F64)
    cbn = CompoundBatchNorm(C, num_components=3, dtype=F64)
    for module in (mbn, cbn):
        set_affine(module)
        for t in range(4):
            module(batch(t, 3 + t, extent=(4,)))
    for name, module in (("mbn", mbn), ("compoundbn", cbn)):
        module.train(mode == "train")
        reference = copy.deepcopy(module)
        x = batch(10, extent=(4,)).requires_grad_(True)
        y = module(x)
        y_ref = REFERENCES[name](x, reference)
        close(y, y_ref, tol=1e-10)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
        for a, b in zip(
            torch.autograd.grad(y, [x, *module.parameters()], g),
            torch.autograd.grad(y_ref, [x, *reference.parameters()], g),
            strict=True,
        ):
            close(a, b, tol=1e-10)
