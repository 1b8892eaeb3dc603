"""Placements: each block's equation, its constants and init, and every norm in every placement."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normlab
from normlab.blocks import Block, BlockConfig, TokenwiseNorm, build_block, list_placements, make_block_norm
from normlab.blocks import init as nl_init
from normlab.models import GPT, GPTConfig, load_checkpoint, save_checkpoint

PLACEMENTS = list_placements()


def cfg_(**kw: object) -> BlockConfig:
    base: dict[str, object] = {"n_embd": 12, "n_head": 2, "n_layer": 4}
    return BlockConfig(**{**base, **kw})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Constants, computed by hand from the papers' formulas, to 4 decimals


@pytest.mark.parametrize(
    ("n", "alpha", "beta"),
    [
        (6, 1.8612, 0.3799),
        (12, 2.2134, 0.3195),
        (18, 2.4495, 0.2887),
        (24, 2.6321, 0.2686),
        (100, 3.7606, 0.1880),
    ],
)
@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_deepnorm_constants(n: int, alpha: float, beta: float, arch: str) -> None:
    a, b = nl_init.deepnorm_alpha_beta(n, arch)  # type: ignore[arg-type]
    assert round(a, 4) == alpha and round(b, 4) == beta


def test_deepnorm_encoder_decoder_constants() -> None:
    enc = nl_init.deepnorm_alpha_beta(6, "encdec", 6, part="encoder")
    enc_ts = nl_init.deepnorm_alpha_beta(6, "encdec", 6, part="encoder", variant="torchscale")
    dec = nl_init.deepnorm_alpha_beta(6, "encdec", 6, part="decoder")
    assert [round(v, 4) for v in (enc.alpha, enc.beta, enc_ts.beta, dec.alpha, dec.beta)] == [
        1.4179,
        0.4970,
        0.6569,
        2.0598,
        0.3433,
    ]
    assert enc_ts.alpha == enc.alpha
    enc12 = nl_init.deepnorm_alpha_beta(12, "encdec", 6, part="encoder")
    dec12 = nl_init.deepnorm_alpha_beta(12, "encdec", 6, part="decoder")
    assert [round(v, 4) for v in (*enc12, *dec12)] == [1.6862, 0.4179, 2.0598, 0.3433]


@pytest.mark.parametrize(
    ("n", "gamma"), [(6, 1.5764), (12, 1.7827), (18, 1.8930), (24, 1.9675), (100, 2.3018)]
)
def test_subln_gamma(n: int, gamma: float) -> None:
    assert round(nl_init.subln_gamma(n), 4) == gamma
    assert round(nl_init.subln_gamma(n, "encoder"), 4) == gamma


def test_subln_gamma_encoder_decoder() -> None:
    assert round(nl_init.subln_gamma(6, "encdec", 6, part="encoder"), 4) == 1.5473
    assert round(nl_init.subln_gamma(6, "encdec", 6, part="decoder"), 4) == 1.7001


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: nl_init.deepnorm_alpha_beta(0), "num_layers"),
        (lambda: nl_init.deepnorm_alpha_beta(6, "encdec"), "part"),
        (lambda: nl_init.deepnorm_alpha_beta(6, "encdec", part="encoder"), "num_decoder_layers"),
        (lambda: nl_init.deepnorm_alpha_beta(6, "decoder", 6), "only for arch='encdec'"),
        (lambda: nl_init.deepnorm_alpha_beta(6, "bert"), "arch"),  # type: ignore[arg-type]
        (lambda: nl_init.deepnorm_alpha_beta(6, variant="fairseq"), "variant"),  # type: ignore[arg-type]
        (lambda: nl_init.subln_gamma(True), "num_layers"),
    ],
)
def test_constant_helpers_reject_bad_arguments(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_lns_scales_and_mixln_split() -> None:
    scales = [build_block("lns", cfg_(n_layer=12), i).scale for i in range(12)]  # type: ignore[attr-defined]
    expected = [1, 0.7071, 0.5774, 0.5, 0.4472, 0.4082, 0.3780, 0.3536, 0.3333, 0.3162, 0.3015, 0.2887]
    assert [round(s, 4) for s in scales] == expected
    for n_layer, n_post in ((12, 3), (24, 6), (4, 1), (3, 0)):
        c = cfg_(n_layer=n_layer)
        assert sum(build_block("mixln", c, i).post_ln for i in range(n_layer)) == n_post  # type: ignore[misc]
        assert all(build_block("mixln", c, i).post_ln for i in range(n_post))


# ------------------------------------------------------------------------------------------------
# Formulas, with stub sublayers


class Stub(nn.Module):
    """A fixed nonlinear map standing in for attention or the MLP."""

    def __init__(self, seed: int, d: int = 12) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w) + 0.5


def stubbed(placement: str, layer_idx: int = 2, **kw: object) -> tuple[Block, Stub, Stub]:
    torch.manual_seed(0)
    block = build_block(placement, cfg_(**kw), layer_idx, dtype=torch.float64)
    with torch.no_grad():  # non-trivial norm parameters, so a swapped norm is caught
        for name, p in block.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    f, g = Stub(1), Stub(2)
    block.attn, block.mlp = f, g  # type: ignore[assignment]
    return block, f, g


X = torch.randn(2, 5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2 + 0.7


def test_pre_ln_formula() -> None:
    b, f, g = stubbed("pre")
    h = X + f(b.norm_attn(X))
    torch.testing.assert_close(b(X), h + g(b.norm_mlp(h)), rtol=0, atol=1e-12)


def test_post_ln_formula() -> None:
    b, f, g = stubbed("post")
    h = b.norm_attn(X + f(X))
    torch.testing.assert_close(b(X), b.norm_mlp(h + g(h)), rtol=0, atol=1e-12)


def test_peri_ln_formula() -> None:
    b, f, g = stubbed("peri")
    h = X + b.norm_attn_out(f(b.norm_attn(X)))
    torch.testing.assert_close(b(X), h + b.norm_mlp_out(g(b.norm_mlp(h))), rtol=0, atol=1e-12)
    assert normlab.blocks.get_placement("sandwich") is type(b)


def test_deepnorm_formula() -> None:
    b, f, g = stubbed("deepnorm")
    a = (2 * 4) ** 0.25
    assert b.alpha == pytest.approx(a)
    h = b.norm_attn(a * X + f(X))
    torch.testing.assert_close(b(X), b.norm_mlp(a * h + g(h)), rtol=0, atol=1e-12)


def test_b2t_formula() -> None:
    b, f, g = stubbed("b2t")
    h = b.norm_attn(X + f(X))
    torch.testing.assert_close(b(X), b.norm_mlp(g(h) + h + X), rtol=0, atol=1e-12)


def test_lns_formula_scales_both_pre_norm_outputs() -> None:
    b, f, g = stubbed("lns", layer_idx=3)
    s = 1 / math.sqrt(4)
    h = X + f(b.norm_attn(X) * s)
    torch.testing.assert_close(b(X), h + g(b.norm_mlp(h) * s), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("layer_idx", "post"), [(0, True), (1, False)])
def test_mixln_formula(layer_idx: int, post: bool) -> None:
    b, f, g = stubbed("mixln", layer_idx=layer_idx)
    if post:
        h = b.norm_attn(X + f(X))
        expected = b.norm_mlp(h + g(h))
    else:
        h = X + f(b.norm_attn(X))
        expected = h + g(b.norm_mlp(h))
    torch.testing.assert_close(b(X), expected, rtol=0, atol=1e-12)


def manual_attention(attn: nn.Module, x: Tensor, causal: bool = True) -> Tensor:
    b, t, c = x.shape
    heads = attn.n_head

    def split(y: Tensor) -> Tensor:
        return y.view(b, t, heads, -1).transpose(1, 2)

    q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)
    if attn.inner_norm is not None:
        a = attn.inner_norm(a)
    return attn.out_proj(a)  # type: ignore[no-any-return]


def test_subln_has_its_two_inner_norms_in_the_right_places() -> None:
    torch.manual_seed(0)
    b = build_block("subln", cfg_(), 1, dtype=torch.float64)
    assert isinstance(b.attn.inner_norm, nn.LayerNorm) and b.attn.inner_norm.normalized_shape == (12,)
    assert isinstance(b.mlp.inner_norm, nn.LayerNorm) and b.mlp.inner_norm.normalized_shape == (48,)
    with torch.no_grad():
        for p in (b.attn.inner_norm.weight, b.mlp.inner_norm.weight):
            p.add_(0.3 * torch.randn_like(p))
    ln1 = b.norm_attn(X)
    torch.testing.assert_close(b.attn(ln1), manual_attention(b.attn, ln1), rtol=0, atol=1e-12)
    h = X + b.attn(ln1)
    hidden = b.mlp.inner_norm(F.gelu(b.mlp.fc1(b.norm_mlp(h))))
    torch.testing.assert_close(b(X), h + b.mlp.fc2(hidden), rtol=0, atol=1e-12)
    # the other placements have no inner norm
    assert build_block("pre", cfg_(), 1).attn.inner_norm is None


@pytest.mark.parametrize("causal", [True, False])
def test_attention_and_qk_norm_equal_the_written_out_formula(causal: bool) -> None:
    torch.manual_seed(0)
    b = build_block("pre", cfg_(qk_norm="rmsnorm", causal=causal), 0, dtype=torch.float64)
    assert isinstance(b.attn.q_norm, nn.RMSNorm) and b.attn.q_norm.normalized_shape == (6,)
    with torch.no_grad():
        b.attn.q_norm.weight.uniform_(0.5, 1.5)  # type: ignore[union-attr]
        b.attn.k_norm.weight.uniform_(0.5, 1.5)  # type: ignore[union-attr]
    torch.testing.assert_close(b.attn(X), manual_attention(b.attn, X, causal), rtol=0, atol=1e-12)


def test_swiglu_mlp() -> None:
    torch.manual_seed(0)
    c = cfg_(mlp="swiglu")
    assert c.hidden_dim == 32  # 8 * 12 / 3 = 32, a multiple of 8
    assert cfg_(n_embd=16, n_head=2, mlp="swiglu").hidden_dim == 48  # 42.7 -> 48
    b = build_block("pre", c, 0, dtype=torch.float64)
    assert b.mlp.fc1.out_features == 64
    gate, up = b.mlp.fc1(X).chunk(2, -1)
    torch.testing.assert_close(b.mlp(X), b.mlp.fc2(F.silu(gate) * up), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Inits that come with a placement


def weight_of(block: Block, name: str) -> Tensor:
    return dict(block.named_modules())[name].weight.detach()  # type: ignore[no-any-return]


def test_deepnorm_and_subln_paper_init_is_xavier_normal_with_their_gain() -> None:
    c = cfg_(n_embd=256, n_head=4, n_layer=12)
    xavier = {  # std of xavier_normal with gain 1: sqrt(2 / (fan_in + fan_out))
        "attn.q_proj": math.sqrt(2 / 512),
        "attn.v_proj": math.sqrt(2 / 512),
        "attn.out_proj": math.sqrt(2 / 512),
        "mlp.fc1": math.sqrt(2 / (256 + 1024)),
        "mlp.fc2": math.sqrt(2 / (256 + 1024)),
    }
    for placement, gain in (("deepnorm", (8 * 12) ** -0.25), ("subln", math.sqrt(math.log(24)))):
        torch.manual_seed(0)
        b = build_block(placement, c, 5)
        for name, std in xavier.items():
            expect = std * (1.0 if name == "attn.q_proj" else gain)
            assert weight_of(b, name).std().item() == pytest.approx(expect, rel=0.03), (placement, name)


def test_torchscale_variant_scales_the_existing_init() -> None:
    c = cfg_(n_embd=256, n_head=4, n_layer=12, placement_init="torchscale")
    for placement, gain in (("deepnorm", (8 * 12) ** -0.25), ("subln", math.sqrt(math.log(24)))):
        torch.manual_seed(0)
        plain = build_block("pre", cfg_(n_embd=256, n_head=4, n_layer=12), 5)
        torch.manual_seed(0)
        b = build_block(placement, c, 5)
        for name in ("attn.v_proj", "attn.out_proj", "mlp.fc1", "mlp.fc2"):
            torch.testing.assert_close(weight_of(b, name), weight_of(plain, name) * gain)
        torch.testing.assert_close(weight_of(b, "attn.q_proj"), weight_of(plain, "attn.q_proj"))


def test_scaled_depth_scaled_and_b2t_rescale_inits() -> None:
    torch.manual_seed(0)
    c = cfg_(n_embd=256, n_head=4, n_layer=8, init="scaled")
    b = build_block("pre", c, 3)
    assert weight_of(b, "attn.out_proj").std().item() == pytest.approx(0.02 / 4, rel=0.03)
    assert weight_of(b, "mlp.fc2").std().item() == pytest.approx(0.02 / 4, rel=0.03)
    assert weight_of(b, "attn.q_proj").std().item() == pytest.approx(0.02, rel=0.03)
    b = build_block("pre", cfg_(n_embd=256, n_head=4, n_layer=8, init="depth_scaled"), 3)
    bound = math.sqrt(6 / 512) / 2  # layer 4 (1-based): / sqrt(4)
    w = weight_of(b, "attn.v_proj")
    assert w.abs().max().item() <= bound and w.abs().max().item() > 0.98 * bound
    torch.manual_seed(1)
    plain = build_block("b2t", cfg_(n_layer=9), 0)
    torch.manual_seed(1)
    scaled = build_block("b2t", cfg_(n_layer=9, placement_kwargs={"rescale": True}), 0)
    for lin in ("attn.k_proj", "mlp.fc1"):
        torch.testing.assert_close(weight_of(scaled, lin), weight_of(plain, lin) / 3)


def test_meta_device_construction_then_init_matches_eager() -> None:
    cfg = GPTConfig(
        vocab_size=31, block_size=8, n_layer=3, n_head=2, n_embd=12, placement="deepnorm", norm="dyt"
    )
    eager = GPT(cfg)
    with torch.device("meta"):
        lazy = GPT(cfg)
    lazy.to_empty(device="cpu")
    torch.manual_seed(5)
    lazy.init_weights()
    torch.manual_seed(5)
    eager.init_weights()
    assert lazy.lm_head.weight is lazy.wte.weight
    for (n, a), (_, b) in zip(eager.state_dict().items(), lazy.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    assert lazy.blocks[0].alpha == pytest.approx(6**0.25)  # type: ignore[union-attr]
    assert lazy.embed_scale is not None and lazy.embed_scale.item() == pytest.approx(math.sqrt(12))


# ------------------------------------------------------------------------------------------------
# Every per-token norm in every placement


def token_norms() -> list[str]:
    """Norms a causal transformer block accepts (the others are refused, see below)."""
    ok = []
    for name in normlab.list_norms():
        try:
            make_block_norm(
                cfg_(n_embd=24, norm=name, norm_kwargs=spec_kwargs(name)), 24, site="attn", layer_idx=0
            )
        except ValueError as e:
            if "transformer block" not in str(e):
                raise
            continue
        ok.append(name)
    return ok


def spec_kwargs(name: str) -> dict[str, object]:
    kwargs = dict(normlab.get_norm_layer(name).spec.example_kwargs)
    kwargs.pop("layer_idx", None)  # the block supplies it
    return kwargs


TOKEN_NORMS = token_norms()


def test_the_sweep_covers_the_per_token_norms() -> None:
    for name in ("layernorm", "rmsnorm", "groupnorm", "dyt", "derf", "lns", "identity"):
        assert name in TOKEN_NORMS
    for name in ("batchnorm", "instancenorm"):
        assert name not in TOKEN_NORMS


@pytest.mark.parametrize("norm", TOKEN_NORMS)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_every_placement_with_every_norm_trains(placement: str, norm: str) -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=23,
        block_size=16,
        n_layer=4,
        n_head=2,
        n_embd=24,
        norm=norm,
        placement=placement,
        norm_kwargs=spec_kwargs(norm),
    )
    model = GPT(cfg)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 23, (4, 12), generator=g)
    targets = torch.randint(0, 23, (4, 12), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        loss = model(idx, targets).loss
        assert loss is not None and torch.isfinite(loss)
        opt.zero_grad(set_to_none=True)
        (loss + normlab.total_aux_loss(model)).backward()  # Batchless fits its statistics by an aux loss
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not missing, f"no gradient for {missing}"
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    # FSDP2's fully_shard refuses 0-dim parameters: every scalar is a 1-element vector
    assert not [n for n, p in model.named_parameters() if p.dim() == 0]


def test_a_checkpoint_with_a_0_dim_embed_scale_still_loads() -> None:
    """``embed_scale`` was 0-dim before it became ``(1,)``; such state dicts load by a pre-hook."""
    cfg = GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=1, n_embd=16, norm="dyt")
    model = GPT(cfg)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    old["embed_scale"] = torch.tensor(2.5)  # the old 0-dim layout
    fresh = GPT(cfg)
    fresh.load_state_dict(old)
    assert fresh.embed_scale is not None and fresh.embed_scale.shape == (1,)
    assert fresh.embed_scale.item() == 2.5
    wrapped = nn.Sequential(fresh)  # the hook reads the prefix of a nested model
    wrapped.load_state_dict({f"0.{k}": v for k, v in old.items()})


def test_norms_a_block_cannot_use_are_refused_with_the_reason() -> None:
    cfg = GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4, norm="batchnorm")
    with pytest.raises(ValueError, match=r"batch statistics.*causal=False"):
        GPT(cfg)
    # an encoder may use them: each token is one sample of the batch statistics
    block = build_block("pre", cfg_(norm="batchnorm", causal=False), 0)
    assert isinstance(block.norm_attn, TokenwiseNorm)
    assert block(torch.randn(3, 5, 12)).shape == (3, 5, 12)
    with pytest.raises(ValueError, match=r"instancenorm.*spatial"):
        build_block("pre", cfg_(norm="instancenorm", causal=False), 0)


def test_channel_norms_normalize_each_token_alone() -> None:
    torch.manual_seed(0)
    block = build_block("pre", cfg_(norm="groupnorm", norm_kwargs={"num_groups": 3}), 0)
    x = torch.randn(2, 5, 12)
    y = block.norm_attn(x)
    torch.testing.assert_close(y[1, 3], F.group_norm(x[1, 3][None], 3)[0] * 1.0, atol=1e-6, rtol=0)


def test_dyt_recipe_alpha_per_site_and_embedding_scale() -> None:
    wide = cfg_(n_embd=4096, n_head=32, norm="dyt")
    alphas = [make_block_norm(wide, 8, site=s, layer_idx=0).alpha_init for s in ("attn", "ffn", "final")]
    assert alphas == [0.8, 0.2, 0.2]
    override = cfg_(norm="dyt", norm_kwargs={"alpha_init": 0.3})
    assert make_block_norm(override, 8, site="attn", layer_idx=0).alpha_init == 0.3
    model = GPT(GPTConfig(vocab_size=7, block_size=4, n_layer=2, n_head=2, n_embd=16, norm="dyt"))
    assert model.embed_scale is not None and model.embed_scale.item() == pytest.approx(4.0)
    assert model.final_norm is not None and model.final_norm.alpha_init == 1.0  # width <= 1024
    assert GPT(GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=1, n_embd=4)).embed_scale is None
    no_scale = GPT(
        GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=1, n_embd=4, norm="dyt", embed_scale=False)
    )
    assert no_scale.embed_scale is None


def test_lns_norm_and_lns_placement_compute_the_same_model() -> None:
    kw = {"vocab_size": 17, "block_size": 8, "n_layer": 3, "n_head": 2, "n_embd": 12}
    torch.manual_seed(0)
    a = GPT(GPTConfig(**kw, norm="lns", placement="pre"))  # type: ignore[arg-type]
    torch.manual_seed(0)
    b = GPT(GPTConfig(**kw, norm="layernorm", placement="lns"))  # type: ignore[arg-type]
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match="layernorm_scaling"):  # the old spelling, one release
        c = GPT(GPTConfig(**kw, norm="layernorm", placement="pre", layernorm_scaling=True))  # type: ignore[arg-type]
    assert type(c.blocks[2]).__name__ == "LNSBlock"
    assert a.final_norm.scale == 1.0  # type: ignore[union-attr]
    idx = torch.randint(0, 17, (2, 8))
    torch.testing.assert_close(a(idx).logits, b(idx).logits, atol=2e-6, rtol=0)
    torch.testing.assert_close(b(idx).logits, c(idx).logits, atol=0, rtol=0)
    with (
        pytest.raises(ValueError, match="layernorm_scaling"),
        pytest.warns(DeprecationWarning, match="deprecated"),
    ):
        GPTConfig(**kw, placement="post", layernorm_scaling=True)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# The GPT


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_gpt_is_causal_and_exposes_the_residual_stream(placement: str) -> None:
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=19, block_size=10, n_layer=3, n_head=2, n_embd=12, placement=placement)
    ).eval()
    idx = torch.randint(0, 19, (2, 10))
    out = model(idx, output_hidden_states=True)
    assert len(out.hidden_states) == 4 and out.loss is None
    last = out.hidden_states[-1]
    head_in = model.final_norm(last) if model.final_norm is not None else last
    torch.testing.assert_close(model.lm_head(head_in), out.logits)
    changed = idx.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 19
    torch.testing.assert_close(model(changed).logits[:, :6], out.logits[:, :6])
    assert not torch.allclose(model(changed).logits[:, 6:], out.logits[:, 6:])
    enc = GPT(
        GPTConfig(
            vocab_size=19, block_size=10, n_layer=3, n_head=2, n_embd=12, placement=placement, encoder=True
        )
    )
    assert not enc.config.causal
    assert not torch.allclose(enc(changed).logits[:, :6], enc(idx).logits[:, :6])


def test_final_norm_follows_the_placement() -> None:
    has_final = {}
    for placement in PLACEMENTS:
        model = GPT(GPTConfig(vocab_size=5, block_size=4, n_layer=2, n_head=1, n_embd=4, placement=placement))
        has_final[placement] = model.final_norm is not None
    assert has_final == {
        "b2t": False,
        "deepnorm": False,
        "lns": True,
        "mixln": True,
        "peri": True,
        "post": False,
        "pre": True,
        "subln": True,
    }
    forced = GPT(
        GPTConfig(
            vocab_size=5, block_size=4, n_layer=2, n_head=1, n_embd=4, placement="post", final_norm=True
        )
    )
    assert forced.final_norm is not None


def test_gpt_weight_tying_and_loss() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8))
    assert model.lm_head.weight is model.wte.weight
    idx = torch.randint(0, 11, (3, 6))
    targets = idx.roll(-1, 1)
    targets[:, -1] = -1
    out = model(idx, targets)
    expect = F.cross_entropy(out.logits[:, :-1].reshape(-1, 11), idx[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expect)
    untied = GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, tie_weights=False))
    assert untied.lm_head.weight is not untied.wte.weight


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda m: m(torch.zeros(2, 7, dtype=torch.long)), "exceeds block_size=6"),
        (lambda m: m(torch.zeros(2, 3)), "integer dtype"),
        (lambda m: m(torch.full((1, 3), 11)), r"\[0, 11\)"),
        (
            lambda m: m(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)),
            "targets shape",
        ),
        (lambda m: m.blocks[1](torch.zeros(2, 3, 9)), "layer_idx=1.*expected input"),
    ],
)
def test_gpt_bad_input_errors(make: Callable[[GPT], object], match: str) -> None:
    model = GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8))
    with pytest.raises(ValueError, match=match):
        make(model)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_embd": 10, "n_head": 3}, "n_head=3 must divide n_embd=10"),
        ({"placement": "prenrom"}, "did you mean 'prenorm'"),
        ({"norm": "layrnorm"}, "did you mean"),
        ({"mlp": "relu"}, "mlp must be"),
        ({"dropout": 1.0}, "dropout"),
        ({"init": "xavier"}, "init must be"),
        ({"mixln_alpha": 1.5}, "mixln_alpha"),
        (
            {"placement": "mixln", "placement_kwargs": {"alpha": 1.5}},
            r"'mixln': alpha must be a number in \[0, 1\]",
        ),
        ({"placement": "b2t", "placement_kwargs": {"rescale": 1}}, "'b2t': rescale must be a bool"),
        (
            {"placement_kwargs": {"alpha": 0.3}},
            r"placement 'pre': unknown placement_kwargs \['alpha'\]; its options: none",
        ),
        ({"vocab_size": 0}, "vocab_size"),
    ],
)
def test_config_errors(kwargs: dict[str, object], match: str) -> None:
    base: dict[str, object] = {"vocab_size": 11, "block_size": 6, "n_layer": 2, "n_head": 2, "n_embd": 8}
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**base, **kwargs})  # type: ignore[arg-type]


def test_bad_layer_idx() -> None:
    with pytest.raises(ValueError, match=r"layer_idx must be an int in \[0, n_layer=4\), got 4"):
        build_block("pre", cfg_(), 4)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_blocks_compile_without_graph_breaks(placement: str) -> None:
    block = build_block(placement, cfg_(qk_norm="rmsnorm"), 1)
    explanation = torch._dynamo.explain(block)(torch.randn(2, 5, 12))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_residual_variance_at_init_follows_the_theory() -> None:
    """Pre-LN's stream variance grows with depth, LNS's grows slower, Post-LN's stays at 1."""
    var = {}
    for placement in ("pre", "lns", "post"):
        torch.manual_seed(0)
        model = GPT(
            GPTConfig(vocab_size=64, block_size=16, n_layer=12, n_head=2, n_embd=32, placement=placement)
        )
        idx = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            var[placement] = [h.var().item() for h in model(idx, output_hidden_states=True).hidden_states]
    pre, lns, post = var["pre"], var["lns"], var["post"]
    assert all(b > a for a, b in itertools.pairwise(pre[1:]))
    assert all(b > a for a, b in itertools.pairwise(lns[1:]))
    assert pre[12] / pre[6] > 1.5 * lns[12] / lns[6]
    assert all(v == pytest.approx(1.0, rel=0.02) for v in post[1:])


def test_checkpoint_round_trip_and_atomic_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = GPTConfig(
        vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=8, norm="dyt", placement="deepnorm"
    )
    torch.manual_seed(0)
    model = GPT(cfg)
    path = save_checkpoint(model, tmp_path / "run" / "ckpt.pt", extra={"step": 7})
    loaded, extra = load_checkpoint(path)
    assert extra == {"step": 7} and loaded.config == cfg
    idx = torch.randint(0, 13, (2, 8))
    torch.testing.assert_close(loaded(idx).logits, model(idx).logits, rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.wte.weight

    # a failing write leaves the previous checkpoint intact and no temporary file behind
    def crash(obj: object, f: BinaryIO) -> None:
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, path, extra={"step": 8})
    monkeypatch.undo()
    assert load_checkpoint(path)[1] == {"step": 7}
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt"]
    torch.save({"format": "other"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a normlab GPT checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
