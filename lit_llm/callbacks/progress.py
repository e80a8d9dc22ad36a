"""A Rich progress bar that shows what a pretraining run is watched for: loss, tokens/s, validation loss."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar


class ProgressBar(RichProgressBar):
    """Lightning's ``RichProgressBar`` with short metric names (``loss``, ``tok/s``, ``val_loss``, ``lr``) and an
    epoch label that stays sensible when a run is bounded by ``max_steps`` rather than ``max_epochs``.

    Args:
        refresh_rate: Redraw every this many batches (0 disables the bar).
        leave: Keep each finished epoch's bar on screen.
    """

    SHORT_NAMES = {
        "train/loss": "loss",
        "perf/tokens_per_sec": "tok/s",
        "val/loss": "val_loss",
        "val/ppl": "val_ppl",
        "train/lr": "lr",
    }

    METRICS_INTERVAL_S = 0.5

    def __init__(self, refresh_rate: int = 1, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self._metrics_read_at = float("-inf")

    def _update_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Reading the logged metrics copies them to the host, which makes the CPU wait for the GPU; on every batch
        # that costs a few percent of a GPU run's speed. Refresh them at most twice a second instead.
        now = time.monotonic()
        if now - self._metrics_read_at < self.METRICS_INTERVAL_S and trainer.state.stage == "train":
            return
        self._metrics_read_at = now
        super()._update_metrics(trainer, pl_module)

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs > 0:
            return f"Epoch {current_epoch}/{max_epochs - 1}"
        return f"Epoch {current_epoch}"

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        # The tasks log train/loss without prog_bar=True: Lightning copies every progress-bar metric to the host
        # after every batch (a GPU synchronisation per micro-batch, whether a bar is shown or not). The bar reads it
        # here instead, when it redraws.
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None and trainer.state.stage == "train":
            items = {"train/loss": float(loss), **items}
        shown: dict[str, Any] = {}
        for key, value in items.items():
            name = self.SHORT_NAMES.get(key, key)
            if name == "tok/s" and isinstance(value, (int, float)):
                value = f"{value:,.0f}"
            shown[name] = value
        return shown
