"""A torchtitan-style Llama with its RMSNorms swapped for normlab norms, trained as torchtitan does:
tensor + sequence parallel (``parallelize_module`` with torchtitan's plan) and FSDP2
(``fully_shard`` per block, then the root), on 2 gloo processes; each equals one process.

The model is written here the way torchtitan's ``llama3/model.py`` is (``tok_embeddings``,
``layers`` as a ModuleDict of blocks with ``attention_norm``/``ffn_norm``, ``norm``, ``output``),
small enough for CPU. The README's "FSDP2, tensor and sequence parallel" section shows the same steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normlab
from normlab.convert import convert_norms
from test_distributed import spawn_pair

pytestmark = pytest.mark.distributed

WORLD = 2
DIM, HEADS, LAYERS, VOCAB, SEQ, BATCH = 32, 4, 2, 64, 8, 4
NORMS = ("rmsnorm", "layernorm", "dyt", "derf")


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head_dim = DIM // HEADS
        self.wq, self.wk, self.wv = (nn.Linear(DIM, DIM, bias=False) for _ in range(3))
        self.wo = nn.Linear(DIM, DIM, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds HEADS / tp of them (as torchtitan)
        q, k, v = (w(x).view(b, t, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(DIM, 2 * DIM, bias=False), nn.Linear(DIM, 2 * DIM, bias=False)
        self.w2 = nn.Linear(2 * DIM, DIM, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(DIM, eps=1e-5), nn.RMSNorm(DIM, eps=1e-5)
        self.attention, self.feed_forward = Attention(), FeedForward()

    def forward(self, x: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleDict({str(i): TransformerBlock() for i in range(LAYERS)})
        self.norm = nn.RMSNorm(DIM, eps=1e-5)
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h)
        return self.output(self.norm(h))


def build(norm: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer()
    convert_norms(model, norm)  # every RMSNorm -> the normlab norm, in place
    with torch.no_grad():  # non-trivial norm parameters, so a wrong parameter gradient shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return tokens, torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def loss_of(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def tensor_parallel(model: Transformer, mesh: Any) -> Transformer:
    """torchtitan's plan: column/row-parallel linears, the norms sequence parallel (Shard(1))."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    parallelize_module(
        model,
        mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
        },
    )
    into_block = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    for block in model.layers.values():
        plan = {
            "attention_norm": SequenceParallel(),
            "attention": into_block,
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": into_block,
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w3": ColwiseParallel(),
        }
        parallelize_module(block, mesh, plan)  # type: ignore[arg-type]
    return model


def full(t: Tensor) -> Tensor:
    value = getattr(t, "full_tensor", None)
    return (value() if callable(value) else t).detach().clone()


def rank_main(rank: int, out: Path) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.profiler import profile

    mesh = init_device_mesh("cpu", (WORLD,))
    tokens, targets = data()
    results: dict[str, Any] = {}
    for norm in NORMS:
        model = tensor_parallel(build(norm), mesh)
        with profile() as prof:
            loss = loss_of(model(tokens), targets)
            loss.backward()
        grads = {n: full(p.grad) for n, p in model.named_parameters() if "norm" in n and p.grad is not None}
        results["tp", norm] = {
            "loss": float(loss.detach()),
            "norm_grads": grads,
            "ops": sorted({e.name for e in prof.events() if e.name.startswith("normlab::")}),
        }
        model = build(norm)
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        for _ in range(2):
            opt.zero_grad()
            loss_of(model(tokens[rows]), targets[rows]).backward()
            opt.step()
        results["fsdp", norm] = {n: full(p) for n, p in model.named_parameters()}
    return results


def test_a_torchtitan_style_llama_with_normlab_norms_under_tp_sp_and_fsdp(tmp_path: Path) -> None:
    fused = normlab.kernels.build()
    ranks = spawn_pair(tmp_path, rank_main, deadline_s=120.0)
    tokens, targets = data()
    for norm in NORMS:
        model = build(norm)
        assert not any(type(m) is nn.RMSNorm for m in model.modules())  # all swapped
        loss = loss_of(model(tokens), targets)
        loss.backward()
        got = ranks[0]["tp", norm]
        assert got["loss"] == pytest.approx(float(loss.detach()), rel=1e-6), norm
        for name, p in model.named_parameters():
            if "norm" in name:
                assert p.grad is not None
                torch.testing.assert_close(got["norm_grads"][name], p.grad, rtol=1e-5, atol=1e-6)
        if fused:  # the sequence-parallel norms ran normlab's fused ops on their shards
            forward = {"dyt": "dyt", "derf": "derf", "rmsnorm": "rms_norm"}.get(norm, "layer_norm")
            assert f"normlab::{forward}" in got["ops"] and f"normlab::{forward}_backward" in got["ops"]

        reference = build(norm)
        opt = torch.optim.SGD(reference.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            for half in range(WORLD):  # the reduce-scatter's mean of the two halves' gradients
                rows = slice(half * BATCH // WORLD, (half + 1) * BATCH // WORLD)
                (loss_of(reference(tokens[rows]), targets[rows]) / WORLD).backward()
            opt.step()
        for name, p in reference.named_parameters():
            torch.testing.assert_close(ranks[0]["fsdp", norm][name], p.detach(), rtol=1e-5, atol=1e-6)
