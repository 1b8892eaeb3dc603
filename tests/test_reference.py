"""Every registered norm against the independent float64 reference in ``reference.py``.

Forward, backward, gradcheck + gradgradcheck, dtypes (incl. bf16 input into an fp32 module) and
degenerate inputs. The tolerances (``PRECISIONS``) start from the errors of torch's own norms
against fp64 measured on CPU (torch 2.13).

A low-precision layer is compared with the reference evaluated on the *same* rounded input and
parameters upcast to float64, so the measured error is the layer's own arithmetic error, not the
rounding of its inputs. The upstream gradient is random: with ``y.sum()`` the input gradient of a
normalized output is (nearly) zero and hides most backward bugs.

Set ``NORMLAB_ERROR_REPORT=/path/err.json`` to write the max errors per (norm, dtype) as JSON; run
with ``-s`` to see them as a table.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call

import normlab

from cases import FEATURES, all_norms, input_shape, make_input, make_norm, randomize_params, ranks, spec_of
from reference import REFERENCES

F64 = torch.float64
TINY = 1e-30


# ------------------------------------------------------------------------------------------------
# Precisions and tolerances


@dataclass(frozen=True)
class Tolerance:
    """Bounds on the error of a layer against the fp64 reference.

    Forward, elementwise: ``|y - y_ref| <= fwd_atol * max(1, max|y_ref|)**atol_grows + fwd_rtol * |y_ref|``.
    In fp32 (``atol_grows=1``) the absolute term scales with the output magnitude: at input scale
    1e3 an un-normalized output (Identity, DyT's linear region, BN eval) is ~1e3 and carries
    fp32 rounding of ~1e3 * 6e-8 even on elements that are small after a cancellation.

    Gradients, on the whole tensor: ``max|g - g_ref| <= tol * max(max|g_ref|, floor)``. For fp32 the
    input-gradient floor is 1, i.e. an absolute 1e-5 for gradients up to 1 and a relative 1e-5
    beyond; everywhere else the floor is tiny, making it a relative error.
    Scalar parameters (DyT/Derf ``alpha``, ``shift``) get ``scalar_factor`` times ``dparam``.
    """

    fwd_atol: float
    fwd_rtol: float
    dx: float
    dparam: float
    atol_grows: int = 0
    dx_floor: float = TINY
    scalar_factor: float = 10.0


@dataclass(frozen=True)
class Precision:
    label: str
    module_dtype: torch.dtype
    input_dtype: torch.dtype
    scales: tuple[float, ...]
    tol: Tolerance = field(repr=False)


FP32_TOL = Tolerance(fwd_atol=1e-5, fwd_rtol=1e-5, dx=1e-5, dparam=1e-4, atol_grows=1, dx_floor=1.0)
FP16_TOL = Tolerance(fwd_atol=1e-2, fwd_rtol=1e-3, dx=2e-3, dparam=1e-2)
BF16_TOL = Tolerance(fwd_atol=1e-1, fwd_rtol=1.6e-2, dx=1.6e-2, dparam=5e-2)

# Input scales: 1, 50 and (fp32) 1e3, plus 0.01 in fp32, where eps (1e-5) is a tenth
# of the variance, so a misplaced eps (outside the square root, or dropped) fails the forward check.
PRECISIONS = (
    Precision("fp32", torch.float32, torch.float32, (1.0, 50.0, 1e3, 0.01), FP32_TOL),
    Precision("fp16", torch.float16, torch.float16, (1.0, 50.0), FP16_TOL),
    Precision("bf16", torch.bfloat16, torch.bfloat16, (1.0, 50.0), BF16_TOL),
    # bf16 activations into an fp32 module (autocast-free mixed precision): output is bf16.
    Precision("bf16-in/fp32-mod", torch.float32, torch.bfloat16, (1.0, 50.0), BF16_TOL),
)
BY_LABEL = {p.label: p for p in PRECISIONS}


# ------------------------------------------------------------------------------------------------
# Error bookkeeping: max errors per (norm or variant, precision), written at module teardown

ERROR_KEYS = ("fwd_abs", "dx_abs", "dparams_abs", "fwd_rel", "dx_rel", "dparams_rel")
# norm (or variant) -> precision label -> {error key: max over cases, "cases": count}. A key is
# absent where nothing was measured (no parameters, or a forward-only test).
ERRORS: dict[str, dict[str, dict[str, float]]] = {}


def _record(norm: str, precision: str, errors: dict[str, float]) -> None:
    row = ERRORS.setdefault(norm, {}).setdefault(precision, {"cases": 0})
    for key, value in errors.items():
        row[key] = max(row.get(key, 0.0), value)
    row["cases"] += 1


def _format_table() -> str:
    width = max(len(norm) for norm in ERRORS)
    head = f"{'norm':<{width}} {'dtype':<17} " + " ".join(f"{k:>11}" for k in ERROR_KEYS) + f" {'cases':>5}"
    lines = [head, "-" * len(head)]
    for norm in sorted(ERRORS):
        for label, row in ERRORS[norm].items():
            values = " ".join(f"{row[k]:>11.2e}" if k in row else f"{'-':>11}" for k in ERROR_KEYS)
            lines.append(f"{norm:<{width}} {label:<17} {values} {int(row['cases']):>5}")
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Run this module on one intra-op thread, then restore the setting.

    The tensors here are tiny, so threads only add synchronisation; on a loaded 2-core machine
    OpenMP barriers made the gradchecks ~10x slower (BatchNorm's: 0.5 s -> 7 s).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def error_report() -> Iterator[None]:
    """After this module's tests: print the error table (visible with ``-s``) and write the JSON."""
    yield
    if not ERRORS:
        return
    print("\nmax error vs the fp64 reference (abs, and rel = max|a-b| / max|ref|), per norm x dtype:")
    print(_format_table())
    path = os.environ.get("NORMLAB_ERROR_REPORT")
    if path:
        worker = os.environ.get("PYTEST_XDIST_WORKER")  # one file per xdist worker, never a torn write
        with open(f"{path}.{worker}" if worker else path, "w") as f:
            json.dump(ERRORS, f, indent=2, sort_keys=True)


# ------------------------------------------------------------------------------------------------
# Comparison helpers


def _max_abs(t: Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0


def _fwd_violation(actual: Tensor, expected: Tensor, tol: Tolerance) -> float:
    """Largest ``|a - b| - bound`` over the elements; <= 0 means within tolerance. NaN counts as +inf."""
    a, b = actual.detach().to(F64), expected.detach().to(F64)
    atol = tol.fwd_atol * max(1.0, _max_abs(b)) ** tol.atol_grows
    excess = (a - b).abs() - (atol + tol.fwd_rtol * b.abs())
    excess = torch.where(torch.isnan(excess), torch.full_like(excess, math.inf), excess)
    return float(excess.max())


def _grad_error(actual: Tensor, expected: Tensor, floor: float) -> tuple[float, float, float]:
    """``(abs, rel, rel_checked)`` with ``abs = max|a - b|``, ``rel = abs / max(max|b|, floor)``.

    ``rel_checked`` is what tolerances are applied to: it forgives one unit in the last place of the
    subnormal range of ``actual``'s dtype (fp16: 6e-8), because a saturated DyT/Derf at input scale
    50 has fp16 gradients ~1e-5 that the dtype cannot hold more precisely, whatever the layer does.
    The report records ``abs`` and ``rel``. Any NaN or inf in the difference gives inf for all three.
    """
    diff = (actual.detach().to(F64) - expected.detach().to(F64)).abs()
    if not torch.isfinite(diff).all():
        return math.inf, math.inf, math.inf
    err = _max_abs(diff)
    scale = max(_max_abs(expected), floor)
    info = torch.finfo(actual.dtype)
    subnormal_ulp = info.smallest_normal * info.eps
    return err, err / scale, max(err - subnormal_ulp, 0.0) / scale


def upstream_grad(shape: torch.Size, dtype: torch.dtype, seed: int = 2) -> Tensor:
    """A seeded N(0, 1) upstream gradient rounded to ``dtype`` (ones would hide normalization bugs)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64).to(dtype)


def compare_with_reference(
    name: str, module: nn.Module, x: Tensor, precision: Precision, key: str, *, grads: bool = True
) -> None:
    """Forward and backward of ``module`` on ``x`` against ``REFERENCES[name]``; records and asserts.

    ``x`` is a leaf with ``requires_grad``. The reference runs on float64 copies of the same
    (rounded) input and parameters, taken before the forward pass (which may update BN's running
    statistics). With ``grads=False`` only the forward pass is checked and recorded.
    """
    tol = precision.tol
    factor = spec_of(name).fp32_tolerance  # an ill-conditioned norm (see NormSpec.fp32_tolerance)
    if precision.input_dtype == torch.float32 and factor != 1.0:
        tol = dataclasses.replace(
            tol,
            fwd_atol=tol.fwd_atol * factor,
            fwd_rtol=tol.fwd_rtol * factor,
            dx=tol.dx * factor,
            dparam=tol.dparam * factor,
        )
    ref_module = copy.deepcopy(module).to(F64)
    x64 = x.detach().to(F64).requires_grad_(True)

    y = module(x)
    assert y.dtype == x.dtype, f"output dtype {y.dtype} != input dtype {x.dtype}"
    assert y.shape == x.shape
    y_ref = REFERENCES[name](x64, ref_module, input_dtype=x.dtype)
    fwd_abs, fwd_rel, _ = _grad_error(y, y_ref, TINY)
    errors = {"fwd_abs": fwd_abs, "fwd_rel": fwd_rel}
    violation = _fwd_violation(y, y_ref, tol)
    if not grads:
        _record(key, precision.label, errors)
        assert violation <= 0, f"forward: max abs err {fwd_abs:.3g} exceeds tolerance by {violation:.3g}"
        return

    g = upstream_grad(y.shape, y.dtype)
    # Parameters fitted only by an auxiliary loss (Batchless mean/std) are not in the output's graph.
    names = [n for n, _ in module.named_parameters() if n not in module.spec.aux_params]
    got = torch.autograd.grad(y, [x, *(module.get_parameter(n) for n in names)], g)
    ref_params = dict(ref_module.named_parameters())
    want = torch.autograd.grad(y_ref, [x64, *(ref_params[n] for n in names)], g.to(F64))

    errors["dx_abs"], errors["dx_rel"], dx_checked = _grad_error(got[0], want[0], tol.dx_floor)
    param_failures = []
    for pname, got_p, want_p in zip(names, got[1:], want[1:], strict=True):
        assert got_p.dtype == module.get_parameter(pname).dtype
        p_abs, p_rel, p_checked = _grad_error(got_p, want_p, TINY)
        errors["dparams_abs"] = max(errors.get("dparams_abs", 0.0), p_abs)
        errors["dparams_rel"] = max(errors.get("dparams_rel", 0.0), p_rel)
        bound = tol.dparam * (tol.scalar_factor if want_p.numel() == 1 else 1.0)
        if not p_checked <= bound:
            param_failures.append(f"d{pname}: rel {p_rel:.3g} > {bound:.3g} (abs {p_abs:.3g})")
    _record(key, precision.label, errors)

    assert violation <= 0, f"forward: max abs err {fwd_abs:.3g} exceeds tolerance by {violation:.3g}"
    assert dx_checked <= tol.dx, (
        f"input grad: rel {errors['dx_rel']:.3g} > {tol.dx:.3g} (abs {errors['dx_abs']:.3g})"
    )
    assert not param_failures, "; ".join(param_failures)


def build(name: str, features: int, mode: str, module_dtype: torch.dtype, **kwargs: Any) -> nn.Module:
    """A norm with randomized parameters and running stats, cast to ``module_dtype``, in ``mode``."""
    module = randomize_params(make_norm(name, features, **kwargs)).to(module_dtype)
    return module.train(mode == "train")


# ------------------------------------------------------------------------------------------------
# Forward/backward: every registered norm, every rank, both feature counts, train and eval, every precision


def test_every_registered_norm_has_a_reference() -> None:
    """A newly registered norm must come with an fp64 reference, or this fails."""
    missing = sorted(set(normlab.list_norms()) - set(REFERENCES))
    assert not missing, f"no fp64 reference in tests/reference.py for: {missing}"


def _sweep_cases() -> Iterator[Any]:
    """Every (norm, rank, C, mode, precision, scale), trimmed to keep the run short.

    C=123 (odd, 3 x 41) only for ranks <= 3 and only scale 1 for 5-D inputs: the large ranks
    add no new code paths, only elements. GroupNorm on ``(N, 6)`` with 3 groups has 2 values per
    group; their normalized values are +-1 whatever ``x`` is, so the exact input gradient is ~0
    (of order eps / var) and a relative error in half precision measures only cancellation noise.
    That shape runs in fp32 (and gradcheck); 2-D GroupNorm in half precision runs with C=123.
    """
    for name in all_norms():
        for rank in ranks(make_norm(name)):
            for c in FEATURES:
                if c == 123 and rank > 3:
                    continue
                for mode in ("train", "eval"):
                    for prec in PRECISIONS:
                        if name == "groupnorm" and rank == 2 and c == 6 and prec.label != "fp32":
                            continue  # 2 values per group: see the docstring
                        for scale in prec.scales:
                            if rank == 5 and scale != 1.0:
                                continue
                            yield pytest.param(
                                name,
                                rank,
                                c,
                                mode,
                                prec.label,
                                scale,
                                id=f"{name}-{rank}d-C{c}-{mode}-{prec.label}-x{scale:g}",
                            )


@pytest.mark.parametrize(("name", "rank", "c", "mode", "label", "scale"), list(_sweep_cases()))
def test_matches_reference(name: str, rank: int, c: int, mode: str, label: str, scale: float) -> None:
    """Forward, input grad and every parameter grad within the section-7 tolerance of the fp64 reference."""
    prec = BY_LABEL[label]
    module = build(name, c, mode, prec.module_dtype)
    x = make_input(
        module, rank, dtype=prec.input_dtype, scale=scale, seed=rank * 1000 + c, requires_grad=True
    )
    compare_with_reference(name, module, x, prec, key=name)


# Options the example kwargs do not reach. Each runs on a 3-D input with C=6 and C=123 (when the
# option allows it) and on the norm's largest rank with C=6, at scale 1 (and 0.01 in fp32, where
# an eps placed on the wrong side of the square root shows).
VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("layernorm", {"channels_first": True}),
    ("layernorm", {"elementwise_affine": False}),
    ("layernorm", {"bias": False, "eps": 1e-3}),
    ("rmsnorm", {"eps_mode": "outside", "eps": 1e-8}),
    ("rmsnorm", {"p": 0.7}),
    ("rmsnorm", {"p": 0.5, "eps_mode": "outside"}),
    ("rmsnorm", {"bias": True}),
    ("rmsnorm", {"eps": None}),
    ("rmsnorm", {"channels_first": True, "bias": True}),
    ("rmsnorm", {"elementwise_affine": False}),
    ("batchnorm", {"track_running_stats": False}),
    ("batchnorm", {"affine": False}),
    ("batchnorm", {"bias": False, "eps": 1e-3}),
    ("groupnorm", {"num_groups": 1}),
    ("groupnorm", {"num_groups": 6}),
    ("instancenorm", {"track_running_stats": True}),
    ("instancenorm", {"affine": False}),
    ("dyt", {"channels_first": True}),
    ("dyt", {"bias": False, "alpha_init": 1.2}),
    ("dyt", {"elementwise_affine": False}),
    ("derf", {"channels_first": True, "shift_init": 0.4}),
    ("derf", {"elementwise_affine": False}),
    ("identity", {"channels_first": True}),
    ("lns", {"base": "rmsnorm"}),
    ("lns", {"base": "rmsnorm", "bias": True, "layer_idx": 11, "eps": 1e-5}),
    ("lns", {"layer_idx": 0}),
    ("lns", {"elementwise_affine": False}),
)


def _variant_key(name: str, kwargs: dict[str, Any]) -> str:
    return name + "(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"


def _variant_cases() -> Iterator[Any]:
    for name, kwargs in VARIANTS:
        module = make_norm(name, 6, **kwargs)
        shapes = [(3, 6), (max(ranks(module)), 6)]
        if kwargs.get("num_groups", 1) in (1, 3):
            shapes.append((3, 123))
        # Only the norms with running statistics compute differently in eval.
        modes = ("train", "eval") if module.spec.running_stats or name == "instancenorm" else ("train",)
        key = _variant_key(name, kwargs)
        for rank, c in shapes:
            for mode in modes:
                for prec in PRECISIONS:
                    for scale in (1.0, 0.01) if prec.label == "fp32" else (1.0,):
                        case_id = f"{key}-{rank}d-C{c}-{mode}-{prec.label}-x{scale:g}"
                        yield pytest.param(name, kwargs, rank, c, mode, prec.label, scale, id=case_id)


@pytest.mark.parametrize(("name", "kwargs", "rank", "c", "mode", "label", "scale"), list(_variant_cases()))
def test_variant_matches_reference(
    name: str, kwargs: dict[str, Any], rank: int, c: int, mode: str, label: str, scale: float
) -> None:
    """Constructor options (eps placement, partial RMS, channels_first, no affine, ...) vs the reference."""
    prec = BY_LABEL[label]
    module = build(name, c, mode, prec.module_dtype, **kwargs)
    x = make_input(
        module, rank, dtype=prec.input_dtype, scale=scale, seed=rank * 1000 + c, requires_grad=True
    )
    compare_with_reference(name, module, x, prec, key=_variant_key(name, kwargs))


def _mixed_param_grad_cases() -> Iterator[Any]:
    for name in all_norms():
        if any(True for _ in make_norm(name).parameters()):
            yield pytest.param(name, id=name)


@pytest.mark.parametrize("name", list(_mixed_param_grad_cases()))
def test_fp32_params_get_fp32_accurate_grads_from_bf16_input(name: str) -> None:
    """fp32 master parameters with bf16 activations: the parameter grads are sums of products of
    bf16 numbers, which fp32 accumulation gets right to ~1e-7 (relative), so the fp32 parameter
    tolerance (rel 1e-4, x10 for scalars) applies to them, not bf16's 5e-2 used in the sweep."""
    prec = dataclasses.replace(BY_LABEL["bf16-in/fp32-mod"], tol=dataclasses.replace(BF16_TOL, dparam=1e-4))
    module = build(name, 123, "train", torch.float32)
    x = make_input(module, 3, dtype=torch.bfloat16, seed=23, requires_grad=True)
    compare_with_reference(name, module, x, prec, key=f"{name} (fp32 param grads)")


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("layernorm", {}),
        ("rmsnorm", {}),
        ("rmsnorm", {"p": 0.3, "eps_mode": "outside", "bias": True}),
    ],
)
@pytest.mark.parametrize("label", ["fp32", "bf16"])
def test_multi_dim_normalized_shape_matches_reference(name: str, kwargs: dict[str, Any], label: str) -> None:
    """``normalized_shape=(5, 6)``: statistics over the two trailing dims (pRMSNorm over their flattening)."""
    prec = BY_LABEL[label]
    module = randomize_params(normlab.create_norm(name, (5, 6), **kwargs)).to(prec.module_dtype)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 4, 5, 6, generator=g, dtype=F64) + 0.3).to(prec.input_dtype).requires_grad_(True)
    compare_with_reference(
        name, module, x, prec, key=_variant_key(name, {"normalized_shape": (5, 6), **kwargs})
    )


# ------------------------------------------------------------------------------------------------
# gradcheck and gradgradcheck in float64 on tiny shapes


def _tiny_input(module: nn.Module, seed: int = 3) -> Tensor:
    """``(2, 6, 3)`` for channel layouts, ``(2, 3, 6)`` otherwise; N(0.3, 1) in float64."""
    shape = (2, 6, 3) if module.channel_dim == 1 else (2, 3, 6)  # type: ignore[operator]
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) + 0.3).requires_grad_(True)


def _gradcheck_cases() -> Iterator[Any]:
    for name in all_norms():
        # An aux-loss-only parameter (Batchless mean/std) enters the output through a stop-gradient,
        # so finite differences of the output see it while autograd, by design, does not.
        skip = spec_of(name).aux_params
        wrts = ["input", *(n for n, _ in make_norm(name).named_parameters() if n not in skip)]
        for mode in ("train", "eval"):
            for wrt in wrts:
                yield pytest.param(name, mode, wrt, id=f"{name}-{mode}-{wrt}")


def _fresh_state(module: nn.Module, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """``params`` plus clones of every buffer, for one call of ``functional_call``.

    Finite differences need a pure function: each evaluation starts from the same buffers. A norm
    whose training output reads state that the forward also updates (MBN's memory, Compound BN's
    moving mixture) would otherwise be a different function at every call.
    """
    return {**params, **{n: b.clone() for n, b in module.named_buffers()}}


def _check_both(fn: Any, inputs: tuple[Tensor, ...]) -> None:
    """gradcheck and gradgradcheck with torch's defaults (eps 1e-6, atol 1e-5, rtol 1e-3)."""
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize(("name", "mode", "wrt"), list(_gradcheck_cases()))
def test_gradcheck_and_gradgradcheck(name: str, mode: str, wrt: str) -> None:
    """First and second derivatives w.r.t. the input or one parameter match finite differences."""
    module = build(name, 6, mode, F64)
    x = _tiny_input(module)
    params = {n: p.detach() for n, p in module.named_parameters()}
    if wrt == "input":
        _check_both(lambda inp: functional_call(module, _fresh_state(module, params), (inp,)), (x,))
    else:
        x = x.detach()
        p = params[wrt].clone().requires_grad_(True)
        _check_both(lambda q: functional_call(module, _fresh_state(module, {**params, wrt: q}), (x,)), (p,))


@pytest.mark.parametrize(("name", "kwargs"), VARIANTS, ids=[_variant_key(n, k) for n, k in VARIANTS])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_variant_gradcheck_and_gradgradcheck(name: str, kwargs: dict[str, Any], mode: str) -> None:
    """The options' code paths, w.r.t. the input and all parameters at once."""
    module = build(name, 6, mode, F64, **kwargs)
    names = [n for n, _ in module.named_parameters()]
    leaves = tuple(p.detach().clone().requires_grad_(True) for p in module.parameters())

    def fn(inp: Tensor, *ps: Tensor) -> Tensor:
        return functional_call(module, _fresh_state(module, dict(zip(names, ps, strict=True))), (inp,))

    _check_both(fn, (_tiny_input(module), *leaves))


# ------------------------------------------------------------------------------------------------
# Degenerate inputs


def _constant_input(name: str, module: nn.Module) -> Tensor:
    """An input that is constant over each normalization set of ``name``.

    The constants are multiples of 1/4 in [-2, 2] so that their fp32 mean is exact: what is tested
    is the layer's handling of a zero variance, not fp32 rounding of the mean of a constant.
    """
    g = torch.Generator().manual_seed(7)

    def levels(*size: int) -> Tensor:
        return torch.randint(-8, 9, size, generator=g).to(torch.float32) / 4

    shape = input_shape(module, 4)  # (3, C, 5, 3) or (3, 5, 3, C)
    n, c = 3, module.num_features  # type: ignore[union-attr]
    if name in ("layernorm", "lns"):  # constant along the feature (last) dim
        return levels(*shape[:-1], 1).expand(shape).contiguous()
    if name == "batchnorm":  # constant per channel over batch and space
        return levels(1, c, 1, 1).expand(shape).contiguous()
    if name == "instancenorm":  # constant per (sample, channel) over space
        return levels(n, c, 1, 1).expand(shape).contiguous()
    if name == "groupnorm":  # constant per (sample, group) over its channels and space
        groups = module.num_groups  # type: ignore[union-attr]
        return (
            levels(n, groups, 1, 1, 1).expand(n, groups, c // groups, *shape[2:]).reshape(shape).contiguous()
        )
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["layernorm", "batchnorm", "groupnorm", "instancenorm", "lns"])
def test_constant_input_gives_bias_and_finite_grads(name: str) -> None:
    """Zero variance: the normalized part is 0, so the output is the (LNS-scaled) bias; grads are finite.

    In training mode (BN and IN use the batch/instance statistics there). Grads are also checked
    against the reference: they are ``(g*w - mean(g*w)) / sqrt(eps)``-sized, not zero, with a random
    upstream gradient.
    """
    module = build(name, 6, "train", torch.float32)
    x = _constant_input(name, module).requires_grad_(True)
    y = module(x)
    scale = 1.0 / math.sqrt(module.layer_idx + 1) if name == "lns" else 1.0  # type: ignore[operator]
    bias = module.bias.detach() * scale  # type: ignore[operator, union-attr]
    expected = bias if module.channel_dim == -1 else bias.view(-1, 1, 1)  # type: ignore[operator]
    torch.testing.assert_close(y.detach(), expected.expand_as(y), atol=1e-4, rtol=0)

    g = upstream_grad(y.shape, y.dtype)
    grads = torch.autograd.grad(y, [x, *module.parameters()], g)
    assert all(torch.isfinite(t).all() for t in grads)
    ref_module = copy.deepcopy(module).double()
    x64 = x.detach().double().requires_grad_(True)
    ref = torch.autograd.grad(REFERENCES[name](x64, ref_module), [x64, *ref_module.parameters()], g.double())
    _, _, dx_rel = _grad_error(grads[0], ref[0], TINY)
    assert dx_rel <= 1e-4
    # dweight is 0 in exact arithmetic and dbias = sum(g). Fused kernels compute terms like
    # x * rsqrt(eps) ~ 600 and subtract mean * rsqrt(eps), so fp32 cancellation leaves ~1e-4 in
    # dweight (GroupNorm measured 1.3e-4): atol 1e-3, i.e. ~1e-7 of those terms.
    for got, want in zip(grads[1:], ref[1:], strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"eps_mode": "outside", "eps": 1e-8},
        {"eps": 1e-5, "bias": True},
    ],
    ids=["inside", "outside", "inside-bias"],
)
def test_rmsnorm_zero_row_gives_zero_output_and_finite_grads(kwargs: dict[str, Any]) -> None:
    """An all-zero row: output is the bias (0 without one); its input grad is ``g * w / sqrt(eps)``
    (eps inside) or ``g * w / eps`` (eps outside): finite, and equal to the reference's."""
    module = build("rmsnorm", 6, "train", torch.float32, **kwargs)
    x = make_input(module, 3, seed=11)
    x[1, 2] = 0.0  # one all-zero row among normal ones
    x.requires_grad_(True)
    y = module(x)
    expected_zero_row = torch.zeros(6) if module.bias is None else module.bias.detach()
    torch.testing.assert_close(y[1, 2].detach(), expected_zero_row, atol=0, rtol=0)

    g = upstream_grad(y.shape, y.dtype)
    grads = torch.autograd.grad(y, [x, *module.parameters()], g)
    assert all(torch.isfinite(t).all() for t in grads), "non-finite grads"
    ref_module = copy.deepcopy(module).double()
    x64 = x.detach().double().requires_grad_(True)
    ref = torch.autograd.grad(
        REFERENCES["rmsnorm"](x64, ref_module), [x64, *ref_module.parameters()], g.double()
    )
    eps = module.eps if module.eps_mode == "outside" else math.sqrt(module.eps)  # type: ignore[arg-type]
    torch.testing.assert_close(ref[0][1, 2], g[1, 2].double() * module.weight.detach().double() / eps)
    for got, want in zip(grads, ref, strict=True):
        _, _, rel = _grad_error(got, want, TINY)
        assert rel <= 1e-5


LARGE_MAGNITUDE_NORMS = (
    ("layernorm", {}),
    ("rmsnorm", {}),
    ("rmsnorm", {"eps_mode": "outside", "p": 0.5}),
    ("lns", {}),
    ("lns", {"base": "rmsnorm"}),
)
LARGE_MAGNITUDES = (("fp16", 300.0), ("fp16", 1e4), ("bf16", 1e4), ("bf16", 1e18))


def _large_magnitude_cases() -> Iterator[Any]:
    for name, kwargs in LARGE_MAGNITUDE_NORMS:
        for label, scale in LARGE_MAGNITUDES:
            key = _variant_key(name, kwargs)
            yield pytest.param(name, kwargs, label, scale, id=f"{key}-{label}-x{scale:g}")


def _check_large_magnitude(name: str, kwargs: dict[str, Any], label: str, scale: float, grads: bool) -> None:
    prec = BY_LABEL[label]
    module = build(name, 123, "train", prec.module_dtype, **kwargs)
    x = make_input(module, 3, dtype=prec.input_dtype, scale=scale, seed=13, requires_grad=True)
    assert torch.isfinite(x).all()
    key = f"{_variant_key(name, kwargs)} |x|~{scale:g}"
    compare_with_reference(name, module, x, prec, key=key, grads=grads)


@pytest.mark.parametrize(("name", "kwargs", "label", "scale"), list(_large_magnitude_cases()))
def test_large_magnitudes_forward(name: str, kwargs: dict[str, Any], label: str, scale: float) -> None:
    """|x| ~ 300 and 1e4 in fp16 (x^2 overflows fp16 beyond 256), 1e4 and 1e18 in bf16: a naive
    ``x.pow(2)`` in the input dtype gives inf or all zeros; the output must be finite and match."""
    _check_large_magnitude(name, kwargs, label, scale, grads=False)


@pytest.mark.parametrize(("name", "kwargs", "label", "scale"), list(_large_magnitude_cases()))
def test_large_magnitudes_backward(name: str, kwargs: dict[str, Any], label: str, scale: float) -> None:
    """The same inputs: input and parameter gradients finite and within tolerance of the reference."""
    _check_large_magnitude(name, kwargs, label, scale, grads=True)


@pytest.mark.parametrize("name", ["layernorm", "rmsnorm"])
def test_bf16_small_std_input(name: str) -> None:
    """std 0.05 in bf16 (pytorch#189581: statistics computed in bf16 lose the variance)."""
    prec = BY_LABEL["bf16"]
    module = build(name, 123, "train", prec.module_dtype)
    x = make_input(module, 3, dtype=prec.input_dtype, scale=0.05, seed=17, requires_grad=True)
    compare_with_reference(name, module, x, prec, key=f"{name} std0.05")


PER_SAMPLE_NORMS = ("layernorm", "rmsnorm", "groupnorm", "dyt", "derf", "lns", "instancenorm")


@pytest.mark.parametrize("name", PER_SAMPLE_NORMS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_nan_stays_in_its_sample(name: str, mode: str) -> None:
    """A NaN in sample 1 leaves the outputs and input grads of samples 0 and 2 unchanged and finite."""
    module = build(name, 6, mode, torch.float32)
    clean = make_input(module, 3, seed=19)
    dirty = clean.clone()
    dirty[1, 0, 0] = math.nan
    g = upstream_grad(clean.shape, clean.dtype)
    outs, dxs = [], []
    for inp in (clean, dirty):
        x = inp.clone().requires_grad_(True)
        y = module(x)
        (dx,) = torch.autograd.grad(y, x, g)
        outs.append(y.detach())
        dxs.append(dx)
    assert torch.isnan(outs[1][1]).any(), "the NaN did not reach its own sample's output"
    others = [0, 2]
    assert torch.isfinite(outs[1][others]).all() and torch.isfinite(dxs[1][others]).all()
    torch.testing.assert_close(outs[1][others], outs[0][others])
    torch.testing.assert_close(dxs[1][others], dxs[0][others])
