"""The book's loss figure: training and validation loss against tokens seen, with epochs on a second axis."""

from __future__ import annotations

import csv
import math
import os
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lit_llm.errors import ConfigError

_COLUMNS = ("step", "tokens_seen", "epoch", "train_loss", "val_loss")


class LossPlot(pl.Callback):
    """Record one point per validation run and draw the book's ``plot_losses`` figure when training ends.

    A point holds the optimizer step, ``pl_module.tokens_seen``, the epochs seen (fractional when validation runs
    mid-epoch), the mean training loss since the previous validation, and ``val/loss``. Training losses are summed
    on the device and read only at validation, so recording costs no per-step synchronisation. Sanity-check
    validation is skipped.

    At the end of training, rank 0 writes the figure to ``<log dir>/<filename>`` and the points to ``loss.csv``
    beside it (the log dir is ``trainer.log_dir``, else ``default_root_dir``). The points are saved in checkpoints,
    so a resumed run plots its whole history.
    """

    def __init__(self, filename: str = "loss.png") -> None:
        """Plot training and validation loss.

        Args:
            filename: Name of the figure inside the run's log directory; its extension picks the format
                (``.png``, ``.pdf``, ``.svg``).
        """
        super().__init__()
        if not isinstance(filename, str) or not filename or os.path.basename(filename) != filename:
            raise ConfigError(
                f"LossPlot(filename={filename!r}): give a plain file name such as 'loss.png'; "
                "it is written inside the run's log directory"
            )
        self.filename = filename
        self.points: list[dict[str, float]] = []
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self._batches_in_epoch = 0
        self._log_dir: str | None = None
        self._warned_no_val = False

    # --- recording ---------------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # trainer.log_dir is a collective call (it broadcasts), so resolve it here, where every rank runs.
        self._log_dir = trainer.log_dir or trainer.default_root_dir
        self._loss_sum, self._loss_count = None, 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches_in_epoch = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches_in_epoch = batch_idx + 1
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return  # a skipped step (training_step returned None)
        # Lightning hands over the loss already divided by accumulate_grad_batches; undo that to plot the real loss.
        loss = loss.detach().float() * trainer.accumulate_grad_batches
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._loss_count += 1

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_validation_end rather than on_validation_epoch_end: only here are the epoch's val/loss in callback_metrics.
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        # Sum over ranks so the point is the global mean; every rank runs this, as the collective needs.
        totals = torch.stack([
            self._loss_sum if self._loss_sum is not None else torch.zeros((), device=pl_module.device),
            torch.tensor(float(self._loss_count), device=pl_module.device),
        ]).to(pl_module.device)
        totals = trainer.strategy.reduce(totals, reduce_op="sum")
        loss_sum, count = totals.tolist()
        self._loss_sum, self._loss_count = None, 0

        val = trainer.callback_metrics.get("val/loss")
        if val is None and not self._warned_no_val:
            rank_zero_warn("LossPlot: no 'val/loss' among the logged metrics; the validation curve will be empty")
            self._warned_no_val = True
        # The book plots the training loss measured in eval mode; use it when the data module provides it.
        train_eval = trainer.callback_metrics.get("train_eval/loss")
        if train_eval is not None:
            loss_sum, count = float(train_eval), 1
        num_batches = trainer.num_training_batches
        epoch = float(trainer.current_epoch)
        if isinstance(num_batches, int) and num_batches > 0:
            epoch += self._batches_in_epoch / num_batches
        self.points.append({
            "step": float(trainer.global_step),
            "tokens_seen": float(getattr(pl_module, "tokens_seen", trainer.global_step)),
            "epoch": epoch,
            "train_loss": loss_sum / count if count else math.nan,
            "val_loss": float(val) if val is not None else math.nan,
        })

    # --- writing -----------------------------------------------------------------------------------------------

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.write(self._log_dir or trainer.default_root_dir)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # An interrupted run (Ctrl-C) still gets its figure up to the last validation.
        if trainer.is_global_zero and self.points:
            try:
                self.write(self._log_dir or trainer.default_root_dir)
            except Exception as err:  # never mask the exception that stopped training
                rank_zero_warn(f"LossPlot: could not write the loss plot after the failure: {err}")

    def write(self, log_dir: str) -> str | None:
        """Write the figure and ``loss.csv`` into ``log_dir``; returns the figure's path, or None without points."""
        if not self.points:
            rank_zero_info("LossPlot: no validation ran during training, so no loss plot was written")
            return None
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, "loss.csv"), "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=_COLUMNS)
            writer.writeheader()
            writer.writerows(self.points)
        path = os.path.join(log_dir, self.filename)
        _draw(self.points, path)
        rank_zero_info(f"LossPlot: wrote {path}")
        return path

    # --- checkpointing -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"points": [dict(p) for p in self.points]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.points = [dict(p) for p in state_dict.get("points", [])]


def _draw(points: list[dict[str, float]], path: str) -> None:
    # Figure + FigureCanvasAgg draws off-screen without pyplot, so the user's global backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, MaxNLocator

    tokens = [p["tokens_seen"] for p in points]
    fig = Figure(figsize=(5, 3))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(tokens, [p["train_loss"] for p in points], marker=".", label="Training loss")
    ax.plot(tokens, [p["val_loss"] for p in points], marker=".", linestyle="-.", label="Validation loss")
    ax.set_xlabel("Tokens seen")
    ax.set_ylabel("Loss")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.legend(loc="upper right")
    # As in the book: an invisible plot against epochs gives the top axis the same span as the tokens below
    # (exact when every batch holds the same number of tokens).
    top = ax.twiny()
    top.plot([p["epoch"] for p in points], [p["train_loss"] for p in points], alpha=0)
    top.set_xlabel("Epochs")
    top.xaxis.set_major_locator(MaxNLocator(nbins=6))
    fig.tight_layout()
    fig.savefig(path, dpi=150)
