"""Pretraining: next-token prediction over packed windows of a corpus (the book's chapter 5)."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MeanMetric

from lit_llm.model.losses import next_token_loss
from lit_llm.tasks.base import GPTTask


class TokenPerplexity(MeanMetric):
    """``exp`` of the token-weighted mean cross-entropy; update with ``(mean_loss, weight=n_tokens)``."""

    def compute(self) -> torch.Tensor:
        return torch.exp(super().compute())


class PretrainTask(GPTTask):
    """Train a GPT to predict the next token. Batches are ``(inputs, targets)`` with targets shifted by one.

    Logs ``train/loss``, ``train/lr``, ``train/tokens_seen``, ``train/grad_norm`` every step and ``val/loss``,
    ``val/ppl`` (perplexity, token-weighted over the whole validation set) every validation run, plus
    ``train_eval/loss`` when the data module evaluates training batches too (``eval_train_batches``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.val_loss = MeanMetric()
        self.val_ppl = TokenPerplexity()
        self.train_eval_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.test_ppl = TokenPerplexity()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        inputs, targets = batch
        loss = self.loss(inputs, targets)
        self.count_tokens(inputs)
        self.log("train/loss", loss, on_step=True, on_epoch=False)  # shown by ProgressBar, see there
        self.log_lr()
        return {"loss": loss}

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        inputs, targets = batch
        loss = self.loss(inputs, targets)
        n_tokens = (targets != -100).sum()
        if split == "train_eval":
            self.train_eval_loss.update(loss, weight=n_tokens)
            self.log("train_eval/loss", self.train_eval_loss, on_step=False, on_epoch=True, add_dataloader_idx=False)
            return loss
        loss_metric, ppl_metric = (self.val_loss, self.val_ppl) if split == "val" else (self.test_loss, self.test_ppl)
        loss_metric.update(loss, weight=n_tokens)
        ppl_metric.update(loss, weight=n_tokens)
        kw = dict(on_step=False, on_epoch=True, add_dataloader_idx=False)
        self.log(f"{split}/loss", loss_metric, prog_bar=split == "val", **kw)
        self.log(f"{split}/ppl", ppl_metric, **kw)
        return loss

    def validation_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> torch.Tensor:
        # Loader 1, when present, is the data module's eval-mode pass over training batches (eval_train_batches).
        return self._evaluate(batch, "val" if dataloader_idx == 0 else "train_eval")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Score text: the mean next-token loss and perplexity of each window."""
        inputs, targets = batch
        per_token = next_token_loss(self(inputs), targets, reduction="none").view_as(targets)
        mask = (targets != -100).float()
        loss = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
        return {"loss": loss, "ppl": torch.exp(loss)}
