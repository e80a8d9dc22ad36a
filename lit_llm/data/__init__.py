"""LightningDataModules and the helpers that turn a ``source`` string into documents."""

from lit_llm.data.pretrain import PretrainDataModule
from lit_llm.data.sources import load_documents, load_records

__all__ = ["PretrainDataModule", "load_documents", "load_records"]
