"""Triton row norms (normlab.kernels.gpu.rownorm) against plain torch in fp64 and the C++ CPU ops.

On CUDA when a GPU is present, else through Triton's CPU interpreter (small tensors). Every output
of every op is checked: y (and h), dx (with grad_residual), dw and db, for fp32/fp64/bf16/fp16,
rows and channels-first, with and without the affine, odd sizes, non-contiguous inputs, and the
looping path for long rows / many channels (MAX_FUSED_BLOCK shrunk to 64).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from normlab import functional as NF

from gpu_kernels import DEVICE, ON_GPU, load

mod = load("rownorm")
from normlab.kernels.gpu import _common  # noqa: E402  (after load(): it sets TRITON_INTERPRET)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Relative to the largest reference value; low precision: the output's rounding plus the input's.
TOL = {torch.float64: 1e-12, torch.float32: 3e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# name: (layer, eps_inside)
NORMS = {"ln": (True, True), "rms_in": (False, True), "rms_out": (False, False)}
# Large enough that eps inside vs outside the square root differs beyond the fp32 tolerance.
EPS = 0.1


@pytest.fixture(scope="module")
def cpp_ops() -> Any:
    """``torch.ops.normlab`` with the C++ CPU kernels, or None when they cannot be built."""
    import normlab.kernels

    return torch.ops.normlab if normlab.kernels.build() else None


def _close(got: Tensor, ref: Tensor, dtype: torch.dtype, what: str) -> None:
    tol = TOL[dtype]
    scale = max(ref.abs().max().item(), 1.0) if ref.numel() else 1.0
    torch.testing.assert_close(
        got.detach().double().cpu(), ref.detach().double().cpu(), rtol=tol, atol=tol * scale, msg=what
    )


def _rand(shape: tuple[int, ...], dtype: torch.dtype, shift: float = 0.5) -> Tensor:
    return (torch.randn(shape, dtype=torch.float64) * 2 + shift).to(dtype).to(DEVICE)


def _reference(
    norm: str,
    x: Tensor,
    row_size: int,
    w: Tensor | None,
    b: Tensor | None,
    gy: Tensor,
    channels_first: bool = False,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """(y, (dx, dw, db)) in fp64 from the (rounded) inputs; absent parameters as ones / zeros."""
    layer, inside = NORMS[norm]
    xd = x.detach().double().requires_grad_()
    wd = (torch.ones(row_size) if w is None else w.detach()).double().to(x.device).requires_grad_()
    bd = (torch.zeros(row_size) if b is None else b.detach()).double().to(x.device).requires_grad_()
    v = xd.movedim(1, -1) if channels_first else xd.reshape(-1, row_size)
    if layer:
        y = NF.layer_norm_torch(v, (row_size,), wd, bd, EPS)
    else:
        y = NF.rms_norm_torch(v, (row_size,), wd, bd, EPS, eps_inside=inside)
    y = y.movedim(-1, 1) if channels_first else y.reshape(x.shape)
    grads = torch.autograd.grad(y, (xd, wd, bd), gy.double())
    return y.detach(), grads


def _run(
    ops: Any,
    norm: str,
    x: Tensor,
    row_size: int,
    w: Tensor | None,
    b: Tensor | None,
    gy: Tensor,
    channels_first: bool = False,
    grad_residual: Tensor | None = None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Forward and backward through ``ops`` (the Triton module or torch.ops.normlab)."""
    layer, inside = NORMS[norm]
    if layer:
        y = ops.layer_norm(x, row_size, w, b, EPS, channels_first)
        grads = ops.layer_norm_backward(gy, x, row_size, w, EPS, grad_residual, channels_first)
    else:
        y = ops.rms_norm(x, row_size, w, b, EPS, inside, channels_first)
        grads = ops.rms_norm_backward(gy, x, row_size, w, EPS, inside, grad_residual, channels_first)
    return y, tuple(grads)


def _cpu(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.cpu()


def _check_all(
    cpp_ops: Any,
    norm: str,
    x: Tensor,
    row_size: int,
    w: Tensor | None,
    b: Tensor | None,
    channels_first: bool = False,
) -> None:
    gy = _rand(tuple(x.shape), x.dtype, shift=0.0)
    y, (dx, dw, db) = _run(mod, norm, x, row_size, w, b, gy, channels_first)
    assert y.shape == x.shape and y.dtype == x.dtype and dx.shape == x.shape and dx.dtype == x.dtype
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert dw.shape == db.shape == (row_size,) and dw.dtype == db.dtype == acc
    ref_y, (ref_dx, ref_dw, ref_db) = _reference(norm, x, row_size, w, b, gy, channels_first)
    for name, got, ref in (("y", y, ref_y), ("dx", dx, ref_dx), ("dw", dw, ref_dw), ("db", db, ref_db)):
        _close(got, ref, x.dtype, f"{norm} {x.dtype} {name} vs fp64 torch")
    if cpp_ops is not None:
        cy, cg = _run(cpp_ops, norm, x.cpu(), row_size, _cpu(w), _cpu(b), gy.cpu(), channels_first)
        for name, got, ref in (("y", y, cy), *zip(("dx", "dw", "db"), (dx, dw, db), cg, strict=True)):
            _close(got, ref, x.dtype, f"{norm} {x.dtype} {name} vs C++ op")


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("n", [1, 7, 100])
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows(cpp_ops: Any, dtype: torch.dtype, norm: str, n: int, affine: bool) -> None:
    x = _rand((3, 5, n), dtype)
    w = _rand((n,), dtype) if affine else None
    b = _rand((n,), dtype) if affine else None
    _check_all(cpp_ops, norm, x, n, w, b)


@pytest.mark.parametrize("c", [1, 7, 100])
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_first(cpp_ops: Any, dtype: torch.dtype, norm: str, c: int) -> None:
    x = _rand((2, c, 5, 3), dtype)
    _check_all(cpp_ops, norm, x, c, _rand((c,), dtype), _rand((c,), dtype), channels_first=True)


@pytest.mark.parametrize("norm", list(NORMS))
def test_channels_first_no_affine_1d_and_2d(cpp_ops: Any, norm: str) -> None:
    _check_all(cpp_ops, norm, _rand((3, 20, 37), torch.float32), 20, None, None, channels_first=True)
    # (N, C) and (N, C, 1): no positions, the rows path.
    _check_all(cpp_ops, norm, _rand((3, 20), torch.float32), 20, None, None, channels_first=True)
    _check_all(cpp_ops, norm, _rand((3, 20, 1), torch.float32), 20, None, None, channels_first=True)


@pytest.mark.parametrize("norm", list(NORMS))
def test_mixed_param_dtype_and_weight_only(cpp_ops: Any, norm: str) -> None:
    # bf16 activations with fp32 parameters (autocast-style), weight without bias.
    x = _rand((4, 100), torch.bfloat16)
    _check_all(cpp_ops, norm, x, 100, _rand((100,), torch.float32), None)


@pytest.mark.parametrize("norm", list(NORMS))
def test_non_contiguous(cpp_ops: Any, norm: str) -> None:
    x = _rand((3, 33, 6), torch.float32).transpose(1, 2)  # (3, 6, 33), rows of 33, strided
    assert not x.is_contiguous()
    _check_all(cpp_ops, norm, x, 33, _rand((33,), torch.float32), _rand((33,), torch.float32))
    xc = _rand((2, 5, 9), torch.float32).transpose(1, 2)  # (2, 9, 5), channels-first over dim 1
    assert not xc.is_contiguous()
    _check_all(cpp_ops, norm, xc, 9, _rand((9,), torch.float32), None, channels_first=True)


def _check_add(
    cpp_ops: Any, norm: str, dtype: torch.dtype, shape: tuple[int, ...], pdtype: torch.dtype
) -> None:
    """add_* forward (y, h) and the add + norm backward (grad_residual added to dx)."""
    layer, inside = NORMS[norm]
    n = shape[-1]
    x, res = _rand(shape, dtype), _rand(shape, dtype)
    w, b = _rand((n,), pdtype), _rand((n,), pdtype)
    gy, gh = _rand(shape, dtype, 0.0), _rand(shape, dtype, 0.0)
    if layer:
        y, h = mod.add_layer_norm(x, res, n, w, b, EPS)
        dx, dw, db = mod.layer_norm_backward(gy, h, n, w, EPS, gh)
    else:
        y, h = mod.add_rms_norm(x, res, n, w, b, EPS, inside)
        dx, dw, db = mod.rms_norm_backward(gy, h, n, w, EPS, inside, gh)
    assert h.dtype == y.dtype == dtype
    # h rounded to x's dtype like torch's add. Triton's interpreter (not the GPU) truncates fp32 to
    # bf16 instead of rounding to nearest: 1 ulp there.
    h_tol = 2.0**-7 if dtype == torch.bfloat16 and not ON_GPU else 0.0
    torch.testing.assert_close(h, x + res, rtol=h_tol, atol=0)
    ref_y, (ref_dh, ref_dw, ref_db) = _reference(norm, x + res, n, w, b, gy)
    ref_dx = ref_dh + gh.double()
    for name, got, ref in (("y", y, ref_y), ("dx", dx, ref_dx), ("dw", dw, ref_dw), ("db", db, ref_db)):
        _close(got, ref, dtype, f"add {norm} {dtype} {name} vs fp64 torch")
    if cpp_ops is not None:
        if layer:
            cy, ch = cpp_ops.add_layer_norm(x.cpu(), res.cpu(), n, w.cpu(), b.cpu(), EPS)
            cg = cpp_ops.layer_norm_backward(gy.cpu(), ch, n, w.cpu(), EPS, gh.cpu())
        else:
            cy, ch = cpp_ops.add_rms_norm(x.cpu(), res.cpu(), n, w.cpu(), b.cpu(), EPS, inside)
            cg = cpp_ops.rms_norm_backward(gy.cpu(), ch, n, w.cpu(), EPS, inside, gh.cpu())
        torch.testing.assert_close(h.cpu(), ch, rtol=h_tol, atol=0)
        for name, got, ref in (("y", y, cy), *zip(("dx", "dw", "db"), (dx, dw, db), cg, strict=True)):
            _close(got, ref, dtype, f"add {norm} {dtype} {name} vs C++ op")


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_norm_and_grad_residual(cpp_ops: Any, dtype: torch.dtype, norm: str) -> None:
    _check_add(cpp_ops, norm, dtype, (2, 3, 100), torch.float32 if dtype.itemsize < 4 else dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm", list(NORMS))
def test_looping_path(cpp_ops: Any, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, norm: str) -> None:
    """Rows longer than MAX_FUSED_BLOCK and channels_first tiles over the cap: the two-pass loops."""
    monkeypatch.setattr(_common, "MAX_FUSED_BLOCK", 64)
    assert mod._rows_config(4, 300, dtype, backward=True)[2] and mod._cf_config(100, 6, dtype)[2]
    # A large common offset: the shifted sums must not cancel (var of x + 50 is var of x).
    x = _rand((4, 300), dtype) + 50.0 if norm == "ln" else _rand((4, 300), dtype)
    _check_all(cpp_ops, norm, x.to(dtype), 300, _rand((300,), dtype), _rand((300,), dtype))
    _check_all(
        cpp_ops, norm, _rand((2, 100, 2, 3), dtype), 100, _rand((100,), dtype), None, channels_first=True
    )
    _check_add(cpp_ops, norm, dtype, (3, 300), torch.float32)


def test_zero_rows_rms_eps_outside_and_constant_rows(cpp_ops: Any) -> None:
    # Zero rows (RMSNorm eps outside: no projection term, no NaN) and constant rows (LayerNorm: var 0).
    x = _rand((4, 50), torch.float32)
    x[1] = 0.0
    x[2] = 3.0
    for norm in NORMS:
        _check_all(cpp_ops, norm, x, 50, _rand((50,), torch.float32), _rand((50,), torch.float32))


def test_empty_and_errors() -> None:
    x = torch.empty((0, 8), device=DEVICE)
    assert mod.rms_norm(x, 8, None, None, EPS, True).shape == (0, 8)
    dx, dw, db = mod.layer_norm_backward(x, x, 8, None, EPS, None)
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros(8, device=DEVICE)) and db.shape == (8,)
    x = torch.randn(2, 6, 4, device=DEVICE)
    with pytest.raises(RuntimeError, match="row_size"):
        mod.layer_norm(x, 5, None, None, EPS)
    with pytest.raises(RuntimeError, match="channels_first"):
        mod.layer_norm(x, 4, None, None, EPS, True)
    with pytest.raises(RuntimeError, match="grad_residual"):
        mod.rms_norm_backward(x, x, 6, None, EPS, True, x, True)
    with pytest.raises(RuntimeError, match="parameter"):
        mod.rms_norm(x, 4, torch.ones(3, device=DEVICE), None, EPS, True)
