"""Instruction finetuning (the book's chapter 7): train on prompt + response, then answer the test set and score it.

Training and evaluation use the next-token loss on the batches of :class:`~lit_llm.data.InstructDataModule`.
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

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.text import ROUGEScore

from lit_llm.data.prompts import get_template
from lit_llm.distributed import params_are_sharded
from lit_llm.errors import ConfigError
from lit_llm.model.sampling import check_sampling_args, generate
from lit_llm.tasks.base import GPTTask

RESPONSE_KEY = "model_response"


def exact_match(responses: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of ``responses`` equal to their reference after stripping surrounding whitespace (0 when empty)."""
    if len(responses) != len(references):
        raise ValueError(f"{len(responses)} responses but {len(references)} references")
    if not responses:
        return 0.0
    return sum(r.strip() == t.strip() for r, t in zip(responses, references)) / len(responses)


def rouge_l(responses: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure of ``responses`` against their references (torchmetrics; 0 when empty)."""
    if len(responses) != len(references):
        raise ValueError(f"{len(responses)} responses but {len(references)} references")
    if not responses:
        return 0.0
    metric = ROUGEScore(rouge_keys="rougeL")
    return float(metric(list(responses), list(references))["rougeL_fmeasure"])


class InstructTask(GPTTask):
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

    # ---- setup -------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Take the prompt template from the data module, so the checkpoint records what the model was taught."""
        super().setup(stage)
        datamodule = self._datamodule()
        data_template = getattr(datamodule, "prompt_template", None)
        own = self.hparams.get("prompt_template")
        if own is not None and data_template is not None and own != data_template:
            raise ConfigError(
                f"model.prompt_template={own!r} differs from data.prompt_template={data_template!r}; the model must be "
                "trained and prompted with one template: set one of them (model.prompt_template: null follows the data)"
            )
        resolved = own or data_template or "alpaca"
        self.hparams["prompt_template"] = resolved
        # Lightning logs the hyperparameters as first saved and refuses a key the data module has with another value.
        initial = getattr(self, "_hparams_initial", None)
        if initial is not None:
            initial["prompt_template"] = resolved

    def _datamodule(self) -> Any:
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    # ---- loss --------------------------------------------------------------------------------------------------
    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = batch
        n_tokens = (targets != -100).sum()
        loss = self.loss(inputs, targets)
        # An all-ignored batch makes the mean 0/0 = NaN; its gradient through `where` is exactly zero.
        return torch.where(n_tokens > 0, loss, torch.zeros_like(loss)), n_tokens

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
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

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        loss, n_tokens = self._loss(batch)
        metric = self.val_loss if split == "val" else self.test_loss
        metric.update(loss, weight=n_tokens)
        self.log(f"{split}/loss", metric, on_step=False, on_epoch=True, prog_bar=split == "val")
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test")

    # ---- generation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def respond(self, prompt_ids: torch.Tensor) -> list[str]:
        """Responses to a batch of prompts of equal length ``(B, T)``: each generated until its end-of-text (which
        is left out) and stripped of surrounding whitespace, as the book's ``extract_response`` does."""
        if self.model is None:
            self.configure_model()
        tokenizer = self._datamodule().tokenizer
        hp = self.hparams
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(hp.generation_seed)
        out = generate(
            self.model, prompt_ids.to(device), hp.max_new_tokens, temperature=hp.temperature, top_k=hp.top_k,
            top_p=hp.top_p, eos_id=tokenizer.eos_id, generator=generator,
        )
        responses = []
        for row in out[:, prompt_ids.shape[1] :].tolist():
            if tokenizer.eos_id in row:
                row = row[: row.index(tokenizer.eos_id)]
            responses.append(tokenizer.decode(row).strip())
        return responses

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        """Answer a batch of test prompts (from the data module's ``predict_dataloader``)."""
        responses = self.respond(batch["prompt_ids"])
        indices = batch["index"].tolist()
        self._predictions.extend(zip(indices, responses))
        return {"index": indices, RESPONSE_KEY: responses}

    def on_predict_epoch_start(self) -> None:
        self._predictions = []

    def on_predict_epoch_end(self) -> None:
        predictions = self._predictions
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, predictions)
            predictions = [p for part in gathered for p in part]
        if self.trainer.is_global_zero:
            self.write_responses(dict(predictions))

    def on_fit_end(self) -> None:
        trainer = self.trainer
        if not self.hparams.generate_after_fit or trainer.interrupted:
            return
        datamodule = self._datamodule()
        if not hasattr(datamodule, "prompt_batches"):
            rank_zero_warn("model.generate_after_fit needs an InstructDataModule (data.prompt_batches); skipped")
            return
        if params_are_sharded(trainer.strategy):
            rank_zero_warn(
                "model.generate_after_fit is skipped under a strategy that shards the weights; answer the test set "
                "with `python -m lit_llm.train predict --config <run config> --ckpt_path <checkpoint>` instead"
            )
            return
        if not trainer.is_global_zero:
            return
        batches = datamodule.prompt_batches()
        if len(batches) == 0:
            rank_zero_warn("the test split is empty: no responses to generate (model.generate_after_fit)")
            return
        n_batches = 1 if trainer.fast_dev_run else len(batches)
        rank_zero_info(f"Generating responses to {sum(len(b) for b in batches.batches[:n_batches])} test prompts ...")
        predictions: dict[int, str] = {}
        for b in range(n_batches):  # generate() runs in eval mode and restores the training mode itself
            batch = batches[b]
            predictions.update(zip(batch["index"].tolist(), self.respond(batch["prompt_ids"])))
        self.write_responses(predictions)

    # ---- output ------------------------------------------------------------------------------------------------
    def write_responses(self, predictions: dict[int, str]) -> dict[str, float]:
        """Write ``responses_file`` (test records answered, in test order, each with ``model_response``) and the
        scores file; log the scores. Returns the scores.

        Args:
            predictions: Response of each answered test record, by its position in the test split.
        """
        datamodule = self._datamodule()
        output_field = datamodule.fields["output"]
        records = []
        for index in sorted(predictions):
            record = dict(datamodule.test_records[index])
            record[RESPONSE_KEY] = predictions[index]
            records.append(record)
        responses = [r[RESPONSE_KEY] for r in records]
        references = [str(r[output_field]) for r in records]
        scores = {"exact_match": exact_match(responses, references), "rougeL": rouge_l(responses, references)}
        root = Path(self.trainer.default_root_dir)
        path = Path(self.hparams.responses_file)
        path = path if path.is_absolute() else root / path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records, indent=4, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
        scores_path = path.with_name(f"{path.stem.removesuffix('_responses')}_scores.json")
        summary = {
            **scores, "n_records": len(records), "n_test_records": len(datamodule.test_records),
            "global_step": self.global_step, "max_new_tokens": self.hparams.max_new_tokens,
            "temperature": self.hparams.temperature, "prompt_template": self.hparams.get("prompt_template"),
            "responses_file": str(path),
        }
        scores_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        self.test_scores = scores
        for logger in self.loggers:
            logger.log_metrics({f"test/{k}": v for k, v in scores.items()}, step=self.global_step)
            logger.save()
        rank_zero_info(
            f"Test responses: {path} ({len(records)} records); exact match {scores['exact_match']:.4f}, "
            f"ROUGE-L {scores['rougeL']:.4f} ({scores_path.name})"
        )
        return scores
