"""Training: run configs, the resumable loop, schedules, JSONL logs, checkpoints of the full state."""

from normlab.train.config import ImageTask, LMTask, RunConfig, TrainConfig, config_hash
from normlab.train.logger import JsonlLogger, read_jsonl
from normlab.train.loop import make_optimizer, summarize, train
from normlab.train.schedules import SCHEDULES, lr_factor
from normlab.train.state import load_state, rng_state, save_state, seed_everything, set_rng_state
from normlab.train.tasks import ImageRuntime, LMRuntime, TaskRuntime, make_task, prepare_data

__all__ = [
    "SCHEDULES",
    "ImageRuntime",
    "ImageTask",
    "JsonlLogger",
    "LMRuntime",
    "LMTask",
    "RunConfig",
    "TaskRuntime",
    "TrainConfig",
    "config_hash",
    "load_state",
    "lr_factor",
    "make_optimizer",
    "make_task",
    "prepare_data",
    "read_jsonl",
    "rng_state",
    "save_state",
    "seed_everything",
    "set_rng_state",
    "summarize",
    "train",
]
