"""LightningDataModules and the helpers that turn a ``source`` string into records."""

from lit_llm.data.classification import ClassificationDataModule
from lit_llm.data.instruction import InstructionDataModule
from lit_llm.data.pretrain import PretrainDataModule
from lit_llm.data.sources import load_documents, load_records

__all__ = [
    "ClassificationDataModule",
    "InstructionDataModule",
    "PretrainDataModule",
    "load_documents",
    "load_records",
]
