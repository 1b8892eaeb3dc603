"""The user's own study: a TOML or Python file on their data and model, `--set`, `normlab compare`,
`study init`, resume after SIGKILL, and one clear error (exit code 2) for each bad input.

Every data form is made here, small: a text file and a folder of them, nanoGPT token files (with
meta.pkl), a `datasets` save_to_disk folder (text and token columns, one split and two), and an
ImageFolder of PNGs (greyscale, RGB, train/test sub-folders). Runs are tiny (a few steps of a
one-block model); what is checked is that the right data and model were trained, not a loss.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from normlab.cli import main
from normlab.data.user import load_user_images, load_user_text
from normlab.studies import StudyFileError, load_study_file, run_study, study_from_dict
from normlab.studies.overrides import parse_set
from normlab.studies.stats import t_ppf, welch_interval
from normlab.train import RunConfig, read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread_plain_torch")

TEXT = "".join(f"line {i % 11}: a small text the tests wrote for a user study\n" for i in range(300))
TINY_GPT = "{ n_layer = 1, n_embd = 16, n_head = 2 }"
TRAIN = "steps = 4\nbatch_size = 4\nlr = 3e-3\nblock_size = 16\nckpt_every = 2\n"


def write_study(
    path: Path,
    *,
    data: str,
    model: str = f"gpt = {TINY_GPT}",
    sweep: str = 'norm = ["layernorm", "rmsnorm"]',
    train: str = TRAIN,
    extra: str = "",
    name: str = "mine",
) -> Path:
    path.write_text(
        f'name = "{name}"\nseeds = 2\n{extra}\n[data]\n{data}\n[model]\n{model}\n'
        f"[train]\n{train}\n[sweep]\n{sweep}\n"
    )
    return path


def run_cli(*args: str) -> int:
    return main([*map(str, args)])


def assert_one_error(err: str, *needles: str) -> None:
    """The command ended with one ``normlab: error:`` line naming ``needles``, not a traceback of
    normlab (third-party loggers may write above it)."""
    last = err.strip().splitlines()[-1]
    assert last.startswith("normlab: error: "), err
    assert all(n in last for n in needles), last


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def results_of(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())


# ---- data forms --------------------------------------------------------------------------------


def test_text_file_study_runs_ranks_and_records_its_file(
    tmp_path: Path, text_file: Path, capsys: Any
) -> None:
    study = write_study(tmp_path / "s.toml", data='text = "corpus.txt"')
    assert run_cli("study", study, "--out", tmp_path / "out", "--no-progress") == 0
    printed = capsys.readouterr().out
    assert "val_loss (lower is better)" in printed and "layernorm" in printed and "rmsnorm" in printed
    results = results_of(tmp_path / "out")
    assert results["run_counts"]["finished"] == 4
    assert [r["rank"] for r in results["ranking"]] == [1, 2]
    assert results["ranking"][1]["ci95"] is not None  # two seeds a side: an interval
    run = results["runs"]["sweep.norm-layernorm-s0"]
    assert str(text_file) in run["data"] and "char-level" in run["data"]
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["source"]["text"] == study.read_text() and plan["rank"]["metric"] == "val_loss"
    assert "## Ranking" in (tmp_path / "out" / "report.md").read_text()


def test_a_folder_of_text_files_is_read_in_path_order(tmp_path: Path) -> None:
    folder = tmp_path / "texts"
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_text("first " * 50)
    (folder / "b" / "c.txt").write_text("second " * 50)
    (folder / ".hidden").write_text("\x00binary")  # hidden files are not data
    corpus = load_user_text({"kind": "text", "path": str(folder)}, level="byte")
    text = bytes(np.concatenate([corpus.train, corpus.val]).tolist()).decode()
    assert text.startswith("first ") and text.rstrip().endswith("second") and "binary" not in text


def test_token_files_with_meta_pkl(tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    folder.mkdir()
    ids = (np.arange(3000) % 37).astype(np.uint16)
    ids[:2700].tofile(folder / "train.bin")
    ids[2700:].tofile(folder / "val.bin")
    (folder / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 40, "itos": {0: "a"}, "stoi": {"a": 0}}))
    corpus = load_user_text({"kind": "tokens", "path": str(folder)})
    assert corpus.vocab_size == 40 and corpus.level == "tokens" and len(corpus.train) == 2700
    write_study(tmp_path / "s.toml", data='tokens = "tok"', sweep='norm = ["dyt"]')
    assert run_cli("study", tmp_path / "s.toml", "--out", tmp_path / "out", "--no-progress") == 0
    final = torch.load(tmp_path / "out" / "runs" / "sweep.norm-dyt-s0" / "final.pt", weights_only=True)
    assert final["wte.weight"].shape[0] == 40  # the GPT's vocabulary is meta.pkl's


def test_a_pickle_that_builds_objects_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    folder.mkdir()
    np.zeros(100, np.uint16).tofile(folder / "train.bin")
    np.zeros(100, np.uint16).tofile(folder / "val.bin")
    (folder / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": Path("x")}))
    with pytest.raises(ValueError, match=r"meta\.pkl.*refusing"):
        load_user_text({"kind": "tokens", "path": str(folder)})


def test_hf_dataset_folders(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"body": TEXT.splitlines()}).save_to_disk(str(single))
    corpus = load_user_text({"kind": "hf_dataset", "path": str(single), "column": "body"})
    assert corpus.level == "char" and len(corpus.val) > 0
    with pytest.raises(ValueError, match=r"no column 'text'.*'body'"):
        load_user_text({"kind": "hf_dataset", "path": str(single)})
    split = tmp_path / "split"
    rows = [[i % 50, (i + 1) % 50, (i + 2) % 50] for i in range(400)]
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"ids": rows[:300]}),
            "validation": datasets.Dataset.from_dict({"ids": rows[300:]}),
        }
    ).save_to_disk(str(split))
    tokens = load_user_text({"kind": "hf_dataset", "path": str(split), "column": "ids"})
    assert (
        tokens.level == "tokens"
        and tokens.vocab_size == 50
        and len(tokens.train) == 900
        and len(tokens.val) == 300
    )
    write_study(
        tmp_path / "s.toml", data='hf_dataset = "single"\ncolumn = "body"', sweep='norm = ["rmsnorm"]'
    )
    assert run_cli("study", tmp_path / "s.toml", "--out", tmp_path / "out", "--no-progress") == 0
    assert results_of(tmp_path / "out")["run_counts"]["finished"] == 2


def _image_folder(root: Path, *, mode: str, n: int = 12, size: tuple[int, int] = (8, 8)) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (*size, 3) if mode == "RGB" else size
            pixels = (rng.random(shape) * 100 + 120 * label).astype(np.uint8)
            Image.fromarray(pixels, mode=mode).save(root / cls / f"{i}.png")


def test_image_folders_grey_rgb_and_train_test(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    _image_folder(tmp_path / "grey", mode="L")
    grey = load_user_images({"kind": "images", "path": str(tmp_path / "grey")})
    assert grey.image_shape == (1, 8, 8) and grey.classes == ("cat", "dog") and len(grey.x_test) == 5
    _image_folder(tmp_path / "rgb" / "train", mode="RGB")
    _image_folder(tmp_path / "rgb" / "test", mode="RGB", n=3)
    rgb = load_user_images({"kind": "images", "path": str(tmp_path / "rgb")})
    assert rgb.image_shape == (3, 8, 8) and len(rgb.x_train) == 24 and len(rgb.x_test) == 6
    assert rgb.to_tensor(rgb.x_train[:2]).shape == (2, 3, 8, 8)
    write_study(
        tmp_path / "s.toml",
        data='images = "rgb"',
        model='convnet = { arch = "plain", widths = [4, 8], depth = 1 }',
        train='steps = 3\nbatch_size = 4\nlr = 0.05\noptimizer = "sgd"\n',
        sweep='norm = ["batchnorm", "groupnorm"]',
    )
    assert run_cli("study", tmp_path / "s.toml", "--out", tmp_path / "out", "--no-progress") == 0
    results = results_of(tmp_path / "out")
    assert results["rank"]["metric"] == "test_acc" and not results["rank"]["lower_is_better"]
    assert results["run_counts"]["finished"] == 4


def test_hf_image_classifier_config_on_an_image_folder(tmp_path: Path, capsys: Any) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("PIL")
    _image_folder(tmp_path / "imgs", mode="RGB", size=(8, 8))
    vit = "hidden_size = 16, num_hidden_layers = 1, num_attention_heads = 2, intermediate_size = 32"
    vit += ", patch_size = 4"
    write_study(
        tmp_path / "s.toml",
        data='images = "imgs"',
        model=f'hf = "vit"\nconfig = {{ {vit} }}',
        train="steps = 2\nbatch_size = 4\nlr = 1e-3\n",
        sweep='norm = ["layernorm", "dyt"]',
    )
    assert run_cli("study", tmp_path / "s.toml", "--out", tmp_path / "out", "--no-progress") == 0
    final = torch.load(tmp_path / "out" / "runs" / "sweep.norm-dyt-s0" / "final.pt", weights_only=True)
    assert any(k.endswith(".alpha") for k in final)
    assert final["model.classifier.weight"].shape[0] == 2  # num_labels from the class folders
    capsys.readouterr()
    assert run_cli("report", tmp_path / "out") == 0  # the report of a study file, rewritten
    assert "test_acc (higher is better)" in capsys.readouterr().out


def test_images_of_different_sizes_need_size(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    _image_folder(tmp_path / "imgs", mode="L", n=3)
    _image_folder(tmp_path / "imgs", mode="L", n=1, size=(9, 7))  # overwrites 0.png of each class
    with pytest.raises(ValueError, match=r"set size = \[height, width\]"):
        load_user_images({"kind": "images", "path": str(tmp_path / "imgs")})
    resized = load_user_images({"kind": "images", "path": str(tmp_path / "imgs"), "size": [6, 6]})
    assert resized.image_shape == (1, 6, 6)


# ---- models ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_type", "fields"),
    [
        (
            "llama",
            {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "max_position_embeddings": 64,
            },
        ),
        ("gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}),
    ],
)
def test_hf_config_swept_over_norms_trains_different_models(
    tmp_path: Path, text_file: Path, model_type: str, fields: dict[str, Any]
) -> None:
    pytest.importorskip("transformers")
    from normlab.models.hf import hf_config

    (tmp_path / "config.json").write_text(json.dumps(hf_config(model_type, fields).to_dict()))
    write_study(
        tmp_path / "s.toml",
        data='text = "corpus.txt"',
        model='hf_config = "config.json"',
        sweep='norm = ["layernorm", "rmsnorm", "dyt"]',
    )
    assert run_cli("study", tmp_path / "s.toml", "--out", tmp_path / "out", "--no-progress") == 0
    finals = {
        norm: torch.load(tmp_path / "out" / "runs" / f"sweep.norm-{norm}-s0" / "final.pt", weights_only=True)
        for norm in ("layernorm", "rmsnorm", "dyt")
    }
    assert any(k.endswith(".alpha") for k in finals["dyt"])  # DyT's alpha: the norms really changed
    assert not any(k.endswith(".alpha") for k in finals["layernorm"])
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    for run in plan["runs"]:
        if run["seed"] != 0:
            continue
        config = RunConfig.from_dict(run["config"])
        model = config.task.build_model(vocab_size=finals["dyt"]["model.lm_head.weight"].shape[0])
        model.load_state_dict(finals[run["params"]["norm"]])  # the trained weights fit this model
        norms = {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("normlab.norms")}
        assert norms == {NORM_CLASS[run["params"]["norm"]]}, norms
    losses = {
        r["params"]["norm"]: r["metrics"]["val_loss"] for r in results_of(tmp_path / "out")["runs"].values()
    }
    assert len(set(losses.values())) == 3


NORM_CLASS = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm", "dyt": "DyT"}

FACTORY = """
import torch
from torch import nn
import normlab

class Tiny(nn.Module):
    def __init__(self, vocab_size, width):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, width)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width)) for _ in range(2)]
        )
        self.head = nn.Linear(width, vocab_size)

    def forward(self, idx):
        h = self.emb(idx)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)

def build(vocab_size, width=16):
    return Tiny(vocab_size, width)
"""


def test_factory_model_gets_the_sweep_and_its_norms_converted(tmp_path: Path, text_file: Path) -> None:
    (tmp_path / "my_models.py").write_text(FACTORY)
    write_study(
        tmp_path / "s.toml",
        data='text = "corpus.txt"',
        model='factory = "my_models:build"',
        sweep='norm = ["layernorm", "dyt"]\nmodel.width = [8, 12]',
    )
    assert (
        run_cli("study", tmp_path / "s.toml", "--out", tmp_path / "out", "--no-progress", "--jobs", "2") == 0
    )
    final = torch.load(
        tmp_path / "out" / "runs" / "sweep.norm-dyt.model.width-12-s0" / "final.pt", weights_only=True
    )
    assert final["model.emb.weight"].shape[1] == 12 and "model.blocks.0.0.alpha" in final


PY_STUDY = """
from normlab.studies import study_from_dict

STUDY = study_from_dict({
    "name": "py-study", "seeds": 2,
    "data": {"text": "corpus.txt"},
    "model": {"gpt": {"n_layer": 1, "n_embd": 16, "n_head": 2}},
    "train": {"steps": 3, "batch_size": 4, "lr": 3e-3, "block_size": 16},
    "sweep": {"norm": ["layernorm", "dyt"]},
    "claim": [{"id": "c", "text": "DyT is on par", "a": {"norm": "dyt"}, "b": {"norm": "layernorm"},
               "rule": {"similar": 0.5}}],
}, base_dir=__file__.rsplit("/", 1)[0])
"""


def test_python_study_file_and_set_on_its_runs(tmp_path: Path, text_file: Path) -> None:
    (tmp_path / "study.py").write_text(PY_STUDY)
    code = run_cli(
        "study", tmp_path / "study.py", "--set", "train.steps=2", "--out", tmp_path / "out", "--no-progress"
    )
    assert code == 0
    results = results_of(tmp_path / "out")
    assert results["claims"][0]["id"] == "c" and results["claims"][0]["verdict"] in (
        "reproduced",
        "inconclusive",
        "not reproduced",
    )
    steps = {r["steps"] for r in results["runs"].values()}
    assert steps == {2}  # --set reached every run
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["options"]["sets"] == [["train.steps", 2]]


# ---- --set, init, compare ----------------------------------------------------------------------


def test_parse_set_reads_toml_values_and_keeps_bare_strings() -> None:
    assert parse_set("train.lr=3e-4") == ("train.lr", 3e-4)
    assert parse_set('sweep.norm=["dyt", "rmsnorm"]') == ("sweep.norm", ["dyt", "rmsnorm"])
    assert parse_set("model.norm=dyt") == ("model.norm", "dyt")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_set("train.steps")


def test_set_on_a_study_file_changes_the_grid_and_is_recorded(tmp_path: Path, text_file: Path) -> None:
    write_study(tmp_path / "s.toml", data='text = "corpus.txt"')
    sets = (parse_set('sweep.norm=["dyt"]'), parse_set("train.steps=3"), parse_set("seeds=1"))
    study = load_study_file(tmp_path / "s.toml", sets=sets)
    results = run_study(study, tmp_path / "out", progress=False, plots=False, echo=lambda _: None)
    assert (
        list(results["cells"]) == ["sweep.norm-dyt"] and results["cells"]["sweep.norm-dyt"]["finished"] == 1
    )
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["source"]["sets"] == [["sweep.norm", ["dyt"]], ["train.steps", 3], ["seeds", 1]]
    assert plan["runs"][0]["config"]["train"]["steps"] == 3


def test_set_on_a_registered_study(tmp_path: Path) -> None:
    from normlab.studies import StudyOptions, get_study

    study = get_study("quick")
    specs = study.specs(StudyOptions(seeds=1, sets=(("train.steps", 7), ("model.n_embd", 32))))
    assert {s.config.train.steps for s in specs} == {7}
    assert {s.config.task.gpt["n_embd"] for s in specs if s.config.kind == "lm"} == {32}
    with pytest.raises(ValueError, match="identical: it sets what the study varies"):
        study.specs(StudyOptions(seeds=1, sets=(("placement", "pre"), ("train.warmup", 0))))
    with pytest.raises(ValueError, match="not a training setting"):
        study.specs(StudyOptions(seeds=1, sets=(("train.stepz", 7),)))


def test_study_init_writes_a_template_that_runs(tmp_path: Path, capsys: Any) -> None:
    target = tmp_path / "new.toml"
    assert run_cli("study", "init", target) == 0
    assert run_cli("study", "init", target) == 2  # never overwritten
    assert "exists" in capsys.readouterr().err
    study = load_study_file(target, sets=(("train.steps", 2), ("seeds", 1), ("sweep.norm", ["dyt"])))
    specs = study.specs(study_options(study))
    assert len(specs) == 2 and {s.config.train.steps for s in specs} == {2}
    code = run_cli(
        "study",
        target,
        "--set",
        "train.steps=2",
        "--set",
        "seeds=1",
        "--set",
        'sweep.norm=["dyt"]',
        "--set",
        "model.gpt.n_layer=1",
        "--out",
        tmp_path / "out",
        "--no-progress",
    )
    assert code == 0 and results_of(tmp_path / "out")["run_counts"]["finished"] == 2
    dropped = json.loads((tmp_path / "out" / "plan.json").read_text())["source"]["dropped_claims"]
    assert [d["id"] for d in dropped] == ["dyt-matches-layernorm", "rmsnorm-beats-layernorm"]
    assert (
        "claim dyt-matches-layernorm not evaluated: --set sweep.norm=['dyt'] leaves out"
        in capsys.readouterr().out
    )


def study_options(study: Any) -> Any:
    from normlab.studies import StudyOptions

    return StudyOptions(seeds=study.default_seeds)


def test_compare_ranks_plots_and_diagnoses(tmp_path: Path, text_file: Path, capsys: Any) -> None:
    code = run_cli(
        "compare",
        "--data",
        text_file,
        "--model",
        "gpt:n_layer=1,n_embd=16,n_head=2",
        "--norms",
        "layernorm,dyt",
        "--placements",
        "pre,peri",
        "--steps",
        "3",
        "--block-size",
        "16",
        "--batch-size",
        "4",
        "--out",
        tmp_path / "cmp",
        "--no-progress",
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "diff to best [95% CI]" in printed and "diagnostics of the final models" in printed
    cells = json.loads((tmp_path / "cmp" / "diagnostics" / "cells.json").read_text())
    assert len(cells) == 4 and all(Path(c["summary"]).is_file() for c in cells)
    assert all(
        len(
            json.loads((tmp_path / "cmp" / "diagnostics" / c["cell"] / "diagnostics.json").read_text())[
                "residual"
            ]["variance"]
        )
        == 2
        for c in cells
    )
    assert any(p.name.endswith("training_loss.png") for p in (tmp_path / "cmp" / "plots").iterdir())


def test_study_file_seeds_cap_and_interval_rules(tmp_path: Path, text_file: Path) -> None:
    from normlab.studies import Better, Rate

    claims = (
        CLAIM.format(a="rmsnorm", b="layernorm", rule="better = 0.01, level = 0.9, paired = true")
        + "\n"
        + CLAIM.replace('id = "x"', 'id = "y"').format(a="rmsnorm", b="layernorm", rule="rate_diff = 0.1")
        + '\nmetric = "diverged"\n'
    )
    path = write_study(tmp_path / "s.toml", data='text = "corpus.txt"', extra="max_seeds = 5")
    path.write_text(path.read_text() + claims)
    study = load_study_file(path)
    assert study.max_seeds == 5 and study.default_seeds == 2
    assert study.claims[0].rule == Better(lower_is_better=True, min_effect=0.01, level=0.9, paired=True)
    assert study.claims[1].rule == Rate(min_effect=0.1) and study.claims[1].metric == "diverged"
    options = study.resolve(study_options(study))
    assert (options.seeds, options.max_seeds) == (2, 5)
    assert len(study.specs(options)) == 4 and len(study.specs(replace(options, seeds=5))) == 10


# ---- bad input: one clear error, exit code 2, nothing written -----------------------------------


CLAIM = '[[claim]]\nid = "x"\na = {{ norm = "{a}" }}\nb = {{ norm = "{b}" }}\nrule = {{ {rule} }}'
OLMO_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}
BAD = [
    ("misspelt top key", {"extra": "sead = 3"}, "'sead': unknown key"),
    ("misspelt metric", {"extra": 'metric = "val_los"'}, "'val_los' is not a metric of these runs"),
    ("misspelt train key", {"train": TRAIN + "stepz = 3\n"}, "train.stepz: unknown key"),
    ("unknown norm", {"sweep": 'norm = ["layernrom"]'}, "'layernrom' is not a normlab norm"),
    ("unknown placement", {"sweep": 'placement = ["middle"]'}, "'middle' is not a placement"),
    ("sweep key no run uses", {"sweep": "model.n_layers = [1, 2]"}, "'n_layers' is not an option of gpt"),
    (
        "sweep key of another data",
        {"sweep": "data.test_fraction = [0.1]"},
        "no run of text data reads 'test_fraction'",
    ),
    (
        "placement of an hf model",
        {
            "model": 'hf = "gpt2"\nconfig = { n_embd = 16, n_layer = 1, n_head = 2 }',
            "sweep": 'placement = ["pre"]',
        },
        "placement applies to normlab's GPT",
    ),
    (
        "norm kwarg the norm lacks",
        {"sweep": 'norm = ["layernorm"]\nnorm_kwargs.alpha_init = [0.5]'},
        "cannot be built",
    ),
    ("missing data path", {"data": 'text = "nowhere.txt"'}, "data.text: 'nowhere.txt' does not exist"),
    ("two data sources", {"data": 'text = "corpus.txt"\ncorpus = "bible"'}, "needs exactly one of"),
    (
        "claim on a value not swept",
        {
            "extra": "",
            "claims": CLAIM.format(a="dyt", b="rmsnorm", rule="better = 0.0"),
        },
        "'dyt' is not a value of the sweep",
    ),
    (
        "claim rule unknown",
        {"claims": CLAIM.format(a="rmsnorm", b="layernorm", rule="faster = 1")},
        "needs exactly one of better, similar, exceeds, rate, rate_diff",
    ),
    ("seeds cap below 2", {"extra": "max_seeds = 1"}, "max_seeds: must be an int >= 2 and >= seeds = 2"),
    (
        "confidence level as a percentage",
        {"claims": CLAIM.format(a="rmsnorm", b="layernorm", rule="better = 0.01, level = 95")},
        "the confidence level must be in (0, 1)",
    ),
    (
        "rate against a value with a side b",
        {"claims": CLAIM.format(a="rmsnorm", b="layernorm", rule="rate = 0.2")},
        "an exceeds or rate rule compares side a with a value: no side b",
    ),
    (
        "rate difference beyond 1",
        {"claims": CLAIM.format(a="rmsnorm", b="layernorm", rule="rate_diff = 1.5")},
        "must be a rate in [0, 1]",
    ),
]


@pytest.mark.parametrize(("label", "change", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_study_file_is_one_error_before_any_run(
    tmp_path: Path, text_file: Path, capsys: Any, label: str, change: dict[str, str], message: str
) -> None:
    pytest.importorskip("transformers")
    kwargs = {"data": 'text = "corpus.txt"', **{k: v for k, v in change.items() if k != "claims"}}
    path = write_study(tmp_path / "s.toml", **kwargs)
    if "claims" in change:
        path.write_text(path.read_text() + change["claims"] + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_cli("study", path, "--out", out, "--no-progress") == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert_one_error(err, str(path))
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "holds no text"),
        (b"   \n\n", "holds no text"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "NUL byte"),
        (b"caf\xe9 au lait " * 20, "not UTF-8 text: byte 0xe9"),
    ],
)
def test_empty_or_binary_text_is_refused_before_training(
    tmp_path: Path, capsys: Any, content: bytes, message: str
) -> None:
    (tmp_path / "corpus.txt").write_bytes(content)
    path = write_study(tmp_path / "s.toml", data='text = "corpus.txt"')
    assert run_cli("study", path, "--out", tmp_path / "out", "--no-progress") == 2
    err = capsys.readouterr().err
    assert_one_error(err, message, "corpus.txt")
    assert not (tmp_path / "out" / "runs").exists()


def test_token_ids_outside_the_vocabulary(tmp_path: Path, capsys: Any) -> None:
    folder = tmp_path / "tok"
    folder.mkdir()
    np.full(500, 7, np.uint16).tofile(folder / "train.bin")
    np.full(100, 70, np.uint16).tofile(folder / "val.bin")
    path = write_study(tmp_path / "s.toml", data='tokens = "tok"\nvocab_size = 64')
    assert run_cli("study", path, "--out", tmp_path / "out", "--no-progress") == 2
    err = capsys.readouterr().err
    assert_one_error(err, "val.bin holds token id 70, outside the vocabulary of 64 ids")


def test_hf_token_data_beyond_the_config_vocabulary(tmp_path: Path, capsys: Any) -> None:
    pytest.importorskip("transformers")
    folder = tmp_path / "tok"
    folder.mkdir()
    np.full(500, 300, np.uint16).tofile(folder / "train.bin")
    np.full(100, 3, np.uint16).tofile(folder / "val.bin")
    path = write_study(
        tmp_path / "s.toml",
        data='tokens = "tok"',
        model='hf = "gpt2"\nconfig = { n_embd = 16, n_layer = 1, n_head = 2, vocab_size = 256 }',
    )
    assert run_cli("study", path, "--out", tmp_path / "out", "--no-progress") == 2
    assert (
        "holds token id 300, outside the vocabulary of 256 ids (vocab_size of the data)"
        in capsys.readouterr().err
    )


def test_a_conversion_that_changes_nothing_is_refused(tmp_path: Path, text_file: Path, capsys: Any) -> None:
    pytest.importorskip("transformers")
    # GPT-2 has no q/k norm: a sweep over norms at where='qk' would train the same model twice
    path = write_study(
        tmp_path / "s.toml",
        data='text = "corpus.txt"',
        sweep='norm = ["dyt"]\nnorm_kwargs.where = ["qk"]',
        model='hf = "gpt2"\nconfig = { n_embd = 16, n_layer = 1, n_head = 2 }',
    )
    assert run_cli("study", path, "--out", tmp_path / "out", "--no-progress") == 2
    err = capsys.readouterr().err
    assert_one_error(err, "norm='dyt' changes nothing", "GPT2LMHeadModel")
    assert not (tmp_path / "out" / "runs").exists()


def test_a_parameterless_layernorm_is_converted(tmp_path: Path, text_file: Path) -> None:
    pytest.importorskip("transformers")
    from normlab.convert.zoo import build_hf_lm

    # OLMo's LayerNorm has no parameters and hard-codes eps=1e-5: it is read by probing
    model = build_hf_lm(
        {"config": {"model_type": "olmo", **OLMO_CONFIG}, "norm": "dyt"}, vocab_size=64, block_size=8
    )
    kinds = {type(m).__name__ for m in model.modules()}
    assert "DyT" in kinds and "OlmoLayerNorm" not in kinds


def test_an_existing_study_is_never_overwritten(tmp_path: Path, text_file: Path, capsys: Any) -> None:
    path = write_study(tmp_path / "s.toml", data='text = "corpus.txt"', sweep='norm = ["rmsnorm"]')
    assert run_cli("study", path, "--out", tmp_path / "out", "--no-progress", "--set", "seeds=1") == 0
    before = (tmp_path / "out" / "runs" / "sweep.norm-rmsnorm-s0" / "final.pt").read_bytes()
    assert run_cli("study", path, "--out", tmp_path / "out", "--no-progress") == 2
    assert "already holds a study" in capsys.readouterr().err
    assert run_cli("study", path, "--out", tmp_path / "out", "--resume", "--no-progress") == 2  # seeds=2 now
    assert "planned differently" in capsys.readouterr().err
    assert (tmp_path / "out" / "runs" / "sweep.norm-rmsnorm-s0" / "final.pt").read_bytes() == before
    text_file.write_text(TEXT + "one more line\n")  # the data changed: no resume mixes two corpora
    assert run_cli("study", path, "--out", tmp_path / "out", "--resume", "--set", "seeds=1") == 2
    assert "planned on other data" in capsys.readouterr().err


def test_study_from_dict_errors_name_the_document() -> None:
    with pytest.raises(StudyFileError, match=r"^mydoc: \[data\]: missing"):
        study_from_dict({"name": "x", "model": {"gpt": {}}, "train": {}}, where="mydoc")


# ---- resume after SIGKILL ---------------------------------------------------------------------


def test_sigkill_of_a_user_study_then_resume(tmp_path: Path, text_file: Path) -> None:
    path = write_study(
        tmp_path / "s.toml",
        data='text = "corpus.txt"',
        sweep='norm = ["layernorm", "dyt"]',
        train="steps = 40\nbatch_size = 4\nlr = 3e-3\nblock_size = 16\nckpt_every = 5\nlog_every = 1\n",
    )
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NORMLAB_KERNELS": "0"}
    cmd = [sys.executable, "-m", "normlab.cli", "study", str(path), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = out / "runs" / "sweep.norm-layernorm-s1" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 180
        while not (
            second.is_file() and any(r["kind"] == "train" and r["step"] >= 12 for r in read_jsonl(second))
        ):
            assert proc.poll() is None, "the study ended before it could be killed"
            assert time.monotonic() < deadline, "the study made no progress"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert (out / "runs" / "sweep.norm-layernorm-s0" / "result.json").is_file()
    assert not (out / "runs" / "sweep.norm-layernorm-s1" / "result.json").exists()
    subprocess.run([*cmd, "--resume"], env=env, check=True, timeout=300, stdout=subprocess.DEVNULL)
    results = results_of(out)
    assert results["run_counts"] == {"finished": 4, "unfinished": 0, "failed": 0}
    resumed = [r for r in read_jsonl(second) if r["kind"] == "resume"]
    assert resumed and resumed[0]["step"] % 5 == 0 and resumed[0]["step"] >= 10
    steps = [r["step"] for r in read_jsonl(second) if r["kind"] == "train"]
    assert steps == list(range(1, 41))


# ---- statistics --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [
        (0.975, 1, 12.7062047),
        (0.975, 2, 4.30265273),
        (0.975, 10, 2.22813885),
        (0.95, 3, 2.35336343),
        (0.995, 4.5, 4.3060000),
        (0.975, 1e7, 1.95996398),
    ],
)
def test_t_quantiles_match_the_tables(p: float, df: float, expected: float) -> None:
    if df == 4.5:  # no printed table: check the inverse instead
        from normlab.studies.stats import t_cdf

        assert t_cdf(t_ppf(p, df), df) == pytest.approx(p, abs=1e-12)
        return
    assert t_ppf(p, df) == pytest.approx(expected, abs=1e-6)
    assert t_ppf(1 - p, df) == pytest.approx(-expected, abs=1e-6)


def test_welch_interval() -> None:
    diff, lo, hi = welch_interval([1.0, 2.0, 3.0], [2.0, 4.0, 6.0, 8.0]) or (0, 0, 0)
    # se^2 = 1/3 + 20/3/4 = 2; df = 4 / ((1/9)/2 + (25/9)/3) = 4.0751...
    assert diff == -3.0 and hi - diff == pytest.approx(t_ppf(0.975, 4 / (1 / 18 + 25 / 27)) * 2**0.5)
    assert lo < diff < hi
    assert welch_interval([1.0], [2.0, 3.0]) is None
