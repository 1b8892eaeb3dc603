"""The dyt and batchless studies: grids, their probes' known answers, tiny end-to-end runs,
and DyT's frozen-alpha option (Zhu et al. 2025, arXiv:2503.10622; Berger & Uc Cetina 2022,
arXiv:2212.14729)."""

from __future__ import annotations

import dataclasses
import gzip
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import normlab
from normlab.data import images as images_mod
from normlab.models import GPT, ConvNet, ConvNetConfig, GPTConfig
from normlab.studies import RunSpec, StudyOptions, get_study, grid, run_study
from normlab.studies import batchless as bl_study
from normlab.studies import dyt as dyt_study
from normlab.train import ImageTask, LMTask, RunConfig

pytestmark = pytest.mark.usefixtures("one_thread_plain_torch")

# the grid with its 2 start seeds and no sequential seeding (tested in test_verdict_stats)
FIXED_SEEDS = StudyOptions(max_seeds=2)


@pytest.fixture
def data_dir(data_dir: Path) -> Path:
    """conftest's tiny Shakespeare, and Fashion-MNIST as four tiny IDX files."""
    root = data_dir
    folder = root / "fashion-mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    y_train, y_test = rng.integers(0, 10, 64), rng.integers(0, 10, 16)
    y_train[:10] = np.arange(10)
    arrays = (rng.integers(0, 256, (64, 28, 28)), y_train, rng.integers(0, 256, (16, 28, 28)), y_test)
    for (name, _), arr in zip(images_mod.FASHION_FILES.values(), arrays, strict=True):
        header = b"\x00\x00\x08" + bytes([arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
        with gzip.open(folder / name, "wb") as f:
            f.write(header + arr.astype(np.uint8).tobytes())
    return root


# --------------------------------------------------------------------------------------------
# DyT(learnable_alpha=False)


def test_dyt_frozen_alpha_is_a_buffer_under_the_same_key() -> None:
    torch.manual_seed(0)
    learned = normlab.DyT(8, alpha_init=0.7)
    frozen = normlab.DyT(8, alpha_init=0.7, learnable_alpha=False)
    assert "alpha" in dict(learned.named_parameters())
    assert "alpha" not in dict(frozen.named_parameters()) and "alpha" in dict(frozen.named_buffers())
    assert list(frozen.state_dict()) == list(learned.state_dict())
    assert "learnable_alpha=False" in repr(frozen) and "learnable_alpha" not in repr(learned)
    assert learned.weight is not None
    with torch.no_grad():
        learned.alpha.fill_(0.3)
        learned.weight.uniform_()
    frozen.load_state_dict(learned.state_dict())  # checkpoints move both ways
    assert float(frozen.alpha) == pytest.approx(0.3)
    x = torch.randn(4, 5, 8, requires_grad=True)
    torch.testing.assert_close(frozen(x), learned(x))
    frozen(x).square().sum().backward()
    assert x.grad is not None and frozen.weight is not None and frozen.weight.grad is not None
    opt = torch.optim.SGD(frozen.parameters(), lr=1.0)
    opt.step()
    assert float(frozen.alpha) == pytest.approx(0.3)  # never trained
    frozen.reset_parameters()
    assert float(frozen.alpha) == pytest.approx(0.7)


def test_frozen_alpha_reaches_every_dyt_of_a_gpt() -> None:
    cfg = GPTConfig(
        vocab_size=32, block_size=8, n_layer=2, n_embd=16, n_head=2, norm="dyt",
        norm_kwargs={"learnable_alpha": False},
    )  # fmt: skip
    model = GPT(cfg)
    dyts = [m for m in model.modules() if isinstance(m, normlab.DyT)]
    assert len(dyts) == 5 and all(not d.learnable_alpha for d in dyts)
    assert not any(name.endswith("alpha") for name, _ in model.named_parameters())
    assert model.embed_scale is not None  # the rest of the DyT recipe is unchanged


# --------------------------------------------------------------------------------------------
# Grids


def test_dyt_grid_is_well_formed() -> None:
    study = get_study("dyt")
    specs = study.specs(StudyOptions())
    assert len(specs) == 10 and {s.seed for s in specs} == {0, 1}
    by_variant = {s.params["variant"]: s.config for s in specs if s.seed == 0}
    assert set(by_variant) == {"layernorm", "rmsnorm", "dyt", "dyt-frozen", "identity"}
    trains = {dataclasses.replace(c.train, seed=0) for c in by_variant.values()}
    assert len(trains) == 1  # same optimization everywhere
    gpts = {v: dict(c.task.gpt) for v, c in by_variant.items() if isinstance(c.task, LMTask)}
    assert all(g["placement"] == "pre" for g in gpts.values())
    assert gpts["dyt"]["norm_kwargs"] == {"alpha_init": 6.25}  # 1 / (sqrt(64) * 0.02)
    assert gpts["dyt-frozen"]["norm_kwargs"] == {"alpha_init": 6.25, "learnable_alpha": False}
    assert gpts["identity"] == {**gpts["layernorm"], "norm": "identity", "embed_scale": True}
    probes = {v: c.task.probes for v, c in by_variant.items()}
    assert probes["dyt"] == ("residual", "dyt_alpha") and probes["layernorm"] == ("residual",)
    assert {c.id for c in study.claims} >= {"dyt-vs-layernorm", "tanh-needed", "alpha-needed"}
    with pytest.raises(ValueError, match="variant must be one of"):
        dyt_study._make(StudyOptions())(seed=0, variant="batchnorm")


def test_batchless_grid_is_well_formed() -> None:
    study = get_study("batchless")
    specs = study.specs(StudyOptions())
    assert len(specs) == 10
    for s in specs:
        assert s.config.train.batch_size == 32  # equal effective batch everywhere
        assert s.config.train.accum_steps == 32 // s.params["micro"]
        assert isinstance(s.config.task, ImageTask)
        assert s.config.task.eval_batch_size == s.params["micro"]  # the probes see one micro-batch
        assert s.config.task.convnet["norm"] == s.params["norm"]
    assert {(s.params["norm"], s.params["micro"]) for s in specs} == {
        ("batchless", 32),
        ("batchless", 1),
        ("batchnorm", 32),
        ("batchnorm", 1),
        ("groupnorm", 32),
    }
    with pytest.raises(ValueError, match="micro must divide 32"):
        bl_study._make(StudyOptions())(seed=0, norm="batchless", micro=5)


# --------------------------------------------------------------------------------------------
# Probes with known answers


class _Scaled(nn.Module):
    """``sum_i DyT_i(s_i x)``: the input of DyT ``i`` has exactly ``s_i`` times the std of ``x``."""

    def __init__(self, scales: list[float], alphas: list[float]) -> None:
        super().__init__()
        self.scales = scales
        self.norms = nn.ModuleList(normlab.DyT(4, alpha_init=a) for a in alphas)

    def forward(self, x: Tensor) -> Tensor:
        return sum((n(s * x) for s, n in zip(self.scales, self.norms, strict=True)), torch.zeros(()))


def test_alpha_probe_gives_the_correlation_with_inverse_std() -> None:
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    scales = [0.5, 1.0, 2.0, 4.0]
    std = float(x.double().std())
    tracks = dyt_study.dyt_alpha_probe(_Scaled(scales, [1 / s for s in scales]), x)
    assert tracks["dyt_alpha_r"] == pytest.approx(1.0, abs=1e-9)
    assert tracks["dyt_inv_std"] == pytest.approx([1 / (s * std) for s in scales], rel=1e-5)
    assert tracks["dyt_alpha"] == pytest.approx([1 / s for s in scales], rel=1e-6)
    against = dyt_study.dyt_alpha_probe(_Scaled(scales, scales), x)
    assert against["dyt_alpha_r"] < -0.8
    assert dyt_study.dyt_alpha_probe(nn.Linear(4, 4), x) == {}
    assert dyt_study.alpha_inv_std_r([], {"probe": tracks}) == pytest.approx(1.0)
    assert dyt_study.alpha_inv_std_r([], {"probe": {}}) is None


def test_peak_allocated_bytes_matches_known_allocations() -> None:
    mib = 1 << 20
    kept = torch.empty(mib // 4)  # allocated before: not counted

    def sequential() -> Tensor:
        a = torch.empty(mib // 4)  # 1 MiB of float32
        del a
        b = torch.empty(mib // 4)
        c = torch.empty(mib // 8)  # 0.5 MiB, while b is alive
        return b.clone() if c.numel() else b

    def at_once() -> tuple[Tensor, Tensor]:
        return torch.empty(mib // 2), torch.empty(mib // 2)  # 2 MiB each, both alive

    peak, out = bl_study.peak_allocated_bytes(sequential)
    assert peak == 2.5 * mib and out.numel() == mib // 4  # b, c and the clone at once
    peak, _ = bl_study.peak_allocated_bytes(at_once)
    assert peak == 4 * mib
    assert bl_study.peak_allocated_bytes(lambda: kept.add_(1))[0] < 1024  # in place: nothing big


@pytest.mark.parametrize(("norm", "exact"), [("batchless", True), ("groupnorm", True), ("batchnorm", False)])
def test_step_probes_on_a_convnet(norm: str, exact: bool) -> None:
    torch.manual_seed(0)
    model = ConvNet(ConvNetConfig(widths=(4, 8), depth=1, norm=norm)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 1, 12, 12)
    err = bl_study.accum_exactness_probe(model, x)["accum_grad_rel_err"]
    assert (err < 1e-5) if exact else (err > 1e-3), err
    assert bl_study.accum_exactness_probe(model, x[:1]) == {}
    one = bl_study.step_memory_probe(model, x[:1])
    eight = bl_study.step_memory_probe(model, x)
    assert one["step_micro_batch"] == 1 and eight["step_micro_batch"] == 8
    assert 0 < one["step_peak_mib"] < eight["step_peak_mib"]
    # activations of 8 images at 12 x 12 x 4 channels are at least 8 x 576 floats
    assert eight["step_peak_mib"] * (1 << 20) > 8 * 576 * 4
    # the probes train a copy: the run's model, its mode and its gradients are untouched
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------
# Tiny end-to-end runs


def _shrunk_lm(options: StudyOptions) -> Any:
    make = dyt_study._make(options)

    def small(*, seed: int, variant: str) -> RunConfig:
        config = make(seed=seed, variant=variant)
        assert isinstance(config.task, LMTask)
        gpt = {**config.task.gpt, "n_layer": 2, "n_embd": 16, "n_head": 2}
        task = dataclasses.replace(config.task, gpt=gpt, block_size=16, eval_batches=1, eval_batch_size=4)
        small_config: RunConfig = dataclasses.replace(config, task=task)
        return small_config.with_train(steps=4, batch_size=4, warmup=1, eval_every=2)

    return small


def test_dyt_study_end_to_end_on_a_toy_text(tmp_path: Path, data_dir: Path) -> None:
    def small_grid(options: StudyOptions) -> list[RunSpec]:
        return grid("lm", _shrunk_lm(options), seeds=options.seed_list, variant=list(dyt_study.VARIANTS))

    study = dataclasses.replace(get_study("dyt"), grid=small_grid)
    out = tmp_path / "dyt"
    results = run_study(
        study, out, options=FIXED_SEEDS, data_dir=data_dir, progress=False, plots=False, echo=lambda s: None
    )
    assert results["run_counts"] == {"finished": 10, "unfinished": 0, "failed": 0}
    assert [c["id"] for c in results["claims"]] == [c.id for c in study.claims]
    cells = results["cells"]
    r = cells["lm.variant-dyt"]["metrics"]["alpha_inv_std_r"]
    assert r["n"] == 2 and all(-1.0 <= v <= 1.0 for v in r["values"])
    assert "alpha_inv_std_r" not in cells["lm.variant-layernorm"]["metrics"]
    frozen = next(v for k, v in results["runs"].items() if k.startswith("lm.variant-dyt-frozen"))
    assert frozen["probe"]["dyt_alpha"] == [6.25] * 5  # the study's alpha0, never trained
    assert (out / "report.md").is_file()


def test_batchless_study_end_to_end_on_toy_images(tmp_path: Path, data_dir: Path) -> None:
    def small(*, seed: int, norm: str, micro: int) -> RunConfig:
        config = bl_study._make(StudyOptions(images="fashion-mnist"))(seed=seed, norm=norm, micro=micro * 8)
        assert isinstance(config.task, ImageTask)
        convnet = {**config.task.convnet, "widths": (4, 4)}
        task = dataclasses.replace(config.task, n_train=48, n_test=8, eval_batch_size=micro, convnet=convnet)
        small_config: RunConfig = dataclasses.replace(config, task=task)
        return small_config.with_train(steps=2, batch_size=4, accum_steps=4 // micro)

    def small_grid(options: StudyOptions) -> list[RunSpec]:
        specs = grid("img", small, seeds=options.seed_list, norm=["batchless", "batchnorm"], micro=[4, 1])
        # the claims select micro-batches of 32 and 1: relabel the batch cells
        return [
            dataclasses.replace(s, params={**s.params, "micro": 32 if s.params["micro"] == 4 else 1})
            for s in specs
        ]

    claims = tuple(c for c in bl_study.CLAIMS if "groupnorm" not in str(c.to_dict()))
    study = dataclasses.replace(get_study("batchless"), grid=small_grid, claims=claims)
    out = tmp_path / "batchless"
    results = run_study(
        study, out, options=FIXED_SEEDS, data_dir=data_dir, progress=False, plots=False, echo=lambda s: None
    )
    assert results["run_counts"] == {"finished": 8, "unfinished": 0, "failed": 0}
    metrics = {k: v["metrics"] for k, v in results["cells"].items()}
    whole, micro1 = metrics["img.norm-batchless.micro-4"], metrics["img.norm-batchless.micro-1"]
    assert micro1["step_peak_mib"]["mean"] < whole["step_peak_mib"]["mean"]
    assert whole["accum_grad_rel_err"]["max"] < 1e-5
    assert metrics["img.norm-batchnorm.micro-4"]["accum_grad_rel_err"]["min"] > 1e-3
    assert "accum_grad_rel_err" not in micro1  # a batch of 1 has nothing to compare
    # exact accumulation: the same seed trains the same Batchless model at either micro-batch
    assert whole["test_acc"]["values"] == pytest.approx(micro1["test_acc"]["values"], abs=1e-9)
    verdicts = {c["id"]: c["verdict"] for c in results["claims"]}
    assert verdicts["batchless-grad-exact"] == "reproduced"
    assert all(math.isfinite(whole[m]["mean"]) for m in ("test_acc", "train_loss"))
