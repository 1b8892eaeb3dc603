"""Per-layer anchors (exact values of the papers' formulas) and options no generic test reaches."""

from __future__ import annotations

import math

import pytest
import torch

import normlab


def test_dyt_defaults_match_the_official_code() -> None:
    dyt = normlab.DyT(8)
    assert dyt.alpha.shape == (1,)
    assert dyt.alpha.item() == 0.5
    assert torch.equal(dyt.weight, torch.ones(8)) and torch.equal(dyt.bias, torch.zeros(8))
    x = torch.randn(4, 8)
    torch.testing.assert_close(dyt(x), torch.tanh(0.5 * x))


@pytest.mark.parametrize(
    ("width", "attn", "other"),
    [
        (256, 1.0, 1.0),
        (1024, 1.0, 1.0),
        (2048, 1.0, 0.5),
        (4096, 0.8, 0.2),
        (5120, 0.6, 0.15),
        (8192, 0.2, 0.05),
    ],
)
def test_dyt_alpha_table(width: int, attn: float, other: float) -> None:
    """Paper Tables 10-11: width sets alpha0 (attention / other)."""
    assert normlab.dyt_alpha_init(width, "attn") == attn
    assert normlab.dyt_alpha_init(width, "other") == other


def test_dyt_alpha_table_rounds_up_between_rows() -> None:
    assert normlab.dyt_alpha_init(3000) == normlab.dyt_alpha_init(4096)
    assert normlab.dyt_alpha_init(16384, "other") == 0.05
    with pytest.raises(ValueError, match="width"):
        normlab.dyt_alpha_init(0)
    with pytest.raises(ValueError, match="site"):
        normlab.dyt_alpha_init(512, "ffn")  # type: ignore[arg-type]


def test_dyt_without_affine_is_plain_tanh_and_llama_variant_has_no_bias() -> None:
    plain = normlab.DyT(8, alpha_init=0.8, elementwise_affine=False)
    x = torch.randn(3, 8)
    torch.testing.assert_close(plain(x), torch.tanh(0.8 * x))
    assert [n for n, _ in normlab.DyT(8, bias=False).named_parameters()] == ["weight", "alpha"]


def test_dyt_channels_first_matches_channels_last_layout() -> None:
    a = normlab.DyT(6, channels_first=True)
    b = normlab.DyT(6)
    with torch.no_grad():
        a.weight.uniform_()
        a.bias.uniform_()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 6, 4, 5)
    torch.testing.assert_close(a(x), b(x.movedim(1, -1)).movedim(-1, 1))


def test_derf_defaults_match_the_official_code() -> None:
    derf = normlab.Derf(8)
    assert (derf.alpha.item(), derf.shift.item()) == (0.5, 0.0)
    x = torch.randn(4, 8)
    torch.testing.assert_close(derf(x), torch.erf(0.5 * x))


def test_lns_scales_for_twelve_blocks() -> None:
    """1/sqrt(l), l = 1..12: 1, .7071, .5774, .5, .4472, .4082, .3780, .3536, .3333, .3162, .3015, .2887."""
    expected = [1, 0.7071, 0.5774, 0.5, 0.4472, 0.4082, 0.3780, 0.3536, 0.3333, 0.3162, 0.3015, 0.2887]
    scales = [normlab.LayerNormScaling(8, layer_idx=i).scale for i in range(12)]
    assert scales == pytest.approx(expected, abs=5e-5)


@pytest.mark.parametrize("base", ["layernorm", "rmsnorm"])
def test_lns_is_the_base_norm_divided_by_sqrt_depth(base: str) -> None:
    lns = normlab.LayerNormScaling(16, layer_idx=8, base=base)  # type: ignore[arg-type]
    plain = normlab.create_norm(base, 16, eps=lns.eps)
    with torch.no_grad():
        lns.weight.uniform_()
        plain.weight.copy_(lns.weight)
    x = torch.randn(5, 16)
    torch.testing.assert_close(lns(x), plain(x) / 3.0)
    assert list(lns.state_dict()) == list(plain.state_dict())  # a base-norm checkpoint loads unchanged


def test_lns_scale_survives_meta_init() -> None:
    """OLMo-core#698: a scale kept as a buffer was wiped by to_empty(); ours is a Python float."""
    lns = normlab.LayerNormScaling(8, layer_idx=3, device="meta").to_empty(device="cpu")
    lns.reset_parameters()
    x = torch.randn(2, 8)
    torch.testing.assert_close(lns(x), torch.nn.functional.layer_norm(x, (8,)) * 0.5)


def test_rmsnorm_eps_none_uses_the_dtype_epsilon_like_torch() -> None:
    ours = normlab.RMSNorm(8, eps=None)
    theirs = torch.nn.RMSNorm(8)
    x = torch.randn(4, 8) * 1e-4
    torch.testing.assert_close(ours(x), theirs(x))


def test_rmsnorm_eps_placements_differ_as_specified() -> None:
    x = torch.full((1, 4), 1e-3, dtype=torch.float64)
    inside = normlab.RMSNorm(4, eps=1e-6, dtype=torch.float64)(x)
    outside = normlab.RMSNorm(4, eps=1e-6, eps_mode="outside", dtype=torch.float64)(x)
    torch.testing.assert_close(inside, x / math.sqrt(1e-6 + 1e-6))
    torch.testing.assert_close(outside, x / (1e-3 + 1e-6))


def test_partial_rmsnorm_uses_the_first_features_only() -> None:
    norm = normlab.RMSNorm(16, p=0.25, dtype=torch.float64)
    x = torch.randn(3, 16, dtype=torch.float64)
    rms = x[:, :4].pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    torch.testing.assert_close(norm(x), x / rms)


def test_groupnorm_takes_channels_first() -> None:
    gn = normlab.GroupNorm(64, num_groups=8)
    assert (gn.num_channels, gn.num_groups, gn.num_features) == (64, 8, 64)
    assert isinstance(gn, torch.nn.GroupNorm)


def test_instancenorm_is_affine_by_default_unlike_torch() -> None:
    assert normlab.InstanceNorm(4).affine
    assert not normlab.InstanceNorm(4, affine=False).affine


@pytest.mark.parametrize("k", [1, 2, 3])
def test_instancenorm_spatial_dims_reads_unbatched_input_as_torch_does(k: int) -> None:
    """(C, *k) is unbatched for torch's InstanceNorm{k}d, also when a size equals C; a converted
    layer (spatial_dims set from the class) computes the same, batched or not."""
    from normlab.convert import convert_norms

    torch.manual_seed(0)
    cls = {1: torch.nn.InstanceNorm1d, 2: torch.nn.InstanceNorm2d, 3: torch.nn.InstanceNorm3d}[k]
    model = torch.nn.Sequential(cls(4, affine=True))
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.5)
        model[0].bias.uniform_(-1.0, 1.0)
    unbatched = torch.randn(4, *([4] * (k - 1)), 5)  # the first spatial size equals C when k > 1
    batched = torch.randn(2, 4, *([3] * k))
    expected = (model(unbatched), model(batched))
    summary = convert_norms(model, "instancenorm", where="0")
    assert [r.relation for r in summary.replaced] == ["exact"]
    converted = model[0]
    assert isinstance(converted, normlab.InstanceNorm) and converted.spatial_dims == k
    assert f"spatial_dims={k}" in repr(converted)
    torch.testing.assert_close(model(unbatched), expected[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(batched), expected[1], rtol=0, atol=1e-6)
    wrong_rank = rf"InstanceNorm: expected \(N, C\) \+ {k} spatial dims, or unbatched"
    with pytest.raises(ValueError, match=wrong_rank):
        converted(torch.randn(2, 4, *([3] * (k + 1))))


def test_instancenorm_spatial_dims_is_checked_and_keeps_the_state_dict() -> None:
    with pytest.raises(ValueError, match="spatial_dims must be an int >= 1 or None, got 0"):
        normlab.InstanceNorm(4, spatial_dims=0)
    plain, fixed = normlab.InstanceNorm(4), normlab.InstanceNorm(4, spatial_dims=2)
    assert plain.state_dict().keys() == fixed.state_dict().keys()
    assert plain(torch.randn(2, 4, 3, 3)).shape == (2, 4, 3, 3)  # default: any rank, batched
