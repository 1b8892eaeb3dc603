"""A norm owns its facts: a new norm is one class (and its registration) and then converts, sits in
every placement and trains, with its training hooks run, without an edit anywhere else."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import normlab
from normlab.data import TextCorpus
from normlab.norms import NORMS, NormMixin, NormSpec, register_norm
from normlab.norms._info import NEW, ZERO_MEAN, NormInfo, NotConvertibleError
from normlab.train import LMRuntime, LMTask, RunConfig, TrainConfig, train

TEXT = "the quick brown fox jumps over the lazy dog, " * 4  # 162 training characters: 5 steps of 4 x 8


class ScaleNorm(NormMixin, nn.Module):
    """ScaleNorm (Nguyen & Salazar 2019, arXiv:1910.05895): ``g * x / ||x||`` with one learned ``g``;
    it counts the optimizer steps and epochs it is told about."""

    spec = NormSpec(paper="Nguyen & Salazar 2019, arXiv:1910.05895", example_kwargs={})

    def __init__(
        self, num_features: int, *, eps: float = 1e-5, device: Any = None, dtype: Any = None
    ) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.g = nn.Parameter(torch.full((1,), num_features**0.5, device=device, dtype=dtype))
        self.steps = self.epochs = 0

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return self.g * x / x.norm(dim=-1, keepdim=True).clamp_min(self.eps)

    @classmethod
    def conversion_relation(cls, info: NormInfo, kwargs: Mapping[str, Any]) -> str:
        return ZERO_MEAN if info.kind == "rmsnorm" and info.weight is None else NEW

    def after_step(self) -> bool:
        self.steps += 1
        return True

    def on_epoch_end(self) -> bool:
        self.epochs += 1
        return True


@pytest.fixture
def scalenorm() -> Iterator[type[ScaleNorm]]:
    register_norm("test_scalenorm")(ScaleNorm)
    try:
        yield ScaleNorm
    finally:
        NORMS.unregister("test_scalenorm")


@pytest.mark.usefixtures("scalenorm")
def test_a_new_norm_converts_without_edits_elsewhere() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.RMSNorm(8, elementwise_affine=False))
    report = normlab.convert_norms(model, "test_scalenorm")
    assert [r.target for r in report.replaced] == ["ScaleNorm", "ScaleNorm"]
    assert [r.relation for r in report.replaced] == [NEW, ZERO_MEAN]
    assert report.replaced[0].options == {"eps": 1e-5}  # eps mirrored: it has one in its signature
    assert model(torch.randn(3, 8)).shape == (3, 8)
    normlab.convert.revert(model, report)
    assert type(model[1]) is nn.LayerNorm


@pytest.mark.usefixtures("scalenorm")
@pytest.mark.parametrize("placement", normlab.list_placements())
def test_a_new_norm_sits_in_every_placement(placement: str) -> None:
    from normlab.models import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, norm="test_scalenorm",
                          placement=placement))  # fmt: skip
    assert any(isinstance(m, ScaleNorm) for m in model.modules())
    assert model(torch.randint(0, 11, (2, 6))).logits.isfinite().all()


@pytest.mark.usefixtures("scalenorm")
def test_a_new_norm_trains_and_its_hooks_run(tmp_path: Path) -> None:
    gpt = {"n_layer": 1, "n_embd": 8, "n_head": 2, "norm": "test_scalenorm"}
    task = LMTask(block_size=8, gpt=gpt, eval_batches=1, eval_batch_size=2, probes=())
    config = RunConfig(task=task, train=TrainConfig(steps=5, batch_size=4, lr=1e-2, ckpt_every=0))
    runtime = LMRuntime(task, TextCorpus.from_text(TEXT), seed=0, batch_size=4)
    model: list[nn.Module] = []
    build = runtime.build_model
    runtime.build_model = lambda: model.append(build()) or model[0]  # type: ignore[method-assign]
    summary = train(config, tmp_path, task=runtime)
    norms = [m for m in model[0].modules() if isinstance(m, ScaleNorm)]
    assert len(norms) == 3 and summary["steps"] == 5
    assert runtime.steps_per_epoch == 5
    assert all(n.steps == 5 and n.epochs == 1 for n in norms)


def test_from_info_builds_a_norm_that_mirrors_a_foreign_one() -> None:
    from normlab.convert import read_norm

    source = nn.GroupNorm(4, 16, eps=1e-3, dtype=torch.float64)
    gn = normlab.GroupNorm.from_info(read_norm(source))
    assert isinstance(gn, normlab.GroupNorm) and (gn.num_groups, gn.num_channels, gn.eps) == (4, 16, 1e-3)
    assert gn.weight is not None and gn.weight.dtype == torch.float64
    rms = normlab.RMSNorm.from_info(read_norm(nn.LayerNorm(8, eps=1e-6)), eps_mode="outside")
    assert isinstance(rms, normlab.RMSNorm) and rms.eps == 1e-6 and rms.eps_mode == "outside"
    with pytest.raises(NotConvertibleError, match="GroupNorm normalizes dimension 1"):
        normlab.GroupNorm.from_info(read_norm(nn.LayerNorm(8)))
