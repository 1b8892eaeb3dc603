"""Model specs from the command line: normlab GPTs, checkpoints, Hugging Face configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from normlab.models import GPT, save_checkpoint
from normlab.models.spec import model_from_spec, parse_overrides


def test_parse_overrides_literals_strings_and_lists() -> None:
    got = parse_overrides("n_layer=12, norm=rmsnorm,depths=[1, 2],bias=False,x=None", where="t")
    assert got == {"n_layer": 12, "norm": "rmsnorm", "depths": [1, 2], "bias": False, "x": None}
    with pytest.raises(ValueError, match="expected key=value, got 'oops'"):
        parse_overrides("a=1,oops", where="t")


def test_gpt_spec_and_checkpoint(tmp_path: Path) -> None:
    model = model_from_spec("gpt:n_layer=3,n_embd=16,n_head=2,placement=deepnorm,norm=dyt")
    assert isinstance(model, GPT)
    assert (model.config.n_layer, model.config.placement, model.config.vocab_size) == (3, "deepnorm", 256)
    path = save_checkpoint(model, tmp_path / "m.pt")
    loaded = model_from_spec(str(path))
    assert isinstance(loaded, GPT) and loaded.config == model.config
    with pytest.raises(ValueError, match=r"unknown fields \['n_layers'\]"):
        model_from_spec("gpt:n_layers=3")
    with pytest.raises(ValueError, match="expected gpt:key=value"):
        model_from_spec("no_such_file.pt")


def test_hf_specs_build_random_models_without_download(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="transformers is an optional dependency (normlab[hf])")
    gpt2 = model_from_spec("hf:gpt2:n_layer=2,n_embd=32,n_head=2,vocab_size=50")
    assert type(gpt2).__name__ == "GPT2LMHeadModel"
    bert = model_from_spec(
        "hf:bert:num_hidden_layers=1,hidden_size=32,num_attention_heads=2,intermediate_size=64"
    )
    assert type(bert).__name__ == "BertForMaskedLM"
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "num_hidden_layers": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_attention_heads": 2,
                "vocab_size": 40,
            }
        )
    )
    llama = model_from_spec("ignored", config_json=cfg)
    assert type(llama).__name__ == "LlamaForCausalLM" and len(llama.model.layers) == 2
    with pytest.raises(ValueError, match="unknown model_type 'nosuchmodel'"):
        model_from_spec("hf:nosuchmodel")
