"""A run killed with SIGKILL mid-training resumes and ends bit-for-bit like an uninterrupted one.

Three real subprocesses (one torch thread each, CPU): the reference run; a run killed at a step
that is not a checkpoint boundary; the resume of the killed run. Final weights and every
logged loss must be identical, with no step logged twice or missing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from normlab.train import read_jsonl

TEXT = "".join(f"LINE {i % 7}: the quick brown fox jumps over the lazy dog\n" for i in range(400))
CKPT_EVERY = 10
STEPS = 60

SCRIPT = f"""
import sys, time, torch
torch.set_num_threads(1)
from normlab.train import LMTask, RunConfig, TrainConfig, train
delay = float(sys.argv[2])
config = RunConfig(
    task=LMTask(block_size=16, gpt={{"n_layer": 2, "n_embd": 16, "n_head": 2, "dropout": 0.1}},
                eval_batches=2, eval_batch_size=4),
    train=TrainConfig(steps={STEPS}, batch_size=4, lr=3e-3, warmup=5, log_every=1, eval_every=15,
                      ckpt_every={CKPT_EVERY}, grad_clip=1.0, seed=3),
)
train(config, sys.argv[1], data_dir=sys.argv[3], on_step=lambda step: time.sleep(delay))
"""


def _python(run_dir: Path, delay: float, data_dir: Path) -> list[str]:
    return [sys.executable, "-c", SCRIPT, str(run_dir), str(delay), str(data_dir)]


def _env() -> dict[str, str]:
    # plain-torch norms in all three processes: the fused kernels compile at their first use
    # (a minute), which would race the kill and could switch paths between kill and resume
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NORMLAB_KERNELS": "0"}


def _last_step(path: Path) -> int:
    return max((r["step"] for r in read_jsonl(path) if r["kind"] == "train"), default=0)


def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "text").mkdir(parents=True)
    (data / "text" / "shakespeare.txt").write_text(TEXT)  # a prepared copy: no package needed
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    proc = subprocess.Popen(_python(killed, 0.05, data), env=_env())
    try:
        deadline = time.monotonic() + 120
        # kill between checkpoints: after step 2 * CKPT_EVERY + 3 is logged
        while _last_step(killed / "metrics.jsonl") < 2 * CKPT_EVERY + 3:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    lost_at = _last_step(killed / "metrics.jsonl")
    assert lost_at % CKPT_EVERY != 0 and lost_at < STEPS
    assert (killed / "checkpoint.pt").is_file() and not (killed / "result.json").exists()

    subprocess.run(_python(killed, 0.0, data), env=_env(), check=True, timeout=120)
    subprocess.run(_python(straight, 0.0, data), env=_env(), check=True, timeout=120)

    a = torch.load(straight / "final.pt", weights_only=True)
    b = torch.load(killed / "final.pt", weights_only=True)
    assert a.keys() == b.keys()
    diffs = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point()}
    assert max(diffs.values()) == 0.0, diffs

    def logged(path: Path) -> list[tuple[str, int, float | None]]:
        return [
            (r["kind"], r["step"], r.get("loss", r.get("val_loss")))
            for r in read_jsonl(path / "metrics.jsonl")
            if r["kind"] in ("train", "eval")
        ]

    assert logged(killed) == logged(straight)
    steps = [s for kind, s, _ in logged(killed) if kind == "train"]
    assert steps == list(range(1, STEPS + 1))  # none twice, none missing
    resumed = [r for r in read_jsonl(killed / "metrics.jsonl") if r["kind"] == "resume"]
    assert [r["step"] for r in resumed] == [lost_at // CKPT_EVERY * CKPT_EVERY]
    result = json.loads((killed / "result.json").read_text())
    assert result["final"] == json.loads((straight / "result.json").read_text())["final"]


@pytest.mark.parametrize("partial", ['{"kind": "train", "st', '{"kind": "train", "step": 99, "loss": 1.'])
def test_resume_drops_a_partial_line(tmp_path: Path, partial: str) -> None:
    from normlab.train import JsonlLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind":"train","step":1,"loss":1.0}\n{"kind":"train","step":2,"loss":0.9}\n' + partial)
    with JsonlLogger.open(path, keep_until_step=2) as log:
        log.log({"kind": "train", "step": 3, "loss": 0.8})
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
