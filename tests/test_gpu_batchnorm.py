"""normlab.kernels.gpu.batchnorm: the Triton BatchNorm training ops against fp64 torch and the C++
CPU op.

On a machine without a GPU the kernels run through Triton's interpreter on CPU tensors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from gpu_kernels import DEVICE, DTYPES, TOL, cpp_ops, load
from gpu_kernels import close as _close

bn = load("batchnorm")
gn = load("groupnorm")  # the kernels and their tile sizes live there

EPS = 1e-5


def _reference(
    x: Tensor, w: Tensor | None, b: Tensor | None, dy: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """fp64 ``(y, mean, var, dx, dw, db)``; ``dw``/``db`` for ``w = 1``, ``b = 0`` when absent."""
    c = x.shape[1]
    xr = x.detach().double().cpu().requires_grad_(True)
    wr = (torch.ones(c) if w is None else w.detach().cpu()).double().requires_grad_(True)
    br = (torch.zeros(c) if b is None else b.detach().cpu()).double().requires_grad_(True)
    y = F.batch_norm(xr, None, None, wr, br, True, 0.0, EPS)
    dx, dw, db = torch.autograd.grad(y, (xr, wr, br), dy.double().cpu())
    xd = xr.detach()
    return y.detach(), xd.mean((0, 2)), xd.var((0, 2), unbiased=False), dx, dw, db


def _inputs(
    n: int, c: int, s: int, dtype: torch.dtype, affine: bool, mean: float = 0.0
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    x = (torch.randn(n, c, s, dtype=torch.float64) * 2 + mean).to(dtype).to(DEVICE)
    dy = torch.randn(n, c, s, dtype=torch.float64).to(dtype).to(DEVICE)
    w = (torch.randn(c) + 1).to(DEVICE) if affine else None
    b = torch.randn(c).to(DEVICE) if affine else None
    return x, w, b, dy


def _check(x: Tensor, w: Tensor | None, b: Tensor | None, dy: Tensor, tol: float) -> None:
    y, mean, var = bn.batch_norm_train(x, w, b, EPS)
    dx, dw, db = bn.batch_norm_train_backward(dy, x, mean, var, w, EPS)
    ry, rmean, rvar, rdx, rdw, rdb = _reference(x, w, b, dy)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert y.dtype == dx.dtype == x.dtype
    assert mean.dtype == var.dtype == dw.dtype == db.dtype == acc
    _close(y, ry, tol, "y")
    # the statistics are only rounded to the accumulation dtype
    stat_tol = 1e-12 if acc == torch.float64 else 1e-6
    _close(mean, rmean, stat_tol, "mean")
    _close(var, rvar, stat_tol * 10, "var")
    _close(dx, rdx, tol, "dx")
    _close(dw, rdw, tol * 4, "dw")
    _close(db, rdb, tol * 4, "db")


# (N, C, S): BatchNorm1d's (N, C, 1), odd sizes, one channel, two values per channel
SHAPES = [(4, 3, 7), (5, 6, 1), (2, 4, 33), (3, 1, 10), (1, 2, 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_fp64_reference(dtype: torch.dtype, affine: bool, shape: tuple[int, int, int]) -> None:
    x, w, b, dy = _inputs(*shape, dtype, affine)
    _check(x, w, b, dy, TOL[dtype])


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles of 64 values, 128 per reduction program: many chunks per channel."""
    monkeypatch.setattr(gn, "REDUCE_TILE", 64)
    monkeypatch.setattr(gn, "REDUCE_TARGET", 128)
    monkeypatch.setattr(gn, "APPLY_TILE", 64)
    monkeypatch.setattr(gn, "MAX_CONTIGUOUS", 16)


@pytest.mark.parametrize("shape", [(2, 5, 101), (7, 3, 5), (37, 20, 1)], ids=str)
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_large_mean(shape: tuple[int, int, int], tiles: str, request: pytest.FixtureRequest) -> None:
    """x = 1000 + randn in fp32: naive E[x^2] - E[x]^2 in fp32 would lose the variance. With small
    tiles the chunks split positions (101), group several samples (7 x 5) and channels (20)."""
    if tiles == "small":
        request.getfixturevalue("small_tiles")
    x, w, b, dy = _inputs(*shape, torch.float32, True, mean=1000.0)
    _check(x, w, b, dy, 2e-5)


def test_backward_uses_the_saved_var() -> None:
    """rstd comes from the var passed in (the saved one), the mean from x, as in the C++ op."""
    x, w, _, dy = _inputs(3, 2, 9, torch.float64, True)
    assert w is not None
    _, mean, var = bn.batch_norm_train(x, w, None, EPS)
    dx, dw, _ = bn.batch_norm_train_backward(dy, x, mean, var * 4, w, EPS)
    rstd = (var * 4 + EPS).rsqrt()[None, :, None]
    xhat = (x - x.mean((0, 2), keepdim=True)) * rstd
    proj = (dy * xhat).mean((0, 2), keepdim=True)
    ref = w[None, :, None] * rstd * (dy - dy.mean((0, 2), keepdim=True) - xhat * proj)
    _close(dx, ref.cpu(), 1e-9, "dx")
    _close(dw, (dy * xhat).sum((0, 2)).cpu(), 1e-9, "dw")


def test_non_contiguous_inputs() -> None:
    x = torch.randn(2, 9, 4, dtype=torch.float64).to(DEVICE).transpose(1, 2)
    dy = torch.randn(2, 9, 4, dtype=torch.float64).to(DEVICE).transpose(1, 2)
    w = torch.randn(8, device=DEVICE)[::2]
    assert not x.is_contiguous() and not dy.is_contiguous()
    _check(x, w, None, dy, TOL[torch.float64])


def test_empty() -> None:
    x = torch.randn(0, 3, 4, device=DEVICE)
    y, mean, var = bn.batch_norm_train(x, None, None, EPS)
    assert y.shape == x.shape and mean.shape == var.shape == (3,)
    assert bool(mean.isnan().all()) and bool(var.isnan().all())
    dx, dw, db = bn.batch_norm_train_backward(x, x, mean, var, None, EPS)
    assert dx.shape == x.shape
    assert torch.equal(dw, torch.zeros(3, device=DEVICE)) and torch.equal(db, dw)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the C++ op runs on CPU tensors")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_matches_cpu_op(dtype: torch.dtype, affine: bool) -> None:
    ops = cpp_ops()
    x, w, b, dy = _inputs(4, 3, 50, dtype, affine, mean=100.0)
    outs = bn.batch_norm_train(x, w, b, EPS)
    refs = ops.batch_norm_train(x, w, b, EPS)
    tol = TOL[dtype] * 2
    for name, out, ref in zip(("y", "mean", "var"), outs, refs, strict=True):
        assert out.dtype == ref.dtype, name
        _close(out, ref.double(), tol, name)
    # the backward of each from the same saved statistics (the C++ op's)
    grads = bn.batch_norm_train_backward(dy, x, refs[1], refs[2], w, EPS)
    ref_grads = ops.batch_norm_train_backward(dy, x, refs[1], refs[2], w, EPS)
    for name, out, ref in zip(("dx", "dw", "db"), grads, ref_grads, strict=True):
        assert out.dtype == ref.dtype and out.shape == ref.shape, name
        _close(out, ref.double(), tol * 4, name)
