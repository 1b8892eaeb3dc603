"""Append-only JSONL metrics, flushed at every write, and a reader that survives a kill.

One JSON object per line. A process killed mid-write leaves at most one partial last line;
:func:`read_jsonl` skips it. When a run resumes from the checkpoint of step ``k``,
:meth:`JsonlLogger.open` first drops the records after step ``k`` (written after that
checkpoint by the killed process), so no step is logged twice and none is missing.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from normlab._atomic import atomic_write_bytes


def json_safe(value: Any) -> Any:
    """JSON-safe values: non-finite floats become ``None`` (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(record: Mapping[str, Any]) -> str:
    return json.dumps(json_safe(record), separators=(",", ":"), allow_nan=False)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All complete records of ``path`` (``[]`` if it does not exist).

    A last line without its newline is the trace of a kill mid-write and is skipped; a
    complete line that is not a JSON object is an error naming the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    records = []
    for i, line in enumerate(lines[:-1]):  # the last piece has no newline: empty, or cut by a kill
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"read_jsonl: {str(path)!r} line {i + 1} is not JSON: {err}") from err
        if not isinstance(obj, dict):
            raise ValueError(f"read_jsonl: {str(path)!r} line {i + 1} is not a JSON object")
        records.append(obj)
    return records


class JsonlLogger:
    """Appends records to ``path``; each :meth:`log` is one flushed line.

    Use :meth:`open`, which can first truncate the file to the records up to a resumed step.
    """

    def __init__(self, path: str | os.PathLike[str], file: TextIO) -> None:
        self.path = Path(path)
        self._file = file

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, keep_until_step: int | None = None) -> JsonlLogger:
        """Open ``path`` for appending. With ``keep_until_step``, records whose ``step`` is larger
        (or every record when it is 0 and they carry steps) are removed first, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            records = read_jsonl(path)
            keep = [r for r in records if keep_until_step is None or int(r.get("step", 0)) <= keep_until_step]
            raw = path.read_bytes()
            if len(keep) != len(records) or (raw and not raw.endswith(b"\n")):
                atomic_write_bytes(path, "".join(dumps(r) + "\n" for r in keep).encode())
        return cls(path, path.open("a", encoding="utf-8"))

    def log(self, record: Mapping[str, Any]) -> None:
        self._file.write(dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class NoLogger:
    """What ranks other than 0 log to: nothing (rank 0 writes the run directory)."""

    def log(self, record: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary of a run from its logged records (what the claims are computed from).

    ``final``: the metrics of the last evaluation, or the task's fallback values if the run
    diverged; ``train_loss``: the mean training loss of the last 10% of the logged steps;
    ``probe``: the last probe record; ``diverged``; ``steps``: the last step logged.
    """
    evals = [r for r in records if r.get("kind") == "eval"]
    trains = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    starts = [r for r in records if r.get("kind") == "start"]
    diverged = [r for r in records if r.get("kind") == "diverged"]
    probes = [r for r in records if r.get("kind") == "probe"]
    fallback: dict[str, float] = dict(starts[0].get("fallback", {})) if starts else {}
    final: dict[str, Any] = {}
    if diverged:
        final = dict(fallback)
    elif evals:
        final = {k: v for k, v in evals[-1].items() if k not in ("kind", "step")}
    tail = trains[-max(1, len(trains) // 10) :] if trains else []
    return {
        "diverged": bool(diverged),
        "diverged_at": diverged[0]["step"] if diverged else None,
        "steps": max((int(r.get("step", 0)) for r in records), default=0),
        "final": final,
        "train_loss": (sum(float(r["loss"]) for r in tail) / len(tail)) if tail else None,
        "probe": {k: v for k, v in probes[-1].items() if k not in ("kind", "step")} if probes else {},
    }


def open_tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ValueError(
            "tensorboard logging needs the tensorboard package: pip install tensorboard"
        ) from err
    return SummaryWriter(str(run_dir / "tb"))


def progress_bar(total: int, initial: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)
