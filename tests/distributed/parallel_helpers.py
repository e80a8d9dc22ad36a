"""Recording for the tensor- and pipeline-parallel tests (importable by the training subprocesses, which get this folder
on ``PYTHONPATH``): the gradients of the tied embedding and head at the first optimizer step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

#: The GPT's modules whose weight is the tied embedding / head.
TIED = ("tok_emb", "out_head")


class TiedGradRecorder(pl.Callback):
    """Write ``grads.rank<r>.pt`` into ``folder``: the gradient of ``tok_emb.weight`` and ``out_head.weight`` (those
    this rank holds, whole) just before the first optimizer step, after the strategy has reduced them and before
    clipping. A tensor-parallel gradient is gathered from its shards (every rank takes part)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if trainer.global_step != 0:
            return
        grads = {}
        for name in TIED:
            module = getattr(pl_module.model, name, None)
            if module is None or module.weight.grad is None:
                continue
            grad = module.weight.grad
            grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
            grads[f"{name}.weight"] = grad.detach().cpu().clone()
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(grads, self.folder / f"grads.rank{trainer.global_rank}.pt")
