"""Stop (or skip the step) on a NaN/Inf loss or gradient norm, before the optimizer touches the weights."""

from __future__ import annotations

import math
import os
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from lit_llm.errors import ConfigError, NonFiniteLossError

#: Attribute set on the LightningModule for one optimizer step; ``GPTTask.lr_scheduler_step`` honours it.
SKIP_SCHEDULER_ATTR = "_lit_llm_skip_scheduler_step"


class NonFiniteGuard(pl.Callback):
    """Check the loss and the gradient norm of every optimizer step before ``optimizer.step()`` applies it.

    Lightning calls ``on_before_optimizer_step`` after backward (of every accumulated micro-batch) and before both
    gradient clipping and the optimizer's update, so a fault found there has not reached the weights yet. The loss
    of each micro-batch is collected in ``on_before_backward``; the gradient norm is computed from the unclipped
    gradients without modifying them.

    With ``policy: stop`` a fault raises :class:`~lit_llm.errors.NonFiniteLossError` naming the step, the rank, the
    value and the last good checkpoint; the weights and the optimizer are left as they were before the step, and
    ``Checkpoint`` saves nothing after the error (even with ``save_on_exception``). With ``policy: skip`` the
    step's gradients are dropped (set to ``None``, so AdamW leaves every parameter and its moments untouched), the
    learning-rate schedule does not advance, and ``max_consecutive_skips`` faults in a row raise the error. The skip
    counts are saved in checkpoints. ``trainer.global_step`` still counts a skipped step (its batch is consumed).

    Under DDP the fault flags are summed over the ranks, so a fault on one rank stops or skips on every rank and none
    waits for the others. With a ``16-mixed`` gradient scaler an infinite gradient is the scaler's business (it
    skips the step and lowers the scale), so only the loss is checked then.

    Under DeepSpeed the engine holds the gradients, so only the loss is checked before the step; the step's gradient
    norm is the engine's, known once it has applied the step. lit_llm turns DeepSpeed's own bf16 overflow check off
    (``GPTDeepSpeedStrategy.check_grad_overflow``: it waits for the GPU at every step), so a non-finite gradient
    with a finite loss would reach the weights. The guard keeps that norm's verdict on the GPU and raises
    :class:`~lit_llm.errors.NonFiniteLossError` at the next step's check, or before ``Checkpoint`` saves anything,
    whichever comes first, whatever the policy: nothing computed from that step is saved.

    Cost per optimizer step: one norm over the gradients (the same work as clipping), one all-reduce of a 3-element
    tensor under DDP, and one device-to-host copy of 6 numbers: a single GPU synchronisation.
    """

    def __init__(self, policy: Literal["stop", "skip"] = "stop", max_consecutive_skips: int = 10) -> None:
        """
        Args:
            policy: ``stop``: raise at the first NaN/Inf loss or gradient norm. ``skip``: drop that optimizer step
                (weights, optimizer moments and learning-rate schedule unchanged) and go on.
            max_consecutive_skips: With ``policy: skip``, raise after this many faulty steps in a row.
        """
        if policy not in ("stop", "skip"):
            raise ConfigError(f"NonFiniteGuard policy={policy!r} must be 'stop' or 'skip'")
        if max_consecutive_skips < 1:
            raise ConfigError(f"NonFiniteGuard max_consecutive_skips={max_consecutive_skips} must be >= 1")
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._losses: list[torch.Tensor] = []
        self._stepping = False
        #: Under DeepSpeed: whether a step the engine already applied had a non-finite gradient norm (a GPU tensor,
        #: not yet read), and the last such step.
        self._applied_bad: torch.Tensor | None = None
        self._applied_step = 0

    # ---- collecting the loss -----------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._losses = []

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        # Every micro-batch of the coming optimizer step; cleared when that step is checked.
        self._losses.append(loss.detach().float().reshape(()))

    # ---- the check ---------------------------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        losses, self._losses = self._losses, []
        grads = [_local(p.grad) for p in pl_module.parameters() if p.grad is not None]
        device = pl_module.device
        loss_bad = (~torch.isfinite(torch.stack(losses))).any() if losses else torch.tensor(False, device=device)
        if grads and not _scaler_active(trainer):
            grad_norm = torch.nn.utils.get_total_norm(grads, foreach=None).float()
            grad_bad = ~torch.isfinite(grad_norm)
        else:
            grad_norm = torch.tensor(0.0, device=device)
            grad_bad = torch.tensor(False, device=device)
        applied = self._applied_bad if self._applied_bad is not None else torch.tensor(False, device=device)
        self._applied_bad = None
        local = torch.stack([loss_bad, grad_bad, applied]).to(device=device, dtype=torch.float32)
        total = trainer.strategy.reduce(local.clone(), reduce_op="sum")
        (loss_bad_here, grad_bad_here, _, loss_bad_any, grad_bad_any,
         applied_bad_any) = torch.cat([local, total]).tolist()  # one sync
        if applied_bad_any:
            raise self._applied_fault(trainer)
        self._stepping = not (loss_bad_any or grad_bad_any)  # the optimizer applies this step
        if self._stepping:
            self.consecutive_skips = 0
            return
        step, rank = trainer.global_step, trainer.global_rank
        scale = getattr(trainer, "accumulate_grad_batches", 1)  # on_before_backward sees the loss / accumulation
        if loss_bad_here:
            values = [v * scale for v in torch.stack(losses).tolist() if not math.isfinite(v)]
            what = f"loss={values[0] if values else 'non-finite'}"
        elif grad_bad_here:
            what = f"gradient norm={grad_norm.item()} with a finite loss"
        else:
            what = f"non-finite {'loss' if loss_bad_any else 'gradient norm'} on another rank"
        where = f"rank {rank} of {trainer.world_size}"
        if self.policy == "skip":
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if self.consecutive_skips < self.max_consecutive_skips:
                for p in pl_module.parameters():
                    p.grad = None
                setattr(pl_module, SKIP_SCHEDULER_ATTR, True)
                rank_zero_warn(f"NonFiniteGuard: skipped optimizer step {step} ({what}, {where}); "
                               f"{self.consecutive_skips} in a row, {self.skipped_steps} in all")
                return
            raise NonFiniteLossError(
                f"{what} at optimizer step {step} on {where}: {self.consecutive_skips} consecutive steps were "
                f"skipped (max_consecutive_skips={self.max_consecutive_skips}). Last good checkpoint: "
                f"{last_good_checkpoint(trainer)}. Lower the learning rate or add warmup, check the data around "
                "this step, or resume from that checkpoint with another seed."
            )
        raise NonFiniteLossError(
            f"{what} at optimizer step {step} on {where}; stopped before the optimizer step, so the weights are those "
            f"after step {step - 1}. Last good checkpoint: {last_good_checkpoint(trainer)}. Lower the learning rate "
            "or add warmup, check the data around this step, use bf16 instead of fp16, or set the guard's "
            "policy: skip to drop such steps."
        )

    # ---- DeepSpeed: the gradient norm of the step its engine applied ---------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stepped, self._stepping = self._stepping, False
        if not stepped:
            return
        norm = _engine_grad_norm(trainer.strategy)
        if norm is None:
            return
        bad = ~torch.isfinite(torch.as_tensor(norm, dtype=torch.float32, device=pl_module.device))
        self._applied_bad = bad if self._applied_bad is None else self._applied_bad | bad
        self._applied_step = trainer.global_step - 1  # global_step has already counted the step

    def check_before_save(self, trainer: pl.Trainer) -> None:
        """Raise :class:`~lit_llm.errors.NonFiniteLossError` if a step DeepSpeed's engine applied since the last check
        had a non-finite gradient norm on any rank (``Checkpoint`` calls this, on every rank, before it saves)."""
        if self._applied_bad is None:
            return
        bad, self._applied_bad = self._applied_bad, None
        if trainer.strategy.reduce(bad.float().reshape(1), reduce_op="sum").item():
            raise self._applied_fault(trainer)

    def _applied_fault(self, trainer: pl.Trainer) -> NonFiniteLossError:
        return NonFiniteLossError(
            f"non-finite gradient norm at optimizer step {self._applied_step} (rank {trainer.global_rank} of "
            f"{trainer.world_size} or another), which DeepSpeed's engine applied: the weights are not finite from "
            f"that step on, and nothing was saved after it. Last good checkpoint: {last_good_checkpoint(trainer)}. "
            "Resume from it with a lower learning rate or more warmup, or set trainer.strategy.check_grad_overflow="
            "true (with class_path: lit_llm.strategies.GPTDeepSpeedStrategy) so that DeepSpeed skips such steps."
        )

    # ---- checkpointed state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.consecutive_skips = int(state_dict.get("consecutive_skips", 0))


def last_good_checkpoint(trainer: pl.Trainer) -> str:
    """The newest checkpoint the run's checkpoint callbacks saved (or resumed from), or ``none saved yet``."""
    found = []
    for cb in trainer.checkpoint_callbacks:
        for path in (getattr(cb, "last_model_path", ""), getattr(cb, "best_model_path", "")):
            if path and os.path.exists(path):
                found.append(path)
    if not found and trainer.ckpt_path and os.path.exists(str(trainer.ckpt_path)):
        found.append(str(trainer.ckpt_path))
    if not found:
        return "none saved yet"
    return max(found, key=os.path.getmtime)


def _engine_grad_norm(strategy: Any) -> Any:
    """The global gradient norm DeepSpeed's engine computed for its last step (a tensor or a number), or ``None``
    for other strategies and when the engine computed none (no clipping)."""
    get = getattr(getattr(strategy, "deepspeed_engine", None), "get_global_grad_norm", None)
    return get() if callable(get) else None


def _local(grad: torch.Tensor) -> torch.Tensor:
    # Sharded (DTensor) gradients: this rank's shard; a non-finite value on any shard shows up in the all-reduce.
    return grad.to_local() if hasattr(grad, "to_local") else grad


def _scaler_active(trainer: pl.Trainer) -> bool:
    return getattr(trainer.precision_plugin, "scaler", None) is not None
