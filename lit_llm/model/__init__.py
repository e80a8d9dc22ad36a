"""The GPT itself, free of Lightning: its config and presets (:mod:`~lit_llm.model.config`), the book-shaped model
(:mod:`~lit_llm.model.gpt`), losses (:mod:`~lit_llm.model.losses`, :mod:`~lit_llm.model.fused_loss`), LoRA
(:mod:`~lit_llm.model.lora`), FP8 matmuls (:mod:`~lit_llm.model.float8`) and sampling (:mod:`~lit_llm.model.sampling`).
"""

from lit_llm.model.config import PRESETS, GPTConfig
from lit_llm.model.gpt import GPTModel

__all__ = ["PRESETS", "GPTConfig", "GPTModel"]
