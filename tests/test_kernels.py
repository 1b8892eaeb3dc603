"""normlab.kernels: the fused CPU ops against plain torch, their registration, dispatch and fallbacks.

``make install`` builds the library ahead (``normlab kernels build``, cached in
``~/.cache/normlab``); where it did not, the first test to need the library builds it (about a
minute on 2 cores): the session-scoped ``built`` fixture does it once, and every test here skips
with the build's reason where no compiler is available. The rest of the suite
(contract, reference, compile) runs with the kernels on, their default.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.library import opcheck
from torch.profiler import profile

import normlab
import normlab.kernels as K
from normlab import functional as NF
from normlab.kernels import _build
from test_reference import BY_LABEL, PRECISIONS, build, compare_with_reference

from cases import make_input, randomize_params

OPS = torch.ops.normlab
FUSED = ("dyt", "derf", "rmsnorm", "layernorm", "lns", "groupnorm", "batchnorm")


@pytest.fixture(scope="session")
def built() -> None:
    if not K.build():
        pytest.skip(f"normlab kernels unavailable: {K.status()['reason']}")


@pytest.fixture(autouse=True)
def _kernels_on(built: None) -> Iterator[None]:
    """Every test starts with the kernels on and leaves them as it found them."""
    previous = K.set_enabled(True)
    yield
    K.set_enabled(previous)


def fused_ops_called(fn: Callable[[], Any]) -> set[str]:
    """The ``normlab::`` operators that ``fn`` runs (forward and backward)."""
    with profile() as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("normlab::")}


def grads_of(module: nn.Module, x: Tensor, seed: int = 3) -> tuple[Tensor, list[Tensor]]:
    """Output, then the grads of the input and every parameter, for a seeded random upstream."""
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype)
    grads = torch.autograd.grad(y, [x, *module.parameters()], g)
    return y.detach(), list(grads)


def assert_close_rel(actual: Tensor, expected: Tensor, tol: float, what: str) -> None:
    """``max|a - b| <= tol * max(1, max|b|)``: the whole-tensor relative error of test_reference."""
    diff = (actual.double() - expected.double()).abs().max().item()
    scale = max(1.0, expected.double().abs().max().item())
    assert diff <= tol * scale, f"{what}: max abs diff {diff:.3g} > {tol:g} * {scale:.3g}"


TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 3e-3}


# ------------------------------------------------------------------------------------------------
# Dispatch: the layers use the fused ops, and the switch turns them off


CONFIGS: list[tuple[str, dict[str, Any], tuple[int, ...]]] = [
    ("dyt", {}, (4, 7, 24)),
    ("dyt", {"channels_first": True}, (2, 24, 5, 3)),
    ("dyt", {"bias": False}, (4, 7, 24)),
    ("dyt", {"elementwise_affine": False}, (3, 24)),
    ("derf", {"shift_init": 0.3}, (4, 7, 24)),
    ("derf", {"channels_first": True}, (2, 24, 5, 3)),
    ("rmsnorm", {}, (4, 7, 24)),
    ("rmsnorm", {"eps_mode": "outside", "eps": 1e-8, "bias": True}, (4, 7, 24)),
    ("rmsnorm", {"eps": None, "elementwise_affine": False}, (4, 7, 24)),
    ("layernorm", {}, (4, 7, 24)),
    ("layernorm", {"bias": False}, (4, 7, 24)),
    ("layernorm", {"elementwise_affine": False}, (4, 7, 24)),
    ("layernorm", {"channels_first": True}, (2, 24, 5, 3)),
    ("layernorm", {"channels_first": True}, (2, 24, 300)),  # positions: one block of 256 and a tail
    ("rmsnorm", {"channels_first": True, "bias": True}, (2, 24, 7)),
    ("rmsnorm", {"channels_first": True, "eps_mode": "outside"}, (3, 24, 5, 2)),
    # widths off the kernels' step sizes: DyT/Derf take 4 vectors per step, then single vectors,
    # then a tail; channels-first row norms sum 4 channels (backward: 2) per sweep, then single ones
    ("dyt", {"num_features": 75}, (3, 5, 75)),
    ("derf", {"num_features": 5, "channels_first": True}, (2, 5, 9, 9)),
    ("layernorm", {"num_features": 7, "channels_first": True}, (2, 7, 5, 3)),
    ("rmsnorm", {"num_features": 3, "channels_first": True}, (2, 3, 11)),
    ("lns", {"layer_idx": 3}, (4, 7, 24)),
    ("lns", {"layer_idx": 2, "base": "rmsnorm"}, (4, 7, 24)),
    ("lns", {"layer_idx": 5, "elementwise_affine": False}, (4, 7, 24)),
    ("groupnorm", {"num_groups": 4}, (3, 24, 5, 3)),
    ("groupnorm", {"num_groups": 1}, (3, 24, 7)),
    ("groupnorm", {"num_groups": 24, "bias": False}, (2, 24, 6)),
    ("groupnorm", {"num_groups": 3, "affine": False}, (3, 24)),
    ("batchnorm", {}, (4, 24, 7, 7)),
    ("batchnorm", {"affine": False}, (3, 24, 50)),
    ("batchnorm", {"track_running_stats": False, "bias": False}, (2, 24, 61)),
]


def config_id(config: tuple[str, dict[str, Any], tuple[int, ...]]) -> str:
    name, kwargs, shape = config
    return "-".join([name, *(f"{k}={v}" for k, v in kwargs.items()), "x".join(map(str, shape))])


def make(config: tuple[str, dict[str, Any], tuple[int, ...]], dtype: torch.dtype) -> tuple[nn.Module, Tensor]:
    name, kwargs, shape = config
    kwargs = dict(kwargs)
    features = kwargs.pop("num_features", 24)
    module = randomize_params(normlab.create_norm(name, features, **kwargs)).to(dtype)
    g = torch.Generator().manual_seed(len(shape))
    x = ((torch.randn(shape, generator=g, dtype=torch.float64) + 0.3) * 2).to(dtype)
    return module, x


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_layers_dispatch_to_the_fused_ops_and_the_switch_turns_them_off(
    config: tuple[str, dict[str, Any], tuple[int, ...]],
) -> None:
    module, x = make(config, torch.float32)

    def step() -> None:
        grads_of(module, x)

    assert fused_ops_called(step), "kernels on: no normlab:: op ran"
    with K.use_kernels(False):
        assert not K.enabled()
        assert fused_ops_called(step) == set()
    assert K.enabled()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_fused_matches_plain_torch(
    config: tuple[str, dict[str, Any], tuple[int, ...]], dtype: torch.dtype
) -> None:
    """Kernels on vs off, same module and input: output, input grad and every parameter grad."""
    module, x = make(config, dtype)
    y, grads = grads_of(module, x)
    with K.use_kernels(False):
        y_ref, grads_ref = grads_of(module, x)
    assert y.dtype == y_ref.dtype == dtype
    assert_close_rel(y, y_ref, TOL[dtype], "output")
    names = ["input", *(n for n, _ in module.named_parameters())]
    exact = None
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert g.dtype == g_ref.dtype and g.shape == g_ref.shape, name
        if name == "input" or dtype not in (torch.bfloat16, torch.float16):
            assert_close_rel(g, g_ref, TOL[dtype], name)
            continue
        # Half-precision parameter grads sum over the batch: torch's own channels-first
        # LayerNorm path loses up to 11% of them in bf16 (one thread), so the fused grads are
        # held to the fp64 truth: within the dtype's tolerance, or no farther than torch's.
        if exact is None:
            _, exact = grads_of(copy.deepcopy(module).double(), x.double())
        truth = exact[names.index(name)]
        scale = max(1.0, truth.abs().max().item())
        err, err_ref = ((t.double() - truth).abs().max().item() for t in (g, g_ref))
        assert err <= max(4 * TOL[dtype] * scale, err_ref), f"{name}: fused {err:.3g}, torch {err_ref:.3g}"


REFERENCE_CASES = [
    ("dyt", {}),
    ("dyt", {"channels_first": True}),
    ("derf", {"shift_init": 0.4}),
    ("rmsnorm", {}),
    ("rmsnorm", {"eps_mode": "outside", "eps": 1e-8, "bias": True}),
    ("layernorm", {}),
    ("layernorm", {"channels_first": True}),
    ("lns", {"layer_idx": 3}),
    ("lns", {"layer_idx": 2, "base": "rmsnorm", "elementwise_affine": False}),
    ("groupnorm", {"num_groups": 3}),
    ("batchnorm", {}),
]


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels-on", "kernels-off"])
@pytest.mark.parametrize("label", [p.label for p in PRECISIONS])
@pytest.mark.parametrize(("name", "kwargs"), REFERENCE_CASES, ids=[f"{n}-{k}" for n, k in REFERENCE_CASES])
def test_reference_with_kernels_on_and_off(
    name: str, kwargs: dict[str, Any], label: str, kernels: bool
) -> None:
    """The fp64-reference check of test_reference.py, both ways: the fused path has to meet the
    same per-dtype tolerances as the plain one (C=123, odd: vector tails; scale 50: saturation)."""
    prec = BY_LABEL[label]
    with K.use_kernels(kernels):
        for c, rank, scale in ((123, 3, 1.0), (123, 3, 50.0), (6, 4, 1.0)):
            module = build(name, c, "train", prec.module_dtype, **kwargs)
            x = make_input(
                module, rank, dtype=prec.input_dtype, scale=scale, seed=c + rank, requires_grad=True
            )
            compare_with_reference(name, module, x, prec, key=f"{name} kernels={kernels}")


def test_env_var_turns_the_kernels_off() -> None:
    code = "import normlab.kernels as K; print(K.enabled())"
    env = {**os.environ, "NORMLAB_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_set_enabled_validates_and_returns_the_previous_setting() -> None:
    assert K.set_enabled(False) is True
    assert K.set_enabled(True) is False
    with pytest.raises(ValueError, match="flag must be a bool"):
        K.set_enabled(1)  # type: ignore[arg-type]
    info = K.info()
    assert info["enabled"] and info["loaded"] and info["reason"] == "loaded"


# ------------------------------------------------------------------------------------------------
# Layouts, sizes and threads the small cases do not reach


def test_channels_last_maps_keep_their_memory_format() -> None:
    """(N, C, H, W) stored channels-last: DyT and GroupNorm run on the NHWC data without a copy."""
    for name, kwargs in (("dyt", {"channels_first": True}), ("groupnorm", {"num_groups": 4})):
        module = randomize_params(normlab.create_norm(name, 16, **kwargs))
        x = torch.randn(2, 16, 5, 3).to(memory_format=torch.channels_last)
        y, grads = grads_of(module, x)
        assert y.is_contiguous(memory_format=torch.channels_last), name
        with K.use_kernels(False):
            y_ref, grads_ref = grads_of(module, x)
        assert_close_rel(y, y_ref, 2e-5, name)
        for g, g_ref in zip(grads, grads_ref, strict=True):
            assert_close_rel(g, g_ref, 1e-4, name)


class TokenGroupNorm(nn.Module):
    """GroupNorm on (N, L, C) tokens, the way a transformer calls it."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.gn = normlab.GroupNorm(channels, num_groups=groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.gn(x.transpose(1, 2)).transpose(1, 2)  # type: ignore[no-any-return]


def test_group_norm_on_tokens_uses_the_channels_last_kernel() -> None:
    """(N, L, C) tokens through ``gn(x.transpose(1, 2)).transpose(1, 2)``: one fused op, torch's result."""
    module = randomize_params(TokenGroupNorm(64, 8))
    x = torch.randn(3, 50, 64) * 3 + 1
    calls = fused_ops_called(lambda: grads_of(module, x))
    assert calls == {"normlab::group_norm", "normlab::group_norm_backward"}
    y, grads = grads_of(module, x)
    with K.use_kernels(False):
        y_ref, grads_ref = grads_of(module, x)
    assert y.is_contiguous()
    assert_close_rel(y, y_ref, 2e-5, "output")
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert_close_rel(g, g_ref, 1e-4, "grad")


@pytest.mark.parametrize("threads", [1, 2])
def test_large_inputs_across_threads(threads: int) -> None:
    """Above 16 MiB of output the kernels write with streaming stores; reductions of dw/db/dalpha
    and the per-sample GroupNorm sums are split across threads. Both must not change the result."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(11)
        x = torch.randn(2731 * 2, 768, generator=g) + 0.5  # 16.8 MB in fp32
        for name, kwargs, inp in (
            ("dyt", {}, x),
            ("layernorm", {}, x),
            ("rmsnorm", {"bias": True}, x[:1000]),
            ("groupnorm", {"num_groups": 32}, x[:1000].view(1, 1000, 768).transpose(1, 2)),
            ("batchnorm", {}, x.view(2, 768, 2731)),  # runs of 2731: a vector tail in each
        ):
            module = randomize_params(normlab.create_norm(name, 768, **kwargs))
            y, grads = grads_of(module, inp)
            with K.use_kernels(False):
                y_ref, grads_ref = grads_of(module, inp)
            assert_close_rel(y, y_ref, 2e-5, f"{name} output")
            for g_, g_ref in zip(grads, grads_ref, strict=True):
                assert_close_rel(g_, g_ref, 1e-4, f"{name} grad")
    finally:
        torch.set_num_threads(previous)


THREAD_CASES = [
    ("dyt", {}, (4096, 96)),
    ("dyt", {"channels_first": True}, (8, 96, 20, 20)),  # inner > 1: per-plane partials
    ("derf", {}, (4096, 96)),
    ("layernorm", {}, (4096, 96)),
    ("rmsnorm", {"bias": True}, (4096, 96)),
    ("layernorm", {"channels_first": True}, (3, 96, 40, 40)),  # channels-first blocks
    ("groupnorm", {"num_groups": 8}, (1, 96, 64, 64)),  # one sample: its rows split
    ("batchnorm", {}, (16, 96, 12, 12)),
]


@pytest.mark.parametrize(("name", "kwargs", "shape"), THREAD_CASES, ids=lambda v: str(v))
def test_gradients_are_the_same_bits_with_any_thread_count(
    name: str, kwargs: dict[str, Any], shape: tuple[int, ...]
) -> None:
    """The weight, bias and alpha gradients are sums over rows; summed per fixed chunk (not per
    thread) they are bit-identical with 1 and 2 threads, so a training run does not change with
    --jobs (with per-thread partials a 200-step GPT ended 0.3 nats apart)."""
    module = randomize_params(normlab.create_norm(name, shape[1] if len(shape) > 2 else shape[-1], **kwargs))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)) + 0.3
    previous = torch.get_num_threads()
    got = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got.append(grads_of(module, x))
    finally:
        torch.set_num_threads(previous)
    (y1, g1), (y2, g2) = got
    assert torch.equal(y1, y2), f"{name}: the output changes with the thread count"
    names = ["input", *(n for n, _ in module.named_parameters())]
    for what, a, b in zip(names, g1, g2, strict=True):
        assert torch.equal(a, b), f"{name}: d{what} changes with the thread count"


def test_a_gpt_trains_to_the_same_bits_with_1_and_2_threads() -> None:
    """The study runner's promise for language models: --jobs and --threads change the speed of a
    run, not its numbers (with per-thread partials the first backward already differed)."""
    from normlab.models.gpt import GPT, GPTConfig

    def train(threads: int) -> list[Tensor]:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_embd=64, n_head=4))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(1)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for _ in range(3):
                x, y = torch.randint(0, 64, (2, 16, 32), generator=gen)
                opt.zero_grad()
                model(x, y).loss.backward()
                opt.step()
        finally:
            torch.set_num_threads(previous)
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(train(1), train(2), strict=True):
        assert torch.equal(a, b)


ADD_NORMS: list[Callable[..., tuple[Tensor, Tensor]]] = [
    lambda x, r, w, b: NF.add_layer_norm(x, r, (48,), w, b, 1e-5),
    lambda x, r, w, b: NF.add_rms_norm(x, r, (48,), w, b, 1e-6),
    lambda x, r, w, b: NF.add_rms_norm(x, r, (48,), w, None, 1e-8, eps_inside=False),
]


@pytest.mark.parametrize("use_h", [True, False], ids=["h-used", "h-unused"])
@pytest.mark.parametrize("fn", ADD_NORMS, ids=["layernorm", "rmsnorm", "rmsnorm-outside"])
def test_residual_add_fused_with_the_norm(fn: Callable[..., tuple[Tensor, Tensor]], use_h: bool) -> None:
    """``add_layer_norm``/``add_rms_norm`` return ``(norm(x + r), x + r)``; both outputs carry grads."""
    g = torch.Generator().manual_seed(4)
    inputs = [torch.randn(5, 9, 48, generator=g), torch.randn(5, 9, 48, generator=g) * 0.5 + 1]
    params = [torch.randn(48, generator=g), torch.randn(48, generator=g)]
    upstream = torch.randn(5, 9, 48, generator=g)
    results = []
    for on in (True, False):
        leaves = [t.clone().requires_grad_(True) for t in (*inputs, *params)]
        with K.use_kernels(on):
            y, h = fn(*leaves)
            loss = (y * upstream).sum() + ((h * h).sum() if use_h else 0.0)
            loss.backward()
        results.append([y.detach(), h.detach(), *(t.grad for t in leaves)])
    for got, want in zip(*results, strict=True):
        if want is None:  # the unused bias of the third case
            assert got is None
        else:
            assert got is not None
            assert_close_rel(got, want, 2e-5, "add+norm")


@pytest.mark.parametrize("fn", ADD_NORMS, ids=["layernorm", "rmsnorm", "rmsnorm-outside"])
def test_residual_add_double_backward_with_both_outputs(fn: Callable[..., tuple[Tensor, Tensor]]) -> None:
    """gradgradcheck through ``(y, h)``: the backward's recomputation reads the saved output ``h``,
    whose own node also leads to the weight; this once recursed without end (a hang)."""
    g = torch.Generator().manual_seed(5)
    shapes = ((2, 48), (2, 48), (48,), (48,))
    leaves = [torch.randn(shape, generator=g, dtype=torch.float64) + 0.3 for shape in shapes]
    leaves = [t.requires_grad_(True) for t in leaves]

    def f(*ts: Tensor) -> Tensor:
        y, h = fn(*ts)
        return y + 0.5 * h

    assert fused_ops_called(lambda: f(*leaves).sum().backward())
    assert torch.autograd.gradcheck(f, tuple(leaves))
    assert torch.autograd.gradgradcheck(f, tuple(leaves))


def test_residual_add_uses_one_fused_op_each_way() -> None:
    x = torch.randn(4, 32, requires_grad=True)
    r = torch.randn(4, 32, requires_grad=True)
    w = torch.ones(32, requires_grad=True)

    def step() -> None:
        y, h = NF.add_layer_norm(x, r, (32,), w, None)
        (y.sum() + h.sum()).backward()

    assert fused_ops_called(step) == {"normlab::add_layer_norm", "normlab::layer_norm_backward"}


# ------------------------------------------------------------------------------------------------
# Fallbacks: cases the fused ops do not take, which must still compute the plain result


def test_wider_parameters_than_the_accumulator_take_the_plain_path() -> None:
    ln = normlab.LayerNorm(16).double()
    x = torch.randn(3, 16)
    assert fused_ops_called(lambda: ln(x)) == set()
    assert ln(x).dtype == torch.float32


def test_prms_norm_and_meta_and_empty_inputs_take_the_plain_path() -> None:
    prms = normlab.RMSNorm(16, p=0.5)
    assert fused_ops_called(lambda: prms(torch.randn(3, 16))) == set()
    dyt = normlab.DyT(16)
    assert fused_ops_called(lambda: dyt(torch.randn(0, 16))) == set()
    meta = normlab.DyT(16, device="meta")
    assert meta(torch.randn(3, 16, device="meta")).is_meta


def test_autocast_keeps_torch_behaviour() -> None:
    """Under CPU autocast the plain path runs, so LayerNorm's output is fp32 as torch's autocast makes it."""
    ln = normlab.LayerNorm(16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_ops_called(lambda: ln(x)) == set()
        assert ln(x).dtype == F.layer_norm(x, (16,)).dtype


def test_vmap_grad_and_forward_ad_fall_back_and_agree() -> None:
    """torch.func transforms wrap tensors and forward AD needs a JVP: the plain path runs them."""
    rms = randomize_params(normlab.RMSNorm(12))
    dyt = randomize_params(normlab.DyT(12))
    x = torch.randn(5, 3, 12)
    for module in (rms, dyt):
        batched = torch.func.vmap(module)(x)
        torch.testing.assert_close(batched, module(x), rtol=2e-6, atol=2e-6)
        g = torch.func.grad(lambda t: module(t).pow(2).sum())(x)  # noqa: B023
        x1 = x.clone().requires_grad_(True)
        module(x1).pow(2).sum().backward()
        torch.testing.assert_close(g, x1.grad, rtol=1e-5, atol=1e-5)
        import torch.autograd.forward_ad as fwAD

        tangent = torch.randn_like(x)
        with fwAD.dual_level():
            out = module(fwAD.make_dual(x, tangent))
            jvp = fwAD.unpack_dual(out).tangent
        _, jvp_ref = torch.func.jvp(lambda t: module(t), (x,), (tangent,))  # noqa: B023
        torch.testing.assert_close(jvp, jvp_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["dyt", "derf", "rmsnorm", "layernorm", "groupnorm"])
def test_double_backward_through_the_fused_ops(name: str) -> None:
    """create_graph=True: the backward recomputes through plain torch, so gradgradcheck holds (fp64)."""
    kwargs = {"num_groups": 2} if name == "groupnorm" else {}
    module = randomize_params(normlab.create_norm(name, 6, **kwargs)).double()
    x = (torch.randn(2, 6, 3, dtype=torch.float64) + 0.3).requires_grad_(True)
    if name != "groupnorm":
        x = x.detach().transpose(1, 2).contiguous().requires_grad_(True)
    assert fused_ops_called(lambda: module(x).sum().backward())
    assert torch.autograd.gradcheck(module, (x,))
    assert torch.autograd.gradgradcheck(module, (x,))


def test_a_new_process_loads_the_cached_build_at_its_first_fused_call() -> None:
    """After ``normlab kernels build`` (``make install``), a new process compiles nothing."""
    code = (
        "import torch, normlab; from normlab.kernels import _build; "
        "normlab.DyT(256)(torch.randn(64, 256)); s = _build.status(); "
        "print(s['loaded'], s['source'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "cache"], out.stdout + out.stderr
    assert "building" not in out.stderr


def test_failed_build_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("NORMLAB_KERNELS_CACHE", str(tmp_path))  # an empty cache: nothing to load
    fresh = _build.BuildState()
    monkeypatch.setattr(_build, "STATE", fresh)
    monkeypatch.setattr(_build, "_missing_tool", lambda: "no C++ compiler ('c++' not found)")
    dyt = normlab.DyT(8)
    x = torch.randn(2, 8)
    with pytest.warns(
        RuntimeWarning, match=r"fused CPU kernels are unavailable \(build failed: no C\+\+ compiler"
    ):
        y = dyt(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert fused_ops_called(lambda: dyt(x)) == set()
    assert fresh.attempted and not fresh.loaded and "no C++ compiler" in K.status()["reason"]
    torch.testing.assert_close(y, NF.dyt_torch(x, dyt.alpha, dyt.weight, dyt.bias))


# ------------------------------------------------------------------------------------------------
# torch.library registration: opcheck, and torch.compile keeps the ops in the graph


def _p(*shape: int, dtype: torch.dtype = torch.float32, grad: bool = True) -> Tensor:
    return (torch.randn(shape, dtype=torch.float64) + 0.2).to(dtype).requires_grad_(grad)


def _opcheck_cases() -> Iterator[Any]:
    for dtype in (torch.float32, torch.bfloat16):
        d = {"dtype": dtype}
        f32 = {"dtype": torch.float32}
        yield "dyt", OPS.dyt.default, (_p(3, 5, 8, **d), _p(1), _p(8, **f32), _p(8, **f32), -1)
        yield "dyt-cf", OPS.dyt.default, (_p(2, 8, 5, **d), _p(1), _p(8, **f32), None, 1)
        yield "derf", OPS.derf.default, (_p(3, 8, **d), _p(1), _p(1), _p(8, **f32), _p(8, **f32), -1)
        yield "rms", OPS.rms_norm.default, (_p(3, 5, 8, **d), 8, _p(8, **f32), None, 1e-6, True)
        yield "rms-out", OPS.rms_norm.default, (_p(3, 8, **d), 8, _p(8, **f32), _p(8, **f32), 1e-8, False)
        yield "ln", OPS.layer_norm.default, (_p(3, 5, 8, **d), 8, _p(8, **f32), _p(8, **f32), 1e-5)
        yield "ln-2d", OPS.layer_norm.default, (_p(3, 4, 6, **d), 24, None, None, 1e-5)
        yield (
            "ln-cf",
            OPS.layer_norm.default,
            (_p(2, 8, 5, 3, **d), 8, _p(8, **f32), _p(8, **f32), 1e-5, True),
        )
        yield "rms-cf", OPS.rms_norm.default, (_p(2, 8, 7, **d), 8, _p(8, **f32), None, 1e-6, False, True)
        yield (
            "add-ln",
            OPS.add_layer_norm.default,
            (_p(3, 8, **d), _p(3, 8, **d), 8, _p(8, **f32), None, 1e-5),
        )
        yield "add-rms", OPS.add_rms_norm.default, (_p(3, 8, **d), _p(3, 8, **d), 8, None, None, 1e-6, True)
        yield "gn", OPS.group_norm.default, (_p(2, 8, 5, **d), 4, _p(8, **f32), _p(8, **f32), 1e-5, False)
        yield "gn-cl", OPS.group_norm.default, (_p(2, 5, 8, **d), 2, _p(8, **f32), None, 1e-5, True)
        yield "bn", OPS.batch_norm_train.default, (_p(3, 8, 20, **d), _p(8, **f32), _p(8, **f32), 1e-5)
        yield "bn-noaffine", OPS.batch_norm_train.default, (_p(2, 5, 9, **d), None, None, 1e-5)


@pytest.mark.parametrize(
    ("label", "op", "args"), [pytest.param(*c, id=f"{c[0]}-{c[2][0].dtype}") for c in _opcheck_cases()]
)
def test_opcheck(label: str, op: Any, args: tuple[Any, ...]) -> None:
    """Schema, fake kernel, autograd registration and AOT dispatch (torch.library.opcheck)."""
    results = opcheck(op, args)
    assert all(v == "SUCCESS" for v in results.values()), results


@pytest.mark.parametrize("name", ["dyt", "rmsnorm", "groupnorm"])
def test_compile_keeps_the_fused_op_in_the_graph(name: str) -> None:
    """Dynamo sees the custom op (no graph break, no decomposition into torch ops) and the
    compiled module matches eager."""
    kwargs = {"num_groups": 4} if name == "groupnorm" else {}
    module = randomize_params(normlab.create_norm(name, 16, **kwargs))
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(module), backend=backend, fullgraph=True)
    x = torch.randn(3, 16, 5) if name == "groupnorm" else torch.randn(3, 5, 16)
    y, grads = grads_of(compiled, x)
    y_ref, grads_ref = grads_of(module, x)
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert any(t.startswith("normlab.") for t in targets), targets
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref)
    torch._dynamo.reset()


def test_group_norm_plain_path_for_other_layouts() -> None:
    """A (N, C, H, W) view that is neither contiguous nor channels-last: F.group_norm runs."""
    gn = normlab.GroupNorm(8, num_groups=2)
    x = torch.randn(2, 8, 6, 5)[:, :, ::2]
    assert fused_ops_called(lambda: gn(x)) == set()
    torch.testing.assert_close(gn(x), F.group_norm(x, 2, gn.weight, gn.bias, gn.eps))


# ------------------------------------------------------------------------------------------------
# BatchNorm's training step: statistics, running update, fallbacks


def test_batch_norm_large_mean_is_accurate() -> None:
    """x = 1e4 + randn in fp32: the kernel's statistics re-centre and x - mean keeps the mean's fp32
    tail, so the output, grads and statistics stay near fp64 (torch's own fp32 kernel: ~1e-4)."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(4, 6, 50, generator=g, dtype=torch.float64) + 1e4).float()
    w, b = torch.randn(6, generator=g), torch.randn(6, generator=g)
    upstream = torch.randn(x.shape, generator=g, dtype=torch.float64)
    xs = x.clone().requires_grad_(True)
    assert fused_ops_called(lambda: NF.batch_norm_train(xs, w, b, 1e-5))
    y, mean, var = NF.batch_norm_train(xs, w, b, 1e-5)
    (dx,) = torch.autograd.grad(y, [xs], upstream.float())
    x64 = x.double().requires_grad_(True)
    y64 = F.batch_norm(x64, None, None, w.double(), b.double(), True, 0.0, 1e-5)
    (dx64,) = torch.autograd.grad(y64, [x64], upstream)
    var64, mean64 = torch.var_mean(x.double(), dim=[0, 2], correction=0)
    assert_close_rel(y, y64, 1e-6, "output")
    assert_close_rel(dx, dx64, 1e-6, "dx")
    assert_close_rel(mean, mean64, 1e-7, "mean")
    assert (var.double() - var64).abs().max().item() <= 1e-6 * var64.max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batch_norm_running_update_matches_the_plain_path(dtype: torch.dtype) -> None:
    """Two training steps and an eval step, kernels on vs off: running statistics, counters, output."""
    modules: list[normlab.BatchNorm] = []
    outs: list[Tensor] = []
    for on in (True, False):
        bn = normlab.BatchNorm(16, momentum=0.3)
        randomize_params(bn).to(dtype)
        g = torch.Generator().manual_seed(2)
        with K.use_kernels(on):
            for _ in range(2):
                x = ((torch.randn(3, 16, 7, 8, generator=g, dtype=torch.float64) - 0.7) * 3).to(dtype)
                calls = fused_ops_called(lambda: bn(x))  # noqa: B023
                assert bool(calls) == on
            outs.append(bn.eval()(x))
        modules.append(bn)
    fused, plain = (
        tuple(m.get_buffer(k) for k in ("num_batches_tracked", "running_mean", "running_var"))
        for m in modules
    )
    assert int(fused[0]) == int(plain[0]) == 2
    tol = TOL[dtype]
    assert_close_rel(fused[1], plain[1], tol, "running_mean")
    assert_close_rel(fused[2], plain[2], tol, "running_var")
    assert_close_rel(outs[0], outs[1], tol, "eval output")


def test_batch_norm_non_finite_batch_skips_the_update() -> None:
    bn = normlab.BatchNorm(4)
    x = torch.randn(2, 4, 64)
    x[1, 2, 3] = float("nan")
    assert fused_ops_called(lambda: bn(x))
    assert int(bn.skipped_updates) == 1 and int(bn.get_buffer("num_batches_tracked")) == 0
    assert torch.equal(bn.get_buffer("running_mean"), torch.zeros(4))
    assert torch.equal(bn.get_buffer("running_var"), torch.ones(4))


def test_batch_norm_plain_path_for_other_layouts_and_short_planes() -> None:
    """Channels-last maps, (N, C), planes under 48 positions and momentum=None keep torch's path."""
    cases: list[tuple[tuple[int, ...], torch.memory_format, float | None]] = [
        ((2, 8, 6, 5), torch.channels_last, 0.1),
        ((5, 8), torch.contiguous_format, 0.1),
        ((4, 8, 5, 5), torch.contiguous_format, 0.1),
        ((2, 8, 16), torch.contiguous_format, None),
    ]
    for shape, fmt, momentum in cases:
        bn = randomize_params(normlab.BatchNorm(8, momentum=momentum))
        ref = copy.deepcopy(bn)
        x = torch.randn(shape).contiguous(memory_format=fmt)
        assert fused_ops_called(lambda: bn(x)) == set()  # noqa: B023
        with K.use_kernels(False):
            y_ref = ref(x)
        torch.testing.assert_close(bn.get_buffer("running_var"), ref.get_buffer("running_var"))
        torch.testing.assert_close(bn(x), y_ref)


def test_cross_batch_norm_without_a_group_uses_the_fused_step() -> None:
    """No process group: CrossBatchNorm is BatchNorm (same math), so it takes the fused op."""
    cbn = randomize_params(normlab.create_norm("crossbn", 8))
    x = torch.randn(3, 8, 60)
    assert fused_ops_called(lambda: grads_of(cbn, x)) == {
        "normlab::batch_norm_train",
        "normlab::batch_norm_train_backward",
    }


def test_batch_norm_double_backward() -> None:
    bn = randomize_params(normlab.BatchNorm(3, track_running_stats=False)).double()
    x = (torch.randn(2, 3, 50, dtype=torch.float64) + 0.3).requires_grad_(True)
    assert fused_ops_called(lambda: bn(x).sum().backward())
    assert torch.autograd.gradcheck(bn, (x,))
    assert torch.autograd.gradgradcheck(bn, (x,))


@pytest.mark.parametrize("label", [p.label for p in PRECISIONS])
def test_batch_norm_reference_through_the_fused_op(label: str) -> None:
    """test_reference's fp64 check on maps large enough for the fused op (its own shapes, 7 and
    5x3 positions, take torch's path): C=123 (vector tails in the parameters), scale 1 and 50."""
    prec = BY_LABEL[label]
    for scale in (1.0, 50.0):
        module = build("batchnorm", 123, "train", prec.module_dtype)
        g = torch.Generator().manual_seed(7)
        x = ((torch.randn(3, 123, 7, 8, generator=g, dtype=torch.float64) + 0.3) * scale).to(prec.input_dtype)
        x.requires_grad_(True)
        assert fused_ops_called(lambda: module(x))  # noqa: B023
        compare_with_reference("batchnorm", module, x, prec, key="batchnorm fused")
