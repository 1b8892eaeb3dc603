"""Small reference models assembled from normlab blocks, and the registry of models a task can train."""

from normlab.models.checkpoint import load_checkpoint, save_checkpoint
from normlab.models.convnet import BasicBlock, ConvNet, ConvNetConfig
from normlab.models.gpt import GPT, GPTConfig, GPTOutput
from normlab.models.zoo import MODELS, ModelEntry, register_model

__all__ = [
    "GPT",
    "MODELS",
    "BasicBlock",
    "ConvNet",
    "ConvNetConfig",
    "GPTConfig",
    "GPTOutput",
    "ModelEntry",
    "load_checkpoint",
    "register_model",
    "save_checkpoint",
]
