"""Answering a test set with the model being trained, as the book's chapter 7 does, shared by the tasks that need it.

:class:`RespondsToPrompts` is a mixin for a :class:`~lit_llm.tasks.base.GPTTask` whose data module provides test
prompts (``prompt_batches()``, ``test_records``, ``tokenizer``, ``prompt_template``). It takes the prompt template
from the data module (so the checkpoint records what the model was taught), answers every test prompt (greedily by
default), writes the answers with each test record's own fields (the book's ``instruction-data-with-response.json``
layout) and scores them without any outside model:

- ``exact_match``: the fraction of responses equal to the expected output once leading and trailing whitespace is
  stripped from both (case and inner spacing count);
- ``rougeL``: the mean ROUGE-L F-measure (``torchmetrics.text.ROUGEScore``; it lower-cases and splits on anything
  that is not a letter or digit).

The expected output of a record is its field ``datamodule.reference_field`` when the data module has one (the
preference data's ``chosen``), else ``datamodule.fields["output"]``. ``python -m lit_llm.judge`` scores the same files
with a local or remote LLM.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torchmetrics.text import ROUGEScore

from lit_llm.distributed.common import params_are_sharded
from lit_llm.errors import ConfigError
from lit_llm.model.sampling import generate

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


class RespondsToPrompts:
    """Mixin (list it before :class:`~lit_llm.tasks.base.GPTTask`): prompt template from the data, test responses.

    Reads the hyperparameters ``prompt_template``, ``generate_after_fit``, ``max_new_tokens``, ``temperature``,
    ``top_k``, ``top_p``, ``generation_seed`` and ``responses_file``, which the task declares in its ``__init__``.
    """

    test_scores: dict[str, float]
    _predictions: list[tuple[int, str]]

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

    # ---- generation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def respond(self, prompt_ids: torch.Tensor) -> list[str]:
        """Responses to a batch of prompts of equal length ``(B, T)``: each generated until its end-of-text, or the
        chat template's end-of-turn marker (left out), and stripped of surrounding whitespace, as the book's
        ``extract_response`` does."""
        if self.model is None:
            self.configure_model()
        datamodule = self._datamodule()
        tokenizer = datamodule.tokenizer
        # A chat template's end-of-turn marker (the data module's stop_id) ends an answer; else end-of-text does.
        stop = getattr(datamodule, "stop_id", None)
        stop = tokenizer.eos_id if stop is None else stop
        hp = self.hparams
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(hp.generation_seed)
        out = generate(
            self.model, prompt_ids.to(device), hp.max_new_tokens, temperature=hp.temperature, top_k=hp.top_k,
            top_p=hp.top_p, eos_id=stop, generator=generator,
        )
        responses = []
        for row in out[:, prompt_ids.shape[1] :].tolist():
            for end in {stop, tokenizer.eos_id}:
                if end in row:
                    row = row[: row.index(end)]
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
        if not self.hparams.generate_after_fit or self.trainer.interrupted:
            return
        self.answer_test_set()

    def answer_test_set(self, responses_file: str | None = None, label: str = "") -> dict[str, float] | None:
        """Answer the test split now (on rank 0) and write the responses and scores; ``None`` when skipped.

        Args:
            responses_file: Where the responses go (default: the ``responses_file`` hyperparameter).
            label: Marks the scores in the logs and the summary (``test/<label>exact_match``), e.g. ``before_``.
        """
        trainer = self.trainer
        datamodule = self._datamodule()
        if not hasattr(datamodule, "prompt_batches"):
            rank_zero_warn("model.generate_after_fit needs a data module with test prompts (data.prompt_batches); "
                           "skipped")
            return None
        if params_are_sharded(trainer.strategy):
            rank_zero_warn(
                "model.generate_after_fit is skipped under a strategy that shards the weights; answer the test set "
                "with `python -m lit_llm.train predict --config <run config> --ckpt_path <checkpoint>` instead"
            )
            return None
        if not trainer.is_global_zero:
            return None
        batches = datamodule.prompt_batches()
        if len(batches) == 0:
            rank_zero_warn("the test split is empty: no responses to generate (model.generate_after_fit)")
            return None
        n_batches = 1 if trainer.fast_dev_run else len(batches)
        rank_zero_info(f"Generating responses to {sum(len(b) for b in batches.batches[:n_batches])} test prompts ...")
        predictions: dict[int, str] = {}
        for b in range(n_batches):  # generate() runs in eval mode and restores the training mode itself
            batch = batches[b]
            predictions.update(zip(batch["index"].tolist(), self.respond(batch["prompt_ids"])))
        return self.write_responses(predictions, responses_file, label)

    # ---- output ------------------------------------------------------------------------------------------------
    def write_responses(
        self, predictions: dict[int, str], responses_file: str | None = None, label: str = ""
    ) -> dict[str, float]:
        """Write the responses file (test records answered, in test order, each with ``model_response``) and the
        scores file beside it (``test_responses.json`` -> ``test_scores.json``); log the scores. Returns the scores.

        Args:
            predictions: Response of each answered test record, by its position in the test split.
            responses_file: Relative to ``trainer.default_root_dir``; default: the ``responses_file`` hyperparameter.
            label: Prefix of the scores' names in the logs (``test/<label>exact_match``); with none, the scores are
                also kept as ``test_scores``.
        """
        datamodule = self._datamodule()
        reference_field = getattr(datamodule, "reference_field", None) or datamodule.fields["output"]
        records = []
        for index in sorted(predictions):
            record = dict(datamodule.test_records[index])
            record[RESPONSE_KEY] = predictions[index]
            records.append(record)
        responses = [r[RESPONSE_KEY] for r in records]
        references = [str(r[reference_field]) for r in records]
        scores = {"exact_match": exact_match(responses, references), "rougeL": rouge_l(responses, references)}
        root = Path(self.trainer.default_root_dir)
        path = Path(responses_file or self.hparams.responses_file)
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
        if not label:
            self.test_scores = scores
        for logger in self.loggers:
            logger.log_metrics({f"test/{label}{k}": v for k, v in scores.items()}, step=self.global_step)
            logger.save()
        rank_zero_info(
            f"Test responses: {path} ({len(records)} records); exact match {scores['exact_match']:.4f}, "
            f"ROUGE-L {scores['rougeL']:.4f} ({scores_path.name})"
        )
        return scores
