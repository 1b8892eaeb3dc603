"""normlab.kernels.gpu.groupnorm: the Triton GroupNorm ops against fp64 torch and the C++ CPU op.

On a machine without a GPU the kernels run through Triton's interpreter on CPU tensors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from gpu_kernels import DEVICE, DTYPES, TOL, cpp_ops, load
from gpu_kernels import close as _close

gn = load("groupnorm")

EPS = 1e-5


def _reference(
    x: Tensor, groups: int, w: Tensor | None, b: Tensor | None, cl: bool, dy: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """fp64 ``(y, dx, dw, db)`` by autograd of F.group_norm; ``dw``/``db`` for ``w = 1``, ``b = 0``
    when absent (what the op returns)."""
    c = x.shape[2] if cl else x.shape[1]
    xr = x.detach().double().cpu().requires_grad_(True)
    wr = (torch.ones(c) if w is None else w.detach().cpu()).double().requires_grad_(True)
    br = (torch.zeros(c) if b is None else b.detach().cpu()).double().requires_grad_(True)
    y = F.group_norm(xr.transpose(1, 2) if cl else xr, groups, wr, br, EPS)
    y = y.transpose(1, 2) if cl else y
    dx, dw, db = torch.autograd.grad(y, (xr, wr, br), dy.double().cpu())
    return y.detach(), dx, dw, db


def _inputs(
    n: int, c: int, s: int, cl: bool, dtype: torch.dtype, affine: bool, mean: float = 0.0
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    shape = (n, s, c) if cl else (n, c, s)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + mean).to(dtype).to(DEVICE)
    dy = torch.randn(shape, dtype=torch.float64).to(dtype).to(DEVICE)
    w = (torch.randn(c) + 1).to(DEVICE) if affine else None
    b = torch.randn(c).to(DEVICE) if affine else None
    return x, w, b, dy


def _check(
    x: Tensor, groups: int, w: Tensor | None, b: Tensor | None, cl: bool, dy: Tensor, tol: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y = gn.group_norm(x, groups, w, b, EPS, cl)
    dx, dw, db = gn.group_norm_backward(dy, x, groups, w, EPS, cl)
    ry, rdx, rdw, rdb = _reference(x, groups, w, b, cl, dy)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert y.dtype == dx.dtype == x.dtype
    assert y.is_contiguous() and dx.is_contiguous()
    assert dw.dtype == db.dtype == acc
    _close(y, ry, tol, "y")
    _close(dx, rdx, tol, "dx")
    # the parameter grads are sums over N * S values
    _close(dw, rdw, tol * 4, "dw")
    _close(db, rdb, tol * 4, "db")
    return y, dx, dw, db


# (N, C, S, G): a one-position map, odd sizes, one group, one channel per group
SHAPES = [(2, 6, 7, 3), (3, 4, 1, 2), (2, 8, 33, 4), (1, 3, 20, 1), (2, 4, 5, 4)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_fp64_reference(
    dtype: torch.dtype, cl: bool, affine: bool, shape: tuple[int, int, int, int]
) -> None:
    n, c, s, g = shape
    x, w, b, dy = _inputs(n, c, s, cl, dtype, affine)
    _check(x, g, w, b, cl, dy, TOL[dtype])


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles of 64 values, 128 per reduction program: many chunks per (sample, group)."""
    monkeypatch.setattr(gn, "REDUCE_TILE", 64)
    monkeypatch.setattr(gn, "REDUCE_TARGET", 128)
    monkeypatch.setattr(gn, "APPLY_TILE", 64)
    monkeypatch.setattr(gn, "MAX_CONTIGUOUS", 16)


@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_large_mean(cl: bool, tiles: str, request: pytest.FixtureRequest) -> None:
    """x = 1000 + randn in fp32: naive E[x^2] - E[x]^2 in fp32 would lose the variance."""
    if tiles == "small":
        request.getfixturevalue("small_tiles")
    x, w, b, dy = _inputs(2, 6, 301 if tiles == "default" else 101, cl, torch.float32, True, mean=1000.0)
    _check(x, 3, w, b, cl, dy, 2e-5)


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
def test_many_chunks_and_channel_blocks(cl: bool) -> None:
    # 20 channels: several channel blocks, the last one partial; 37 positions: partial tiles
    x, w, b, dy = _inputs(2, 20, 37, cl, torch.float32, True)
    _check(x, 5, w, b, cl, dy, 2e-5)


def test_constant_groups_have_zero_variance() -> None:
    x = torch.full((2, 4, 9), 3.0, device=DEVICE)
    y = gn.group_norm(x, 2, None, None, EPS, False)
    assert torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
def test_non_contiguous_inputs(cl: bool) -> None:
    n, c, s = 2, 6, 11
    # the logical (N, C, S) / (N, S, C) views of a tensor stored the other way round
    x = torch.randn((n, c, s) if cl else (n, s, c), dtype=torch.float64).to(DEVICE).transpose(1, 2)
    dy = torch.randn(x.shape[0], x.shape[2], x.shape[1], dtype=torch.float64).to(DEVICE).transpose(1, 2)
    assert not x.is_contiguous() and not dy.is_contiguous()
    w = torch.randn(c * 2, device=DEVICE)[::2]
    _check(x, 3, w, None, cl, dy, TOL[torch.float64])


def test_grad_dtype_and_param_dtype_differ() -> None:
    # fp32 grad for bf16 x (cast to x's dtype), bf16 parameters (used in fp32)
    x, _, _, _ = _inputs(2, 4, 10, False, torch.bfloat16, False)
    dy = torch.randn(x.shape, device=DEVICE)
    w = torch.randn(4, device=DEVICE).to(torch.bfloat16)
    b = torch.randn(4, device=DEVICE).to(torch.bfloat16)
    _check(x, 2, w, b, False, dy.to(torch.bfloat16), TOL[torch.bfloat16])
    dx, _, _ = gn.group_norm_backward(dy, x, 2, w, EPS, False)
    assert dx.dtype == torch.bfloat16


def test_empty_and_bad_groups() -> None:
    x = torch.randn(0, 4, 5, device=DEVICE)
    assert gn.group_norm(x, 2, None, None, EPS, False).shape == x.shape
    dx, dw, db = gn.group_norm_backward(x, x, 2, None, EPS, False)
    assert dx.shape == x.shape
    assert torch.equal(dw, torch.zeros(4, device=DEVICE)) and torch.equal(db, dw)
    with pytest.raises(RuntimeError, match="divisible"):
        gn.group_norm(torch.randn(1, 6, 3, device=DEVICE), 4, None, None, EPS, False)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the C++ op runs on CPU tensors")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
def test_matches_cpu_op(dtype: torch.dtype, cl: bool) -> None:
    ops = cpp_ops()
    x, w, b, dy = _inputs(2, 6, 13, cl, dtype, True, mean=50.0)
    y = gn.group_norm(x, 3, w, b, EPS, cl)
    grads = gn.group_norm_backward(dy, x, 3, w, EPS, cl)
    ref_y = ops.group_norm(x, 3, w, b, EPS, cl)
    ref_grads = ops.group_norm_backward(dy, x, 3, w, EPS, cl)
    tol = TOL[dtype] * 2
    _close(y, ref_y.double(), tol, "y")
    for name, out, ref in zip(("dx", "dw", "db"), grads, ref_grads, strict=True):
        assert out.dtype == ref.dtype, name
        _close(out, ref.double(), tol * 4, name)
    # no weight: the op still returns (C,) dw and db
    _, dw, db = gn.group_norm_backward(dy, x, 3, None, EPS, cl)
    _, rdw, rdb = ops.group_norm_backward(dy, x, 3, None, EPS, cl)
    assert dw.shape == rdw.shape == (6,)
    _close(dw, rdw.double(), tol * 4, "dw (no weight)")
    _close(db, rdb.double(), tol * 4, "db (no weight)")
