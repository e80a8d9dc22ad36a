"""LightningModules, one per task."""

from lit_llm.tasks.base import GPTTask
from lit_llm.tasks.pretrain import PretrainTask

__all__ = ["GPTTask", "PretrainTask"]
