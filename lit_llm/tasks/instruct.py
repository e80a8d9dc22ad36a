"""Instruction finetuning (the book's chapter 7): train on prompt + response, then answer the test set and score it.

Training and evaluation use the next-token loss on the batches of :class:`~lit_llm.data.InstructDataModule`:
``(inputs, targets)``, or ``(inputs, targets, documents)`` when several examples are packed into each row
(``data.packing``; the model keeps them from seeing each other).
After ``fit`` (and in ``python -m lit_llm.train predict``) the model answers every test prompt, greedily by default
as the book does; the answers are written, with each test record's own fields, to ``test_responses.json`` in the run
folder (the book's ``instruction-data-with-response.json`` layout) and scored without any outside model:

- ``test/exact_match``: the fraction of responses equal to the expected output once leading and trailing
  whitespace is stripped from both (case and inner spacing count);
- ``test/rougeL``: the mean ROUGE-L F-measure (``torchmetrics.text.ROUGEScore``; it lower-cases and splits on
  anything that is not a letter or digit).

The scores go to ``test_scores.json`` beside the responses and to the loggers. ``python -m lit_llm.judge`` scores the
same file with a local or remote LLM, like the book's Ollama evaluation.
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torchmetrics import MeanMetric, SumMetric

from lit_llm.data.prompts import get_template
from lit_llm.distributed import splits_model
from lit_llm.errors import ConfigError
from lit_llm.model.sampling import check_sampling_args
from lit_llm.tasks.base import PACKING_UNSUPPORTED, GPTTask
from lit_llm.tasks.responses import RESPONSE_KEY, RespondsToPrompts, exact_match, rouge_l

__all__ = ["RESPONSE_KEY", "InstructTask", "exact_match", "rouge_l"]

#: A batch: ``(inputs, targets)`` or, packed, ``(inputs, targets, documents)``, all ``(B, T)``.
Batch = tuple[torch.Tensor, ...]

class InstructTask(RespondsToPrompts, GPTTask):
    """Instruction finetuning of the GPT; pair it with :class:`~lit_llm.data.InstructDataModule`.

    Logs ``train/loss`` (with ``train/lr``, ``train/tokens_seen``, ``train/grad_norm``), ``val/loss`` and
    ``test/loss`` (token-weighted over the split), and after generation ``test/exact_match`` and ``test/rougeL``.
    A batch whose targets are all ignored (every row's prompt masked or cut off) gives a loss of 0 that moves no
    weight, instead of the NaN of an empty mean; such batches are counted and reported at the end of each epoch.

    Args:
        *args: The arguments of :class:`~lit_llm.tasks.base.GPTTask` (``model``, ``learning_rate``, ``lora``, ...).
        prompt_template: The template the model learns; ``null`` takes the data module's ``prompt_template`` (the
            usual case; a different value is an error). Saved in checkpoints as the hyperparameter
            ``prompt_template``, which ``python -m lit_llm.generate --chat`` uses.
        generate_after_fit: Answer the test split at the end of ``fit`` (on rank 0), write the responses and scores.
            Under ``fast_dev_run`` only the first batch of prompts is answered.
        max_new_tokens: Most tokens generated per response (the book uses 256).
        temperature: 0 decodes greedily (the book); higher values sample.
        top_k: Sample among the k most likely tokens only.
        top_p: Nucleus sampling threshold in (0, 1].
        generation_seed: Seed of the sampling generator (unused when greedy).
        responses_file: Where the responses go, relative to ``trainer.default_root_dir``; the scores are written
            beside it as ``<stem>_scores.json`` (``test_responses.json`` -> ``test_scores.json``).
        **kwargs: Keyword arguments of :class:`~lit_llm.tasks.base.GPTTask`.
    """

    def __init__(
        self,
        *args: Any,
        prompt_template: str | None = None,
        generate_after_fit: bool = True,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generation_seed: int = 123,
        responses_file: str = "test_responses.json",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        check_sampling_args(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens)
        if prompt_template is not None:
            get_template(prompt_template)
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.empty_batches = SumMetric()
        self.test_scores: dict[str, float] = {}
        self._predictions: list[tuple[int, str]] = []

    def setup(self, stage: str) -> None:
        super().setup(stage)
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if getattr(datamodule, "packing", False) and splits_model(trainer.strategy):
            raise ConfigError(PACKING_UNSUPPORTED.format(strategy=type(trainer.strategy).__name__))

    # ---- loss --------------------------------------------------------------------------------------------------
    def _loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets, *packed = batch
        n_tokens = (targets != -100).sum()
        loss = self.loss(inputs, targets, packed[0] if packed else None)
        # An all-ignored batch makes the mean 0/0 = NaN; its gradient through `where` is exactly zero.
        return torch.where(n_tokens > 0, loss, torch.zeros_like(loss)), n_tokens

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        loss, n_tokens = self._loss(batch)
        self.empty_batches.update((n_tokens == 0).float())  # on the device: no host sync per step
        self.count_tokens(batch[0])
        self.log("train/loss", loss, on_step=True, on_epoch=False)  # shown by ProgressBar, see there
        self.log_lr()
        return {"loss": loss}

    def on_train_epoch_end(self) -> None:
        if not self.empty_batches.update_called:
            return
        empty = int(self.empty_batches.compute())
        self.empty_batches.reset()
        if empty:
            rank_zero_warn(
                f"{empty} training batches this epoch had no target token (every row's prompt masked or cut off by "
                "data.allowed_max_length); they counted as loss 0 and changed no weight. Raise "
                "data.allowed_max_length or set data.overlong=drop."
            )

    def _evaluate(self, batch: Batch, split: str) -> torch.Tensor:
        loss, n_tokens = self._loss(batch)
        metric = self.val_loss if split == "val" else self.test_loss
        metric.update(loss, weight=n_tokens)
        self.log(f"{split}/loss", metric, on_step=False, on_epoch=True, prog_bar=split == "val")
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test")
