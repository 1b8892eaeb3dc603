"""normlab.kernels._gpu: the Python autograd that CUDA tensors get, and its registration guards.

The autograd functions are device-agnostic: on CPU tensors their forward and backward ops run the
C++ kernels, so here they must reproduce the C++ autograd (``AutogradCPU``) bit for bit, and
their double backward must pass gradgradcheck. The CUDA registration itself needs a GPU
(tests/test_gpu_layers.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

import normlab.kernels as K
from normlab.kernels import _dispatch, _gpu

OPS = torch.ops.normlab


@pytest.fixture(scope="module", autouse=True)
def built() -> Iterator[None]:
    if not K.build():
        pytest.skip(f"normlab kernels unavailable: {K.status()['reason']}")
    previous = K.set_enabled(True)
    yield
    K.set_enabled(previous)


def _t(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed + sum(shape))
    return (torch.randn(shape, generator=g, dtype=torch.float64) + 0.3).to(dtype).requires_grad_(True)


# (name, the Python autograd function, the op it wraps (C++ autograd on CPU), tensors, other args)
CASES: list[tuple[str, Callable[..., Any], Callable[..., Any], Callable[[torch.dtype], list[Any]]]] = [
    ("dyt", _gpu.dyt_autograd, OPS.dyt, lambda d: [_t(3, 5, 8, dtype=d), _t(1), _t(8), _t(8), -1]),
    ("dyt-cf-noaffine", _gpu.dyt_autograd, OPS.dyt, lambda d: [_t(2, 8, 5, dtype=d), _t(1), None, None, 1]),
    ("derf", _gpu.derf_autograd, OPS.derf, lambda d: [_t(3, 8, dtype=d), _t(1), _t(1), _t(8), _t(8), -1]),
    ("ln", _gpu.layer_norm_autograd, OPS.layer_norm, lambda d: [_t(3, 5, 8, dtype=d), 8, _t(8), _t(8), 1e-5]),
    (
        "ln-cf",
        _gpu.layer_norm_autograd,
        OPS.layer_norm,
        lambda d: [_t(2, 8, 5, dtype=d), 8, _t(8), None, 1e-5, True],
    ),
    (
        "rms",
        _gpu.rms_norm_autograd,
        OPS.rms_norm,
        lambda d: [_t(3, 5, 8, dtype=d), 8, _t(8), None, 1e-6, True],
    ),
    (
        "rms-outside-bias",
        _gpu.rms_norm_autograd,
        OPS.rms_norm,
        lambda d: [_t(3, 8, dtype=d), 8, _t(8), _t(8), 1e-8, False],
    ),
    (
        "add-ln",
        _gpu.add_layer_norm_autograd,
        OPS.add_layer_norm,
        lambda d: [_t(3, 8, dtype=d), _t(3, 8, dtype=d, seed=1), 8, _t(8), _t(8), 1e-5],
    ),
    (
        "add-rms",
        _gpu.add_rms_norm_autograd,
        OPS.add_rms_norm,
        lambda d: [_t(3, 8, dtype=d), _t(3, 8, dtype=d, seed=1), 8, None, None, 1e-6, True],
    ),
    (
        "gn",
        _gpu.group_norm_autograd,
        OPS.group_norm,
        lambda d: [_t(2, 8, 5, dtype=d), 4, _t(8), _t(8), 1e-5, False],
    ),
    (
        "gn-cl",
        _gpu.group_norm_autograd,
        OPS.group_norm,
        lambda d: [_t(2, 5, 8, dtype=d), 2, _t(8), None, 1e-5, True],
    ),
    (
        "bn",
        _gpu.batch_norm_train_autograd,
        OPS.batch_norm_train,
        lambda d: [_t(3, 8, 20, dtype=d), _t(8), _t(8), 1e-5],
    ),
]


def _outputs(out: Any) -> list[Tensor]:
    return list(out) if isinstance(out, tuple | list) else [out]


def _run(fn: Callable[..., Any], args: list[Any]) -> tuple[list[Tensor], list[Tensor | None]]:
    """Outputs, and the grads of every tensor argument for a fixed upstream on the first output
    (and on ``h``, the second output of the residual-add ops)."""
    args = [a.detach().clone().requires_grad_(True) if isinstance(a, Tensor) else a for a in args]
    outs = _outputs(fn(*args))
    g = torch.Generator().manual_seed(7)
    loss = (outs[0] * torch.randn(outs[0].shape, generator=g, dtype=outs[0].dtype)).sum()
    if len(outs) == 2:  # (y, h): h feeds the next layer too
        loss = loss + (outs[1] * torch.randn(outs[1].shape, generator=g, dtype=outs[1].dtype)).sum()
    tensors = [a for a in args if isinstance(a, Tensor)]
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [o.detach() for o in outs], list(grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("name", "fn", "op", "make"), CASES, ids=[c[0] for c in CASES])
def test_python_autograd_matches_the_cpp_autograd(
    name: str,
    fn: Callable[..., Any],
    op: Callable[..., Any],
    make: Callable[..., list[Any]],
    dtype: torch.dtype,
) -> None:
    args = make(dtype)
    outs, grads = _run(fn, args)
    ref_outs, ref_grads = _run(op, args)
    for a, b in zip(outs, ref_outs, strict=True):
        assert torch.equal(a, b), name
    for i, (a, b) in enumerate(zip(grads, ref_grads, strict=True)):
        assert (a is None) == (b is None), f"{name}: grad {i} presence"
        if a is not None and b is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: grad {i}"
            assert torch.equal(a, b), f"{name}: grad {i}"


@pytest.mark.parametrize(("name", "fn", "op", "make"), CASES, ids=[c[0] for c in CASES])
def test_python_autograd_double_backward(
    name: str, fn: Callable[..., Any], op: Callable[..., Any], make: Callable[..., list[Any]]
) -> None:
    """create_graph=True recomputes through plain torch: gradcheck and gradgradcheck hold (fp64)."""
    args = make(torch.float64)
    positions = [i for i, a in enumerate(args) if isinstance(a, Tensor)]

    def f(*tensors: Tensor) -> Tensor:
        full = list(args)
        for i, t in zip(positions, tensors, strict=True):
            full[i] = t
        outs = _outputs(fn(*full))
        return outs[0] if len(outs) != 2 else outs[0] + 0.5 * outs[1]  # (y, h): both differentiable

    inputs = tuple(args[i] for i in positions)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_only_x_needs_grad() -> None:
    """Parameters without requires_grad get no grad, as with the C++ autograd."""
    x = _t(4, 8, dtype=torch.float32)
    w, b = torch.ones(8), torch.zeros(8)
    y = _gpu.layer_norm_autograd(x, 8, w, b, 1e-5)
    (dx,) = torch.autograd.grad(y.sum() + (y * y).sum(), [x])
    assert dx.shape == x.shape and w.grad is None


def test_registration_needs_cuda_here() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/test_gpu_layers.py covers the registration")
    assert not _gpu.ensure_registered()
    assert _gpu.status()["reason"] == "CUDA is not available"
    meta = torch.empty(4, 8, device="meta")
    assert not _dispatch.usable(meta)


class _FakeTritonError(RuntimeError):
    pass


_FakeTritonError.__module__ = "triton.compiler.errors"


def test_a_failing_triton_kernel_warns_once_and_turns_its_op_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_gpu.STATE, "failed", {})

    def broken(*args: Any) -> Any:
        raise _FakeTritonError("out of shared memory")

    with pytest.warns(UserWarning, match=r"normlab::dyt failed \(_FakeTritonError: out of shared memory\)"):
        assert _gpu.call_guarded("dyt", broken, 1) is None
    assert not _gpu.op_usable("dyt") and _gpu.op_usable("rms_norm")
    assert _gpu.status()["failed"] == {"dyt": "_FakeTritonError: out of shared memory"}

    def other(*args: Any) -> Any:
        raise ValueError("a user error, not the kernel's")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="a user error"):
            _gpu.call_guarded("rms_norm", other)
    assert _gpu.op_usable("rms_norm")


def test_every_gpu_kernel_module_defines_its_ops() -> None:
    """The registration table names, for every op with a CPU kernel, a function in a gpu module
    (checked without importing triton: the modules' sources define them)."""
    from pathlib import Path

    import normlab.kernels.gpu as gpu

    root = Path(gpu.__file__).parent
    from normlab.kernels._ops import _SCHEMAS

    schemas = set(_gpu.KERNEL_MODULES)
    assert schemas == set(_SCHEMAS)  # every op with a C++ CPU kernel has a Triton one
    assert set(_gpu.AUTOGRAD) == {n for n in schemas if not n.endswith("_backward")}
    for op, module in _gpu.KERNEL_MODULES.items():
        source = (root / f"{module}.py").read_text()
        assert f"\ndef {op}(" in source, f"normlab/kernels/gpu/{module}.py defines no {op}()"
