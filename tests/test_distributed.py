"""Data-parallel training (DDP, 2 gloo processes on CPU) equals single-process training.

One spawned pair of ranks (file store, 20 s process-group timeout) runs every in-process case
through :func:`normlab.train.train` and reports back; this process trains the same configs
single-process on the global batch and compares the final parameters and buffers. A second
test launches ``python -m normlab.train`` as two real processes with torchrun's environment,
SIGKILLs one mid-run, checks that the survivor ends with an error, and resumes the run from its
last checkpoint. Run with ``-s`` to see the measured differences and times.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

import normlab
from normlab.data import ImageSet, TextCorpus
from normlab.studies import RunSpec
from normlab.studies.runner import _run_one_distributed, torchrun_command
from normlab.train import (
    ImageRuntime,
    ImageTask,
    LMRuntime,
    LMTask,
    RunConfig,
    TrainConfig,
    read_jsonl,
    train,
)
from normlab.train import distributed as nd
from normlab.train.__main__ import main as train_main

pytestmark = pytest.mark.distributed

WORLD = 2
DEADLINE_S = 90.0  # the pair normally finishes in ~10 s on 2 loaded cores; a hang is killed
TEXT = "".join(f"LINE {i % 7}: the quick brown fox jumps over the lazy dog\n" for i in range(400))
TINY_GPT = {"n_layer": 2, "n_embd": 16, "n_head": 2}


pytestmark = pytest.mark.usefixtures("one_thread_plain_torch")


# ------------------------------------------------------------------------------------------------
# Configurations and in-memory data, built identically in the children and here


def lm_config(*, dropout: float = 0.0, **train_opts: Any) -> RunConfig:
    opts: dict[str, Any] = {"steps": 4, "batch_size": 8, "lr": 3e-3, "log_every": 1, "eval_every": 2}
    opts.update(train_opts)
    task = LMTask(block_size=16, gpt={**TINY_GPT, "dropout": dropout}, eval_batches=2, eval_batch_size=4)
    return RunConfig(task=task, train=TrainConfig(**opts))


def image_config(norm: str, **train_opts: Any) -> RunConfig:
    opts: dict[str, Any] = {"steps": 3, "batch_size": 8, "lr": 0.02, "log_every": 1, "ckpt_every": 2}
    opts.update(train_opts)
    task = ImageTask(n_test=16, convnet={"widths": (4, 8), "depth": 1, "norm": norm})
    return RunConfig(task=task, train=TrainConfig(**opts))


def lm_runtime(config: RunConfig) -> LMRuntime:
    assert isinstance(config.task, LMTask)
    return LMRuntime(
        config.task, TextCorpus.from_text(TEXT), seed=config.train.seed, batch_size=config.train.batch_size
    )


def image_runtime(config: RunConfig) -> ImageRuntime:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 12, 12)).astype(np.uint8)
    y = rng.integers(0, 3, 64)
    images = ImageSet.from_arrays(x[:48], y[:48], x[48:], y[48:])
    assert isinstance(config.task, ImageTask)
    return ImageRuntime(config.task, images, seed=config.train.seed, batch_size=config.train.batch_size)


def runtime_for(config: RunConfig) -> LMRuntime | ImageRuntime:
    return lm_runtime(config) if isinstance(config.task, LMTask) else image_runtime(config)


# name -> (config, dist_bn); each must equal single-process training on the global batch. The
# GPTs use SGD: the key bias gets a zero gradient in exact arithmetic (softmax ignores a constant
# per row), and Adam would turn its rounding noise (~1e-10) into steps of size lr, ~1e-6 apart.
SGD: dict[str, Any] = {"optimizer": "sgd", "lr": 0.1}
EQUAL_CASES: dict[str, tuple[RunConfig, nd.DistBN]] = {
    "gpt-layernorm": (lm_config(ckpt_every=2, **SGD), "sync"),
    "gpt-layernorm-accum2": (lm_config(accum_steps=2, **SGD), "sync"),
    "convnet-batchless": (image_config("batchless"), "sync"),
    "convnet-batchnorm-sync": (image_config("batchnorm"), "sync"),
}
AVERAGE_CASE = image_config("batchnorm", seed=1)
RESUME_CASE = lm_config(dropout=0.1, steps=6, ckpt_every=2)
FAULT_CASE = lm_config(steps=5)
FAULT_STEP = 3  # the rank-1 fault happens in this step (1-based)


class NaNOnRank1(LMRuntime):
    """Rank 1's loss is NaN from step ``FAULT_STEP`` on; rank 0's never is."""

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        loss = super().loss(model, batch)
        self.calls = getattr(self, "calls", 0) + 1
        return loss * float("nan") if dist.get_rank() == 1 and self.calls >= FAULT_STEP else loss


class RaiseOnRank1(LMRuntime):
    """Rank 1 raises in step ``FAULT_STEP`` before its forward."""

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        self.calls = getattr(self, "calls", 0) + 1
        if dist.get_rank() == 1 and self.calls == FAULT_STEP:
            raise ValueError("bad batch on rank 1")
        return super().loss(model, batch)


class CrashAtError(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# What each spawned rank runs


def _outcome(fn: Any) -> dict[str, Any]:
    try:
        return {"summary": fn()}
    except Exception as err:
        return {"error": type(err).__name__, "message": str(err), "ranks": getattr(err, "ranks", None)}


def run_rank(rank: int, out: Path) -> dict[str, Any]:
    ctx = nd.context()
    assert ctx is not None and ctx.rank == rank
    results: dict[str, Any] = {}
    for name, (config, mode) in EQUAL_CASES.items():
        results[name] = train(config, out / name, task=runtime_for(config), dist_bn=mode)
    results["average"] = train(
        AVERAGE_CASE, out / "average", task=image_runtime(AVERAGE_CASE), dist_bn="average"
    )

    straight = train(RESUME_CASE, out / "straight", task=lm_runtime(RESUME_CASE))

    def crash(step: int) -> None:
        if step == 3:
            raise CrashAtError

    crashed = _outcome(
        lambda: train(RESUME_CASE, out / "resumed", task=lm_runtime(RESUME_CASE), on_step=crash)
    )
    other_bn = _outcome(
        lambda: train(RESUME_CASE, out / "resumed", task=lm_runtime(RESUME_CASE), dist_bn="average")
    )
    resumed = train(RESUME_CASE, out / "resumed", task=lm_runtime(RESUME_CASE))
    results["resume"] = {"straight": straight, "crashed": crashed, "other-bn": other_bn, "resumed": resumed}

    base = lm_runtime(FAULT_CASE)
    nan_task = NaNOnRank1(base.task, base.corpus, seed=0, batch_size=8)
    results["nan"] = _outcome(lambda: train(FAULT_CASE, out / "nan", task=nan_task))
    raise_task = RaiseOnRank1(base.task, base.corpus, seed=0, batch_size=8)
    results["raise"] = _outcome(lambda: train(FAULT_CASE, out / "raise", task=raise_task))
    # the group is still usable after a fault: a run afterwards trains normally
    results["after-fault"] = _outcome(lambda: train(FAULT_CASE, out / "after", task=lm_runtime(FAULT_CASE)))
    results["indivisible"] = _outcome(
        lambda: train(lm_config(batch_size=6, accum_steps=2), out / "indivisible", task=base)
    )

    # the collectives directly: buffer sync modes, the identity check failing
    bn = normlab.BatchNorm(3)
    bn.running_mean.fill_(float(rank))
    bn.running_var.fill_(1.0 + 2 * rank)
    results["synced-average"] = (
        nd.sync_buffers(bn, "average", ctx),
        bn.running_mean.clone(),
        bn.running_var.clone(),
    )
    bn.running_mean.fill_(float(rank) + 5)
    nd.sync_buffers(nn.Sequential(bn), "broadcast", ctx)
    results["synced-broadcast"] = bn.running_mean.clone()
    net = nn.Linear(2, 2)
    with torch.no_grad():
        net.weight.fill_(1.0)
        net.bias.fill_(float(rank == 1))
    results["identical-check"] = _outcome(lambda: nd.check_identical(net, ctx))
    return results


def run_all(rank: int, out: Path) -> dict[str, Any]:
    """Every in-process case, with the fused kernels off, timed."""
    normlab.kernels.set_enabled(False)
    started = time.perf_counter()
    results = run_rank(rank, out / "runs")
    results["seconds"] = time.perf_counter() - started
    return results


def group_worker(rank: int, tmp: str, run: Any, timeout_s: float) -> None:
    """One spawned rank: join the group (file store), ``run(rank, out)``, save its results as
    ``rank{r}.pt`` (or the traceback as ``rank{r}.err``), leave the group as the CLI does."""
    torch.set_num_threads(1)
    out = Path(tmp)
    try:
        store = f"file://{out / 'store'}"
        nd.init_process_group("cpu", timeout_s=timeout_s, init_method=store, rank=rank, world_size=WORLD)
        torch.save(run(rank, out), out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        nd.destroy_process_group()
        raise
    nd.destroy_process_group(barrier=True)


def spawn_pair(
    tmp: Path, run: Any = None, deadline_s: float = DEADLINE_S, timeout_s: float = 30.0
) -> list[dict[str, Any]]:
    """Run ``run(rank, out) -> results`` (a module-level function; default :func:`run_all`, with a
    20 s process-group timeout) under :func:`group_worker` on 2 spawned ranks; raise with the
    children's tracebacks on any failure."""
    ctx = multiprocessing.get_context("spawn")
    if run is None:
        run, timeout_s = run_all, 20.0
    args = (run, timeout_s)
    procs = [ctx.Process(target=group_worker, args=(r, str(tmp), *args), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + deadline_s
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(5)
    errors = [
        f"--- rank {r} ---\n{f.read_text()}" for r in range(WORLD) if (f := tmp / f"rank{r}.err").exists()
    ]
    codes = [p.exitcode for p in procs]
    if errors or hung or any(code != 0 for code in codes):
        raise AssertionError(
            f"spawned ranks failed (exit codes {codes}, killed {hung}):\n" + "\n".join(errors)
        )
    return [torch.load(tmp / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


# ------------------------------------------------------------------------------------------------
# Checks in this process


def final_state(run_dir: Path) -> dict[str, Tensor]:
    state: dict[str, Tensor] = torch.load(run_dir / "final.pt", weights_only=True)
    return state


def max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def records(run_dir: Path, *kinds: str) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] in kinds]


def check_equal_to_single_process(tmp: Path, ranks: list[dict[str, Any]]) -> None:
    measured = {}
    for name, (config, _) in EQUAL_CASES.items():
        single = train(config, tmp / "single" / name, task=runtime_for(config))
        ddp_dir = tmp / "runs" / name
        measured[name] = max_diff(final_state(ddp_dir), final_state(tmp / "single" / name))
        assert ranks[0][name] == ranks[1][name]  # both ranks return rank 0's summary
        # the logged loss is the global-batch mean, as in the single-process log
        ddp_losses = [r["loss"] for r in records(ddp_dir, "train")]
        single_losses = [r["loss"] for r in records(tmp / "single" / name, "train")]
        assert ddp_losses == pytest.approx(single_losses, rel=1e-5, abs=1e-6), name
        assert ranks[0][name]["world_size"] == 2 and "world_size" not in single
    print("\nmax |DDP - single-process| of the final parameters and buffers:")
    for name, diff in measured.items():
        print(f"  {name:<24} {diff:.3g}")
    assert max(measured.values()) <= 1e-6, measured


def check_batchnorm_modes(tmp: Path, ranks: list[dict[str, Any]]) -> None:
    # 'average' trains plain BatchNorm per rank, so its statistics are not the global batch's
    single = tmp / "single" / "average"
    train(AVERAGE_CASE, single, task=image_runtime(AVERAGE_CASE))
    assert max_diff(final_state(tmp / "runs" / "average"), final_state(single)) > 1e-4
    assert ranks[0]["average"]["dist_bn"] == "average"
    count, mean, var = ranks[0]["synced-average"]
    assert count == 4 and torch.equal(mean, torch.full((3,), 0.5)) and torch.equal(var, torch.full((3,), 2.0))
    assert all(torch.equal(r["synced-average"][1], mean) for r in ranks)
    assert all(torch.equal(r["synced-broadcast"], torch.full((3,), 5.0)) for r in ranks)
    for r in ranks:
        outcome = r["identical-check"]
        assert outcome["error"] == "RankFailedError" and outcome["ranks"] == [1], outcome
        assert "differs from rank 0's on rank 1: 'bias'" in outcome["message"]


def check_resume(tmp: Path, ranks: list[dict[str, Any]]) -> None:
    """Crash after step 3 (checkpoint at 2), resume: bit-exact with the straight run, dropout on."""
    for r in ranks:
        assert r["resume"]["crashed"]["error"] == "CrashAtError"
        other = r["resume"]["other-bn"]  # refused: the checkpoint was trained with 'sync'
        assert other["error"] == "ValueError" and "dist_bn='sync'" in other["message"], other
        assert r["resume"]["resumed"]["final"] == r["resume"]["straight"]["final"]
    straight, resumed = tmp / "runs" / "straight", tmp / "runs" / "resumed"
    assert max_diff(final_state(straight), final_state(resumed)) == 0.0
    assert records(straight, "train", "eval") == records(resumed, "train", "eval")
    assert [r["step"] for r in records(resumed, "resume")] == [2]


def check_faults(tmp: Path, ranks: list[dict[str, Any]]) -> None:
    for r in ranks:  # NaN on rank 1 only: both stop at the same step, the record names rank 1
        summary = r["nan"]["summary"]
        assert summary["diverged"] and summary["diverged_at"] == FAULT_STEP
    (diverged,) = records(tmp / "runs" / "nan", "diverged")
    assert diverged["rank"] == 1 and diverged["ranks"] == [1] and diverged["step"] == FAULT_STEP
    assert ranks[1]["raise"] == {"error": "ValueError", "message": "bad batch on rank 1", "ranks": None}
    assert ranks[0]["raise"]["error"] == "RankFailedError" and ranks[0]["raise"]["ranks"] == [1]
    assert f"rank 1 raised an exception at step {FAULT_STEP}" in ranks[0]["raise"]["message"]
    assert not (tmp / "runs" / "raise" / "result.json").exists()
    for r in ranks:
        assert r["after-fault"]["summary"]["steps"] == FAULT_CASE.train.steps
        assert r["indivisible"]["error"] == "ValueError"
        assert "batch_size=6 is not divisible by world_size=2 x accum_steps=2" in r["indivisible"]["message"]


def test_two_ranks_train_like_one_process_on_the_global_batch(tmp_path: Path) -> None:
    """Every in-process distributed check on one spawned pair; all checks run, failures listed."""
    started = time.perf_counter()
    ranks = spawn_pair(tmp_path)
    print(
        f"\nspawned pair: {time.perf_counter() - started:.1f} s (rank 0 training {ranks[0]['seconds']:.1f} s)"
    )
    failures = []
    for check in (check_equal_to_single_process, check_batchnorm_modes, check_resume, check_faults):
        try:
            check(tmp_path, ranks)
        except AssertionError as error:
            failures.append(f"[{check.__name__}] {error!r}")
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------------------
# Real processes: python -m normlab.train under torchrun's environment


LAUNCH = """
import functools, sys, time
import normlab.train.__main__ as cli
delay = float(sys.argv[1])
cli.train = functools.partial(cli.train, on_step=lambda step: time.sleep(delay))
sys.exit(cli.main(sys.argv[2:]))
"""
KILL_CASE = lm_config(steps=16, ckpt_every=4, eval_every=8, **SGD)
TIMEOUT_S = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def launch(args: list[str], delay: float) -> list[subprocess.Popen[str]]:
    port = str(free_port())
    procs = []
    for rank in range(WORLD):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(WORLD),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "NORMLAB_DIST_TIMEOUT": str(TIMEOUT_S),
            "NORMLAB_KERNELS": "0",
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, "-c", LAUNCH, str(delay), *args]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """The corpus of the in-process reference runs, as a ``--data-dir`` for the subprocesses."""
    root = tmp_path / "data"
    (root / "text").mkdir(parents=True)
    (root / "text" / "shakespeare.txt").write_text(TEXT)
    return root


def test_a_killed_rank_stops_the_other_and_the_run_resumes(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ``python -m normlab.train`` processes with torchrun's variables; SIGKILL rank 1 after
    the first checkpoint: rank 0 ends with an error (gloo sees the peer gone, or the 5 s
    timeout). Then the study runner resumes the run with a real ``torchrun --nproc_per_node 2``,
    and it ends where the uninterrupted single-process run on the global batch ends."""
    config_file = tmp_path / "run-config.json"
    config_file.write_text(json.dumps(KILL_CASE.to_dict()))
    run = tmp_path / "run"
    args = ["--config", str(config_file), "--run-dir", str(run), "--data-dir", str(data_dir), "--resume"]
    procs = launch(args, delay=0.1)
    try:
        deadline = time.monotonic() + 60
        while not (run / "checkpoint.pt").exists() and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.02)
        assert (run / "checkpoint.pt").exists(), "no checkpoint within 60 s"
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = procs[0].communicate(timeout=TIMEOUT_S + 30)  # a hang fails here, not in 30 min
        survivor_s = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    print(f"\nrank 0 ended {survivor_s:.2f} s after rank 1 was killed (timeout {TIMEOUT_S} s)")
    assert procs[0].returncode not in (0, None), err
    assert "normlab.train rank 0:" in err, err
    print(next(line for line in err.splitlines() if line.startswith("normlab.train rank 0:")))
    assert not (run / "result.json").exists()
    step = max(r["step"] for r in records(run, "train"))
    assert 4 <= step < KILL_CASE.train.steps

    monkeypatch.setenv("NORMLAB_KERNELS", "0")
    monkeypatch.setenv(nd.TIMEOUT_ENV, "30")
    spec = RunSpec(group="lm", cell="kill", params={}, seed=0, config=KILL_CASE)
    key, summary, error, _ = _run_one_distributed(spec, str(run), str(data_dir), "cpu", WORLD, 1, "sync")
    assert error is None, (run / "error.txt").read_text()
    assert key == "kill-s0" and summary is not None and summary["world_size"] == WORLD
    assert (run / "result.json").exists() and not (run / "checkpoint.pt").exists()
    steps = [r["step"] for r in records(run, "train")]
    assert steps == list(range(1, KILL_CASE.train.steps + 1))  # none missing, none twice
    assert [r["step"] for r in records(run, "resume")] in ([4], [8], [12])
    # the same run, uninterrupted and single-process on the global batch
    single = tmp_path / "single"
    assert train(KILL_CASE, single, data_dir=data_dir)["steps"] == KILL_CASE.train.steps
    diff = max_diff(final_state(run), final_state(single))
    print(f"max |killed-and-resumed DDP - uninterrupted single-process| = {diff:.3g}")
    assert diff <= 1e-6


def test_a_hung_rank_ends_the_other_at_the_timeout(tmp_path: Path, data_dir: Path) -> None:
    """SIGSTOP rank 1 (its sockets stay open, so only the timeout can tell): rank 0 raises after
    ``$NORMLAB_DIST_TIMEOUT`` = 5 s instead of torch's default 30 minutes."""
    config_file = tmp_path / "run-config.json"
    config_file.write_text(json.dumps(KILL_CASE.to_dict()))
    run = tmp_path / "run"
    procs = launch(
        ["--config", str(config_file), "--run-dir", str(run), "--data-dir", str(data_dir)], delay=0.1
    )
    try:
        deadline = time.monotonic() + 60
        while not (run / "checkpoint.pt").exists() and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        _, err = procs[0].communicate(timeout=TIMEOUT_S + 30)
        survivor_s = time.monotonic() - stopped_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    print(f"\nrank 0 ended {survivor_s:.2f} s after rank 1 was stopped (timeout {TIMEOUT_S} s)")
    assert procs[0].returncode not in (0, None), err
    message = next(line for line in err.splitlines() if line.startswith("normlab.train rank 0:"))
    print(message)
    assert "timed out" in message.lower() or "timeout" in message.lower(), message


def test_module_entry_point_trains_single_process(tmp_path: Path, data_dir: Path, capsys: Any) -> None:
    config = lm_config(steps=2)
    run = tmp_path / "run"
    (run).mkdir()
    (run / "config.json").write_text(json.dumps({"config_hash": "x", "config": config.to_dict()}))
    with pytest.raises(ValueError, match="another configuration"):  # the hash of another config
        train_main(["--config", str(run / "config.json"), "--run-dir", str(run), "--data-dir", str(data_dir)])
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(config.to_dict()))
    assert (
        train_main(["--config", str(bare), "--run-dir", str(tmp_path / "ok"), "--data-dir", str(data_dir)])
        == 0
    )
    summary = json.loads((tmp_path / "ok" / "result.json").read_text())
    assert summary["steps"] == 2 and "world_size" not in summary
    assert "val_loss=" in capsys.readouterr().out
    # a written config.json runs again as is: the finished run is returned
    again = ["--config", str(tmp_path / "ok" / "config.json"), "--run-dir", str(tmp_path / "ok")]
    assert train_main([*again, "--data-dir", str(data_dir)]) == 0


def test_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(nd.TIMEOUT_ENV, raising=False)
    assert nd.timeout_seconds() == nd.DEFAULT_TIMEOUT_S and nd.timeout_seconds(3) == 3.0
    monkeypatch.setenv(nd.TIMEOUT_ENV, "7.5")
    assert nd.timeout_seconds() == 7.5
    monkeypatch.setenv(nd.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=r"\$NORMLAB_DIST_TIMEOUT must be a number of seconds, got 'soon'"):
        nd.timeout_seconds()
    with pytest.raises(ValueError, match="timeout_s must be a finite number of seconds > 0"):
        nd.timeout_seconds(math.inf)
    assert nd.launched_by_torchrun({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert not nd.launched_by_torchrun({"RANK": "0"})
    assert nd.context() is None and nd.is_main()
    assert nd.failed_ranks(True, None) == [0] and nd.shard((torch.ones(3), torch.ones(3)), None)[0].shape == (
        3,
    )
    with pytest.raises(ValueError, match="dist_bn must be one of"):
        train(lm_config(), "unused", dist_bn="mean")  # type: ignore[arg-type]


def test_the_study_runner_launches_torchrun() -> None:
    cmd = torchrun_command(Path("r/config.json"), Path("r"), nproc=4, data_dir="d", dist_bn="average")
    assert cmd[1:] == [
        *("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", "-m", "normlab.train"),
        *("--config", "r/config.json", "--run-dir", "r", "--resume", "--device", "cpu"),
        *("--dist-bn", "average", "--dist", "ddp", "--data-dir", "d"),
    ]
