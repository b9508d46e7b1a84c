"""Reference models trained by the ``sparsecore`` command."""
from .gpt import GPT, GPTConfig, build_model, count_parameters

__all__ = ["GPT", "GPTConfig", "build_model", "count_parameters"]
