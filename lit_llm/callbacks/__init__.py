"""Callbacks: throughput and MFU, sample generation, benchmark scores while training, the loss plot, checkpoints in
the run folder, a Rich progress bar.

Importable as ``lit_llm.callbacks.X`` from configs (``class_path: lit_llm.callbacks.Throughput``).
"""

from lit_llm.callbacks.checkpoint import Checkpoint
from lit_llm.callbacks.evaluation import PeriodicEval
from lit_llm.callbacks.guard import NonFiniteGuard
from lit_llm.callbacks.loss_plot import LossPlot
from lit_llm.callbacks.predictions import PredictionWriter
from lit_llm.callbacks.progress import ProgressBar
from lit_llm.callbacks.rng import RNGState
from lit_llm.callbacks.samples import SampleGeneration
from lit_llm.callbacks.throughput import Throughput, get_peak_flops

__all__ = [
    "Checkpoint",
    "LossPlot",
    "NonFiniteGuard",
    "PeriodicEval",
    "PredictionWriter",
    "ProgressBar",
    "RNGState",
    "SampleGeneration",
    "Throughput",
    "get_peak_flops",
]
