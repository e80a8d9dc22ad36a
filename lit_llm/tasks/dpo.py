"""Preference tuning with DPO (the book's chapter 7 bonus): make the model prefer the chosen responses to the rejected.

The task trains the GPT (usually an instruction-finetuned checkpoint, ``init_weights``) on the pairs of
:class:`~lit_llm.data.DPODataModule` with the loss of :mod:`lit_llm.model.preference`, against a frozen reference
model: the policy as it was when training started. ``reference`` picks how that reference is held:

- ``copy``: a frozen copy of the starting weights, made when the model is built (the book's
  ``reference_model``); costs one more model's memory (not its gradients or optimizer state) and one more forward
  pass per batch. Under sharded strategies each process holds the whole copy; not under DeepSpeed ZeRO stage 3.
- ``precomputed``: the reference's log-probabilities of every pair of every split, computed once by the starting
  model before its first step (and kept in checkpoints, so a resumed run uses the very same numbers): the memory of
  plain finetuning and no extra forward pass while training, for one pass over the data at the start.
- ``lora_off``: with ``lora`` set, the policy with its adapters switched off is exactly the starting model; no copy,
  one more forward pass per batch.

All three give the same loss on the same batch (up to floating-point rounding). The reference always runs without
dropout and without gradients.

Logged: ``train/loss`` and ``val/loss`` (``test/loss``), and for each ``rewards/chosen``, ``rewards/rejected``,
``rewards/margin`` (their difference) and ``rewards/accuracy`` (the fraction of pairs whose chosen reward is larger),
as the book's notebook tracks them. Before the first step the starting model answers the test prompts
(``test_before_responses.json``) and after training the tuned model does (``test_responses.json``), both in the
book's layout with the exact-match and ROUGE-L scores beside them, for ``python -m lit_llm.judge``.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric

from lit_llm.data.prompts import get_template
from lit_llm.distributed.common import is_zero3
from lit_llm.errors import CheckpointError, ConfigError, DataError
from lit_llm.model.gpt import GPTModel
from lit_llm.model.lora import adapters_disabled
from lit_llm.model.preference import LossType, PreferenceLoss, Reduction, preference_loss, sequence_logprobs
from lit_llm.model.sampling import check_sampling_args
from lit_llm.tasks.base import GPTTask, sdpa_backend_context
from lit_llm.tasks.responses import RespondsToPrompts

ReferenceMode = Literal["copy", "precomputed", "lora_off"]
_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")
_REFERENCE_KEY = "dpo_reference_logprobs"


class DPOTask(RespondsToPrompts, GPTTask):
    """DPO of the GPT against a frozen reference; pair it with :class:`~lit_llm.data.DPODataModule`.

    Args:
        *args: The arguments of :class:`~lit_llm.tasks.base.GPTTask` (``model``, ``learning_rate``, ``lora``, ...).
        beta: How far the policy may move from the reference (the paper's beta; the book uses 0.1). Larger values
            keep it closer.
        loss_type: ``sigmoid`` (DPO, the book's), ``ipo`` or ``hinge`` (see :mod:`lit_llm.model.preference`).
        reference: How the reference model is held: ``copy``, ``precomputed`` or ``lora_off`` (needs ``lora``);
            see the module docstring for what each costs.
        logprob_reduction: A response's log-probability as the ``sum`` over its tokens (the paper's) or their
            ``mean`` (the book's notebook, which favours neither long nor short responses).
        prompt_template: ``null`` takes the data module's ``prompt_template`` (the usual case).
        generate_before_fit: Answer the test split with the starting model before the first step
            (``responses_before_file``), for a before/after comparison.
        generate_after_fit: Answer the test split at the end of ``fit`` (``responses_file``).
        max_new_tokens: Most tokens generated per response (the book uses 256).
        temperature: 0 decodes greedily (the book); higher values sample.
        top_k: Sample among the k most likely tokens only.
        top_p: Nucleus sampling threshold in (0, 1].
        generation_seed: Seed of the sampling generator (unused when greedy).
        responses_file: Responses after training, relative to ``trainer.default_root_dir`` (scores beside it as
            ``<stem>_scores.json``).
        responses_before_file: Responses of the starting model.
        **kwargs: Keyword arguments of :class:`~lit_llm.tasks.base.GPTTask`.
    """

    #: The reference model (a frozen copy in the checkpoint, precomputed log-probabilities, or the adapters switched
    #: off) stays as the checkpoint has it on a resume; ``beta``, the loss and the generation settings may change.
    FIXED_ON_RESUME = (*GPTTask.FIXED_ON_RESUME, "reference")

    def __init__(
        self,
        *args: Any,
        beta: float = 0.1,
        loss_type: LossType = "sigmoid",
        reference: ReferenceMode = "copy",
        logprob_reduction: Reduction = "sum",
        prompt_template: str | None = None,
        generate_before_fit: bool = True,
        generate_after_fit: bool = True,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generation_seed: int = 123,
        responses_file: str = "test_responses.json",
        responses_before_file: str = "test_before_responses.json",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        problems = []
        if not beta > 0:
            problems.append(f"model.beta={beta} must be > 0 (the book uses 0.1)")
        if loss_type not in ("sigmoid", "ipo", "hinge"):
            problems.append(f"model.loss_type={loss_type!r} must be sigmoid, ipo or hinge")
        if reference not in ("copy", "precomputed", "lora_off"):
            problems.append(f"model.reference={reference!r} must be copy, precomputed or lora_off")
        elif reference == "lora_off" and self.lora_config is None:
            problems.append("model.reference=lora_off uses the policy with its LoRA adapters switched off as the "
                            "reference, but model.lora is not set: set model.lora (e.g. {rank: 8, alpha: 16}) or use "
                            "model.reference: copy or precomputed")
        if logprob_reduction not in ("sum", "mean"):
            problems.append(f"model.logprob_reduction={logprob_reduction!r} must be sum or mean")
        if problems:
            raise ConfigError("Invalid DPO settings:\n  - " + "\n  - ".join(problems))
        check_sampling_args(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens)
        if prompt_template is not None:
            get_template(prompt_template)
        self.eval_metrics = nn.ModuleDict({
            split: nn.ModuleDict({name.replace("/", "_"): MeanMetric() for name in _METRICS})
            for split in ("val", "test")
        })
        self.test_scores: dict[str, float] = {}
        self._predictions: list[tuple[int, str]] = []
        #: The reference's ``(chosen, rejected)`` log-probabilities of each pair, by split (``precomputed``).
        self.reference_logprobs: dict[str, torch.Tensor] = {}
        self._restored = False

    # ---- the reference ----------------------------------------------------------------------------------------
    def adapt_model(self, model: GPTModel) -> None:
        """With ``reference: copy``, keep a frozen copy of the starting model (before any LoRA adapter is added)."""
        if self.hparams.reference != "copy":
            return
        strategy = self._trainer.strategy if self._trainer is not None else None
        if is_zero3(strategy):
            raise ConfigError("model.reference=copy is not supported under DeepSpeed ZeRO stage 3, which partitions "
                              "the weights as they are built: use model.reference: precomputed (or lora_off with "
                              "model.lora)")
        if any(p.is_meta for p in model.parameters()):
            raise ConfigError("model.reference=copy needs the whole model on one device, but this model is too large "
                              "and FSDP builds it shard by shard: use model.reference: precomputed (or lora_off with "
                              "model.lora)")
        reference = copy.deepcopy(model)
        init_weights = self.hparams.get("init_weights")
        if self._resuming() and init_weights:
            # The policy's weights come from the checkpoint; the reference is the starting model, read again.
            from lit_llm.weights.readers import load_into, load_weights

            _, state = load_weights(init_weights, self.config)
            load_into(reference, state, source=init_weights)
        elif self._resuming():
            rank_zero_warn("model.reference=copy resumed without model.init_weights: the reference is the model "
                           "initialised from the seed, as in the first run only if nothing else changed")
        reference.activation_checkpointing = False
        reference.requires_grad_(False)
        reference.eval()
        # Outside the module tree: not in checkpoints, not in the optimizer, not wrapped or sharded by a strategy.
        self.__dict__["_reference_model"] = reference

    @property
    def reference_model(self) -> GPTModel | None:
        """The frozen copy (``reference: copy``), on the policy's device and in its floating dtype."""
        reference = self.__dict__.get("_reference_model")
        if reference is None:
            return None
        dtype = next(p for p in self.model.parameters() if p.is_floating_point()).dtype  # bf16 under *-true precision
        held = next(reference.parameters())
        if held.device != self.device or held.dtype != dtype:
            reference.to(device=self.device, dtype=dtype)
        return reference

    def _pair_logprobs(self, run: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence log-probabilities ``(chosen, rejected)`` of a batch, chosen and rejected in one forward pass."""
        inputs = torch.cat([batch["chosen_inputs"], batch["rejected_inputs"]])
        targets = torch.cat([batch["chosen_targets"], batch["rejected_targets"]])
        logits = run(inputs)
        if logits.shape[-1] != self.config.vocab_size:  # padded head rows are no tokens: leave them out of the softmax
            logits = logits[..., : self.config.vocab_size]
        logps = sequence_logprobs(logits, targets, self.hparams.logprob_reduction)
        return logps.chunk(2)

    @torch.no_grad()
    def reference_logprobs_of(self, batch: dict[str, torch.Tensor], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference model's ``(chosen, rejected)`` log-probabilities of a batch of ``split``."""
        mode = self.hparams.reference
        if mode == "precomputed":
            self._ensure_reference_logprobs()
            table = self.reference_logprobs.get(split)
            if table is None:
                raise CheckpointError(f"no precomputed reference log-probabilities for the {split} split")
            values = table[batch["index"].cpu()].to(self.device)
            return values[:, 0], values[:, 1]
        if mode == "copy":
            reference = self.reference_model
            with sdpa_backend_context(self.hparams.get("sdpa_backend", "auto")):
                return self._pair_logprobs(reference, batch)
        return self._starting_model_logprobs(batch)

    def _starting_model_logprobs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy run as the starting model: without dropout, and (``lora_off``) without its adapters."""
        model = self.model
        training = model.training
        model.eval()
        try:
            with sdpa_backend_context(self.hparams.get("sdpa_backend", "auto")):
                if self.hparams.reference == "lora_off":
                    with adapters_disabled(model):
                        return self._pair_logprobs(model, batch)
                return self._pair_logprobs(model, batch)
        finally:
            model.train(training)

    @torch.no_grad()
    def _ensure_reference_logprobs(self) -> None:
        """``precomputed``: compute the starting model's log-probabilities of every pair once, before its first step.

        Runs inside the first training or validation step (so under every strategy the weights are in place, restored
        and gathered as in any step); every process computes all pairs, so none needs the others'.
        """
        datamodule = self._datamodule()
        if self.reference_logprobs:
            self._check_reference_sizes(datamodule)
            return
        if self._restored or self.global_step > 0:
            raise CheckpointError(
                "model.reference=precomputed, but the checkpoint holds no precomputed reference log-probabilities "
                "(it was trained with another model.reference): resume with the model.reference it was trained with"
            )
        if not hasattr(datamodule, "ordered_loader"):
            raise ConfigError("model.reference=precomputed needs a DPODataModule (data.ordered_loader)")
        splits = [s for s in ("train", "val", "test") if len(datamodule.datasets[s])]
        rank_zero_info(f"Computing the reference log-probabilities of {', '.join(splits)} pairs "
                       "(model.reference=precomputed) ...")
        tables = {}
        for split in splits:
            rows = []
            for batch in datamodule.ordered_loader(split):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                chosen, rejected = self._starting_model_logprobs(batch)
                rows.append(torch.stack([chosen, rejected], dim=1).float().cpu())
            tables[split] = torch.cat(rows)
        self.reference_logprobs = tables

    def _check_reference_sizes(self, datamodule: Any) -> None:
        datasets = getattr(datamodule, "datasets", {})
        for split, table in self.reference_logprobs.items():
            if split in datasets and len(datasets[split]) != len(table):
                raise DataError(
                    f"the checkpoint's precomputed reference log-probabilities cover {len(table)} {split} pairs but "
                    f"the data has {len(datasets[split])}: resume with the data the run started with"
                )

    # ---- steps -------------------------------------------------------------------------------------------------
    def dpo_loss(self, batch: dict[str, torch.Tensor], split: str) -> PreferenceLoss:
        """The DPO loss and rewards of a batch of ``split`` (the policy's forward pass carries the gradient)."""
        if self.model is None:
            self.configure_model()
        reference_chosen, reference_rejected = self.reference_logprobs_of(batch, split)
        policy_chosen, policy_rejected = self._pair_logprobs(self.forward, batch)
        hp = self.hparams
        return preference_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, hp.beta,
                               hp.loss_type)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        out = self.dpo_loss(batch, "train")
        self.count_tokens(batch["chosen_inputs"].unsqueeze(0).expand(2, -1, -1))  # chosen and rejected rows
        for name, value in _values(out).items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False)
        self.log_lr()
        return {"loss": out.loss}

    def _evaluate(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        out = self.dpo_loss(batch, split)
        n = batch["index"].numel()
        for name, value in _values(out).items():
            metric = self.eval_metrics[split][name.replace("/", "_")]
            metric.update(value, weight=n)
            self.log(f"{split}/{name}", metric, on_step=False, on_epoch=True, prog_bar=split == "val" and
                     name in ("loss", "rewards/accuracy"))
        return out.loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test")

    # ---- generation before and after ---------------------------------------------------------------------------
    def on_train_start(self) -> None:
        hp = self.hparams
        if hp.generate_before_fit and self.global_step == 0 and not self._restored:
            self.answer_test_set(hp.responses_before_file, label="before_")

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.reference_logprobs:
            checkpoint[_REFERENCE_KEY] = {k: v.clone() for k, v in self.reference_logprobs.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._restored = True
        saved = checkpoint.get(_REFERENCE_KEY)
        if isinstance(saved, dict):
            self.reference_logprobs = {k: v.float().cpu() for k, v in saved.items()}


def _values(out: PreferenceLoss) -> dict[str, torch.Tensor]:
    """What is logged of a batch, by name."""
    return {
        "loss": out.loss,
        "rewards/chosen": out.chosen_rewards.mean(),
        "rewards/rejected": out.rejected_rewards.mean(),
        "rewards/margin": out.margins.mean(),
        "rewards/accuracy": out.accuracy,
    }
