"""LightningModules, one per task."""

from lit_llm.tasks.base import GPTTask
from lit_llm.tasks.chat import ChatTask
from lit_llm.tasks.classify import ClassifyTask
from lit_llm.tasks.dpo import DPOTask
from lit_llm.tasks.instruct import InstructTask
from lit_llm.tasks.pretrain import PretrainTask

__all__ = ["ChatTask", "ClassifyTask", "DPOTask", "GPTTask", "InstructTask", "PretrainTask"]
