"""normlab's layers on CUDA with the Triton kernels: dispatch, kernels on vs off, opcheck, compile.

Needs a CUDA GPU and Triton: skipped elsewhere (CI has no GPU). The kernels' arithmetic is also
checked without a GPU, in Triton's interpreter (tests/test_gpu_pointwise.py and its siblings);
here the whole path runs: registration, the Python autograd, the layers' dispatch, torch.compile.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.library import opcheck

import normlab
import normlab.kernels as K
from normlab.kernels import _gpu
from normlab.kernels.gpu import triton_available
from test_kernels import (
    CONFIGS,
    TOL,
    _opcheck_cases,
    assert_close_rel,
    config_id,
    fused_ops_called,
    grads_of,
    make,
)

from cases import randomize_params

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not triton_available(), reason="needs Triton (pip install triton)"),
]
CUDA = torch.device("cuda")
# BatchNorm keeps torch's cuDNN kernel on CUDA (normlab.kernels._dispatch.batch_norm_train)
GPU_CONFIGS = [c for c in CONFIGS if c[0] != "batchnorm"]


@pytest.fixture(autouse=True)
def _kernels_on() -> Iterator[None]:
    assert _gpu.ensure_registered(), _gpu.status()
    previous = K.set_enabled(True)
    yield
    K.set_enabled(previous)


def on_cuda(
    config: tuple[str, dict[str, Any], tuple[int, ...]], dtype: torch.dtype
) -> tuple[nn.Module, Tensor]:
    module, x = make(config, dtype)
    return module.to(CUDA), x.to(CUDA)


@pytest.mark.parametrize("config", GPU_CONFIGS, ids=config_id)
def test_layers_dispatch_to_the_triton_ops(config: tuple[str, dict[str, Any], tuple[int, ...]]) -> None:
    module, x = on_cuda(config, torch.float32)
    assert fused_ops_called(lambda: grads_of(module, x)), "kernels on: no normlab:: op ran on CUDA"
    with K.use_kernels(False):
        assert fused_ops_called(lambda: grads_of(module, x)) == set()
    assert _gpu.status()["failed"] == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("config", GPU_CONFIGS, ids=config_id)
def test_triton_matches_plain_torch(
    config: tuple[str, dict[str, Any], tuple[int, ...]], dtype: torch.dtype
) -> None:
    module, x = on_cuda(config, dtype)
    y, grads = grads_of(module, x)
    with K.use_kernels(False):
        y_ref, grads_ref = grads_of(module, x)
    assert_close_rel(y, y_ref, TOL[dtype], "output")
    names = ["input", *(n for n, _ in module.named_parameters())]
    # half-precision parameter grads sum over the batch: held to the fp64 truth, as in test_kernels
    _, exact = grads_of(copy.deepcopy(module).double(), x.double())
    for name, g, g_ref, truth in zip(names, grads, grads_ref, exact, strict=True):
        assert g.dtype == g_ref.dtype and g.shape == g_ref.shape, name
        scale = max(1.0, truth.abs().max().item())
        err, err_ref = ((t.double() - truth).abs().max().item() for t in (g, g_ref))
        assert err <= max(4 * TOL[dtype] * scale, err_ref), f"{name}: triton {err:.3g}, torch {err_ref:.3g}"


@pytest.mark.parametrize(
    ("name", "shape", "kwargs"),
    [
        ("layernorm", (4096, 768), {}),
        ("rmsnorm", (2048, 20000), {}),  # a row longer than one block: the looping kernel
        ("dyt", (8, 197, 384), {}),
        ("derf", (8, 384, 14, 14), {"channels_first": True}),
        ("groupnorm", (16, 256, 32, 32), {"num_groups": 32}),
    ],
)
def test_large_inputs(name: str, shape: tuple[int, ...], kwargs: dict[str, Any]) -> None:
    c = shape[1] if name == "groupnorm" or kwargs.get("channels_first") else shape[-1]
    module = randomize_params(normlab.create_norm(name, c, **kwargs)).to(CUDA)
    x = (torch.randn(shape, device=CUDA) * 3 + 1).requires_grad_(True)
    y, grads = grads_of(module, x)
    with K.use_kernels(False):
        y_ref, grads_ref = grads_of(module, x)
    assert_close_rel(y, y_ref, 1e-4, "output")
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert_close_rel(g, g_ref, 1e-3, "grad")


@pytest.mark.parametrize(
    ("label", "op", "args"), [pytest.param(*c, id=f"{c[0]}-{c[2][0].dtype}") for c in _opcheck_cases()]
)
def test_opcheck_on_cuda(label: str, op: Any, args: tuple[Any, ...]) -> None:
    moved = tuple(
        a.detach().to(CUDA).requires_grad_(a.requires_grad) if isinstance(a, Tensor) else a for a in args
    )
    results = opcheck(op, moved)
    assert all(v == "SUCCESS" for v in results.values()), results


@pytest.mark.parametrize("name", ["dyt", "rmsnorm", "layernorm", "groupnorm"])
def test_compile_keeps_the_triton_op_in_the_graph(name: str) -> None:
    kwargs = {"num_groups": 4} if name == "groupnorm" else {}
    module = randomize_params(normlab.create_norm(name, 64, **kwargs)).to(CUDA)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(module), fullgraph=True)
    x = torch.randn(8, 64, 33, device=CUDA) if name == "groupnorm" else torch.randn(8, 33, 64, device=CUDA)
    y, grads = grads_of(compiled, x)
    y_ref, grads_ref = grads_of(module, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def test_gpt_trains_on_cuda_with_the_triton_ops() -> None:
    from normlab.models import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_embd=64, n_head=4, norm="dyt")
    model = GPT(cfg).to(CUDA)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 64, (8, 32), device=CUDA)
    losses = []
    for _ in range(20):
        out = model(idx, idx)
        assert out.loss is not None
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert fused_ops_called(lambda: model(idx, idx))
