"""LightningDataModules and the helpers that turn a ``source`` string into records."""

from lit_llm.data.chat import ChatDataModule
from lit_llm.data.classify import ClassifyDataModule
from lit_llm.data.dpo import DPODataModule
from lit_llm.data.instruct import InstructDataModule
from lit_llm.data.pretrain import PretrainDataModule
from lit_llm.data.sources import load_documents, load_records

__all__ = [
    "ChatDataModule",
    "ClassifyDataModule",
    "DPODataModule",
    "InstructDataModule",
    "PretrainDataModule",
    "load_documents",
    "load_records",
]
