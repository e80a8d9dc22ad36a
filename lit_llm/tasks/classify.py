"""Classification finetuning (the book's chapter 6): the GPT with a new head that reads one vector per text.

The language-model head (``emb_dim -> vocabulary``) is replaced by a ``Linear(emb_dim, num_classes)`` with a bias,
like the book's ``nn.Linear(768, 2)``; a tied head is thereby untied (the token embedding stays as it is). The
head is applied at every position and the logits are then pooled per text:

- ``last``: the last position, padding or not (the book: every text is padded to the same length, so this is the
  position after the padding);
- ``last_nonpad``: the last real token of each text (``lengths - 1``), which is what the causal model has read the
  whole text at, whatever the padding;
- ``mean``: the average over the real tokens.

Since the head is linear, pooling its outputs equals applying it to the pooled hidden states.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from lit_llm.errors import ConfigError
from lit_llm.model.gpt import GPTModel, Linear
from lit_llm.tasks.base import GPTTask

Pooling = Literal["last", "last_nonpad", "mean"]
POOLINGS = ("last", "last_nonpad", "mean")
_TRAINABLE = re.compile(r"head|last_block|all|lora|last_n_blocks:(\d+)")


def pool_logits(logits: torch.Tensor, lengths: torch.Tensor | None, pooling: Pooling) -> torch.Tensor:
    """One row of class logits per text from per-position logits.

    Args:
        logits: ``(B, T, C)`` logits of every position.
        lengths: ``(B,)`` number of real (non-pad) tokens per row; right padding is assumed. Not needed for ``last``.
        pooling: ``last``, ``last_nonpad`` or ``mean`` (see the module docstring).

    Returns:
        ``(B, C)`` logits.
    """
    if pooling == "last":
        return logits[:, -1]
    if lengths is None:
        raise ValueError(f"pooling={pooling!r} needs the lengths of the rows")
    if pooling == "last_nonpad":
        return logits[torch.arange(logits.shape[0], device=logits.device), lengths - 1]
    if pooling == "mean":
        mask = torch.arange(logits.shape[1], device=logits.device)[None, :] < lengths[:, None]  # (B, T)
        return (logits * mask[..., None]).sum(1) / lengths[:, None].to(logits.dtype)
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")


def trainable_modules(model: GPTModel, policy: str) -> list[nn.Module]:
    """The modules whose parameters train under ``policy`` (``lora`` is handled by the caller).

    Raises:
        ConfigError: ``policy`` is unknown or asks for more blocks than the model has.
    """
    match = _TRAINABLE.fullmatch(policy)
    if match is None or policy == "lora":
        raise ConfigError(f"model.trainable={policy!r} must be head, last_block, last_n_blocks:N, all or lora")
    if policy == "all":
        return [model]
    if policy == "head":
        return [model.out_head]
    n = 1 if policy == "last_block" else int(match.group(1))
    if not 1 <= n <= len(model.trf_blocks):
        raise ConfigError(
            f"model.trainable={policy!r} asks for {n} blocks but the model has {len(model.trf_blocks)}; "
            f"use last_n_blocks:1..{len(model.trf_blocks)} or all"
        )
    return [*model.trf_blocks[-n:], model.final_norm, model.out_head]


class ClassifyTask(GPTTask):
    """Finetune the GPT to label texts: a new classification head, pooled logits, cross-entropy.

    Batches are the dicts of :class:`lit_llm.data.ClassifyDataModule`: ``input_ids`` ``(B, T)``, ``labels``
    ``(B,)`` and ``lengths`` ``(B,)``. Logged: ``train/loss`` every step; ``{train,val,test}/acc`` (accuracy) and
    ``{train,val,test}/f1`` (macro F1) every epoch (``train/*`` from the training-mode predictions), and
    ``{val,test}/loss``. The confusion matrix of each split is printed at the end of every epoch and written to
    ``confusion_matrix.jsonl`` (all epochs) and ``confusion_matrix_<split>.csv`` (the latest) in the run's log
    folder. ``predict`` returns, per text, the predicted ``label``, its ``probability`` and ``probs`` (every class).

    Args:
        num_classes: Outputs of the head; default: ``num_classes`` of the DataModule.
        label_names: Class names in id order; default: the DataModule's. Saved in the checkpoint, so the
            ``lit_llm.classify`` CLI and ``predict`` print names.
        pooling: How one vector per text is read: ``last`` (the book), ``last_nonpad`` or ``mean``.
        trainable: Which parameters train: ``head``; ``last_block`` (the last transformer block, the final
            LayerNorm and the head: the book's choice); ``last_n_blocks:N``; ``all``; or ``lora`` (the LoRA
            adapters of ``lora`` and the head).
        class_weights: Weight of each class in the cross-entropy (e.g. for unbalanced data), in id order.
        **kwargs: The arguments of :class:`~lit_llm.tasks.base.GPTTask` (model, optimizer, ``init_weights``, ...).
    """

    #: The head's size and meaning, what it reads and which parameters train (the optimizer's groups) stay as the
    #: checkpoint has them on a resume; ``class_weights`` may change.
    FIXED_ON_RESUME = (*GPTTask.FIXED_ON_RESUME, "num_classes", "label_names", "pooling", "trainable")

    def __init__(
        self,
        num_classes: int | None = None,
        label_names: list[str] | None = None,
        pooling: Pooling = "last_nonpad",
        trainable: str = "last_block",
        class_weights: list[float] | None = None,
        **kwargs: Any,
    ) -> None:
        problems = []
        if num_classes is not None and num_classes < 2:
            problems.append(f"model.num_classes={num_classes} must be >= 2 (or null to take it from the data)")
        if label_names is not None and num_classes is not None and len(label_names) != num_classes:
            problems.append(f"model.label_names has {len(label_names)} names but model.num_classes={num_classes}")
        if pooling not in POOLINGS:
            problems.append(f"model.pooling={pooling!r} must be one of {', '.join(POOLINGS)}")
        match = _TRAINABLE.fullmatch(trainable)
        if match is None or (match.group(1) is not None and int(match.group(1)) < 1):
            problems.append(f"model.trainable={trainable!r} must be head, last_block, last_n_blocks:N (N >= 1), all "
                            "or lora")
        lora = kwargs.get("lora")
        if trainable == "lora" and lora is None:
            problems.append("model.trainable=lora needs model.lora (e.g. lora: {rank: 16, alpha: 16}); or choose "
                            "another model.trainable")
        if lora is not None and trainable != "lora":
            problems.append(f"model.lora is set but model.trainable={trainable!r} would freeze the adapters; set "
                            "model.trainable: lora")
        speed = kwargs.get("speed")
        for key in ("fused_loss", "chunked_loss"):
            if (speed.get(key) if isinstance(speed, dict) else getattr(speed, key, None)):
                problems.append(f"model.speed.{key} computes the next-token loss of the language-model head; the "
                                "classification task trains a class head with its own cross-entropy and does not "
                                f"use it: remove model.speed.{key}")
        if class_weights is not None:
            if any(w < 0 for w in class_weights) or not any(w > 0 for w in class_weights):
                problems.append(f"model.class_weights={list(class_weights)} must be >= 0 with at least one > 0")
            if num_classes is not None and len(class_weights) != num_classes:
                problems.append(f"model.class_weights has {len(class_weights)} weights but model.num_classes="
                                f"{num_classes}")
        try:
            super().__init__(**kwargs)
        except ConfigError as err:
            if not problems:
                raise
            raise ConfigError(f"{err}\n  - " + "\n  - ".join(problems)) from None
        if problems:
            raise ConfigError("Invalid task config:\n  - " + "\n  - ".join(problems))
        self.metrics: nn.ModuleDict | None = None
        weights = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        self.register_buffer("_class_weights", weights, persistent=False)

    # ---- model ---------------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Resolve the classes (from the DataModule when not given), then build the GPT with its new head."""
        if self.model is not None:
            return
        self._resolve_classes()
        super().configure_model()
        n = self.hparams.num_classes
        # ("train" cannot be a ModuleDict key: it is nn.Module.train.)
        self.metrics = nn.ModuleDict({
            f"{split}_metrics": nn.ModuleDict({
                "acc": MulticlassAccuracy(n, average="micro"),
                "f1": MulticlassF1Score(n, average="macro"),
                "confusion": MulticlassConfusionMatrix(n),
            })
            for split in ("train", "val", "test")
        })

    def _resolve_classes(self) -> None:
        hp = self.hparams
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        data_names = getattr(datamodule, "label_names", None)
        data_count = getattr(datamodule, "num_classes", None) if data_names is None else len(data_names)
        names = list(hp.label_names) if hp.label_names is not None else None
        count = hp.num_classes
        problems = []
        if data_names is not None and names is not None and list(data_names) != names:
            problems.append(f"model.label_names={names} differ from the data's classes {list(data_names)}; remove "
                            "model.label_names (the data's are used) or set data.labels in that order")
        if data_count is not None and count is not None and count != data_count:
            problems.append(f"model.num_classes={count} but the data has {data_count} classes; remove "
                            "model.num_classes (the data's count is used)")
        names = list(data_names) if data_names is not None else names
        count = data_count if data_count is not None else (count if count is not None else
                                                           len(names) if names is not None else None)
        if count is None:
            problems.append("model.num_classes is not set and there is no DataModule to take it from; set "
                            "model.num_classes (and model.label_names)")
        elif hp.class_weights is not None and len(hp.class_weights) != count:
            problems.append(f"model.class_weights has {len(hp.class_weights)} weights for {count} classes")
        if problems:
            raise ConfigError("Invalid classifier config:\n  - " + "\n  - ".join(problems))
        hp.num_classes = count
        hp.label_names = names if names is not None else [str(i) for i in range(count)]

    def adapt_model(self, model: GPTModel) -> None:
        """Replace the language-model head by ``Linear(emb_dim, num_classes)`` with a bias (untying a tied head)."""
        model.out_head = Linear(model.config.emb_dim, self.hparams.num_classes, bias=True)
        # The model's own record of its shape now says the head is separate (FLOPs counts read it); the task's config
        # keeps the configured value, which checkpoints are checked against.
        model.config = model.config.replace(tie_weights=False)

    def select_trainable(self, model: GPTModel) -> None:
        """Set ``requires_grad`` by ``trainable``; under ``lora`` the adapters are trainable already, so the head is
        added to them."""
        policy = self.hparams.trainable
        if policy == "lora":
            for param in model.out_head.parameters():
                param.requires_grad_(True)
            return
        for param in model.parameters():
            param.requires_grad_(False)
        for module in trainable_modules(model, policy):
            for param in module.parameters():
                param.requires_grad_(True)

    # ---- steps ---------------------------------------------------------------------------------------------------

    def class_logits(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, num_classes)`` logits, pooled by ``pooling`` (float32 even under bf16)."""
        return pool_logits(self(input_ids), lengths, self.hparams.pooling).float()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, weight=self._class_weights)

    def _update(self, split: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
        assert self.metrics is not None
        metrics = self.metrics[f"{split}_metrics"]
        preds = logits.argmax(-1)
        for name in ("acc", "f1"):
            metrics[name].update(preds, labels)
            self.log(f"{split}/{name}", metrics[name], on_step=False, on_epoch=True, prog_bar=split == "val"
                     and name == "acc")
        metrics["confusion"].update(preds, labels)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        logits = self.class_logits(batch["input_ids"], batch["lengths"])
        loss = self._loss(logits, batch["labels"])
        self.count_tokens(batch["input_ids"])
        self.log("train/loss", loss, on_step=True, on_epoch=False)  # shown by ProgressBar, see there
        self.log_lr()
        self._update("train", logits.detach(), batch["labels"])
        return {"loss": loss}

    def _evaluate(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        logits = self.class_logits(batch["input_ids"], batch["lengths"])
        loss = self._loss(logits, batch["labels"])
        self.log(f"{split}/loss", loss, on_step=False, on_epoch=True, batch_size=len(logits), prog_bar=split == "val")
        self._update(split, logits, batch["labels"])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """The predicted ``label`` (name), its ``probability`` and ``probs`` (name -> probability) per text, with
        the ``text`` and, when the input had labels, the ``target``."""
        probs = torch.softmax(self.class_logits(batch["input_ids"], batch.get("lengths")), dim=-1)
        probability, index = probs.max(dim=-1)
        names = list(self.hparams.label_names)
        out: dict[str, Any] = {}
        if "text" in batch:
            out["text"] = list(batch["text"])
        out["label"] = [names[i] for i in index.tolist()]
        out["probability"] = probability
        out["probs"] = [dict(zip(names, row)) for row in probs.tolist()]
        labels = batch.get("labels")
        if labels is not None and bool((labels >= 0).any()):
            out["target"] = [names[i] if i >= 0 else None for i in labels.tolist()]
        return out

    # ---- confusion matrices --------------------------------------------------------------------------------------

    def on_train_epoch_end(self) -> None:
        self._confusion("train")

    def on_validation_epoch_end(self) -> None:
        self._confusion("val")

    def on_test_epoch_end(self) -> None:
        self._confusion("test")

    def _confusion(self, split: str) -> None:
        if self.metrics is None:
            return
        metric = self.metrics[f"{split}_metrics"]["confusion"]
        if not metric.update_called:
            return
        matrix = metric.compute().tolist()  # every rank takes part in the reduction
        metric.reset()
        trainer = self._trainer
        if trainer is None or trainer.sanity_checking:
            return
        # trainer.log_dir broadcasts rank 0's path under DDP: every rank must call it, or rank 0 waits forever.
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        names = list(self.hparams.label_names)
        when = f", epoch {self.current_epoch}" if split != "test" else ""
        rank_zero_info(f"{split} confusion matrix{when} (rows: true class, columns: predicted):\n"
                       f"{format_confusion(matrix, names)}")
        folder.mkdir(parents=True, exist_ok=True)
        record = {"split": split, "epoch": self.current_epoch, "step": self.global_step, "labels": names,
                  "matrix": matrix}
        with open(folder / "confusion_matrix.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        rows = [",".join(["true\\predicted", *names])] + [",".join([n, *map(str, r)]) for n, r in zip(names, matrix)]
        (folder / f"confusion_matrix_{split}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")

    # ---- checkpoint ----------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["classifier"] = {
            "num_classes": self.hparams.num_classes,
            "label_names": list(self.hparams.label_names),
            "pooling": self.hparams.pooling,
        }


def format_confusion(matrix: list[list[int]], names: list[str]) -> str:
    """A confusion matrix as an aligned text table: one row per true class, one column per predicted class."""
    width = max(len(str(v)) for v in [*names, *(x for row in matrix for x in row)])
    head = max(len(n) for n in names)
    lines = [" " * head + "  " + " ".join(n.rjust(width) for n in names)]
    lines += [name.ljust(head) + "  " + " ".join(str(v).rjust(width) for v in row) for name, row in zip(names, matrix)]
    return "\n".join(lines)
