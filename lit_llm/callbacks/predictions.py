"""Write what ``predict`` returns to a JSON-lines file, one line per input row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities import rank_zero_info


class PredictionWriter(BasePredictionWriter):
    """Append every row of each ``predict_step`` output to ``<path>`` as one JSON object per line.

    A ``predict_step`` returns a dict of tensors (or lists) whose first dimension is the batch; row ``i`` of each
    value becomes field values of line ``i``. ``python -m lit_llm.train predict`` adds this writer when the config
    has none. Under several processes each rank writes ``<stem>.rank<N><suffix>``.

    Args:
        path: Output file; relative paths are taken from ``trainer.default_root_dir``.
    """

    def __init__(self, path: str = "predictions.jsonl") -> None:
        super().__init__(write_interval="batch")
        self.path = path
        self._file: Path | None = None
        self._rows = 0

    def _target(self, trainer: pl.Trainer) -> Path:
        path = Path(self.path)
        if not path.is_absolute():
            path = Path(trainer.default_root_dir) / path
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        return path

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._file = self._target(trainer)
        self._file.parent.mkdir(parents=True, exist_ok=True)
        self._file.write_text("", encoding="utf-8")  # a fresh file per predict run
        self._rows = 0

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not isinstance(prediction, dict):
            prediction = {"prediction": prediction}
        columns = {k: (v.detach().cpu().tolist() if isinstance(v, torch.Tensor) else list(v))
                   for k, v in prediction.items()}
        n = len(next(iter(columns.values()))) if columns else 0
        assert self._file is not None
        with self._file.open("a", encoding="utf-8") as f:
            for i in range(n):
                f.write(json.dumps({"row": self._rows + i, **{k: v[i] for k, v in columns.items()}}) + "\n")
        self._rows += n

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank_zero_info(f"PredictionWriter: wrote {self._rows} rows to {self._file}")
