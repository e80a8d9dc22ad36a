"""LightningModules, one per task."""

from lit_llm.tasks.base import GPTTask
from lit_llm.tasks.classify import ClassifierModule
from lit_llm.tasks.instruct import InstructModule
from lit_llm.tasks.pretrain import PretrainTask

__all__ = ["ClassifierModule", "GPTTask", "InstructModule", "PretrainTask"]
