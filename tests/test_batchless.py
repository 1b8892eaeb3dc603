"""Batchless Normalization (Berger & Uc Cetina 2022, arXiv:2212.14729; official code ichteltelch/Batchless).

What the paper promises and these tests check: every quantity is per sample, so a batch's
gradient is the mean of its single-sample gradients; the two gradient paths
are split by stop-gradients; the learned mean/std converge to the input's moments; train and
eval compute the same function; ``init_batchless`` sets each layer to the moments of its input,
layer by layer. The elementwise NLL of ``reference.batchless_nll`` is the official code's formula; the
layer computes it from per-channel moments, so the two are compared too.
"""

from __future__ import annotations

import copy
import gc
import math
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normlab
from normlab import BatchlessNorm, init_batchless, total_aux_loss

from reference import batchless, batchless_nll

F64 = torch.float64
PARAMETRIZATIONS = ("log", "abs", "inv")


def randomize_batchless(module: nn.Module, seed: int = 3) -> None:
    """Non-default mean, sigma, weight and bias in every BatchlessNorm of ``module``."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, BatchlessNorm):
            c = m.num_features
            m.set_statistics(0.3 * torch.randn(c, generator=g, dtype=F64), 0.5 + torch.rand(c, generator=g))
            if m.weight is not None and m.bias is not None:
                with torch.no_grad():
                    m.weight.copy_(1 + 0.3 * torch.randn(c, generator=g))
                    m.bias.copy_(0.3 * torch.randn(c, generator=g))


class Net(nn.Module):
    """conv -> BlN -> act -> conv -> BlN -> act -> tokens (N, HW, C) -> linear -> BlN (last dim) -> head.

    The norms are registered in reverse forward order (``norm3`` first), so an init that followed
    the registration order instead of the call order would fit them in the wrong order.
    """

    def __init__(
        self, parametrization: str = "log", dtype: torch.dtype = F64, norm: str = "batchless"
    ) -> None:
        super().__init__()
        torch.manual_seed(0)

        def bln(c: int, channels_first: bool = True) -> nn.Module:
            if norm == "batchnorm":  # the contrast: batch statistics
                return nn.BatchNorm2d(c, dtype=dtype) if channels_first else nn.Identity()
            return BatchlessNorm(
                c, std_parametrization=parametrization, channels_first=channels_first, dtype=dtype
            )

        self.norm3 = bln(6, channels_first=False)
        self.norm2 = bln(5)
        self.norm1 = bln(4)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, dtype=dtype)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, dtype=dtype)
        self.lin = nn.Linear(5, 6, dtype=dtype)
        self.head = nn.Linear(6, 3, dtype=dtype)
        randomize_batchless(self)

    def stage1(self, x: Tensor) -> Tensor:
        return self.conv1(x)

    def stage2(self, h: Tensor) -> Tensor:
        return self.conv2(F.leaky_relu(self.norm1(h), 0.1))

    def stage3(self, h: Tensor) -> Tensor:
        tokens = F.leaky_relu(self.norm2(h), 0.1).flatten(2).transpose(1, 2)  # (N, H*W, C)
        return self.lin(tokens)

    def stage4(self, h: Tensor) -> Tensor:
        return self.head(F.leaky_relu(self.norm3(h), 0.1).mean(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.stage4(self.stage3(self.stage2(self.stage1(x))))


def data(n: int = 16, seed: int = 0, dtype: torch.dtype = F64) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, 3, 6, 6, generator=g, dtype=F64) * 1.5 + 0.7).to(dtype)
    return x, torch.randint(0, 3, (n,), generator=g)


def grads(net: nn.Module) -> dict[str, Tensor]:
    out = {}
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        out[name] = p.grad.clone()
    return out


def batch_and_accumulated_grads(net: nn.Module, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], ...]:
    """Grads of ``CE + total_aux_loss`` on the batch, and the mean over single-sample passes."""
    net.zero_grad()
    (F.cross_entropy(net(x), y) + total_aux_loss(net)).backward()
    whole = grads(net)
    net.zero_grad()
    n = x.shape[0]
    for i in range(n):
        loss = F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]) + total_aux_loss(net)
        (loss / n).backward()
    return whole, grads(net)


def max_rel_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in a)


# ---------------------------------------------------------------------------------------------
# Exact gradient accumulation


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_batch_gradient_equals_mean_of_single_sample_gradients_fp64(parametrization: str) -> None:
    """Every parameter, the mean/std included (through the aux loss): batch of 16 == mean of 16
    single-sample backward passes, to fp64 rounding (measured ~1e-15 relative; bound 1e-12)."""
    net = Net(parametrization).train()
    x, y = data()
    whole, accumulated = batch_and_accumulated_grads(net, x, y)
    for name, g in whole.items():
        assert g.abs().max() > 0, f"{name} got no gradient: the test would be vacuous"
    assert {"norm1.mean", f"norm1.{net.norm1.std_param_name}"} <= whole.keys()
    assert max_rel_diff(accumulated, whole) < 1e-12


def test_batch_gradient_equals_mean_of_single_sample_gradients_fp32() -> None:
    """The same in fp32: reduction order differs between the two, so the bound is 1e-5 relative."""
    net = Net("log", dtype=torch.float32).train()
    x, y = data(dtype=torch.float32)
    whole, accumulated = batch_and_accumulated_grads(net, x, y)
    assert max_rel_diff(accumulated, whole) < 1e-5


def test_batchnorm_gradient_accumulation_is_not_exact() -> None:
    """The contrast that makes the test meaningful: with BN the two differ at order 1."""
    net = Net(norm="batchnorm").train()
    x, y = data()
    whole, accumulated = batch_and_accumulated_grads(net, x, y)
    assert max_rel_diff(accumulated, whole) > 1e-2


# ---------------------------------------------------------------------------------------------
# The stop-gradient split


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_task_loss_never_moves_statistics_and_aux_loss_never_moves_upstream(parametrization: str) -> None:
    net = Net(parametrization).train()
    x, y = data()
    task = F.cross_entropy(net(x), y)
    aux = total_aux_loss(net)
    names, params = zip(*net.named_parameters(), strict=True)
    task_grads = dict(zip(names, torch.autograd.grad(task, params, allow_unused=True), strict=True))
    aux_grads = dict(zip(names, torch.autograd.grad(aux, params, allow_unused=True), strict=True))
    stats = {n for n in names if n.rsplit(".", 1)[-1] in BatchlessNorm.spec.aux_params}
    assert len(stats) == 6  # mean and sigma of three layers
    for name in names:
        if name in stats:
            assert task_grads[name] is None, name
            g = aux_grads[name]
            assert g is not None and g.abs().max() > 0, name
        else:  # conv/linear weights and the norms' affine weight/bias
            assert aux_grads[name] is None, name
            g = task_grads[name]
            assert g is not None and g.abs().max() > 0, name


def test_output_depends_on_the_statistics_through_a_stop_gradient_only() -> None:
    """The statistics are used (changing them changes the output), yet autograd does not see them."""
    m = BatchlessNorm(4)
    x = torch.randn(3, 4, 5)
    y0 = m(x)
    with torch.no_grad():
        m.mean.add_(1.0)
        m.log_std.add_(0.5)
    y1 = m(x)
    expected = (y0 - m.bias.detach().view(-1, 1) - m.weight.detach().view(-1, 1)) * math.exp(-0.5)
    torch.testing.assert_close(y1 - m.bias.detach().view(-1, 1), expected)
    assert y1.grad_fn is not None
    (dmean,) = torch.autograd.grad(y1.sum(), [m.mean], allow_unused=True)
    assert dmean is None


# ---------------------------------------------------------------------------------------------
# The auxiliary loss against the elementwise formula


def nll_cases() -> Iterator[Any]:
    for p in PARAMETRIZATIONS:
        for gauge in (True, False):
            for channels_first, shape in ((True, (4, 5, 3, 2)), (False, (4, 7, 5)), (True, (6, 5))):
                yield pytest.param(p, gauge, channels_first, shape, id=f"{p}-gauge{gauge}-{shape}")


@pytest.mark.parametrize(("parametrization", "gauge", "channels_first", "shape"), list(nll_cases()))
def test_aux_loss_matches_elementwise_nll(
    parametrization: str, gauge: bool, channels_first: bool, shape: tuple[int, ...]
) -> None:
    """Value and gradients of ``aux_loss()`` (from per-channel moments) == the reference's elementwise
    NLL in fp64 (measured ~1e-16; bound 1e-12), and the fp32 layer within 1e-5 of it."""
    m = BatchlessNorm(5, std_parametrization=parametrization, gauge=gauge, channels_first=channels_first)
    randomize_batchless(m)
    if parametrization == "inv":  # a negative inv_std: the NLL uses |inv_std|, the output its sign
        with torch.no_grad():
            m.inv_std[0] *= -1
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g, dtype=F64) * 2 + 1
    m64 = copy.deepcopy(m).double()
    m64(x)
    got = m64.aux_loss()
    want = batchless_nll(x, m64)
    params = [m64.mean, m64.std_param]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    m(x.float())
    torch.testing.assert_close(m.aux_loss().double(), want.detach(), rtol=1e-5, atol=1e-5)


def test_gauged_nll_is_zero_in_expectation_at_the_true_moments() -> None:
    """With mean/std equal to the data's, the gauged NLL is ~0 (0.5 * (E[z²] - 1))."""
    mu, sd = torch.tensor([-1.0, 0.0, 2.0, 5.0]), torch.tensor([0.5, 1.0, 3.0, 0.1])
    for p in PARAMETRIZATIONS:
        m = BatchlessNorm(4, std_parametrization=p)
        m.set_statistics(mu, sd)
        g = torch.Generator().manual_seed(5)
        m(torch.randn(256, 4, 16, generator=g, dtype=F64).float() * sd.view(-1, 1) + mu.view(-1, 1))
        assert abs(m.aux_loss().item()) < 0.01, p  # sampling noise of 0.5 * mean(z²): ~2e-3


def test_aux_loss_of_a_batch_is_the_mean_over_its_samples() -> None:
    """Per-element averaging (official code): a batch's NLL is the mean of its samples' NLLs."""
    m = BatchlessNorm(3, gauge=False)
    randomize_batchless(m)
    x = torch.randn(5, 3, 4, dtype=F64) + 0.5
    m.double()(x)
    whole = m.aux_loss()
    singles = []
    for i in range(5):
        m(x[i : i + 1])
        singles.append(m.aux_loss())
    torch.testing.assert_close(whole, torch.stack(singles).mean(), rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# Convergence of the statistics


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_statistics_converge_to_the_stream_moments(parametrization: str) -> None:
    """Adam (lr 0.1, cosine to 0) on the aux loss alone, 300 steps of fresh N(mu_c, sd_c²) batches
    of 16 x 8 values per channel, from mean 0 and std 1: |mean - mu| < 0.1 sd and |std/sd - 1| < 5%.
    (Measured: 0.021 sd and 0.6-1.8%.)"""
    mu, sd = torch.tensor([-2.0, 0.5, 3.0]), torch.tensor([0.5, 1.0, 2.0])
    m = BatchlessNorm(3, std_parametrization=parametrization)
    g = torch.Generator().manual_seed(1)
    steps = 300
    opt = torch.optim.Adam([m.mean, m.std_param], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        m(torch.randn(16, 3, 8, generator=g) * sd.view(-1, 1) + mu.view(-1, 1))
        opt.zero_grad()
        m.aux_loss().backward()
        opt.step()
        sched.step()
    assert float(((m.mean.detach() - mu) / sd).abs().max()) < 0.1
    assert float((m.std_value() / sd - 1).abs().max()) < 0.05


# ---------------------------------------------------------------------------------------------
# Per-sample, and the same function in train and eval


@pytest.mark.parametrize("channels_first", [True, False])
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_output_is_per_sample_and_identical_in_train_and_eval(
    channels_first: bool, parametrization: str
) -> None:
    m = BatchlessNorm(6, std_parametrization=parametrization, channels_first=channels_first)
    randomize_batchless(m)
    shape = (5, 6, 3, 4) if channels_first else (5, 3, 4, 6)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(6)) * 3 + 1
    y = m.train()(x)
    for i in range(5):
        assert torch.equal(m(x[i : i + 1]), y[i : i + 1])
        other = x.clone()
        other[torch.arange(5) != i] *= 100  # the other samples changed wildly
        assert torch.equal(m(other)[i], y[i])
    assert torch.equal(m.eval()(x), y)
    torch.testing.assert_close(
        y.double(), batchless(x.double(), copy.deepcopy(m).double()), rtol=1e-6, atol=1e-6
    )


def test_aux_loss_is_zero_in_eval_before_any_forward_and_for_an_empty_batch() -> None:
    m = BatchlessNorm(4)
    for make in (lambda: None, lambda: m.eval()(torch.randn(2, 4)), lambda: m.train()(torch.randn(0, 4))):
        make()
        aux = m.aux_loss()
        assert aux.dim() == 0 and aux.item() == 0 and aux.grad_fn is None
    m.train()(torch.randn(2, 4) + 3)
    assert m.aux_loss().item() > 0


def test_no_graph_is_kept_between_steps() -> None:
    """The layer stores only detached (C,) moments: an activation whose output was dropped is
    freed although its aux loss is still alive, and the stored tensors carry no graph."""
    lin, m = nn.Linear(4, 4), BatchlessNorm(4, channels_first=False)
    h = lin(torch.randn(8, 3, 4))
    alive = weakref.ref(h)
    y = m(h)
    aux = m.aux_loss()
    assert m._last_stats is not None
    assert all(t.grad_fn is None and not t.requires_grad and t.shape == (4,) for t in m._last_stats)
    del h, y
    gc.collect()
    assert alive() is None
    aux.backward()
    assert m.mean.grad is not None and lin.weight.grad is None


# ---------------------------------------------------------------------------------------------
# total_aux_loss


def test_total_aux_loss_sums_nested_modules_once_each() -> None:
    a, b, c = BatchlessNorm(4), BatchlessNorm(4), BatchlessNorm(4, channels_first=False)
    model = nn.ModuleDict(
        {"a": a, "deep": nn.Sequential(nn.ReLU(), nn.Sequential(b)), "list": nn.ModuleList([c, a])}
    )
    for i, (m, shape) in enumerate(((a, (3, 4, 2)), (b, (3, 4, 2)), (c, (3, 2, 4)))):
        m(torch.randn(shape) * (i + 1) + i)
    total = total_aux_loss(model)
    torch.testing.assert_close(total, a.aux_loss() + b.aux_loss() + c.aux_loss())
    total.backward()
    assert all(m.mean.grad is not None for m in (a, b, c))
    assert total_aux_loss(a) is not None and torch.equal(total_aux_loss(a), a.aux_loss())


def test_total_aux_loss_is_a_zero_tensor_without_batchless_layers() -> None:
    for model in (nn.Linear(3, 2), nn.ReLU(), nn.Sequential(normlab.LayerNorm(4), normlab.BatchNorm(4))):
        total = total_aux_loss(model)
        assert isinstance(total, Tensor) and total.dim() == 0 and total.item() == 0.0
    loss = nn.Linear(3, 2)(torch.randn(4, 3)).sum()
    (loss + total_aux_loss(nn.Linear(3, 2))).backward()  # adds to a loss like any scalar


def test_compiled_training_step_with_aux_loss_matches_eager() -> None:
    """``fullgraph=True`` over the whole step, ``total_aux_loss`` included; grads match eager."""
    eager = Net("log", dtype=torch.float32).train()
    model = copy.deepcopy(eager)

    def step(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(net(x), y) + total_aux_loss(net)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    for seed in range(2):
        x, y = data(8, seed=seed, dtype=torch.float32)
        compiled(model, x, y).backward()
        step(eager, x, y).backward()
        for (key, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
            assert p.grad is not None and q.grad is not None, key
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=key)
        model.zero_grad()
        eager.zero_grad()
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# init_batchless


def init_batches(dtype: torch.dtype = F64) -> list[Tensor]:
    g = torch.Generator().manual_seed(8)
    return [(torch.randn(n, 3, 6, 6, generator=g, dtype=F64) * 2 + 1).to(dtype) for n in (5, 7, 4)]


def moments(h: Tensor, channel_dim: int) -> tuple[Tensor, Tensor]:
    dims = [d for d in range(h.dim()) if d != channel_dim % h.dim()]
    return h.mean(dims), h.var(dims, correction=0).sqrt()


def manual_init(net: Net, batches: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Layer by layer on the concatenated data: fit norm1, then compute norm2's input with it, ..."""
    x = torch.cat(batches)
    fitted = []
    h = net.stage1(x)
    for norm, stage, channel_dim in (
        (net.norm1, net.stage2, 1),
        (net.norm2, net.stage3, 1),
        (net.norm3, None, -1),
    ):
        mean, std = moments(h, channel_dim)
        norm.set_statistics(mean, std)
        fitted.append((mean, std))
        if stage is not None:
            h = stage(h)
    return fitted


@pytest.mark.parametrize("method", ["two_pass", "single_pass"])
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_init_sets_each_layer_to_the_moments_of_its_input(method: str, parametrization: str) -> None:
    """fp64: mean and std of each layer == the moments of its input given the earlier layers'
    init, to 1e-10 relative, for both methods; the returned names are in forward order."""
    net = Net(parametrization)
    expected_net = copy.deepcopy(net)
    batches = init_batches()
    with torch.no_grad():
        expected = manual_init(expected_net, batches)
    names = init_batchless(net, batches, method=method)
    assert names == ["norm1", "norm2", "norm3"]
    for norm, (mean, std) in zip((net.norm1, net.norm2, net.norm3), expected, strict=True):
        torch.testing.assert_close(norm.mean.detach(), mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(norm.std_value(), std, rtol=1e-10, atol=1e-12)
    sigma = expected[0][1]
    raw = {"log": sigma.log(), "abs": sigma - net.norm1.eps, "inv": 1 / sigma}[parametrization]
    torch.testing.assert_close(net.norm1.std_param.detach(), raw, rtol=1e-10, atol=1e-12)


def test_init_fits_later_layers_after_earlier_ones() -> None:
    """norm2's statistics depend on norm1's init: fitting norm2 with norm1 still at its old values
    gives clearly different numbers, so the layer-by-layer order is what the test above checks."""
    net, batches = Net(), init_batches()
    with torch.no_grad():
        stale_mean, stale_std = moments(net.stage2(net.stage1(torch.cat(batches))), 1)
    init_batchless(net, batches)
    assert float((net.norm2.mean.detach() - stale_mean).abs().max()) > 0.1
    assert float((net.norm2.std_value() / stale_std - 1).abs().max()) > 0.1


def test_two_pass_and_single_pass_agree_in_fp32() -> None:
    """fp32 model: the two methods agree to 1e-6 relative (accumulation is float64)."""
    a = Net("log", dtype=torch.float32)
    b = copy.deepcopy(a)
    batches = init_batches(torch.float32)
    init_batchless(a, batches, method="two_pass")
    init_batchless(b, batches, method="single_pass")
    for na, nb in zip((a.norm1, a.norm2, a.norm3), (b.norm1, b.norm2, b.norm3), strict=True):
        torch.testing.assert_close(na.mean, nb.mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(na.std_value(), nb.std_value(), rtol=1e-6, atol=0)


def test_init_restores_modes_runs_without_grad_and_handles_batch_formats() -> None:
    net = Net().train()
    net.norm2.eval()
    modes = {name: m.training for name, m in net.named_modules()}
    grad_modes: list[bool] = []
    net.conv1.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    batches = init_batches()
    with_targets = [(x, torch.zeros(x.shape[0])) for x in batches]  # a DataLoader's (input, target)
    init_batchless(net, with_targets, method="single_pass")
    assert grad_modes and not any(grad_modes)
    assert {name: m.training for name, m in net.named_modules()} == modes
    assert all(p.grad is None for p in net.parameters())
    other = Net()
    init_batchless(other, [{"x": x} for x in batches], method="single_pass")
    for name, p in net.named_parameters():
        torch.testing.assert_close(p, other.get_parameter(name), rtol=1e-12, atol=1e-12)


def test_init_clamps_a_dead_channel_to_eps() -> None:
    """A constant channel (zero variance) gets sigma = eps, not 0: the output stays finite."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), BatchlessNorm(4, eps=1e-4))
    with torch.no_grad():
        model[0].weight[2].zero_()
        model[0].bias[2] = 0.5
    init_batchless(model, [torch.randn(4, 3, 5, 5)])
    assert model[1].std_value()[2].item() == pytest.approx(1e-4, rel=1e-5)
    assert model[1].mean[2].item() == pytest.approx(0.5)
    assert torch.isfinite(model(torch.randn(2, 3, 5, 5))).all()


def test_init_errors() -> None:
    net = Net()
    with pytest.raises(ValueError, match=r"method must be one of \('two_pass', 'single_pass'\).*'three'"):
        init_batchless(net, init_batches(), method="three")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="re-iterable"):
        init_batchless(net, iter(init_batches()))
    with pytest.raises(ValueError, match="empty"):
        init_batchless(net, [])
    with pytest.raises(ValueError, match="a batch must be a Tensor"):
        init_batchless(net, [3])
    assert init_batchless(nn.Linear(2, 2), [torch.randn(1, 2)]) == []


# ---------------------------------------------------------------------------------------------
# Construction: parametrizations, inits, errors


@pytest.mark.parametrize(
    ("parametrization", "name", "raw"),
    [("log", "log_std", math.log(2.5)), ("abs", "std", 2.5 - 1e-5), ("inv", "inv_std", 1 / 2.5)],
)
def test_parametrizations_store_sigma_as_documented(parametrization: str, name: str, raw: float) -> None:
    m = BatchlessNorm(3, std_parametrization=parametrization, init_mean=-0.5, init_std=2.5)
    assert set(dict(m.named_parameters())) == {"mean", name, "weight", "bias"}
    assert m.std_param_name == name
    torch.testing.assert_close(m.std_param.detach(), torch.full((3,), raw))
    assert torch.equal(m.mean.detach(), torch.full((3,), -0.5))
    torch.testing.assert_close(m.std_value(), torch.full((3,), 2.5))  # 'abs': |std| + eps
    assert f"std_parametrization={parametrization!r}" in repr(m)


def test_affine_off_and_registry_names() -> None:
    m = normlab.create_norm("batchless", 4, affine=False)
    assert isinstance(m, BatchlessNorm) and m.weight is None and m.bias is None
    assert normlab.get_norm_layer("Batchless-Norm") is BatchlessNorm
    x = torch.randn(2, 4, 3)
    torch.testing.assert_close(m(x), x)  # mean 0, sigma 1, no affine: the identity


def test_bad_arguments_fail_at_construction() -> None:
    with pytest.raises(
        ValueError, match=r"BatchlessNorm: std_parametrization must be one of 'abs', 'inv', 'log'"
    ):
        BatchlessNorm(4, std_parametrization="sqrt")  # type: ignore[arg-type]
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=r"init_std must be > 0"):
            BatchlessNorm(4, init_std=bad)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="init_std must be a finite number"):
            BatchlessNorm(4, init_std=bad)
        with pytest.raises(ValueError, match="init_mean must be a finite number"):
            BatchlessNorm(4, init_mean=bad)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        BatchlessNorm(4, eps=0.0)
    with pytest.raises(ValueError, match="num_features"):
        BatchlessNorm(0)
    with pytest.raises(ValueError, match=r"BatchlessNorm: set_statistics needs std > 0"):
        BatchlessNorm(2).set_statistics(0.0, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"expected 4 features in the last dimension, got 3"):
        BatchlessNorm(4, channels_first=False)(torch.randn(2, 4, 3))
