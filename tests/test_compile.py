"""torch.compile and meta-device construction for every registered norm.

Graph-break checks use ``backend="eager"`` with ``fullgraph=True``: Dynamo's tracing is what
breaks graphs, and the eager backend skips Inductor's seconds-long codegen. A few cases marked
``inductor`` compile for real. Every sweep reads ``normlab.list_norms()``, so a new norm is
covered without edits here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend

import normlab

from cases import all_norms, make_input, make_norm, randomize_params, ranks, spec_of

MODES = {"train": True, "eval": False}

# Non-default constructions whose code paths the registry's example kwargs do not reach.
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("batchnorm", {"momentum": None}),  # cumulative average: pytorch#194504 breaks torch's own BN here
    ("batchnorm", {"track_running_stats": False}),
    ("dyt", {"channels_first": True, "alpha_init": 0.8}),
    ("derf", {"channels_first": True, "bias": False}),
    ("instancenorm", {"track_running_stats": True}),
    ("layernorm", {"channels_first": True}),
    ("lns", {"layer_idx": 5, "base": "rmsnorm", "bias": True}),
    ("lns", {"layer_idx": 2, "elementwise_affine": False}),
    ("rmsnorm", {"eps_mode": "outside", "p": 0.5, "bias": True}),
    ("rmsnorm", {"channels_first": True, "eps": None}),
]
CONFIGS = [(name, {}) for name in all_norms()] + VARIANTS


def config_id(config: tuple[str, dict[str, Any]]) -> str:
    name, kwargs = config
    return "-".join([name, *(f"{k}={v}" for k, v in kwargs.items())])


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    """Each case starts from empty Dynamo caches, so graph and recompile counts are its own."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def rank_for(module: nn.Module) -> int:
    """A rank with spatial extent where the module takes one: exercises the reductions fully."""
    return 4 if 4 in ranks(module) else ranks(module)[-1]


def tensors(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer, non-persistent buffers included."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def assert_grads_close(actual: nn.Module, expected: nn.Module, rtol: float) -> None:
    """Parameter grads agree relative to their largest entry (they are sums over the batch)."""
    aux_only = getattr(getattr(actual, "spec", None), "aux_params", ())
    for (key, p), q in zip(actual.named_parameters(), expected.parameters(), strict=True):
        if key in aux_only and p.grad is None and q.grad is None:
            continue  # fitted by the aux loss only, and this (eval) step had none
        assert p.grad is not None and q.grad is not None, key
        scale = max(1.0, q.grad.abs().max().item())
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=rtol * scale, msg=key)


def train_step(module: Callable[[Tensor], Tensor], x: Tensor, upstream: Tensor) -> tuple[Tensor, Tensor]:
    """Forward plus backward of ``sum(module(x) * upstream)`` plus the norm's auxiliary loss, if any
    (Batchless's NLL, recorded by the compiled forward); returns the output and the input grad."""
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    aux = normlab.total_aux_loss(module) if isinstance(module, nn.Module) else 0.0
    ((y * upstream).sum() + aux).backward()
    assert x.grad is not None
    return y.detach(), x.grad


# ---------------------------------------------------------------------------------------------
# Graph breaks


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_dynamo_traces_one_graph_without_breaks(config: tuple[str, dict[str, Any]], mode: str) -> None:
    """``dynamo.explain``: one graph, no break, in train and in eval (a ``.item()`` would break it)."""
    name, kwargs = config
    module = randomize_params(make_norm(name, **kwargs)).train(MODES[mode])
    x = make_input(module, rank_for(module))
    # A forward that returns its input untouched (Identity) runs no op, so there is no graph.
    expected_graphs = 0 if copy.deepcopy(module)(x) is x else 1
    explanation = torch._dynamo.explain(module)(x)
    assert explanation.break_reasons == []
    assert explanation.graph_count == expected_graphs
    if expected_graphs:
        assert explanation.graph_break_count == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_fullgraph_compile_matches_eager(config: tuple[str, dict[str, Any]], mode: str) -> None:
    """``fullgraph=True`` compiles; 3 forward+backward steps match eager, buffers included (fp32)."""
    name, kwargs = config
    eager = randomize_params(make_norm(name, **kwargs)).train(MODES[mode])
    module = copy.deepcopy(eager)
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    for step in range(3):
        x = make_input(eager, rank_for(eager), seed=step)
        upstream = make_input(eager, rank_for(eager), seed=100 + step)
        y, dx = train_step(compiled, x, upstream)
        y_ref, dx_ref = train_step(eager, x, upstream)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
        assert_grads_close(module, eager, rtol=1e-5)
        for key, buf in module.named_buffers():
            torch.testing.assert_close(buf, eager.get_buffer(key), rtol=1e-6, atol=1e-7, msg=key)
        module.zero_grad()
        eager.zero_grad()


def test_compiled_cumulative_batchnorm_tracks_the_mean_of_batch_statistics() -> None:
    """momentum=None under ``fullgraph=True`` (pytorch#194504): 3 steps give eager's running stats,
    which are the plain means of the per-batch mean and unbiased variance."""
    eager = make_norm("batchnorm", momentum=None)
    module = copy.deepcopy(eager)
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    batches = [make_input(eager, 3, batch=4, seed=s, scale=1.0 + s) for s in range(3)]
    for x in batches:
        compiled(x)
        eager(x)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(module.get_buffer(key), eager.get_buffer(key)), key
    assert int(module.num_batches_tracked) == 3
    dims = (0, 2)
    torch.testing.assert_close(
        module.running_mean, torch.stack([x.mean(dims) for x in batches]).mean(0), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        module.running_var, torch.stack([x.var(dims) for x in batches]).mean(0), rtol=0, atol=1e-6
    )


@pytest.mark.inductor
@pytest.mark.parametrize(
    "config",
    [("dyt", {}), ("batchnorm", {}), ("batchnorm", {"momentum": None})],
    ids=config_id,
)
def test_inductor_matches_eager(config: tuple[str, dict[str, Any]]) -> None:
    """Inductor's generated kernels (forward, backward, in-place buffer updates) match eager in fp32."""
    name, kwargs = config
    eager = randomize_params(make_norm(name, **kwargs)).train()
    module = copy.deepcopy(eager)
    compiled = torch.compile(module, fullgraph=True)
    for step in range(2):
        x = make_input(eager, 4, seed=step)
        upstream = make_input(eager, 4, seed=100 + step)
        y, dx = train_step(compiled, x, upstream)
        y_ref, dx_ref = train_step(eager, x, upstream)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
        assert_grads_close(module, eager, rtol=1e-4)  # param grads rtol 1e-4 (reduction order)
        for key, buf in module.named_buffers():
            torch.testing.assert_close(buf, eager.get_buffer(key), rtol=1e-6, atol=1e-7, msg=key)
        module.zero_grad()
        eager.zero_grad()


# ---------------------------------------------------------------------------------------------
# Recompiles


@pytest.mark.parametrize("name", all_norms())
def test_batch_size_changes_recompile_at_most_once(name: str, record_property: Any) -> None:
    """Batch sizes 2, 3, 5: one static graph, then one dynamic graph that serves every later size.

    A guard on a Python value derived from the shape (say a ``count`` used in an ``if``) would
    force one graph per batch size; a fourth size must then compile nothing new.
    """
    module = make_norm(name)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(module, backend=counter)
    for batch in (2, 3, 5):
        compiled(make_input(module, rank_for(module), batch=batch))
    recompiles = max(counter.frame_count - 1, 0)
    record_property("recompiles_3_batch_sizes", recompiles)
    assert recompiles <= 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(make_input(module, rank_for(module), batch=11))


@pytest.mark.parametrize("name", all_norms())
def test_recompiles_across_dtypes_and_instances_stay_per_dtype(name: str, record_property: Any) -> None:
    """3 batch sizes x 2 dtypes x 2 instances recompile at most once per dtype."""
    counter = CompileCounterWithBackend("eager")
    dtypes = (torch.float32, torch.float64)
    for _instance in range(2):
        for dtype in dtypes:
            module = make_norm(name, dtype=dtype)
            compiled = torch.compile(module, backend=counter)
            for batch in (2, 3, 5):
                compiled(make_input(module, rank_for(module), batch=batch, dtype=dtype))
    recompiles = max(counter.frame_count - 1, 0)
    record_property("recompiles_3_batches_2_dtypes_2_instances", recompiles)
    # Buffers shaped by the first training input (spec.lazy_buffers) change shape once per instance.
    assert recompiles <= len(dtypes) * (2 if spec_of(name).lazy_buffers else 1)


# ---------------------------------------------------------------------------------------------
# Meta device and factory kwargs


def poison(module: nn.Module) -> None:
    """Overwrite every tensor, so a value that ``reset_*`` forgets shows as NaN or -7."""
    with torch.no_grad():
        for t in tensors(module).values():
            t.fill_(float("nan") if t.is_floating_point() else -7)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_meta_init_then_to_empty_and_reset_equals_cpu_init(config: tuple[str, dict[str, Any]]) -> None:
    """Deferred init: build on meta, ``to_empty`` on CPU, reset -> bitwise the normal CPU module.

    Python-side state (LNS's scale, DyT's alpha_init) must survive, so the forward is compared too.
    """
    name, kwargs = config
    reference = make_norm(name, **kwargs)
    module = make_norm(name, device="meta", **kwargs)
    assert all(t.is_meta for t in tensors(module).values())
    module.to_empty(device="cpu")
    poison(module)
    if tensors(module):
        assert hasattr(module, "reset_parameters"), "a norm with state needs reset_parameters()"
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
    if spec_of(name).running_stats or hasattr(module, "reset_running_stats"):
        module.reset_running_stats()
    expected = tensors(reference)
    actual = tensors(module)
    assert actual.keys() == expected.keys()
    for key, t in actual.items():
        assert t.device.type == "cpu" and t.dtype == expected[key].dtype, key
        assert torch.equal(t, expected[key]), key
    if "alpha_init" in kwargs:
        assert torch.equal(module.alpha, torch.full((1,), kwargs["alpha_init"]))
    if hasattr(reference, "scale"):
        assert module.scale == reference.scale
    x = make_input(reference, rank_for(reference))
    assert torch.equal(module(x), reference(x))


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_meta_device_context_manager_reaches_every_tensor(config: tuple[str, dict[str, Any]]) -> None:
    """``with torch.device("meta")`` builds no real storage (large-model deferred init)."""
    name, kwargs = config
    with torch.device("meta"):
        module = make_norm(name, **kwargs)
    assert all(t.is_meta for t in tensors(module).values())


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_dtype_and_device_kwargs_reach_every_tensor(config: tuple[str, dict[str, Any]]) -> None:
    """``device=``/``dtype=float64`` reach every parameter and floating buffer; counters stay int64."""
    name, kwargs = config
    module = make_norm(name, device="cpu", dtype=torch.float64, **kwargs)
    reference = make_norm(name, **kwargs)
    for key, t in tensors(module).items():
        assert t.device == torch.device("cpu"), key
        want = torch.float64 if t.is_floating_point() else reference.get_buffer(key).dtype
        assert t.dtype == want, key
        # The same init values (a Python float such as alpha_init=0.8 rounds differently in fp32).
        torch.testing.assert_close(t, tensors(reference)[key].to(want), rtol=1e-6, atol=0, msg=key)
    x = make_input(module, rank_for(module), dtype=torch.float64)
    assert module(x).dtype == torch.float64
