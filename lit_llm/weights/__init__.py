"""Weights in and out, and everything about checkpoint files: readers that never execute code from a file
(:mod:`~lit_llm.weights.readers`, :mod:`~lit_llm.weights.files`), export (:mod:`~lit_llm.weights.export`), where
checkpoints are and whether they are whole (:mod:`~lit_llm.weights.discovery`), and one file from a sharded checkpoint
directory (:mod:`~lit_llm.weights.consolidate`), checkpoints by URL (:mod:`~lit_llm.weights.remote`) and the pickles of
sharded directories read without running code (:mod:`~lit_llm.weights.pickled`)."""

from lit_llm.weights.consolidate import consolidate
from lit_llm.weights.discovery import newest_checkpoint
from lit_llm.weights.export import export_hf, save_weights
from lit_llm.weights.readers import build_model, load_model_for_inference, load_weights

__all__ = [
    "build_model",
    "consolidate",
    "export_hf",
    "load_model_for_inference",
    "load_weights",
    "newest_checkpoint",
    "save_weights",
]
