"""The run directory: its files, the lock that keeps two processes off one run, and its config.

A run directory holds:

- ``config.json``: the :class:`~normlab.train.config.RunConfig` and its hash (written first);
- ``metrics.jsonl``: one record per line, ``{"kind": "train" | "eval" | "probe" | "start" |
  "resume" | "diverged", "step": ..., ...}``, flushed at every write;
- ``checkpoint.pt``: model, optimizer, RNG states and step, every ``ckpt_every`` steps,
  written atomically (removed once the run has finished);
- ``final.pt``: the final model ``state_dict``;
- ``result.json``: the summary, written last and atomically: its presence marks the run
  finished.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from normlab._atomic import atomic_write_bytes

__all__ = [
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "FINAL_FILE",
    "METRICS_FILE",
    "RESULT_FILE",
    "claim",
    "run_lock",
    "write_json",
]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
FINAL_FILE = "final.pt"
RESULT_FILE = "result.json"


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``run_dir/.lock`` while training: two processes (a resumed
    study and a survivor of the killed one) never train the same run. The kernel drops the
    lock when its holder dies, even by SIGKILL. Where ``fcntl`` is missing, no lock is taken."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(run_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise ValueError(f"train: {str(run_dir)!r} is being trained by another process") from err
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def claim(run_dir: Path, digest: str, config: Mapping[str, Any], *, write: bool) -> dict[str, Any] | None:
    """Claim ``run_dir`` for the run whose config hash is ``digest``: its summary if it already
    finished, else ``None`` (``config.json`` is written first, where ``write``).

    Raises:
        ValueError: the directory holds a run of another configuration.
    """
    config_path = run_dir / CONFIG_FILE
    if config_path.exists():
        written = json.loads(config_path.read_text())
        if written.get("config_hash") != digest:
            raise ValueError(
                f"train: {str(run_dir)!r} holds a run of another configuration "
                f"({str(written.get('config_hash'))[:12]} != {digest[:12]}); use a new directory"
            )
        result_path = run_dir / RESULT_FILE
        if result_path.exists():
            result: dict[str, Any] = json.loads(result_path.read_text())
            return result
    elif write:
        write_json(config_path, {"config_hash": digest, "config": dict(config)})
    return None
