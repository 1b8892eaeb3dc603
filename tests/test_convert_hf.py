"""normlab.convert on Hugging Face models built from small configs (random weights, no download),
and on timm / torchvision models where those packages are installed."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import normlab
from normlab.cli import main
from normlab.convert import (
    apply_layernorm_scaling,
    convert_norms,
    find_blocks,
    fold_batchnorm,
    fold_dyt,
    freeze_batchnorm,
    load_converted,
    remove_layernorm_scaling,
    revert,
)

transformers = pytest.importorskip(
    "transformers", reason="transformers is an optional dependency (normlab[hf])"
)
transformers.logging.set_verbosity_error()

VOCAB = 48


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg)


def _llama_like(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config_cls = getattr(transformers, f"{name}Config")
        model_cls = getattr(transformers, f"{name}ForCausalLM")
        cfg = config_cls(
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            vocab_size=VOCAB,
            max_position_embeddings=32,
            tie_word_embeddings=False,
        )
        model: nn.Module = model_cls(cfg)
        return model

    return build


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB
    )
    return transformers.BertForMaskedLM(cfg)


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "gpt2": _gpt2,
    "llama": _llama_like("Llama"),
    "bert": _bert,
}
# expected: (number of norms, source class, stack)
NORMS = {
    "gpt2": (5, "LayerNorm", "transformer.h"),
    "llama": (5, "LlamaRMSNorm", "model.layers"),
    "bert": (6, "LayerNorm", "bert.encoder.layer"),
}


def _build(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # norm weights away from 1, biases away from 0: a dropped copy shows
        for m in model.modules():
            for name, p in m.named_parameters(recurse=False):
                if "Norm" in type(m).__name__ and p.dim() == 1:
                    base = 1.0 if name == "weight" and "Gemma" not in type(m).__name__ else 0.0
                    p.copy_(base + 0.3 * torch.randn(p.shape, generator=gen))
    return model


IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module) -> Tensor:
    out: Tensor = model(input_ids=IDS).logits
    return out


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("target", ["dyt", "rmsnorm", "lns"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_convert_runs_forward_backward_reports_and_reverts(family: str, target: str) -> None:
    model = _build(family)
    before = _state(model)
    count, source, stack = NORMS[family]
    assert find_blocks(model).name == stack  # type: ignore[union-attr]
    where: Any = stack if target == "lns" else None  # LNS needs the block index: the stack's norms
    report = convert_norms(model, target, where=where)
    expected = count - (1 if family == "bert" and target == "lns" else 0) - (1 if target == "lns" else 0)
    assert len(report) == expected and {r.source for r in report.replaced} == {source}
    targets = {"dyt": "DyT", "rmsnorm": "RMSNorm", "lns": "LayerNormScaling"}
    assert {r.target for r in report.replaced} == {targets[target]}
    for r in report.replaced:
        assert "weight" in r.copied
        if target == "dyt":
            assert r.relation == "approximate: new function" and r.new == {"alpha": "0.5"}
        elif target == "lns":
            assert r.options["layer_idx"] == r.depth and r.options["base"] == (
                "rmsnorm" if family == "llama" else "layernorm"
            )
        elif family == "llama":
            assert r.relation == "exact"
    model.train()
    logits = _logits(model)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), IDS.flatten())
    loss.backward()
    new_norm = report.replaced[0].new_module
    assert new_norm is not None and new_norm.weight.grad is not None and torch.isfinite(loss)
    model.eval()
    revert(model, report)
    assert _same(before, _state(model))


def test_exact_conversions_and_measured_differences() -> None:
    """LLaMA-family RMSNorm and GPT-2 LayerNorm to normlab's classes: the same function."""
    for family, target in [("llama", "rmsnorm"), ("gpt2", "layernorm"), ("bert", "layernorm")]:
        model = _build(family)
        ref = _logits(model)
        report = convert_norms(model, target)
        assert {r.relation for r in report.replaced} == {"exact"}
        torch.testing.assert_close(_logits(model), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["Gemma", "Qwen2", "Mistral"])
def test_other_llama_family_rmsnorms_gemma_one_plus_w(name: str) -> None:
    torch.manual_seed(0)
    model = _llama_like(name)().eval()
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight.normal_(0.0 if name == "Gemma" else 1.0, 0.3)
    ref = _logits(model)
    report = convert_norms(model, "rmsnorm")
    assert len(report) == 5 and {r.relation for r in report.replaced} == {"exact"}
    expected = {"weight": "1 + weight"} if name == "Gemma" else {"weight": "weight"}
    assert all(r.copied == expected for r in report.replaced)
    torch.testing.assert_close(_logits(model), ref, rtol=1e-5, atol=1e-5)


def _hand_scaled(model: nn.Module, names: list[str]) -> nn.Module:
    """The LNS reference written out: each pre-norm of block l gets weight and bias times 1/sqrt(l+1)."""
    ref = copy.deepcopy(model)
    stack = find_blocks(ref)
    assert stack is not None
    for i, block in enumerate(ref.get_submodule(stack.name)):
        for attr in names:
            norm = getattr(block, attr)
            with torch.no_grad():
                for p in (norm.weight, getattr(norm, "bias", None)):
                    if p is not None:
                        p.mul_(1.0 / (i + 1) ** 0.5)
    return ref


@pytest.mark.parametrize(
    ("family", "pre_norms"),
    [("gpt2", ["ln_1", "ln_2"]), ("llama", ["input_layernorm", "post_attention_layernorm"])],
)
def test_apply_layernorm_scaling_matches_a_hand_scaled_reference(family: str, pre_norms: list[str]) -> None:
    model = _build(family)
    ref = _logits(model)
    expected = _logits(_hand_scaled(model, pre_norms))
    before = _state(model)
    scaled = apply_layernorm_scaling(model)
    stack = NORMS[family][2]
    assert scaled == pytest.approx({f"{stack}.{i}.{n}": (i + 1) ** -0.5 for i in range(2) for n in pre_norms})
    assert _same(before, _state(model))  # weights and keys untouched
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(model), ref)
    assert remove_layernorm_scaling(model) == 4
    assert torch.equal(_logits(model), ref)


def test_layernorm_scaling_refuses_post_ln_bert() -> None:
    with pytest.raises(ValueError, match="BertLayer is Post-LN"):
        apply_layernorm_scaling(_build("bert"))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fold_dyt_in_hf_models(family: str) -> None:
    model = _build(family)
    convert_norms(model, "dyt", alpha_init=0.7)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, normlab.DyT):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                if m.bias is not None:
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))
    ref = _logits(model)
    report = fold_dyt(model)
    assert len(report.folded) == 4 and len(report.refused) == 1  # the final norm: its reader is unknown
    torch.testing.assert_close(_logits(model), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Vision: ResNet (BatchNorm) and ConvNeXt (channels-first LayerNorm)


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    model = transformers.ResNetModel(cfg)
    with torch.no_grad():
        model.train()
        for _ in range(2):
            model(torch.randn(4, 3, 16, 16) * 2 + 1)
    return model.eval()


PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))


def _features(model: nn.Module) -> Tensor:
    out: Tensor = model(PIXELS).last_hidden_state
    return out


@pytest.mark.parametrize("target", ["groupnorm", "batchless", "crossbn"])
def test_hf_resnet_batchnorm_conversions_and_back(target: str) -> None:
    model = _resnet()
    before = _state(model)
    ref = _features(model)
    report = convert_norms(model, target)
    assert len(report) == 6 and {r.source for r in report.replaced} == {"BatchNorm2d"}
    if target != "groupnorm":
        torch.testing.assert_close(_features(model), ref, rtol=1e-5, atol=1e-5)
    model.train()
    _features(model).mean().backward()
    model.eval()
    revert(model, report)
    if target != "crossbn":  # crossbn shares the running statistics, which training moved
        assert _same(before, _state(model))
    else:
        assert _state(model).keys() == before.keys()


def test_hf_resnet_fold_and_freeze() -> None:
    model = _resnet()
    ref = _features(model)
    frozen = copy.deepcopy(model)
    report = fold_batchnorm(model)
    assert len(report.folded) == 6 and report.refused == {}
    torch.testing.assert_close(_features(model), ref, rtol=1e-5, atol=1e-5)
    assert freeze_batchnorm(frozen) and frozen.train() is frozen
    stats = _state(frozen)
    frozen(PIXELS * 3)
    assert _same(stats, _state(frozen))


def test_hf_convnext_channels_first_layernorm() -> None:
    torch.manual_seed(0)
    model = transformers.ConvNextModel(
        transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
    )
    model.eval()
    ref = _features(model)
    report = convert_norms(model, "layernorm")
    first = {r.name: r for r in report.replaced}
    assert first["embeddings.layernorm"].options["channels_first"] is True
    assert "channels_first" not in first["encoder.stages.0.layers.0.layernorm"].options
    assert {r.relation for r in report.replaced} == {"exact"}
    torch.testing.assert_close(_features(model), ref, rtol=1e-5, atol=1e-5)
    convert_norms(model, "dyt")
    _features(model).sum().backward()


def test_cli_converts_a_hf_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "num_hidden_layers": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_attention_heads": 2,
                "vocab_size": VOCAB,
            }
        )
    )
    out = tmp_path / "dyt.pt"
    assert main(["convert", str(cfg), "--to", "dyt", "--where", "layers.0", "--out", str(out)]) == 0
    assert "replaced 2 norms" in capsys.readouterr().out
    model, payload = load_converted(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert type(model.model.layers[0].input_layernorm) is normlab.DyT
    assert type(model.model.layers[1].input_layernorm).__name__ == "LlamaRMSNorm"
    assert payload["report"]["convert_norms"]["replaced"][0]["names"] == ["model.layers.0.input_layernorm"]
    model(input_ids=IDS)


# --------------------------------------------------------------------------------------------
# timm and torchvision: by class name, tested where installed


def test_timm_norms() -> None:
    timm = pytest.importorskip("timm", reason="timm is not installed (it needs torchvision)")
    x = torch.randn(2, 8, 5, 5)
    model = nn.Sequential(timm.layers.LayerNorm2d(8), timm.layers.RmsNorm2d(8), timm.layers.GroupNorm(8, 2))
    ref = model(x)
    report = convert_norms(model, "layernorm", where=["0"])
    report2 = convert_norms(model, "rmsnorm", where=["1"])
    assert report.replaced[0].options["channels_first"] and report2.replaced[0].relation == "exact"
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_torchvision_frozen_batchnorm_and_layernorm2d() -> None:
    ops = pytest.importorskip("torchvision.ops", reason="torchvision is not installed (or does not import)")
    from torchvision.models.convnext import LayerNorm2d

    frozen = ops.misc.FrozenBatchNorm2d(8)
    with torch.no_grad():
        frozen.running_mean.normal_()
        frozen.running_var.uniform_(0.5, 2)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), frozen, LayerNorm2d(8, eps=1e-6)).eval()
    x = torch.randn(2, 3, 4, 4)
    ref = model(x)
    report = convert_norms(model, "batchnorm")
    assert report.replaced[0].source == "FrozenBatchNorm2d"
    convert_norms(model, "layernorm", where="2")
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    assert fold_batchnorm(model).folded == {"1": ("0",)}
