"""Diagnostics on Hugging Face GPT-2, LLaMA and BERT built from small configs (random weights)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from normlab.diagnostics import (
    count_hooks,
    diagnose,
    find_blocks,
    lm_inputs,
    removed_block,
    residual_stream,
)
from normlab.models.spec import model_from_spec

pytest.importorskip("transformers", reason="transformers is an optional dependency (normlab[hf])")

SPECS = {
    "gpt2": ("hf:gpt2:n_layer=3,n_embd=32,n_head=2,vocab_size=64,n_positions=32", "transformer.h"),
    "llama": (
        "hf:llama:num_hidden_layers=3,hidden_size=32,intermediate_size=64,num_attention_heads=2,"
        "num_key_value_heads=2,vocab_size=64,max_position_embeddings=32",
        "model.layers",
    ),
    "bert": (
        "hf:bert:num_hidden_layers=3,hidden_size=32,intermediate_size=64,num_attention_heads=2,"
        "vocab_size=64,max_position_embeddings=32",
        "bert.encoder.layer",
    ),
}


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = model_from_spec(SPECS[kind][0])
    model.eval()  # GPT-2's and BERT's default dropout is 0.1
    return model


def ids() -> torch.Tensor:
    return torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_blocks_are_found_and_the_residual_stream_matches(kind: str) -> None:
    model = build(kind)
    prefix = SPECS[kind][1]
    assert [n for n, _ in find_blocks(model)] == [f"{prefix}.{i}" for i in range(3)]
    batch = lm_inputs(model, ids())
    hooks = count_hooks(model)  # transformers registers hooks of its own
    hidden = residual_stream(model, batch)
    assert count_hooks(model) == hooks
    with torch.no_grad():
        ref = model(**batch, output_hidden_states=True).hidden_states
    assert len(hidden) == len(ref) == 4
    # HF's last hidden state has the final norm applied (GPT-2, LLaMA); the others are the stream
    for i in range(3):
        assert torch.equal(hidden[i], ref[i].float()), i


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_diagnose_runs_and_leaves_the_model_unchanged(kind: str) -> None:
    model = build(kind)
    batch = lm_inputs(model, ids())
    with torch.no_grad():
        before = model(**batch).logits.clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = count_hooks(model)
    report = diagnose(model, batch)
    assert report.loss_kind == "the model's own loss" and math.isfinite(report.loss)
    assert report.model.num_blocks == 3 and len(report.layers) == 3
    assert report.removal is not None and all(math.isfinite(d) for d in report.removal.delta)
    assert all(e is None for e in report.removal.errors)
    assert report.angular is not None and report.angular.rows == "tokens"
    assert all(math.isfinite(s.weight_grad_norm) and s.weight_grad_norm > 0 for s in report.layers)
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.equal(before, after)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert getattr(model.config, "num_hidden_layers") == 3 and count_hooks(model) == hooks  # noqa: B009
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_llama_removal_reindexes_the_cache_and_restores() -> None:
    model = build("llama")
    batch = lm_inputs(model, ids())
    layers = list(model.model.layers)  # type: ignore[union-attr, arg-type]
    with removed_block(model, 0):
        inner = model.model.layers  # type: ignore[union-attr]
        assert [layer.self_attn.layer_idx for layer in inner] == [0, 1]  # type: ignore[union-attr]
        assert model.config.num_hidden_layers == 2  # type: ignore[union-attr]
        with torch.no_grad():  # the KV cache is built from the config: indices must be 0..L-2
            pruned = model(**batch, use_cache=True).loss
    assert math.isfinite(float(pruned))
    assert list(model.model.layers) == layers  # type: ignore[union-attr, arg-type]
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]  # type: ignore[union-attr]
    assert model.config.num_hidden_layers == 3  # type: ignore[union-attr]
