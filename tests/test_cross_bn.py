"""CrossBatchNorm (cross-process BatchNorm on CPU/gloo) and convert_sync / revert_sync.

The distributed cases run in ONE pair of spawned processes (gloo, file store,
30 s process-group timeout): each rank runs every case on its share of a global batch and saves
its outputs, input grads, parameter grads and buffers; this process compares them with a
single-process float64 ``torch.nn.BatchNorm1d`` on the concatenated global batch. A failure in
a child comes back as a test failure with the child's traceback; the children are killed if they
outlive the deadline, so the module cannot hang. Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations

import copy
import datetime
import functools
import multiprocessing
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

import normlab
from normlab import CrossBatchNorm

from cases import randomize_params

F64 = torch.float64
WORLD = 2
C = 4
DEADLINE_S = 150.0  # the spawned pair normally finishes in ~5-10 s on 2 loaded cores


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add OpenMP barriers, slow on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# Distributed cases: per-rank input shapes of one global batch


@dataclass(frozen=True)
class Tol:
    out: float
    dx: float
    dparam: float
    stats: float


# Parameter grads relative to max(1, max|grad|), running stats to max(1, |value|)
FP32 = Tol(out=1e-6, dx=2e-6, dparam=2e-6, stats=1e-7)
FP64 = Tol(out=1e-12, dx=1e-12, dparam=1e-12, stats=1e-12)
# bf16 activations into an fp32 module: outputs and input grads are rounded to bf16 (relative
# 2^-9 = 2e-3 of the largest value, as a bound on max|ref|); params and stats stay fp32-accurate.
BF16_IN = Tol(out=8e-3, dx=8e-3, dparam=2e-6, stats=1e-7)


@dataclass(frozen=True)
class Case:
    name: str
    shapes: tuple[tuple[int, ...], ...]  # input shape on each rank
    dtype: torch.dtype = torch.float32  # module dtype
    input_dtype: torch.dtype | None = None  # default: the module dtype
    kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int = 2
    scale: float = 1.0
    shift: float = 0.3
    channels_last: bool = False
    subgroup: bool = False  # pass an explicit process_group (a new_group of both ranks)
    tol: Tol = FP32
    # Tolerances relative to max|reference| (outputs, input grads) instead of absolute.
    relative: bool = False

    @property
    def seed(self) -> int:
        return zlib.crc32(self.name.encode())  # str hash() differs between processes


def _shapes(sizes: tuple[int, ...], rest: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    return tuple((n, C, *rest) for n in sizes)


CASES = [
    Case("uneven-3-5-4d", _shapes((3, 5), (3, 2))),
    Case("uneven-3-5-4d-fp64", _shapes((3, 5), (3, 2)), dtype=F64, tol=FP64),
    Case("empty-rank-0-4-3d", _shapes((0, 4), (5,))),
    Case("empty-rank-0-4-3d-fp64", _shapes((0, 4), (5,)), dtype=F64, tol=FP64),
    Case("batch-1-per-rank-2d", _shapes((1, 1), ())),
    Case("batch-1-per-rank-2d-fp64", _shapes((1, 1), ()), dtype=F64, tol=FP64),
    Case("cumulative-momentum-none", _shapes((2, 3), (3,)), kwargs={"momentum": None}, steps=3),
    Case(
        "no-affine-no-running-stats",
        _shapes((3, 2), (3,)),
        kwargs={"affine": False, "track_running_stats": False},
    ),
    Case("no-bias", _shapes((2, 3), (3,)), kwargs={"bias": False, "momentum": 0.3}),
    Case("spatial-sizes-differ", ((2, C, 3, 3), (3, C, 2, 2))),
    Case("channels-last-subgroup", _shapes((3, 2), (3, 2)), channels_last=True, subgroup=True),
    Case(
        "bf16-input-fp32-module",
        _shapes((3, 5), (3,)),
        input_dtype=torch.bfloat16,
        tol=BF16_IN,
        relative=True,
    ),
    # |mean| / std ~ 300: a float32 sum(x²)/n - mean² would lose the variance (relative error ~1e-2).
    Case("large-mean-fp32", _shapes((3, 5), (3, 2)), scale=3.0, shift=1e3),
]
ERROR_CASE = Case("global-count-1", _shapes((1, 0), ()))
EMPTY_CASE = Case("all-empty", _shapes((0, 0), (3,)))
NAN_CASE = Case("nan-on-rank-1", _shapes((2, 3), (3,)))


def rank_data(case: Case, rank: int, step: int) -> tuple[Tensor, Tensor]:
    """This rank's input and upstream gradient at ``step``, identical in the parent and children."""
    g = torch.Generator().manual_seed(case.seed + 100 * rank + step)
    shape = case.shapes[rank]
    dtype = case.input_dtype or case.dtype
    x = (torch.randn(shape, generator=g, dtype=F64) * case.scale + case.shift).to(dtype)
    upstream = torch.randn(shape, generator=g, dtype=F64).to(dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, upstream


def make_module(case: Case, process_group: Any = None) -> CrossBatchNorm:
    module = CrossBatchNorm(C, dtype=case.dtype, process_group=process_group, **case.kwargs)
    return randomize_params(module, seed=case.seed % 1000)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# What each spawned rank runs


def run_case(case: Case, rank: int, process_group: Any = None) -> dict[str, Any]:
    module = make_module(case, process_group)
    result: dict[str, Any] = {"y": [], "dx": [], "channels_last": []}
    for step in range(case.steps):
        x, upstream = rank_data(case, rank, step)
        x.requires_grad_(True)
        try:
            y = module(x)
        except ValueError as error:
            return {"error": str(error), "world_size": module.world_size()}
        (y * upstream).sum().backward()
        assert x.grad is not None
        result["y"].append(y.detach())
        result["dx"].append(x.grad)
        result["channels_last"].append(y.is_contiguous(memory_format=torch.channels_last))
    result["grads"] = {name: p.grad for name, p in module.named_parameters()}
    result["buffers"] = {name: b.clone() for name, b in module.named_buffers()}
    module.eval()
    result["eval"] = module(rank_data(case, rank, 0)[0]).detach()
    return result


def run_nan_case(rank: int) -> dict[str, Any]:
    """A NaN in rank 1's batch: both ranks skip the running-stats update and count it."""
    module = make_module(NAN_CASE)
    before = {name: b.clone() for name, b in module.named_buffers()}
    x, _ = rank_data(NAN_CASE, rank, 0)
    if rank == 1:
        x[0, 1, 0] = float("nan")
    y = module(x)
    return {"before": before, "after": dict(module.named_buffers()), "y": y.detach()}


def make_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        normlab.BatchNorm(4, momentum=None),
        nn.Flatten(),
        nn.Linear(16, 3),
        nn.BatchNorm1d(3),
    )


def sgd_step(model: nn.Module, lr: float = 0.1) -> None:
    """Plain SGD by hand: torch.optim's first step imports torch._dynamo (~3 s per process)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad


DDP_SIZES = (3, 5)
DDP_STEPS = 3


def ddp_data(rank: int, step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 + 10 * rank + step)
    n = DDP_SIZES[rank]
    return torch.randn(n, 3, 4, 4, generator=g), torch.randn(n, 3, generator=g)


def run_data_parallel(rank: int, use_ddp: bool) -> dict[str, Tensor]:
    """convert_sync, then SGD steps on uneven batches with gradients averaged over the ranks:
    by ``DistributedDataParallel`` (its bucket all-reduces interleave with CrossBatchNorm's
    backward all-reduces), or by hand after the backward. Returns the final state."""
    model = normlab.convert_sync(make_net())
    wrapped = model
    if use_ddp:
        from torch.nn.parallel import DistributedDataParallel  # imports torch._dynamo: ~3 s

        wrapped = DistributedDataParallel(model)
    for step in range(DDP_STEPS):
        x, upstream = ddp_data(rank, step)
        model.zero_grad()
        (wrapped(x) * upstream).sum().backward()
        if not use_ddp:
            for p in model.parameters():
                assert p.grad is not None
                dist.all_reduce(p.grad)
                p.grad /= WORLD
        sgd_step(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def torch_syncbn_on_cpu() -> str:
    """``nn.SyncBatchNorm`` refuses CPU tensors; a future torch change shows here."""
    try:
        nn.SyncBatchNorm(C)(torch.randn(4, C, 3))
    except ValueError as error:
        return str(error)
    return "no error"


def worker(rank: int, store: str, out_dir: str, job: str) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=WORLD,
            timeout=datetime.timedelta(seconds=30),
        )
        started = time.perf_counter()
        results: dict[str, Any] = {"world_size": dist.get_world_size()}
        if job == "ddp":
            results["data-parallel"] = run_data_parallel(rank, use_ddp=True)
            torch.save(results, Path(out_dir) / f"rank{rank}.pt")
            return
        subgroup = dist.new_group([0, 1])
        for case in CASES:
            results[case.name] = run_case(case, rank, subgroup if case.subgroup else None)
        for case in (ERROR_CASE, EMPTY_CASE):
            results[case.name] = run_case(case, rank)
        results["after-error"] = run_case(CASES[0], rank)  # the group is still in step
        results[NAN_CASE.name] = run_nan_case(rank)
        cases_done = time.perf_counter()
        results["data-parallel"] = run_data_parallel(rank, use_ddp=False)
        results["torch-syncbn"] = torch_syncbn_on_cpu()
        results["seconds"] = {"cases": cases_done - started, "training": time.perf_counter() - cases_done}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_pair(tmp: Path, job: str = "cases") -> list[dict[str, Any]]:
    """Run ``worker`` on 2 spawned ranks; raise with the children's tracebacks on any failure."""
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=worker, args=(rank, str(tmp / "store"), str(tmp), job), daemon=True)
        for rank in range(WORLD)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    failed_at: float | None = None
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
            failed_at = time.monotonic()  # the other rank may now wait in a collective: give it 5 s
        if failed_at is not None and time.monotonic() > failed_at + 5:
            break
        time.sleep(0.05)
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(5)
    errors = [
        f"--- rank {rank} ---\n{f.read_text()}"
        for rank in range(WORLD)
        if (f := tmp / f"rank{rank}.err").exists()
    ]
    codes = [p.exitcode for p in procs]
    if errors or hung or any(code != 0 for code in codes):
        raise AssertionError(
            f"spawned ranks failed (exit codes {codes}, killed {hung}):\n" + "\n".join(errors)
        )
    return [torch.load(tmp / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


# ------------------------------------------------------------------------------------------------
# The single-process float64 reference on the concatenated global batch


def flatten(ts: list[Tensor]) -> Tensor:
    """Per-rank ``(N_r, C, *S_r)`` tensors as one ``(sum N_r·|S_r|, C)`` batch (S_r may differ)."""
    return torch.cat([t.transpose(0, 1).reshape(C, -1) for t in ts], dim=1).T


def unflatten(y: Tensor, like: list[Tensor]) -> list[Tensor]:
    out, start = [], 0
    for t in like:
        m = t.numel() // C
        shape = (C, t.shape[0], *t.shape[2:])
        out.append(y.T[:, start : start + m].reshape(shape).transpose(0, 1))
        start += m
    return out


def reference_bn(case: Case, dtype: torch.dtype = F64) -> nn.BatchNorm1d:
    """torch's BatchNorm with the test module's initial (rounded) parameters and buffers."""
    module = make_module(case)
    ref = nn.BatchNorm1d(
        C,
        eps=module.eps,
        momentum=module.momentum,
        dtype=dtype,
        **{k: v for k, v in case.kwargs.items() if k in ("affine", "track_running_stats", "bias")},
    )
    ref.load_state_dict(
        {k: v.to(dtype) if v.is_floating_point() else v for k, v in module.state_dict().items()}
    )
    return ref


def run_reference(case: Case, dtype: torch.dtype = F64) -> dict[str, Any]:
    ref = reference_bn(case, dtype)
    result: dict[str, Any] = {"y": [], "dx": []}
    for step in range(case.steps):
        data = [rank_data(case, rank, step) for rank in range(WORLD)]
        xs = [x.to(dtype).requires_grad_(True) for x, _ in data]
        y = ref(flatten(xs))
        (y * flatten([u.to(dtype) for _, u in data])).sum().backward()
        result["y"].append(unflatten(y.detach(), xs))
        result["dx"].append([x.grad for x in xs])
    result["grads"] = {name: p.grad for name, p in ref.named_parameters()}
    result["buffers"] = dict(ref.named_buffers())
    ref.eval()
    result["eval"] = [
        unflatten(
            ref(flatten([rank_data(case, rank, 0)[0].to(dtype)])).detach(), [rank_data(case, rank, 0)[0]]
        )[0]
        for rank in range(WORLD)
    ]
    return result


def max_err(actual: Tensor, expected: Tensor) -> float:
    """``max |actual - expected|`` in float64 (torch.testing.assert_close's first call imports
    DTensor, ~2 s)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if actual.numel() == 0:
        return 0.0
    return float((actual.detach().to(F64) - expected.detach().to(F64)).abs().max())


def max_abs(ts: list[Tensor]) -> float:
    return max((float(t.detach().abs().max()) for t in ts if t.numel()), default=0.0)


def case_errors(case: Case, got: list[dict[str, Any]], ref: dict[str, Any]) -> dict[str, float]:
    """Max abs errors of the ranks' results against ``ref``: outputs, grads, running stats."""
    steps = range(case.steps)
    err = {
        "out": max(max_err(got[r]["y"][s], ref["y"][s][r]) for s in steps for r in range(WORLD)),
        "dx": max(max_err(got[r]["dx"][s], ref["dx"][s][r]) for s in steps for r in range(WORLD)),
        "eval": max(max_err(got[r]["eval"], ref["eval"][r]) for r in range(WORLD)),
        "dparam": 0.0,
        "stats": 0.0,
    }
    for name, g in ref["grads"].items():
        err["dparam"] = max(err["dparam"], max_err(sum(rank["grads"][name] for rank in got), g))
    for name in ("running_mean", "running_var"):
        if name in ref["buffers"]:
            expected = ref["buffers"][name].to(F64)
            for rank in got:  # relative to max(1, |value|): fp32 holds 1.5 no closer than 6e-8
                diff = (rank["buffers"][name].to(F64) - expected).abs() / expected.abs().clamp(min=1)
                err["stats"] = max(err["stats"], float(diff.max()))
    return err


def print_errors(label: str, err: dict[str, float]) -> None:
    print(f"\n{label:<28} " + " ".join(f"{k}={v:.2e}" for k, v in err.items()))


# ------------------------------------------------------------------------------------------------
# Checks of the ranks' results (run by the one distributed test below)


def check_group_of_two(ranks: list[dict[str, Any]]) -> None:
    assert [r["world_size"] for r in ranks] == [WORLD, WORLD]


def check_case(ranks: list[dict[str, Any]], case: Case) -> None:
    """Outputs, input grads, summed parameter grads, running stats and eval outputs vs fp64 BN."""
    got = [r[case.name] for r in ranks]
    ref = run_reference(case)
    err = case_errors(case, got, ref)
    print_errors(case.name, err)
    tol = case.tol
    scale_y = max(max_abs(ys) for ys in ref["y"]) if case.relative else 1.0
    scale_dx = max(max_abs(dxs) for dxs in ref["dx"]) if case.relative else 1.0
    if case.name == "large-mean-fp32":
        # fp32 cannot hold x - mean better than ulp(1e3)/2 = 3e-5: bound the errors by those of
        # torch's own single-process fp32 BatchNorm on the same global batch, and the variance
        # (where cancellation would show) by fp32 storage precision.
        torch_err = case_errors(case, _as_ranks(run_reference(case, torch.float32)), ref)
        print_errors("  torch fp32 BN, same batch", torch_err)
        for key in ("out", "dx", "dparam", "eval"):
            assert err[key] <= 2 * torch_err[key] + 1e-6, (key, err, torch_err)
        var_ref = ref["buffers"]["running_var"]
        for rank in got:
            rel = (rank["buffers"]["running_var"].to(F64) - var_ref).abs() / var_ref
            assert float(rel.max()) < 2e-7
        return
    assert err["out"] <= tol.out * scale_y, err
    assert err["eval"] <= tol.out * scale_y, err
    assert err["dx"] <= tol.dx * scale_dx, err
    assert err["dparam"] <= tol.dparam * max(1.0, max_abs(list(ref["grads"].values()))), err
    assert err["stats"] <= tol.stats, err
    # Every rank applied the same update: buffers are bitwise identical across ranks.
    for name, b in got[0]["buffers"].items():
        assert torch.equal(b, got[1]["buffers"][name]), name
    if "num_batches_tracked" in ref["buffers"]:
        assert int(got[0]["buffers"]["num_batches_tracked"]) == case.steps
        assert int(got[0]["buffers"]["skipped_updates"]) == 0
    for r in range(WORLD):
        for step in range(case.steps):
            assert got[r]["y"][step].dtype == (case.input_dtype or case.dtype)
            assert got[r]["y"][step].shape == case.shapes[r]
            if case.channels_last:
                assert got[r]["channels_last"][step]


def _as_ranks(ref: dict[str, Any]) -> list[dict[str, Any]]:
    """A reference result split into per-rank results (parameter grads all on rank 0)."""
    ranks = []
    for r in range(WORLD):
        grads = {k: g if r == 0 else torch.zeros_like(g) for k, g in ref["grads"].items()}
        ranks.append(
            {
                "y": [ys[r] for ys in ref["y"]],
                "dx": [dxs[r] for dxs in ref["dx"]],
                "eval": ref["eval"][r],
                "grads": grads,
                "buffers": ref["buffers"],
            }
        )
    return ranks


def check_an_empty_rank_gets_an_empty_output_and_zero_grads(ranks: list[dict[str, Any]]) -> None:
    empty = ranks[0]["empty-rank-0-4-3d"]
    for step in range(2):
        assert empty["y"][step].shape == (0, C, 5) and empty["dx"][step].shape == (0, C, 5)
    assert all(torch.count_nonzero(g) == 0 for g in empty["grads"].values())


def check_a_global_count_of_one_raises_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    """Rank 0 holds 1 sample, rank 1 none: both raise BatchNorm's error, neither hangs."""
    for rank in ranks:
        assert "y" not in rank[ERROR_CASE.name]
        message = rank[ERROR_CASE.name]["error"]
        assert message.startswith("CrossBatchNorm: expected more than 1 value per channel"), message
        assert "got 1 in total over the 2 processes" in message
    # the next collective (a whole case) still lines up on both ranks
    assert ranks[0]["after-error"]["y"][0].shape == CASES[0].shapes[0]


def check_an_all_empty_global_batch_is_an_empty_step(ranks: list[dict[str, Any]]) -> None:
    """Global count 0: empty outputs and zero grads, buffers untouched, as BatchNorm on an empty batch."""
    initial = dict(make_module(EMPTY_CASE).named_buffers())
    for rank in ranks:
        result = rank[EMPTY_CASE.name]
        assert "error" not in result
        assert result["y"][0].shape == (0, C, 3)
        assert all(torch.count_nonzero(g) == 0 for g in result["grads"].values())
        for name, b in result["buffers"].items():
            assert torch.equal(b, initial[name]), name


def check_a_nan_on_one_rank_skips_the_update_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        result = rank[NAN_CASE.name]
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(result["after"][name], result["before"][name]), name
        assert int(result["after"]["skipped_updates"]) == 1
        assert torch.isnan(result["y"][:, 1]).all()  # the global channel-1 statistics are NaN


def check_data_parallel_training(ranks: list[dict[str, Any]]) -> None:
    """convert_sync + data-parallel SGD, uneven batches [3, 5]: params and buffers bitwise equal
    across ranks, and equal (fp32 accuracy) to single-process fp64 training on the global batch;
    the rank gradients are averaged, i.e. the global loss is the rank losses' mean."""
    states = [r["data-parallel"] for r in ranks]
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
    model = make_net().double()
    for step in range(DDP_STEPS):
        data = [ddp_data(rank, step) for rank in range(WORLD)]
        x = torch.cat([d[0] for d in data]).double()
        upstream = torch.cat([d[1] for d in data]).double()
        model.zero_grad()
        ((model(x) * upstream).sum() / WORLD).backward()
        sgd_step(model)
    errors = {k: max_err(states[0][k], v) for k, v in model.state_dict().items()}
    print_errors(f"{DDP_STEPS} data-parallel steps", {"max": max(errors.values())})
    for key, e in errors.items():
        assert e <= 1e-5, (key, e)


def check_torch_syncbatchnorm_still_refuses_cpu(ranks: list[dict[str, Any]]) -> None:
    """Why CrossBatchNorm exists (pytorch#78081); if torch lifts this, revisit the docs."""
    for rank in ranks:
        assert "GPU" in rank["torch-syncbn"], rank["torch-syncbn"]


def test_two_gloo_ranks_match_batchnorm_on_the_global_batch(tmp_path: Path) -> None:
    """Every distributed check on one spawned pair of ranks (one spawn, also under xdist).

    Each check runs even if an earlier one failed; the failure lists all failed checks.
    """
    started = time.perf_counter()
    ranks = spawn_pair(tmp_path)
    seconds = {"spawn+run": time.perf_counter() - started, **ranks[0]["seconds"]}
    print("\nseconds (rank 0): " + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()))
    checks: list[tuple[str, Callable[[list[dict[str, Any]]], None]]] = [
        ("group of two", check_group_of_two),
        *((case.name, functools.partial(check_case, case=case)) for case in CASES),
        ("empty rank", check_an_empty_rank_gets_an_empty_output_and_zero_grads),
        ("global count 1", check_a_global_count_of_one_raises_on_every_rank),
        ("global count 0", check_an_all_empty_global_batch_is_an_empty_step),
        ("NaN on one rank", check_a_nan_on_one_rank_skips_the_update_on_every_rank),
        ("data-parallel training", check_data_parallel_training),
        ("torch SyncBatchNorm on CPU", check_torch_syncbatchnorm_still_refuses_cpu),
    ]
    failures = []
    for label, check in checks:
        try:
            check(ranks)
        except AssertionError as error:
            failures.append(f"[{label}] {error}")
    assert not failures, f"{len(failures)} of {len(checks)} checks failed:\n" + "\n\n".join(failures)


@pytest.mark.slow
def test_distributed_data_parallel_training(tmp_path: Path) -> None:
    """The data-parallel check through ``DistributedDataParallel`` itself (a second spawn; DDP's
    constructor imports torch._dynamo, ~3 s per rank): DDP's gradient all-reduces and
    CrossBatchNorm's backward all-reduces share the process group without a deadlock."""
    check_data_parallel_training(spawn_pair(tmp_path, job="ddp"))


# ------------------------------------------------------------------------------------------------
# Without a process group: exactly normlab.BatchNorm


FALLBACK_CONFIGS = [
    {},
    {"momentum": None},
    {"affine": False, "track_running_stats": False},
    {"bias": False, "momentum": 0.5},
]


def _step(module: nn.Module, x: Tensor, upstream: Tensor) -> tuple[Tensor, Tensor, list[Tensor | None]]:
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    (y * upstream).sum().backward()
    assert x.grad is not None
    return y.detach(), x.grad, [p.grad for p in module.parameters()]


def _assert_same_as_batchnorm(ours: nn.Module, bn: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    for step in range(3):
        x = torch.randn(4 + step, C, 3, 2, generator=g)
        upstream = torch.randn(x.shape, generator=g)
        a, b = _step(ours, x, upstream), _step(bn, x, upstream)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for ga, gb in zip(a[2], b[2], strict=True):
            assert ga is not None and gb is not None and torch.equal(ga, gb)
    for (name, x), (_, y) in zip(ours.named_buffers(), bn.named_buffers(), strict=True):
        assert torch.equal(x, y), name
    ours.eval()
    bn.eval()
    x = torch.randn(2, C, 3, 2, generator=g)
    assert torch.equal(ours(x), bn(x))


@pytest.mark.parametrize("kwargs", FALLBACK_CONFIGS, ids=str)
def test_without_a_process_group_it_is_batchnorm_bitwise(kwargs: dict[str, Any]) -> None:
    assert not dist.is_initialized()
    ours = randomize_params(CrossBatchNorm(C, **kwargs))
    bn = normlab.BatchNorm(C, **kwargs)
    bn.load_state_dict(ours.state_dict())
    assert ours.world_size() == 1
    _assert_same_as_batchnorm(ours, bn)


def test_world_size_one_group_is_batchnorm_bitwise(tmp_path: Path) -> None:
    """An initialized group of one process: no collective, BatchNorm's numbers exactly."""
    assert not dist.is_initialized()
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp_path / 'store'}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        ours = randomize_params(CrossBatchNorm(C))
        bn = normlab.BatchNorm(C)
        bn.load_state_dict(ours.state_dict())
        assert ours.world_size() == 1
        _assert_same_as_batchnorm(ours, bn)
    finally:
        dist.destroy_process_group()


def test_the_count_error_matches_batchnorm_without_a_group() -> None:
    with pytest.raises(ValueError, match=r"CrossBatchNorm: expected more than 1 value per channel.*\(1, 4\)"):
        CrossBatchNorm(C)(torch.randn(1, C))


def test_names_aliases_and_spec() -> None:
    for name in ("crossbn", "CrossBN", "syncbn", "sync_batchnorm", "sync-bn", "cross_batch_norm"):
        assert normlab.get_norm_layer(name) is CrossBatchNorm
    module = normlab.create_norm("syncbn", 8, process_group=None)
    assert isinstance(module, normlab.BatchNorm) and isinstance(module, nn.modules.batchnorm._BatchNorm)
    assert CrossBatchNorm.spec.batch_stats and CrossBatchNorm.spec.running_stats
    assert "arXiv:1711.07240" in CrossBatchNorm.spec.paper


def test_state_dict_is_torch_batchnorms() -> None:
    theirs = randomize_params(nn.BatchNorm2d(C))
    ours = CrossBatchNorm(C)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, C, 2, 2)
    for mode in (True, False):
        assert max_err(ours.train(mode)(x), theirs.train(mode)(x)) <= 1e-6


def test_extra_repr_mentions_a_custom_group() -> None:
    assert "process_group" not in repr(CrossBatchNorm(C))
    assert "process_group=<custom>" in repr(CrossBatchNorm(C, process_group=object()))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# convert_sync / revert_sync


class Net(nn.Module):
    """BN of every convertible class, a shared BN, a frozen one, one in eval, and a BN subclass."""

    def __init__(self) -> None:
        super().__init__()
        shared = nn.BatchNorm2d(4)
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            shared,
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
            shared,  # the same module twice
            nn.Conv2d(4, 5, 1),
            normlab.BatchNorm(5, momentum=None, bias=False),
            nn.Conv2d(5, 6, 1),
            nn.BatchNorm2d(6, affine=False, track_running_stats=False, eps=1e-3),
        )
        self.blocks = nn.ModuleDict({"bn3d": nn.BatchNorm3d(6, momentum=0.3), "frozen": nn.BatchNorm2d(6)})
        self.blocks["frozen"].requires_grad_(False)
        self.blocks["frozen"].eval()
        self.subclassed = Subclassed(6)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 16, 8))
        self.bn1d = nn.ModuleList([nn.BatchNorm1d(8)])
        self.sync = nn.SyncBatchNorm(8, process_group=None)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)
        h = self.blocks["bn3d"](h.unsqueeze(2)).squeeze(2)
        h = self.subclassed(self.blocks["frozen"](h))
        h = self.bn1d[0](self.head(h))
        return h if self.training else self.sync(h)  # SyncBatchNorm on CPU runs in eval only


class Subclassed(nn.BatchNorm2d):
    """A BatchNorm subclass: convert_sync must leave it alone (it may compute something else)."""


BN_PATHS = ["features.1", "features.6", "features.8", "blocks.bn3d", "blocks.frozen", "bn1d.0", "sync"]


def _net() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net(torch.randn(4, 3, 4, 4))  # non-default running stats and num_batches_tracked
    randomize_params(net, seed=4)
    return net


def _outputs(net: nn.Module) -> tuple[Tensor, list[Tensor]]:
    """The eval output; and a training step's output, input and parameter grads and new state.

    On copies of ``net``, so its state does not change.
    """
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, 3, 4, 4, generator=g)
    upstream = torch.randn(5, 8, generator=g)
    evaluated = copy.deepcopy(net).eval()(x)
    trained = copy.deepcopy(net).train()
    x.requires_grad_(True)
    y = trained(x)
    (y * upstream).sum().backward()
    assert x.grad is not None
    grads = [p.grad for p in trained.parameters() if p.grad is not None]
    return evaluated, [y, x.grad, *grads, *trained.state_dict().values()]


def test_convert_and_revert_round_trip() -> None:
    net = _net()
    classes = {path: type(net.get_submodule(path)) for path in BN_PATHS}
    state = {k: v.clone() for k, v in net.state_dict().items()}
    params = dict(net.named_parameters())
    requires_grad = {k: p.requires_grad for k, p in params.items()}
    training = {name: m.training for name, m in net.named_modules()}
    before = _outputs(net)

    assert normlab.convert_sync(net) is net
    for path in BN_PATHS:
        m = net.get_submodule(path)
        assert type(m) is CrossBatchNorm and m.converted_from is classes[path], path
    assert type(net.subclassed) is Subclassed
    assert net.features[1] is net.features[4]  # still one shared module
    m = net.get_submodule("features.8")
    assert (m.eps, m.affine, m.track_running_stats, m.running_mean) == (1e-3, False, False, None)
    assert net.get_submodule("features.6").momentum is None and net.get_submodule("features.6").bias is None
    assert net.get_submodule("blocks.bn3d").momentum == 0.3
    # the same Parameter objects (an existing optimizer keeps working), buffers carried
    assert all(p is params[k] for k, p in net.named_parameters())
    assert {k: p.requires_grad for k, p in net.named_parameters()} == requires_grad
    assert {name: m.training for name, m in net.named_modules()} == training
    assert net.state_dict().keys() == state.keys()
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    evaluated, trained = _outputs(net)
    assert torch.equal(evaluated, before[0])  # eval: the same kernel on the same state, bitwise
    for a, b in zip(trained, before[1], strict=True):  # train: normlab's BN vs torch's kernel
        assert max_err(a, b) <= 1e-5 * max(1.0, max_abs([b]))
    assert normlab.convert_sync(net) is net  # idempotent
    assert all(type(net.get_submodule(p)) is CrossBatchNorm for p in BN_PATHS)

    assert normlab.revert_sync(net) is net
    for path in BN_PATHS:
        assert type(net.get_submodule(path)) is classes[path], path
    assert net.features[1] is net.features[4]
    assert all(p is params[k] for k, p in net.named_parameters())
    assert {name: m.training for name, m in net.named_modules()} == training
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    evaluated, trained = _outputs(net)
    assert torch.equal(evaluated, before[0])
    for a, b in zip(trained, before[1], strict=True):
        assert torch.equal(a, b)


def test_convert_keeps_device_dtype_and_counters() -> None:
    bn = randomize_params(nn.BatchNorm2d(C, dtype=F64))
    bn.num_batches_tracked.fill_(7)
    cross = normlab.convert_sync(bn)  # a BatchNorm root is replaced and returned
    assert type(cross) is CrossBatchNorm and cross.weight.dtype == F64
    assert cross.skipped_updates.device == bn.running_mean.device and int(cross.skipped_updates) == 0
    assert int(cross.num_batches_tracked) == 7
    back = normlab.revert_sync(cross)
    assert type(back) is nn.BatchNorm2d and "skipped_updates" not in dict(back.named_buffers())


def test_syncbatchnorm_keeps_its_group_and_normlab_batchnorm_its_skip_count() -> None:
    group = object()
    sync = nn.SyncBatchNorm(C, process_group=group)
    cross = normlab.convert_sync(sync)
    assert cross.process_group is group
    assert type(normlab.revert_sync(cross)) is nn.SyncBatchNorm
    assert normlab.revert_sync(cross).process_group is group
    assert normlab.convert_sync(nn.BatchNorm2d(C), process_group=group).process_group is group

    bn = normlab.BatchNorm(C)
    bn(torch.full((2, C), float("nan")))
    cross = normlab.convert_sync(bn)
    assert cross.skipped_updates is bn.skipped_updates and int(cross.skipped_updates) == 1


def test_revert_of_a_directly_built_crossbn_gives_normlab_batchnorm() -> None:
    cross = randomize_params(normlab.create_norm("crossbn", C, momentum=None))
    back = normlab.revert_sync(nn.Sequential(cross))[0]
    assert type(back) is normlab.BatchNorm and back.momentum is None
    x = torch.randn(3, C, 2)
    assert torch.equal(back.eval()(x), cross.eval()(x))
