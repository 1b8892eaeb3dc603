"""Every Python block and every study file (```toml) of the README runs (x-transformers' test_readme)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 3


def test_readme_starts_with_the_two_commands() -> None:
    first_code = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    assert first_code is not None
    lines = [line.split("#")[0].strip() for line in first_code.group(1).splitlines()]
    assert lines[:2] == ["make demo", "make test"]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # what a block writes (runs/...) lands in a fresh folder
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "__readme__"})


TOML_BLOCKS = re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_two_study_files() -> None:
    assert [b.splitlines()[0] for b in TOML_BLOCKS] == ["# my-text.toml", "# my-llama.toml"]


@pytest.mark.parametrize("index", range(len(TOML_BLOCKS)))
def test_readme_study_file_runs(index: int, tmp_path: Path) -> None:
    """Each README study file runs as shown, at a tiny size (fewer steps, seeds and layers)."""
    from normlab.cli import main

    block = TOML_BLOCKS[index]
    name = block.splitlines()[0].removeprefix("# ")
    (tmp_path / name).write_text(block)
    (tmp_path / "my_corpus.txt").write_text(
        "".join(f"line {i % 13}: words of my own corpus\n" for i in range(400))
    )
    tiny = ["--set", "train.steps=2", "--set", "seeds=1", "--set", "train.block_size=16"]
    if "hf_config" in block:
        pytest.importorskip("transformers")
        from normlab.models.hf import hf_config

        fields = {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
        }
        (tmp_path / "config.json").write_text(json.dumps(hf_config("llama", fields).to_dict()))
        tiny += ["--set", "sweep.model.num_hidden_layers=[1]"]
    else:
        tiny += ["--set", "model.gpt.n_layer=1", "--set", "model.gpt.n_embd=16"]
    out = tmp_path / "out"
    assert main(["study", str(tmp_path / name), *tiny, "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["run_counts"]["finished"] == len(results["runs"]) >= 3
