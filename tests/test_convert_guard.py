"""The conversion guard and the readings it relies on, on small modules written here (no library):
parameter-less, ``1 + w``, bias-free, gated and weightless norms; the numerical check of an
``exact`` label; block stacks of encoder-decoders, lists of lists and parallel lists; ``where="qk"``;
``diagnose`` on blocks it cannot remove; ``normlab.inspect`` and the LNS plan it shares."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normlab
from normlab.convert import (
    UnsupportedNormError,
    apply_layernorm_scaling,
    convert_norms,
    find_blocks,
    read_norm,
    revert,
)
from normlab.convert.detect import extra_inputs
from normlab.diagnostics import diagnose
from normlab.norms import LayerNorm, RMSNorm
from normlab.norms._info import EXACT

W = 16


class PlainLayerNorm(nn.Module):
    """OLMo's: LayerNorm without parameters, eps hard-coded."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.normalized_shape = (hidden,)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, None, None, eps=1e-5)


class OnePlusLayerNorm(nn.LayerNorm):
    """Nemotron's LayerNorm1P: the weight is used as 1 + w."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight + 1.0, self.bias, self.eps)


class BiasFreeLayerNorm(nn.Module):
    """Cohere's: mean-centred, weight only."""

    def __init__(self, hidden: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return self.weight * (x - mu) * torch.rsqrt(var + self.variance_epsilon)


class GatedRMSNorm(nn.Module):
    """Mamba2's: the forward takes a gate."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = 1e-6

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        if gate is not None:
            x = x * F.silu(gate)
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class WeightlessRMSNorm(nn.Module):
    """Falcon-Mamba's: a placeholder weight of another size, never used."""

    def __init__(self, hidden: int, placeholder: int) -> None:
        super().__init__()
        self.variance_epsilon = 1e-6
        self.weight = nn.Buffer(torch.ones(placeholder), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


class Mixer(nn.Module):
    def __init__(self, width: int, norm: nn.Module) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(x))


class PreBlock(nn.Module):
    def __init__(self, norm: nn.Module, width: int = W) -> None:
        super().__init__()
        self.norm = norm
        self.mixer = Mixer(width, nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mixer(self.norm(x))


class Stack(nn.Module):
    def __init__(self, make_norm: type[nn.Module] | None = None, n: int = 3, **kw: object) -> None:
        super().__init__()
        make = make_norm or nn.LayerNorm
        self.layers = nn.ModuleList(PreBlock(make(W, **kw)) for _ in range(n))
        self.final = make(W, **kw)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.final(x)


def _perturbed(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


X = torch.randn(2, 5, W, generator=torch.Generator().manual_seed(0)) * 1.5 + 0.4


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# Readings


def test_a_parameter_less_layernorm_is_read_and_converted_exactly() -> None:
    model = _perturbed(Stack(PlainLayerNorm))
    info = read_norm(model.final)
    assert info is not None and info.kind == "layernorm" and info.weight is None and info.eps == 1e-5
    ref = model(X)
    rep = convert_norms(model, "layernorm")
    assert len(rep.replaced) == 4 and not rep.skipped
    assert all(r.relation == EXACT for r in rep.replaced)
    assert all(isinstance(m, LayerNorm) and m.weight is None for m in (model.final, model.layers[0].norm))
    torch.testing.assert_close(model(X), ref, rtol=0, atol=1e-6)


def test_one_plus_w_layernorm_and_bias_free_layernorm_are_exact() -> None:
    for make in (OnePlusLayerNorm, BiasFreeLayerNorm):
        model = _perturbed(Stack(make))
        ref = model(X)
        info = read_norm(model.final)
        assert info is not None and info.kind == "layernorm"
        assert info.weight_offset == (1.0 if make is OnePlusLayerNorm else 0.0)
        rep = convert_norms(model, "layernorm")
        assert [r.relation for r in rep.replaced] == [EXACT] * 4, rep
        torch.testing.assert_close(model(X), ref, rtol=0, atol=1e-5)
        assert "max relative difference" in rep.replaced[0].checked


def test_a_gated_norm_is_refused_by_name_of_its_extra_input_and_strict_changes_nothing() -> None:
    model = _perturbed(Stack(GatedRMSNorm))
    assert extra_inputs(model.final) == ["gate"]
    with pytest.raises(UnsupportedNormError, match="'gate' besides the input"):
        read_norm(model.final)
    before, modules = _state(model), list(model.modules())
    with pytest.raises(ValueError, match=r"(?s)cannot convert 4 module\(s\), nothing was changed.*'gate'"):
        convert_norms(model, "rmsnorm")
    assert list(model.modules()) == modules and _state(model).keys() == before.keys()
    rep = convert_norms(model, "rmsnorm", strict=False)
    assert not rep.replaced and len(rep.skipped) == 4 and all("gate" in s.reason for s in rep.skipped)


def test_a_weightless_norm_needs_the_models_input_and_then_converts() -> None:
    model = _perturbed(Stack(WeightlessRMSNorm, placeholder=3 * W))
    with pytest.raises(UnsupportedNormError, match="pass example="):
        read_norm(model.final)
    ref = model(X)
    rep = convert_norms(model, "rmsnorm", example=X)
    assert len(rep.replaced) == 4 and all(r.relation == EXACT for r in rep.replaced)
    assert isinstance(model.final, RMSNorm) and model.final.normalized_shape == (W,)
    assert "the model's input" in rep.replaced[0].checked
    torch.testing.assert_close(model(X), ref, rtol=0, atol=1e-5)


def test_the_guard_downgrades_an_exact_label_the_numbers_do_not_bear_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _perturbed(Stack(nn.LayerNorm))
    # a LayerNorm -> RMSNorm conversion that claimed to be exact on every input
    monkeypatch.setattr(RMSNorm, "conversion_relation", classmethod(lambda cls, info, kw: EXACT))
    rep = convert_norms(model, "rmsnorm", copy_affine=True, bias=True)
    assert all(r.relation.startswith("approximate: new function (differs by") for r in rep.replaced), rep
    assert "claimed exact" in rep.replaced[0].checked


class ScalarWeightRMSNorm(nn.Module):
    """One learned gain for every feature: its weight says nothing of the width."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.eps = 1e-6

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class AnyWidthLayerNorm(PlainLayerNorm):
    """Says one width, normalizes whatever last dimension it is given."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], None, None, eps=1e-5)


def test_a_reading_the_models_input_contradicts_is_refused_or_downgraded() -> None:
    scalar = _perturbed(Stack(ScalarWeightRMSNorm))
    with pytest.raises(UnsupportedNormError, match="pass example="):
        read_norm(scalar.final)
    rep = convert_norms(scalar, "rmsnorm", example=X)
    # the scalar gain has no place in a per-feature weight: the check on the input says so
    assert all(r.relation.startswith("approximate: new function (differs by") for r in rep.replaced), rep
    assert all("weight" in r.dropped for r in rep.replaced)
    lying = _perturbed(Stack(AnyWidthLayerNorm))
    lying.final.normalized_shape = (W // 2,)
    assert read_norm(lying.final) is not None  # alone, its attribute is believed
    rep2 = convert_norms(lying, "layernorm", example=X, strict=False)
    assert [s.names for s in rep2.skipped] == [("final",)] and "matches no reading" in rep2.skipped[0].reason


# --------------------------------------------------------------------------------------------
# Stacks, sites, diagnose


class EncDec(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Stack(n=2)
        self.decoder = Stack(n=3)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


def test_an_encoder_decoder_stack_is_the_encoders_blocks_then_the_decoders() -> None:
    stack = find_blocks(EncDec())
    assert stack.name == "encoder.layers+decoder.layers" and stack.size == 5
    assert stack.names[:3] == ["encoder.layers.0", "encoder.layers.1", "decoder.layers.0"]
    with pytest.raises(ValueError, match="encoder-decoder"):
        apply_layernorm_scaling(EncDec(), example=X)


class ParallelLists(nn.Module):
    """XLM's layout: each layer's parts in side-by-side lists, no block module."""

    def __init__(self) -> None:
        super().__init__()
        self.attentions = nn.ModuleList(Mixer(W, nn.Identity()) for _ in range(2))
        self.ffns = nn.ModuleList(Mixer(W, nn.Identity()) for _ in range(2))
        self.norms = nn.ModuleList(nn.LayerNorm(W) for _ in range(2))

    def forward(self, x: Tensor) -> Tensor:
        for a, f, n in zip(self.attentions, self.ffns, self.norms, strict=True):
            x = n(x + f(x + a(x)))
        return x


class ListOfLists(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleList(PreBlock(nn.LayerNorm(W)) for _ in range(2)) for _ in range(2)
        )

    def forward(self, x: Tensor) -> Tensor:
        for group in self.blocks:
            for b in group:
                x = b(x)
        return x


def test_parallel_lists_are_not_a_stack_and_lists_of_lists_hold_their_blocks_one_level_down() -> None:
    assert find_blocks(ParallelLists(), required=False) is None
    stack = find_blocks(ListOfLists())
    assert stack.names == ["blocks.0.0", "blocks.0.1", "blocks.1.0", "blocks.1.1"]
    d = diagnose(_perturbed(ListOfLists()), X)
    assert d.model.num_blocks == 4 and d.model.stack == "blocks" and d.residual is not None


class QKAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_norm = nn.LayerNorm(4)
        self.k_norm = nn.LayerNorm(4)
        self.proj = nn.Linear(W, W)

    def forward(self, x: Tensor) -> Tensor:
        q = self.q_norm(x.unflatten(-1, (4, 4))).flatten(-2)
        k = self.k_norm(x.unflatten(-1, (4, 4))).flatten(-2)
        return self.proj(q * k)


class QKBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(W)
        self.attn = QKAttention()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.attn(self.input_layernorm(x))


def test_where_qk_selects_the_query_key_norms_only() -> None:
    model = nn.Sequential()
    model.layers = nn.ModuleList(QKBlock() for _ in range(2))
    rep = convert_norms(model, "rmsnorm", where="qk", dry_run=True)
    assert sorted(r.name for r in rep.replaced) == [
        f"layers.{i}.attn.{n}_norm" for i in range(2) for n in ("k", "q")
    ]


class DepthCheckingModel(nn.Module):
    """Checks its depth against its config on every call, as some library models do: a removed
    block makes the call raise (a TypeError here, a KeyError or AttributeError elsewhere)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(PreBlock(nn.LayerNorm(W)) for _ in range(2))
        self.n_layer = 2

    def forward(self, x: Tensor) -> Tensor:
        if len(self.layers) != self.n_layer:
            raise TypeError(f"expected {self.n_layer} layers, got {len(self.layers)}")
        for layer in self.layers:
            x = layer(x)
        return x


class Uncalled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(PreBlock(nn.LayerNorm(W)) for _ in range(2))
        self.head = nn.Linear(W, W)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x)


def test_diagnose_reports_what_it_cannot_measure_instead_of_crashing() -> None:
    d = diagnose(_perturbed(DepthCheckingModel()), X)
    assert d.removal is not None and all(math.isnan(v) for v in d.removal.delta)
    assert all(e is not None and e.startswith("TypeError: expected 2 layers") for e in d.removal.errors)
    assert d.residual is not None
    d2 = diagnose(_perturbed(Uncalled()), X)
    assert d2.residual is None and d2.removal is None
    assert any("not called by the model's forward" in n for n in d2.notes), d2.notes


# --------------------------------------------------------------------------------------------
# inspect and the LNS plan


class PostBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mixer = Mixer(W, nn.Identity())
        self.norm = nn.LayerNorm(W)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.mixer(x))


class SandwichBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.LayerNorm(W)
        self.mixer = Mixer(W, nn.Identity())
        self.post = nn.LayerNorm(W)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.post(self.mixer(self.pre(x)))


class ParallelBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(W)
        self.attn = Mixer(W, nn.Identity())
        self.mlp = Mixer(W, nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        return x + self.attn(h) + self.mlp(h)


class Model(nn.Module):
    def __init__(self, block: type[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(block() for _ in range(3))
        self.norm = nn.LayerNorm(W)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def _model_of(block: type[nn.Module]) -> nn.Module:
    return _perturbed(Model(block))


@pytest.mark.parametrize(
    ("block", "placement", "lns"),
    [
        (lambda: PreBlock(nn.LayerNorm(W)), "Pre-LN", "applies: 3 pre-norms"),
        (PostBlock, "Post-LN", "refused"),
        (SandwichBlock, "Peri-LN / sandwich", "refused"),
        (ParallelBlock, "parallel Pre-LN", "applies: 3 pre-norms"),
        (QKBlock, "Pre-LN", "applies: 3 pre-norms"),
    ],
    ids=["pre", "post", "sandwich", "parallel", "qk"],
)
def test_inspect_reads_each_placement_from_a_forward(
    block: type[nn.Module], placement: str, lns: str
) -> None:
    model = _model_of(block)
    before = _state(model)
    report = normlab.inspect(model, example=X)
    assert report.placements == {placement: 3}
    assert report.lns.startswith(lns), report.lns
    assert report.stack == "layers"
    final = next(s for s in report.sites if s.name == "norm")
    assert final.role == "final (after the blocks)"
    assert final.conversions["layernorm"] == EXACT
    assert final.conversions["rmsnorm"] == "approximate: new function (bias dropped)"
    assert _state(model).keys() == before.keys() and all(
        torch.equal(before[k], v) for k, v in _state(model).items()
    )
    assert any(b.qk_norm for b in report.blocks) == (block is QKBlock)
    assert str(report).startswith("normlab inspect: Model")
    assert report.to_dict()["placements"] == {placement: 3}


def test_lns_follows_the_traced_placement() -> None:
    sandwich = _model_of(SandwichBlock)
    with pytest.raises(ValueError, match="Peri-LN / sandwich \\(seen in a forward\\)"):
        apply_layernorm_scaling(sandwich, example=X)
    parallel = _model_of(ParallelBlock)
    ref = parallel(X)
    scaled = apply_layernorm_scaling(parallel, example=X)
    assert scaled == {f"layers.{i}.norm": 1 / math.sqrt(i + 1) for i in range(3)}
    assert not torch.allclose(parallel(X), ref)
    normlab.remove_layernorm_scaling(parallel)
    assert torch.equal(parallel(X), ref)


def test_inspect_without_an_input_says_the_roles_were_not_traced() -> None:
    report = normlab.inspect(_model_of(PostBlock))
    assert report.traced.startswith("not traced") and report.placements == {"not traced": 3}


def test_inspect_cli_on_a_normlab_spec(capsys: pytest.CaptureFixture[str]) -> None:
    from normlab.cli import main

    assert main(["inspect", "gpt:n_layer=2,placement=peri"]) == 0
    out = capsys.readouterr().out
    assert "peri (normlab placement) x 2" in out and "sublayer output (attn)" in out
    assert main(["inspect", "gpt:n_layer=2", "--json"]) == 0
    assert '"Pre-LN"' not in capsys.readouterr().out  # a normlab block names its own placement


def test_revert_after_a_guarded_conversion_is_bit_exact() -> None:
    model = _perturbed(Stack(BiasFreeLayerNorm))
    before, ref = _state(model), model(X)
    rep = convert_norms(model, "dyt", example=X)
    revert(model, rep)
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())
    assert torch.equal(model(X), ref)


class _ScaledResidualBlock(nn.Module):
    """A user's Post-LN block, DeepNorm-style when ``alpha != 1``: ``LN(alpha * x + f(x))``."""

    def __init__(self, d: int, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha
        self.attn = nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.ln2 = nn.LayerNorm(d)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln1(self.alpha * x + self.attn(x))
        return self.ln2(self.alpha * x + self.mlp(x))


@pytest.mark.parametrize(("alpha", "placement"), [(1.0, "Post-LN"), (2.45, "DeepNorm-style Post-LN")])
def test_inspect_tells_a_scaled_residual_from_post_ln(alpha: float, placement: str) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([_ScaledResidualBlock(16, alpha) for _ in range(3)])

        def forward(self, x: Tensor) -> Tensor:
            for block in self.layers:
                x = block(x)
            return x

    report = normlab.inspect(Net(), torch.randn(2, 5, 16))
    assert list(report.placements) == [placement if alpha == 1.0 else f"{placement} (residual x alpha=2.45)"]
