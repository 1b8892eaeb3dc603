"""One reading of a model's structure (normlab.structure) for conversion and diagnostics alike."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import normlab
from normlab.diagnostics import diagnose, lm_inputs
from normlab.models import GPT, GPTConfig
from normlab.structure import BlockStack, find_blocks


class HeadNorms(nn.Module):
    """Per-head q/k norms held in a ModuleList, as StableLM's ``qk_layernorm``."""

    def __init__(self, heads: int, d: int) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(heads))


class Expert(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)


class Layer(nn.Module):
    """A pre-norm block with per-head norms (many) and an MoE of experts (many, most parameters)."""

    def __init__(self, d: int = 8, heads: int = 6, experts: int = 5) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(d)
        self.q_norm = HeadNorms(heads, d // 2)
        self.experts = nn.ModuleList(Expert(d) for _ in range(experts))

    def forward(self, x: Tensor) -> Tensor:
        h = self.input_layernorm(x)
        return x + sum(e.down(torch.relu(e.up(h))) for e in self.experts)


class Decoder(nn.Module):
    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 8)
        self.layers = nn.ModuleList(Layer() for _ in range(n))
        self.norm = nn.LayerNorm(8)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def test_the_stack_is_the_layers_not_the_head_norms_or_the_experts() -> None:
    model = Decoder()
    stack = find_blocks(model)
    assert stack.name == "layers" and stack.names == ["layers.0", "layers.1", "layers.2"]
    assert stack.depth_of("layers.2.q_norm.norms.4") == 2 and stack.depth_of("norm") is None
    report = normlab.convert_norms(model, "rmsnorm", where="1-2", dry_run=True)
    assert {r.depth for r in report.replaced} == {1, 2} and report.blocks == stack
    assert all(r.name.startswith(("layers.1.", "layers.2.")) for r in report.replaced)
    assert len(report.replaced) == 2 * (1 + 6)  # per block: the input norm and the six head norms


def test_conversion_and_diagnostics_number_the_same_blocks() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=17, block_size=8, n_layer=3, n_head=2, n_embd=8))
    stack = find_blocks(model)
    report = normlab.convert_norms(model, "rmsnorm", where="2", dry_run=True)
    diagnosis = diagnose(model, lm_inputs(model, torch.randint(0, 17, (2, 9))), removal=False)
    assert diagnosis.model.block_names == stack.names == ["blocks.0", "blocks.1", "blocks.2"]
    assert {r.depth for r in report.replaced} == {2}
    one = GPT(GPTConfig(vocab_size=17, block_size=8, n_layer=1, n_head=2, n_embd=8))
    assert find_blocks(one).names == ["blocks.0"]  # one block under the conventional name


class BasicBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bn(self.conv(x))


def test_resnet_blocks_are_numbered_across_stages_for_both() -> None:
    model = nn.Sequential()
    model.add_module("layer1", nn.Sequential(BasicBlock(4), BasicBlock(4)))
    model.add_module("layer2", nn.Sequential(BasicBlock(4)))
    stack = find_blocks(model)
    assert isinstance(stack, BlockStack) and stack.name == "layer1+layer2"
    assert stack.names == ["layer1.0", "layer1.1", "layer2.0"] and len(stack) == 3
    report = normlab.convert_norms(model, "groupnorm", where="1-2", num_groups=2, dry_run=True)
    assert [r.name for r in report.replaced] == ["layer1.1.bn", "layer2.0.bn"]


def test_no_stack_is_none_or_an_error_as_asked() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2), nn.LayerNorm(2))
    assert find_blocks(model, required=False) is None
    with pytest.raises(ValueError, match="no residual blocks found in Sequential"):
        find_blocks(model)
    report = normlab.convert_norms(model, "rmsnorm", where="2", dry_run=True)  # a name pattern then
    assert [r.name for r in report.replaced] == ["2"]
