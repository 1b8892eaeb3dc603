"""Training: run configs, the Trainer (resumable bit for bit; one process or DDP), schedules, JSONL
logs, checkpoints of the full state, end-of-run probes."""

from normlab.train.config import ImageTask, LMTask, RunConfig, TrainConfig, config_hash
from normlab.train.logger import JsonlLogger, read_jsonl, summarize
from normlab.train.optim import make_optimizer
from normlab.train.schedules import SCHEDULES, lr_factor
from normlab.train.state import load_state, rng_state, save_state, seed_everything, set_rng_state
from normlab.train.strategy import DataParallel, FullyShard, SingleProcess, make_strategy
from normlab.train.tasks import ImageRuntime, LMRuntime, TaskRuntime, make_task, prepare_data
from normlab.train.trainer import Trainer, train

__all__ = [
    "SCHEDULES",
    "DataParallel",
    "FullyShard",
    "ImageRuntime",
    "ImageTask",
    "JsonlLogger",
    "LMRuntime",
    "LMTask",
    "RunConfig",
    "SingleProcess",
    "TaskRuntime",
    "TrainConfig",
    "Trainer",
    "config_hash",
    "load_state",
    "lr_factor",
    "make_optimizer",
    "make_strategy",
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
