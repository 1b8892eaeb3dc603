"""Hypothesis properties of the norms, in fp64.

Each property is an algebraic identity that holds for *any* input, so hypothesis draws the
shapes, scales, shifts and seeds; tensors are built from a drawn seed with a
``torch.Generator`` (drawing them element by element would be slow). Inputs whose variance is
so small that rounding or ``eps`` dominates are rejected with ``assume``, and the norms under
test use a tiny ``eps`` where a property only holds for ``eps -> 0``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor

import normlab

from cases import FEATURES, all_norms, make_input, make_norm, randomize_params, ranks, spec_of

F64 = torch.float64
TINY_EPS = 1e-12  # eps/var stays below 1e-10 for every accepted draw
PROPERTY = settings(max_examples=40, deadline=None)

seeds = st.integers(0, 2**32 - 1)
scales = st.floats(0.05, 1e3)  # spread of the input
shifts = st.floats(-1e3, 1e3)  # offset of the input, or the constant added to it
factors = st.floats(1e-3, 1e3)  # a positive multiplier
leading = st.lists(st.integers(1, 4), max_size=2)  # batch-like dims before the features
features = st.integers(4, 48)
spatial = st.lists(st.integers(1, 5), min_size=1, max_size=2)  # (L,) or (H, W) of (N, C, *) inputs


def gaussian(
    shape: tuple[int, ...] | list[int], seed: int, *, scale: float = 1.0, shift: float = 0.0
) -> Tensor:
    """fp64 ``N(shift, scale²)`` samples from a private generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=g, dtype=F64) * scale + shift


def close(actual: Tensor, expected: Tensor, tol: float = 1e-9) -> None:
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# LayerNorm and RMSNorm invariances


@PROPERTY
@given(lead=leading, c=features, seed=seeds, scale=scales, mu=shifts, shift=shifts)
def test_layernorm_is_shift_invariant(
    lead: list[int], c: int, seed: int, scale: float, mu: float, shift: float
) -> None:
    """LN(x + c) == LN(x): centring removes any constant added to a row."""
    x = gaussian([*lead, c], seed, scale=scale, shift=mu)
    assume(x.var(dim=-1, correction=0).min() > 1e-2)
    ln = randomize_params(normlab.LayerNorm(c, eps=TINY_EPS, dtype=F64))
    close(ln(x + shift), ln(x))


@PROPERTY
@given(lead=leading, c=features, seed=seeds, scale=scales, mu=shifts, a=factors)
def test_layernorm_is_positive_scale_invariant(
    lead: list[int], c: int, seed: int, scale: float, mu: float, a: float
) -> None:
    """LN(a·x) == LN(x) for a > 0, up to eps/(a²·var) which the tiny eps keeps below 1e-10."""
    x = gaussian([*lead, c], seed, scale=scale, shift=mu)
    var = x.var(dim=-1, correction=0).min().item()
    assume(var > 1e-2 and a * a * var > 1e-2)
    ln = randomize_params(normlab.LayerNorm(c, eps=TINY_EPS, dtype=F64))
    close(ln(a * x), ln(x))


@PROPERTY
@given(
    lead=leading,
    c=features,
    seed=seeds,
    scale=scales,
    mu=shifts,
    a=factors,
    eps_mode=st.sampled_from(["inside", "outside"]),
    p=st.sampled_from([None, 0.5]),
)
def test_rmsnorm_is_positive_scale_invariant(
    lead: list[int], c: int, seed: int, scale: float, mu: float, a: float, eps_mode: str, p: float | None
) -> None:
    """RMS(a·x) == RMS(x) for a > 0, for both eps placements and for partial RMSNorm."""
    x = gaussian([*lead, c], seed, scale=scale, shift=mu)
    k = c if p is None else max(int(c * p), 1)  # pRMSNorm estimates the RMS from the first k features
    ms = x[..., :k].square().mean(dim=-1).min().item()
    assume(ms > 1e-2 and a * a * ms > 1e-2)
    rms = randomize_params(normlab.RMSNorm(c, eps=TINY_EPS, eps_mode=eps_mode, p=p, dtype=F64))
    close(rms(a * x), rms(x))


@PROPERTY
@given(
    lead=leading,
    c=features,
    seed=seeds,
    scale=scales,
    mu=shifts,
    eps_mode=st.sampled_from(["inside", "outside"]),
)
def test_rmsnorm_is_odd(lead: list[int], c: int, seed: int, scale: float, mu: float, eps_mode: str) -> None:
    """RMS(-x) == -RMS(x) exactly (no bias): x² and the rescaling do not see the sign."""
    x = gaussian([*lead, c], seed, scale=scale, shift=mu)
    rms = randomize_params(normlab.RMSNorm(c, eps_mode=eps_mode, dtype=F64))
    assert torch.equal(rms(-x), -rms(x))


# ---------------------------------------------------------------------------------------------
# Batch (in)dependence


PER_SAMPLE_NORMS = [name for name in all_norms() if not spec_of(name).batch_stats]


def test_registry_has_per_sample_norms() -> None:
    """Guards the sweep below against silently testing nothing."""
    assert len(PER_SAMPLE_NORMS) >= 2


@pytest.mark.parametrize("name", PER_SAMPLE_NORMS)
@settings(max_examples=30, deadline=None)
@given(data=st.data(), batch=st.integers(1, 5), seed=seeds, scale=st.floats(0.1, 100.0))
def test_per_sample_norm_is_batch_independent(
    name: str, data: st.DataObject, batch: int, seed: int, scale: float
) -> None:
    """A norm without batch statistics gives sample i the same output alone or in a batch.

    Train mode, where a batch-statistics leak would show; ``batch=1`` is drawn too, so this
    also covers training with a single sample.
    """
    c = data.draw(st.sampled_from(FEATURES), label="num_features")
    norm = randomize_params(make_norm(name, c, dtype=F64)).train()
    rank = data.draw(st.sampled_from(ranks(norm)), label="rank")
    x = make_input(norm, rank, batch, dtype=F64, scale=scale, seed=seed)
    y = norm(x)
    for i in range(batch):
        close(y[i : i + 1], norm(x[i : i + 1]), tol=1e-8)


@PROPERTY
@given(
    batch=st.integers(2, 8),
    c=st.integers(1, 8),
    extent=st.lists(st.integers(1, 4), max_size=2),
    seed=seeds,
    scale=scales,
    mu=shifts,
    data=st.data(),
)
def test_batchnorm_train_is_permutation_equivariant(
    batch: int, c: int, extent: list[int], seed: int, scale: float, mu: float, data: st.DataObject
) -> None:
    """BN(x[perm]) == BN(x)[perm] in training; the running statistics do not see the order."""
    perm = torch.tensor(data.draw(st.permutations(range(batch)), label="perm"))
    x = gaussian([batch, c, *extent], seed, scale=scale, shift=mu)
    dims = [0, *range(2, x.dim())]
    assume(x.var(dim=dims, correction=0).min() > 1e-2)
    bn = randomize_params(normlab.BatchNorm(c, dtype=F64)).train()
    bn_perm = copy.deepcopy(bn)
    close(bn_perm(x[perm]), bn(x)[perm])
    for (key, buf), buf_perm in zip(bn.named_buffers(), bn_perm.buffers(), strict=True):
        assert torch.allclose(buf_perm, buf, rtol=1e-12, atol=1e-9), key


# ---------------------------------------------------------------------------------------------
# GroupNorm's limits


@PROPERTY
@given(batch=st.integers(1, 3), c=st.integers(1, 8), extent=spatial, seed=seeds, scale=scales, mu=shifts)
def test_groupnorm_one_group_is_layernorm_over_channels_and_positions(
    batch: int, c: int, extent: list[int], seed: int, scale: float, mu: float
) -> None:
    """GroupNorm(C, num_groups=1) == LayerNorm((C, *spatial)) with the per-channel affine expanded."""
    x = gaussian([batch, c, *extent], seed, scale=scale, shift=mu)
    assume(x.flatten(1).var(dim=1, correction=0).min() > 1e-2)
    gn = randomize_params(normlab.GroupNorm(c, num_groups=1, dtype=F64))
    ln = normlab.LayerNorm(x.shape[1:], eps=gn.eps, dtype=F64)
    per_channel = (c, *[1] * len(extent))
    with torch.no_grad():
        ln.weight.copy_(gn.weight.view(per_channel).expand(ln.normalized_shape))
        ln.bias.copy_(gn.bias.view(per_channel).expand(ln.normalized_shape))
    close(gn(x), ln(x))


@PROPERTY
@given(batch=st.integers(1, 3), c=st.integers(1, 8), extent=spatial, seed=seeds, scale=scales, mu=shifts)
def test_groupnorm_one_channel_per_group_is_instancenorm(
    batch: int, c: int, extent: list[int], seed: int, scale: float, mu: float
) -> None:
    """GroupNorm(C, num_groups=C) == InstanceNorm(C) with the same per-channel weight and bias."""
    assume(math.prod(extent) >= 2)  # both reject a single value per (sample, channel)
    x = gaussian([batch, c, *extent], seed, scale=scale, shift=mu)
    assume(x.flatten(2).var(dim=2, correction=0).min() > 1e-2)
    gn = randomize_params(normlab.GroupNorm(c, num_groups=c, dtype=F64))
    inorm = normlab.InstanceNorm(c, eps=gn.eps, dtype=F64)
    inorm.load_state_dict(gn.state_dict())
    close(gn(x), inorm(x))


# ---------------------------------------------------------------------------------------------
# Pointwise norms are bounded


@pytest.mark.parametrize("cls", [normlab.DyT, normlab.Derf])
@PROPERTY
@given(
    lead=leading,
    c=features,
    seed=seeds,
    scale=st.floats(1e-3, 1e6),
    alpha=st.floats(-10.0, 10.0),
    shift=st.floats(-5.0, 5.0),
    channels_first=st.booleans(),
)
def test_pointwise_output_stays_within_weight_of_bias(
    cls: type[normlab.DyT | normlab.Derf],
    lead: list[int],
    c: int,
    seed: int,
    scale: float,
    alpha: float,
    shift: float,
    channels_first: bool,
) -> None:
    """|y - bias| <= |weight| per feature: tanh and erf are bounded by 1, whatever alpha and |x|.

    Distinct weights per feature (and ``channels_first``) also check that the affine is
    applied along the feature dimension.
    """
    norm = cls(c, channels_first=channels_first, dtype=F64)
    with torch.no_grad():
        norm.weight.copy_(gaussian([c], seed + 1, scale=3.0))
        norm.bias.copy_(gaussian([c], seed + 2, scale=3.0))
        norm.alpha.fill_(alpha)
        if isinstance(norm, normlab.Derf):
            norm.shift.fill_(shift)
    if channels_first:
        batch, *extent = lead or [1]
        shape = [batch, c, *extent]
    else:
        shape = [*lead, c]
    x = gaussian(shape, seed, scale=scale)
    view = (c,) if not channels_first else (c, *[1] * (x.dim() - 2))
    w, b = norm.weight.detach().view(view), norm.bias.detach().view(view)
    y = norm(x).detach()
    # (w·t + b) - b rounds once more than w·t: allow that one rounding, nothing more.
    slack = 1e-12 * (w.abs() + b.abs())
    assert bool(((y - b).abs() <= w.abs() + slack).all())


# ---------------------------------------------------------------------------------------------
# LayerNorm Scaling


def base_norm_of(lns: normlab.LayerNormScaling, bias: bool) -> torch.nn.Module:
    """The plain LayerNorm/RMSNorm that ``lns`` scales, with ``lns``'s eps and parameters."""
    cls = normlab.LayerNorm if lns.base == "layernorm" else normlab.RMSNorm
    base = cls(lns.num_features, eps=lns.eps, elementwise_affine=lns.elementwise_affine, bias=bias, dtype=F64)
    base.load_state_dict(lns.state_dict())
    return base


lns_config = {
    "base": st.sampled_from(["layernorm", "rmsnorm"]),
    "elementwise_affine": st.booleans(),
    "bias": st.booleans(),
}


@PROPERTY
@given(lead=leading, c=features, seed=seeds, scale=scales, layer_idx=st.integers(1, 200), **lns_config)
def test_lns_is_base_norm_over_sqrt_depth(
    lead: list[int],
    c: int,
    seed: int,
    scale: float,
    layer_idx: int,
    base: str,
    elementwise_affine: bool,
    bias: bool,
) -> None:
    """LNS(layer_idx=l)(x) == base_norm(x) / sqrt(l + 1) (Sun et al. 2025, l 0-based)."""
    lns = normlab.LayerNormScaling(
        c, layer_idx=layer_idx, base=base, elementwise_affine=elementwise_affine, bias=bias, dtype=F64
    )
    randomize_params(lns)
    x = gaussian([*lead, c], seed, scale=scale, shift=0.3 * scale)
    close(lns(x), base_norm_of(lns, bias)(x) / math.sqrt(layer_idx + 1), tol=1e-12)


@PROPERTY
@given(lead=leading, c=features, seed=seeds, scale=scales, **lns_config)
def test_lns_first_layer_is_base_norm_exactly(
    lead: list[int], c: int, seed: int, scale: float, base: str, elementwise_affine: bool, bias: bool
) -> None:
    """layer_idx=0 scales by exactly 1: bitwise the base norm."""
    lns = normlab.LayerNormScaling(
        c, layer_idx=0, base=base, elementwise_affine=elementwise_affine, bias=bias, dtype=F64
    )
    randomize_params(lns)
    x = gaussian([*lead, c], seed, scale=scale, shift=0.3 * scale)
    assert torch.equal(lns(x), base_norm_of(lns, bias)(x))
