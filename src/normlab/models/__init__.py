"""Small reference models assembled from normlab blocks."""

from normlab.models.checkpoint import load_checkpoint, save_checkpoint
from normlab.models.convnet import BasicBlock, ConvNet, ConvNetConfig
from normlab.models.gpt import GPT, GPTConfig, GPTOutput

__all__ = [
    "GPT",
    "BasicBlock",
    "ConvNet",
    "ConvNetConfig",
    "GPTConfig",
    "GPTOutput",
    "load_checkpoint",
    "save_checkpoint",
]
