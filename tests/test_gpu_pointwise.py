"""normlab.kernels.gpu.pointwise: the Triton DyT / Derf kernels against plain torch in fp64 and
against the C++ CPU ops.

On a machine without a GPU the kernels run through Triton's interpreter on CPU tensors (see
``gpu_kernels.py``), so the tensors stay small. The fp64 truth is computed from the very values
the kernel sees (half inputs upcast exactly), so the parameter grads, accumulated in fp32, are held
to 1e-5 whatever the input dtype; outputs and ``dx`` get the rounding of their dtype.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
from torch import Tensor

from normlab import functional as NF

from gpu_kernels import DEVICE, cpp_ops, load

P: ModuleType = load("pointwise")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# max|a - b| <= tol * max(1, max|b|), for outputs and dx in their dtype
OUT_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# parameter grads: fp32 accumulators (fp64 for fp64) over exactly representable inputs
PARAM_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-5, torch.float16: 1e-5}

# (channel_dim, shape): rows of 1, 7, 100 channels; 1-D; (N, C) with channel_dim=1 (inner = 1);
# (N, C, *) with planes of 21, 100 and 1 positions
CASES = [
    (-1, (5, 1)),
    (-1, (3, 4, 7)),
    (-1, (6, 100)),
    (-1, (37,)),
    (1, (4, 7)),
    (1, (2, 5, 3, 7)),
    (1, (3, 4, 100)),
    (1, (2, 3, 1)),
]


def case_id(case: tuple[int, tuple[int, ...]]) -> str:
    return f"cd{case[0]}-" + "x".join(map(str, case[1]))


def make(
    shape: tuple[int, ...],
    channel_dim: int,
    dtype: torch.dtype,
    seed: int = 0,
    param_dtype: torch.dtype | None = None,
    scale: float = 1.5,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``x, alpha, shift, weight, bias, grad`` on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[channel_dim]
    pd = param_dtype or dtype

    def rnd(*s: int) -> Tensor:
        return torch.randn(s, generator=gen, dtype=torch.float64)

    x = (rnd(*shape) * scale + 0.2).to(dtype)
    alpha = (0.8 + 0.1 * rnd(1)).to(pd)
    shift = (0.3 + 0.1 * rnd(1)).to(pd)
    weight = (1.0 + 0.5 * rnd(c)).to(pd)
    bias = (0.5 * rnd(c)).to(pd)
    grad = rnd(*shape).to(dtype)
    return tuple(t.to(DEVICE) for t in (x, alpha, shift, weight, bias, grad))  # type: ignore[return-value]


def reference(
    op: str,
    x: Tensor,
    alpha: Tensor,
    shift: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    grad: Tensor,
    channel_dim: int,
) -> tuple[Tensor, list[Tensor]]:
    """The fp64 output and the grads ``[dx, dalpha, (dshift,) dweight, dbias]`` of the plain-torch
    function (``dweight``/``dbias`` all zeros / ``sum(grad)`` when the parameter is absent)."""
    c = x.shape[channel_dim]

    def leaf(t: Tensor | None, fill: float) -> Tensor:
        base = torch.full((c,), fill, dtype=torch.float64, device=x.device) if t is None else t.double()
        return base.detach().clone().requires_grad_(True)

    xd, a, s = (t.double().detach().clone().requires_grad_(True) for t in (x, alpha, shift))
    w, b = leaf(weight, 1.0), leaf(bias, 0.0)
    if op == "dyt":
        y = NF.dyt_torch(xd, a, w, b, channel_dim=channel_dim)
        grads = torch.autograd.grad(y, (xd, a, w, b), grad.double())
    else:
        y = NF.derf_torch(xd, a, s, w, b, channel_dim=channel_dim)
        grads = torch.autograd.grad(y, (xd, a, s, w, b), grad.double())
    return y.detach(), list(grads)


def run(
    op: str,
    x: Tensor,
    alpha: Tensor,
    shift: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    grad: Tensor,
    channel_dim: int,
) -> tuple[Tensor, list[Tensor]]:
    if op == "dyt":
        y = P.dyt(x, alpha, weight, bias, channel_dim)
        grads = P.dyt_backward(grad, x, alpha, weight, channel_dim)
    else:
        y = P.derf(x, alpha, shift, weight, bias, channel_dim)
        grads = P.derf_backward(grad, x, alpha, shift, weight, channel_dim)
    return y, list(grads)


def assert_close_rel(actual: Tensor, expected: Tensor, tol: float, what: str) -> None:
    diff = (actual.double() - expected.double()).abs().max().item()
    scale = max(1.0, expected.double().abs().max().item())
    assert diff <= tol * scale, f"{what}: max abs diff {diff:.3g} > {tol:g} * {scale:.3g}"


def grad_names(op: str) -> list[str]:
    return ["dx", "dalpha", *(["dshift"] if op == "derf" else []), "dweight", "dbias"]


def check(
    op: str,
    x: Tensor,
    alpha: Tensor,
    shift: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    grad: Tensor,
    channel_dim: int,
) -> tuple[Tensor, list[Tensor]]:
    """Run the Triton op and check every output's shape, dtype and value against fp64 torch."""
    y, grads = run(op, x, alpha, shift, weight, bias, grad, channel_dim)
    y_ref, grads_ref = reference(op, x, alpha, shift, weight, bias, grad, channel_dim)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = x.shape[channel_dim]
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    assert_close_rel(y, y_ref, OUT_TOL[x.dtype], f"{op} y")
    names = grad_names(op)
    assert len(grads) == len(names)
    storages = [t.untyped_storage().data_ptr() for t in (y, *grads)]
    assert len(set(storages)) == len(storages), "outputs alias each other"
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        if name == "dx":
            assert g.shape == x.shape and g.dtype == x.dtype, name
            assert_close_rel(g, g_ref, OUT_TOL[x.dtype], f"{op} {name}")
        else:
            assert g.dtype == acc, name
            assert g.shape == ((1,) if name in ("dalpha", "dshift") else (c,)), name
            assert_close_rel(g, g_ref, PARAM_TOL[x.dtype], f"{op} {name}")
    return y, grads


@pytest.mark.parametrize("op", ["dyt", "derf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_fp64_torch(op: str, dtype: torch.dtype, case: tuple[int, tuple[int, ...]]) -> None:
    channel_dim, shape = case
    x, a, s, w, b, g = make(shape, channel_dim, dtype, seed=len(shape) + shape[-1])
    check(op, x, a, s, w, b, g, channel_dim)


@pytest.mark.parametrize("op", ["dyt", "derf"])
@pytest.mark.parametrize("affine", ["weight", "bias", "none"])
@pytest.mark.parametrize("case", [(-1, (3, 4, 7)), (1, (2, 5, 3, 7))], ids=case_id)
def test_absent_weight_or_bias(op: str, affine: str, case: tuple[int, tuple[int, ...]]) -> None:
    channel_dim, shape = case
    for dtype in (torch.float32, torch.bfloat16):
        x, a, s, w, b, g = make(shape, channel_dim, dtype, seed=5)
        check(
            op,
            x,
            a,
            s,
            w if affine == "weight" else None,
            b if affine == "bias" else None,
            g,
            channel_dim,
        )


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles of 32 elements and 3 backward programs: several channel blocks per row, programs
    that loop over many tiles, and tails everywhere."""
    monkeypatch.setattr(P, "FWD_TILE", 32)
    monkeypatch.setattr(P, "BWD_TILE", 32)
    monkeypatch.setattr(P, "_CPU_PROGRAMS", 3)
    monkeypatch.setattr(P, "PROGRAMS_PER_SM", 1)


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("op", ["dyt", "derf"])
@pytest.mark.parametrize(
    "case", [(-1, (9, 100)), (-1, (2, 3, 33)), (1, (3, 5, 77)), (1, (2, 40, 3)), (1, (3, 70))], ids=case_id
)
def test_rows_and_planes_longer_than_the_tile(op: str, case: tuple[int, tuple[int, ...]]) -> None:
    channel_dim, shape = case
    for dtype in (torch.float32, torch.float16):
        x, a, s, w, b, g = make(shape, channel_dim, dtype, seed=11)
        check(op, x, a, s, w, b, g, channel_dim)


@pytest.mark.parametrize("op", ["dyt", "derf"])
def test_non_contiguous_inputs_and_params(op: str) -> None:
    x, a, s, w, b, g = make((6, 5, 8), 1, torch.float32, seed=3)
    # (N, C, L) viewed from (N, L, C) storage, a strided grad, and strided weight/bias
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    gt = torch.stack([g, -g], dim=-1)[..., 0]
    w2 = torch.stack([w, w], 1)[:, 0]
    b2 = torch.stack([b, b], 1)[:, 1]
    assert not (xt.is_contiguous() or gt.is_contiguous() or w2.is_contiguous() or b2.is_contiguous())
    assert torch.equal(gt, g)
    check(op, xt, a, s, w2, b2, g, 1)
    check(op, x, a, s, w, b, gt, 1)
    # channels-last rows from a slice
    xs = make((7, 24), -1, torch.float32, seed=4)[0][:, ::2]
    check(op, xs, a, s, w[:1].expand(12).clone(), None, torch.ones_like(xs), -1)


@pytest.mark.parametrize("op", ["dyt", "derf"])
def test_fp32_params_with_half_input_and_grad_in_another_dtype(op: str) -> None:
    x, a, s, w, b, g = make((4, 3, 10), -1, torch.bfloat16, seed=8, param_dtype=torch.float32)
    check(op, x, a, s, w, b, g, -1)
    # an fp32 upstream grad is rounded to x's dtype first, as the C++ op does
    g32 = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    _, grads = run(op, x, a, s, w, b, g32, -1)
    _, grads_rounded = run(op, x, a, s, w, b, g32.to(x.dtype), -1)
    for name, g1, g2 in zip(grad_names(op), grads, grads_rounded, strict=True):
        assert torch.equal(g1, g2), name


@pytest.mark.parametrize("op", ["dyt", "derf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_saturation_and_tanh_accuracy(op: str, dtype: torch.dtype) -> None:
    """Large |alpha * x| saturates to exactly +-1 without inf/nan, and f is exact to 1e-6 (fp32)
    over the whole range, near zero included."""
    ramp = torch.cat([torch.linspace(-60.0, 60.0, 1201), torch.tensor([1e-30, -1e-7, 3e-4, 1e4, -1e4])])
    x = ramp.to(dtype).reshape(-1, 1).to(DEVICE)
    a = torch.ones(1, dtype=dtype, device=DEVICE)
    s = torch.zeros(1, dtype=dtype, device=DEVICE)
    y, grads = run(op, x, a, s, None, None, torch.ones_like(x), -1)
    exact = torch.tanh(x.double()) if op == "dyt" else torch.erf(x.double())
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in grads)
    assert (y.double() - exact).abs().max().item() <= (1e-6 if dtype == torch.float32 else 1e-14)
    assert y[0].item() == -1.0 and y[-2].item() == 1.0 and y[-1].item() == -1.0
    assert grads[0][0].item() == 0.0  # f'(-60) underflows to 0: no nan from inf * 0
    xb, ab, sb, wb, bb, gb = make((5, 40), -1, dtype, seed=9, scale=50.0)
    y_big, grads_big = check(op, xb, ab, sb, wb, bb, gb, -1)
    assert torch.isfinite(y_big).all() and all(torch.isfinite(t).all() for t in grads_big)


@pytest.mark.parametrize("op", ["dyt", "derf"])
def test_empty_input(op: str) -> None:
    x = torch.empty(0, 6, device=DEVICE)
    a, s, w, b = (torch.ones(n, device=DEVICE) for n in (1, 1, 6, 6))
    y, grads = run(op, x, a, s, w, b, torch.empty_like(x), -1)
    assert y.shape == x.shape
    names = grad_names(op)
    for name, g in zip(names, grads, strict=True):
        want = x.shape if name == "dx" else (1,) if name in ("dalpha", "dshift") else (6,)
        assert g.shape == want and (g == 0).all(), name


def test_bad_arguments_raise() -> None:
    x = torch.randn(3, 6, device=DEVICE)
    a = torch.ones(1, device=DEVICE)
    with pytest.raises(ValueError, match="expected 6"):
        P.dyt(x, a, torch.ones(5, device=DEVICE), None, -1)
    with pytest.raises(ValueError, match="scalar"):
        P.dyt(x, torch.ones(2, device=DEVICE), None, None, -1)
    with pytest.raises(ValueError, match="shapes differ"):
        P.dyt_backward(torch.ones(3, 5, device=DEVICE), x, a, None, -1)
    with pytest.raises(TypeError, match="dtype"):
        P.dyt(x.to(torch.int32), a, None, None, -1)


# ------------------------------------------------------------------------------------------------
# The same outputs as the C++ CPU ops


@pytest.fixture(scope="module")
def cpu_ops() -> None:
    if DEVICE.type != "cpu":
        pytest.skip("the C++ ops take CPU tensors; this runs where Triton interprets on the CPU")
    cpp_ops()


@pytest.mark.usefixtures("cpu_ops")
@pytest.mark.parametrize("op", ["dyt", "derf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "case", [(-1, (3, 4, 7)), (-1, (6, 100)), (1, (2, 5, 3, 7)), (1, (4, 7))], ids=case_id
)
def test_matches_the_cpp_ops(op: str, dtype: torch.dtype, case: tuple[int, tuple[int, ...]]) -> None:
    ops = torch.ops.normlab
    channel_dim, shape = case
    x, a, s, w, b, g = make(shape, channel_dim, dtype, seed=21)
    for weight, bias in ((w, b), (None, None)):
        y, grads = run(op, x, a, s, weight, bias, g, channel_dim)
        if op == "dyt":
            y_cpp = ops.dyt(x, a, weight, bias, channel_dim)
            grads_cpp = ops.dyt_backward(g, x, a, weight, channel_dim)
        else:
            y_cpp = ops.derf(x, a, s, weight, bias, channel_dim)
            grads_cpp = ops.derf_backward(g, x, a, s, weight, channel_dim)
        assert y.dtype == y_cpp.dtype and y.shape == y_cpp.shape
        assert_close_rel(y, y_cpp, OUT_TOL[dtype], f"{op} y vs C++")
        for name, got, want in zip(grad_names(op), grads, grads_cpp, strict=True):
            assert got.dtype == want.dtype and got.shape == want.shape, name
            tol = OUT_TOL[dtype] if name == "dx" else PARAM_TOL[dtype]
            assert_close_rel(got, want, tol, f"{op} {name} vs C++")
