"""Compile every Triton kernel of normlab.kernels.gpu for an H100 (sm_90) without a GPU.

Run as a script (``python tests/gpu_aot.py``) in a process where ``TRITON_INTERPRET`` is unset:
a stand-in driver names the target, and ``JITFunction.run`` is made to compile without launching
(``warmup=True``), so the op functions run on CPU tensors and every kernel launch they make goes
through Triton's real compiler, ptxas included, down to a cubin. This catches what the
interpreter cannot: code that does not lower for the GPU. The outputs are uninitialized memory
and are not looked at. Prints one line per compiled (kernel, specialization): ``name bytes``.
Exits 3 when this Triton's internals differ from those this relies on (3.2 to 3.9).
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch

try:
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction
except ImportError as err:  # pragma: no cover - another Triton layout
    print(f"unsupported triton: {err}")
    raise SystemExit(3) from err

if not hasattr(driver, "set_active") or "warmup" not in inspect.signature(JITFunction.run).parameters:
    print("unsupported triton: no driver.set_active or JITFunction.run(warmup=)")
    raise SystemExit(3)


class _H100:
    """The driver calls that compiling needs, answered for device 0 of compute capability 9.0."""

    def get_current_target(self) -> Any:
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


driver.set_active(_H100())
_run = JITFunction.run


def _compile_only(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    print(self.fn.__name__, len(kernel.asm["cubin"]), flush=True)
    return kernel


JITFunction.run = _compile_only  # type: ignore[method-assign]

from normlab.kernels.gpu import batchnorm, groupnorm, pointwise, rownorm  # noqa: E402


def t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape).to(dtype)


def main() -> None:
    one = torch.tensor([0.5])
    for dt in (torch.float32, torch.bfloat16):
        w, b = t(96), t(96)
        for x, cd in ((t(64, 96, dtype=dt), -1), (t(4, 96, 50, dtype=dt), 1)):
            pointwise.dyt(x, one, w, b, cd)
            pointwise.dyt_backward(x, x, one, w, cd)
            pointwise.derf(x, one, one, w, b, cd)
            pointwise.derf_backward(x, x, one, one, w, cd)
        for n in (96, 20000):  # in registers, and the looping path
            x = t(8, n, dtype=dt)
            wn = t(n)
            rownorm.layer_norm(x, n, wn, wn, 1e-5)
            rownorm.rms_norm(x, n, wn, None, 1e-6, False)
            rownorm.layer_norm_backward(x, x, n, wn, 1e-5, x)
            rownorm.rms_norm_backward(x, x, n, wn, 1e-6, True, None)
            rownorm.add_layer_norm(x, x, n, wn, wn, 1e-5)
            rownorm.add_rms_norm(x, x, n, None, None, 1e-6, True)
        xcf = t(2, 96, 50, dtype=dt)
        rownorm.layer_norm(xcf, 96, w, b, 1e-5, True)
        rownorm.rms_norm_backward(xcf, xcf, 96, w, 1e-6, True, None, True)
        for cl in (False, True):
            xg = t(2, 50, 96, dtype=dt) if cl else t(2, 96, 50, dtype=dt)
            groupnorm.group_norm(xg, 8, w, b, 1e-5, cl)
            groupnorm.group_norm_backward(xg, xg, 8, w, 1e-5, cl)
        xb = t(4, 96, 50, dtype=dt)
        _, mean, var = batchnorm.batch_norm_train(xb, w, b, 1e-5)
        batchnorm.batch_norm_train_backward(xb, xb, mean, var, w, 1e-5)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
