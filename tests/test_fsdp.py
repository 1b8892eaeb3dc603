"""FSDP2 (``fully_shard``, 2 gloo processes on CPU) trains like one process on the global batch.

One spawned pair runs everything and reports back; this process computes the references:

- every norm a transformer block accepts, in every placement, sharded per block and at the root,
  3 steps of SGD and of AdamW (fused kernels on): the reference is one process on the same
  global batch, its gradient taken as the mean of the two halves' (the reduce-scatter's order of
  operations, so the comparison measures FSDP, not float summation order);
- ``reshard_after_forward=False`` and a bf16 ``MixedPrecisionPolicy`` on a subset;
- the Trainer with ``dist="fsdp"`` (LM and ConvNet runs, gradient clipping, accumulation, BatchNorm
  in sync mode) against single-process training, and sharded checkpoints: a crashed run resumes
  bit for bit on 2 processes, and on 1 process (another process count).

Run with ``-s`` to see the measured differences.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import normlab
from normlab.models import GPT, GPTConfig
from normlab.studies import RunSpec, get_study
from normlab.studies.runner import _run_one_distributed, run_study
from normlab.train import LMTask, RunConfig, TrainConfig, train
from normlab.train import distributed as nd
from normlab.train.strategy import FullyShard
from test_blocks import PLACEMENTS, TOKEN_NORMS, spec_kwargs
from test_distributed import (
    SGD,
    TINY_GPT,
    final_state,
    image_config,
    lm_config,
    lm_runtime,
    max_diff,
    records,
    runtime_for,
    spawn_pair,
)

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 3
GLOBAL_BATCH = 8
OPTIMIZERS = ("sgd", "adamw")
NO_RESHARD = [(n, p) for n in ("layernorm", "dyt", "batchless") for p in ("pre", "post", "deepnorm")]
BF16 = [(n, "pre") for n in ("rmsnorm", "dyt", "derf", "layernorm")]
WHOLE_MODEL = [(n, p) for n in ("rmsnorm", "dyt", "batchless") for p in ("pre", "peri", "mixln")]

DYT_LM = RunConfig(
    task=LMTask(block_size=16, gpt={**TINY_GPT, "norm": "dyt"}, eval_batches=2, eval_batch_size=4),
    train=TrainConfig(steps=4, batch_size=8, log_every=1, eval_every=2, **SGD),
)
TRAINER_CASES: dict[str, RunConfig] = {
    "lm-sgd": lm_config(ckpt_every=2, **SGD),
    "lm-sgd-clip-accum2": lm_config(accum_steps=2, grad_clip=0.05, **SGD),
    "lm-dyt-sgd": DYT_LM,
    "convnet-batchnorm-sync": image_config("batchnorm"),
    "convnet-batchless": image_config("batchless"),
}
RESUME_CASE = lm_config(dropout=0.1, steps=6, ckpt_every=2)
ONE_PROCESS_CASE = lm_config(steps=4, ckpt_every=2, **SGD)


class CrashAtError(Exception):
    pass


def crash_after(step_no: int) -> Any:
    def on_step(step: int) -> None:
        if step == step_no:
            raise CrashAtError

    return on_step


# ------------------------------------------------------------------------------------------------
# the model sweep, computed identically by the ranks and by the reference


def build_gpt(norm: str, placement: str) -> GPT:
    torch.manual_seed(0)
    kwargs = spec_kwargs(norm)
    if norm in ("groupnorm", "evonorm_s0"):
        kwargs["num_groups"] = 4  # the spec's example (3 groups) does not divide 32 channels
    cfg = GPTConfig(
        vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, norm=norm, placement=placement,
        norm_kwargs=kwargs,
    )  # fmt: skip
    return GPT(cfg)


def global_batch(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 64, (GLOBAL_BATCH, 16), generator=g), torch.randint(
        0, 64, (GLOBAL_BATCH, 16), generator=g
    )


def make_opt(kind: str, net: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(net.parameters(), lr=0.1, foreach=False)
    return torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)


def half_loss(net: torch.nn.Module, step: int, half: int) -> Tensor:
    idx, tgt = global_batch(step)
    rows = slice(half * GLOBAL_BATCH // WORLD, (half + 1) * GLOBAL_BATCH // WORLD)
    out = net(idx[rows], tgt[rows])
    return out.loss + normlab.total_aux_loss(net)


def full_params(net: torch.nn.Module) -> dict[str, Tensor]:
    out = {}
    for name, p in net.named_parameters():
        value = p.detach()
        full = getattr(value, "full_tensor", None)
        out[name] = (full() if callable(full) else value).float().clone()
    return out


def sharded_run(ctx: nd.Context, norm: str, placement: str, opt_kind: str, **fsdp: Any) -> dict[str, Tensor]:
    net = FullyShard(ctx, **fsdp).prepare(build_gpt(norm, placement))
    opt = make_opt(opt_kind, net)
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        half_loss(net, step, ctx.rank).backward()
        opt.step()
    return full_params(net)


def reference_run(norm: str, placement: str, opt_kind: str) -> dict[str, Tensor]:
    net = build_gpt(norm, placement)
    opt = make_opt(opt_kind, net)
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        for half in range(WORLD):  # the reduce-scatter's mean: each half's gradient / 2, summed
            (half_loss(net, step, half) / WORLD).backward()
        opt.step()
    return full_params(net)


def max_relative(a: dict[str, Tensor], b: dict[str, Tensor]) -> tuple[float, str]:
    """max over tensors of max|a - b| / max|b|, and the tensor where it is largest."""
    worst, where = 0.0, ""
    for k in b:
        r = float((a[k] - b[k]).abs().max()) / max(float(b[k].abs().max()), 1e-12)
        if r > worst:
            worst, where = r, k
    return worst, where


# ------------------------------------------------------------------------------------------------
# what each rank runs


def run_rank(rank: int, out: Path) -> dict[str, Any]:
    ctx = nd.context()
    assert ctx is not None and ctx.rank == rank
    results: dict[str, Any] = {"sweep": {}, "no-reshard": {}, "bf16": {}, "whole": {}}
    keep = rank == 0  # only rank 0's copies travel back
    started = time.perf_counter()
    for norm in TOKEN_NORMS:
        for placement in PLACEMENTS:
            for opt_kind in OPTIMIZERS:
                params = sharded_run(ctx, norm, placement, opt_kind)
                results["sweep"][norm, placement, opt_kind] = params if keep else None
    for norm, placement in NO_RESHARD:
        params = sharded_run(ctx, norm, placement, "adamw", reshard_after_forward=False)
        results["no-reshard"][norm, placement] = params if keep else None
    for norm, placement in BF16:
        params = sharded_run(ctx, norm, placement, "sgd", param_dtype="bf16")
        results["bf16"][norm, placement] = params if keep else None
    for norm, placement in WHOLE_MODEL:
        params = sharded_run(ctx, norm, placement, "adamw", per_block=False)
        results["whole"][norm, placement] = params if keep else None
    results["sweep-seconds"] = time.perf_counter() - started

    runs = out / "runs"
    for name, config in TRAINER_CASES.items():
        results[name] = train(config, runs / name, task=runtime_for(config), dist="fsdp")

    straight = train(RESUME_CASE, runs / "straight", task=lm_runtime(RESUME_CASE), dist="fsdp")
    crashed = _outcome(
        lambda: train(
            RESUME_CASE, runs / "resumed", task=lm_runtime(RESUME_CASE), dist="fsdp", on_step=crash_after(3)
        )
    )
    resumed = train(RESUME_CASE, runs / "resumed", task=lm_runtime(RESUME_CASE), dist="fsdp")
    results["resume"] = {"straight": straight, "crashed": crashed, "resumed": resumed}
    # a DDP run's single-file checkpoint is refused by FSDP, with the reason
    _outcome(lambda: train(RESUME_CASE, runs / "ddp", task=lm_runtime(RESUME_CASE), on_step=crash_after(3)))
    results["ddp-to-fsdp"] = _outcome(
        lambda: train(RESUME_CASE, runs / "ddp", task=lm_runtime(RESUME_CASE), dist="fsdp")
    )

    one = _outcome(
        lambda: train(
            ONE_PROCESS_CASE,
            runs / "one",
            task=lm_runtime(ONE_PROCESS_CASE),
            dist="fsdp",
            on_step=crash_after(3),
        )
    )
    results["one-crashed"] = one
    results["one-straight"] = train(
        ONE_PROCESS_CASE, runs / "one-straight", task=lm_runtime(ONE_PROCESS_CASE), dist="fsdp"
    )
    return results


def _outcome(fn: Any) -> dict[str, Any]:
    try:
        return {"summary": fn()}
    except Exception as err:
        return {"error": type(err).__name__, "message": str(err)}


# ------------------------------------------------------------------------------------------------
# checks in this process


def check_sweep(ranks: list[dict[str, Any]]) -> None:
    worst: dict[str, tuple[float, Any]] = {}
    for (norm, placement, opt_kind), params in ranks[0]["sweep"].items():
        rel, where = max_relative(params, reference_run(norm, placement, opt_kind))
        if rel > worst.get(opt_kind, (-1.0, None))[0]:
            worst[opt_kind] = (rel, (norm, placement, where))
        assert rel <= 1e-5, (norm, placement, opt_kind, where, rel)
    for (norm, placement), params in ranks[0]["no-reshard"].items():
        rel, where = max_relative(params, reference_run(norm, placement, "adamw"))
        assert rel <= 1e-5, ("reshard_after_forward=False", norm, placement, where, rel)
    for (norm, placement), params in ranks[0]["whole"].items():
        rel, where = max_relative(params, reference_run(norm, placement, "adamw"))
        assert rel <= 1e-5, ("one unit for the whole model", norm, placement, where, rel)
    for (norm, placement), params in ranks[0]["bf16"].items():
        reference = reference_run(norm, placement, "sgd")
        start = full_params(build_gpt(norm, placement))
        moved = sum(float((reference[k] - start[k]).square().sum()) for k in reference) ** 0.5
        off = sum(float((params[k] - reference[k]).square().sum()) for k in reference) ** 0.5
        assert all(torch.isfinite(v).all() for v in params.values())
        assert off < 0.25 * moved, ("bf16", norm, placement, off, moved)  # bf16 rounding, not a bug
    n = len(ranks[0]["sweep"])
    print(f"\nFSDP2 sweep: {n} runs in {ranks[0]['sweep-seconds']:.1f} s; max relative difference:")
    for opt_kind, (rel, where) in worst.items():
        print(f"  {opt_kind:<6} " + ("0 (bit for bit in every run)" if rel == 0 else f"{rel:.3g} at {where}"))


def check_trainer(tmp: Path, ranks: list[dict[str, Any]]) -> None:
    print("max |FSDP - single-process| of the final parameters and buffers (Trainer):")
    for name, config in TRAINER_CASES.items():
        single = tmp / "single" / name
        train(config, single, task=runtime_for(config))
        fsdp_dir = tmp / "runs" / name
        diff = max_diff(final_state(fsdp_dir), final_state(single))
        print(f"  {name:<24} {diff:.3g}")
        assert diff <= 1e-5, (name, diff)
        assert ranks[0][name] == ranks[1][name]
        assert ranks[0][name]["dist"] == "fsdp" and ranks[0][name]["world_size"] == 2
        fsdp_losses = [r["loss"] for r in records(fsdp_dir, "train")]
        single_losses = [r["loss"] for r in records(single, "train")]
        assert fsdp_losses == pytest.approx(single_losses, rel=1e-5, abs=1e-6), name
        assert not list(fsdp_dir.glob("*.dcp")) and not (fsdp_dir / "checkpoint.pt").exists()
    assert ranks[0]["convnet-batchless"]["kept_gathered"], "Batchless blocks keep their parameters gathered"


def check_resume(tmp: Path, ranks: list[dict[str, Any]]) -> None:
    runs = tmp / "runs"
    for r in ranks:
        assert r["resume"]["crashed"]["error"] == "CrashAtError"
        assert r["resume"]["resumed"]["final"] == r["resume"]["straight"]["final"]
        refused = r["ddp-to-fsdp"]
        assert refused["error"] == "ValueError" and "single-file checkpoint" in refused["message"], refused
    straight, resumed = runs / "straight", runs / "resumed"
    assert max_diff(final_state(straight), final_state(resumed)) == 0.0
    assert records(straight, "train", "eval") == records(resumed, "train", "eval")
    assert [r["step"] for r in records(resumed, "resume")] == [2]

    # another process count: the 2-process checkpoint resumes in this process, with no group
    assert ranks[0]["one-crashed"]["error"] == "CrashAtError"
    one = tmp / "one"
    shutil.copytree(runs / "one", one)
    assert len(list(one.glob("checkpoint-*.dcp"))) == 1
    summary = train(ONE_PROCESS_CASE, one, task=lm_runtime(ONE_PROCESS_CASE))
    assert summary["steps"] == ONE_PROCESS_CASE.train.steps
    assert [r["step"] for r in records(one, "resume")] == [2]
    diff = max_diff(final_state(one), final_state(runs / "one-straight"))
    print(f"  resumed on 1 process from the 2-process checkpoint: max difference {diff:.3g}")
    assert diff <= 1e-5


def test_fsdp_trains_like_one_process_on_the_global_batch(tmp_path: Path) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ranks = spawn_pair(tmp_path, run_rank, deadline_s=400.0)
        failures = []
        for check in (check_sweep, lambda r: check_trainer(tmp_path, r), lambda r: check_resume(tmp_path, r)):
            try:
                check(ranks)
            except AssertionError as err:
                failures.append(f"{err!r}")
        assert not failures, "\n".join(failures)
    finally:
        torch.set_num_threads(previous)


def test_torchrun_trains_with_dist_fsdp(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``normlab study --nproc 2 --dist fsdp``'s launch: ``torchrun -m normlab.train --dist fsdp``,
    checkpointing through DCP, ends where single-process training on the global batch ends."""
    monkeypatch.setenv("NORMLAB_KERNELS", "0")
    monkeypatch.setenv(nd.TIMEOUT_ENV, "30")
    config = lm_config(steps=4, ckpt_every=2, **SGD)
    spec = RunSpec(group="lm", cell="fsdp", params={}, seed=0, config=config)
    run = tmp_path / "run"
    launch = (str(data_dir), "cpu", WORLD, 1, "sync", (), "fsdp")
    _, summary, error, _ = _run_one_distributed(spec, str(run), *launch)
    assert error is None, (run / "error.txt").read_text()
    assert summary is not None and summary["dist"] == "fsdp" and summary["world_size"] == WORLD
    assert [r["dist"] for r in records(run, "start")] == ["fsdp"]
    single = tmp_path / "single"
    train(config, single, data_dir=data_dir)
    assert max_diff(final_state(run), final_state(single)) <= 1e-6


def test_fsdp_settings_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    from normlab.cli import main

    assert main(["study", "quick", "--dist", "fsdp", "--out", "unused"]) == 2
    assert "dist='fsdp' shards each run over processes: it needs nproc >= 2" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"dist='fsdp' shards each run over processes: it needs nproc >= 2"):
        run_study(get_study("quick"), "unused", nproc=1, dist="fsdp")
    with pytest.raises(ValueError, match="dist must be one of"):
        train(lm_config(), "unused", dist="zero3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\['param_dtype'\] are options of dist='fsdp'"):
        train(lm_config(), "unused", fsdp={"param_dtype": "bf16"})


# ------------------------------------------------------------------------------------------------
# DTensor: the fused ops on batch- and sequence-sharded inputs, replicated parameters

DTENSOR_NORMS = {
    "rmsnorm": {},
    "rmsnorm-outside-bias": {"eps_mode": "outside", "bias": True},
    "layernorm": {},
    "layernorm-no-affine": {"elementwise_affine": False},
    "dyt": {},
    "derf": {},
    "lns": {"layer_idx": 2},
}
SHAPE = (4, 8, 32)  # (batch, sequence, features)


def dtensor_module(label: str) -> torch.nn.Module:
    torch.manual_seed(0)
    module = normlab.create_norm(label.split("-")[0], SHAPE[-1], **DTENSOR_NORMS[label])
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module


def dtensor_data() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(SHAPE, generator=g) + 0.2
    return x, torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


def dtensor_rank(rank: int, out: Path) -> dict[str, Any]:
    if not normlab.kernels.build():
        raise RuntimeError(f"the fused kernels are unavailable: {normlab.kernels.status()['reason']}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
    from torch.profiler import profile

    from normlab import functional as NF

    mesh = init_device_mesh("cpu", (WORLD,))
    x_full, g_full, r_full = dtensor_data()
    results: dict[str, Any] = {}
    for label in DTENSOR_NORMS:
        for dim in (0, 1, 2):
            module = distribute_module(dtensor_module(label), mesh)  # parameters: Replicate()
            x = distribute_tensor(x_full, mesh, [Shard(dim)]).requires_grad_(True)
            try:
                with profile() as prof:
                    y = module(x)
                    y.backward(distribute_tensor(g_full, mesh, [Shard(dim)]))
            except ValueError as err:
                results[label, dim] = {"refused": str(err)}
                continue
            if list(module.parameters()):  # the partial (or sharded) parameter grads, reduced where used
                torch.optim.SGD(module.parameters(), lr=0.5).step()
            results[label, dim] = {
                "placements": [str(p) for p in y.placements],
                "y": y.full_tensor(),
                "dx": x.grad.full_tensor(),
                "dparams": {n: p.grad.full_tensor() for n, p in module.named_parameters()},
                "stepped": {n: p.full_tensor() for n, p in module.named_parameters()},
                "ops": sorted({e.name for e in prof.events() if e.name.startswith("normlab::")}),
            }
    # the residual-add forms, sequence-sharded
    w = distribute_tensor(torch.linspace(0.5, 1.5, SHAPE[-1]), mesh, [Replicate()])
    x = distribute_tensor(x_full, mesh, [Shard(1)])
    r = distribute_tensor(r_full, mesh, [Shard(1)])
    for name, fn in (("add_rms_norm", NF.add_rms_norm), ("add_layer_norm", NF.add_layer_norm)):
        with profile() as prof:
            y, h = fn(x, r, (SHAPE[-1],), w)
        results[name] = {
            "y": y.full_tensor(),
            "h": h.full_tensor(),
            "placements": [str(y.placements), str(h.placements)],
            "ops": sorted({e.name for e in prof.events() if e.name.startswith("normlab::")}),
        }
    # torch.compile on top keeps the op in its graph (the graph Dynamo hands its backend)
    targets: list[str] = []

    def backend(gm: torch.fx.GraphModule, inputs: Any) -> Any:
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    module = distribute_module(dtensor_module("rmsnorm"), mesh)
    x = distribute_tensor(x_full, mesh, [Shard(1)])
    compiled = torch.compile(module, backend=backend, fullgraph=True)(x)
    results["compiled"] = {"targets": targets, "y": compiled.full_tensor()}
    return results


def test_fused_norms_on_sequence_parallel_dtensors_equal_one_process(tmp_path: Path) -> None:
    """Sequence (Shard(1)) and batch (Shard(0)) parallel inputs take the fused ops on each shard
    and equal the unsharded module; a feature-sharded input (Shard(2)) is refused by the per-row
    norms and computed locally by DyT/Derf with their per-channel parameters sliced alike."""
    from normlab import functional as NF

    if not normlab.kernels.build():
        pytest.skip(f"normlab kernels unavailable: {normlab.kernels.status()['reason']}")
    ranks = spawn_pair(tmp_path, dtensor_rank, deadline_s=120.0)
    x_full, g_full, r_full = dtensor_data()
    worst = 0.0
    for label in DTENSOR_NORMS:
        kind = label.split("-")[0]
        reference = dtensor_module(label)
        x = x_full.clone().requires_grad_(True)
        y = reference(x)
        y.backward(g_full)
        if list(reference.parameters()):
            torch.optim.SGD(reference.parameters(), lr=0.5).step()
        for dim in (0, 1, 2):
            got = ranks[0][label, dim]
            if dim == 2 and kind in ("rmsnorm", "layernorm", "lns"):
                assert "sharded on dim 2 (S(2)), a dimension it normalizes over" in got["refused"], got
                continue
            assert "refused" not in got, (label, dim, got)
            forward = {"dyt": "dyt", "derf": "derf", "rmsnorm": "rms_norm"}.get(kind, "layer_norm")
            expected = [f"normlab::{forward}", f"normlab::{forward}_backward"]
            assert got["ops"] == expected, (label, dim, got["ops"])
            assert got["placements"] == [f"S({dim})"]
            torch.testing.assert_close(got["y"], y, rtol=0, atol=0)
            torch.testing.assert_close(got["dx"], x.grad, rtol=0, atol=0)
            for name, p in reference.named_parameters():
                assert p.grad is not None
                diff = float((got["dparams"][name] - p.grad).abs().max())
                worst = max(worst, diff / max(float(p.grad.abs().max()), 1e-12))
                torch.testing.assert_close(got["dparams"][name], p.grad, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(got["stepped"][name], p.detach(), rtol=1e-5, atol=1e-5)
    w = torch.linspace(0.5, 1.5, SHAPE[-1])
    for name, fn in (("add_rms_norm", NF.add_rms_norm), ("add_layer_norm", NF.add_layer_norm)):
        y, h = fn(x_full, r_full, (SHAPE[-1],), w)
        got = ranks[0][name]
        assert got["ops"] == [f"normlab::{name}"] and got["placements"] == ["(Shard(dim=1),)"] * 2
        torch.testing.assert_close(got["y"], y, rtol=0, atol=0)
        torch.testing.assert_close(got["h"], h, rtol=0, atol=0)
    compiled = ranks[0]["compiled"]
    assert "normlab.rms_norm" in compiled["targets"], compiled["targets"]
    torch.testing.assert_close(compiled["y"], dtensor_module("rmsnorm")(x_full), rtol=0, atol=0)
    print(f"\nDTensor: outputs and input grads bit-exact; parameter grads max relative diff {worst:.2g}")
