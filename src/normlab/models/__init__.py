"""Small reference models assembled from normlab blocks."""

from normlab.models.gpt import GPT, GPTConfig, GPTOutput

__all__ = ["GPT", "GPTConfig", "GPTOutput"]
