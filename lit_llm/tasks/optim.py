"""AdamW with decay / no-decay parameter groups, and the learning-rate schedules of the book's appendix D."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import nn

Schedule = Literal["cosine", "linear", "constant"]


def parameter_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """Split trainable parameters into a decayed group (matrices and embeddings) and an undecayed one.

    Biases and normalisation weights (the 1-D tensors) are not decayed, as in GPT-2 and nanoGPT. ``decay_all=True``
    decays every parameter, as the book's ``AdamW(model.parameters(), weight_decay=0.1)`` does.
    Tied parameters appear once.

    The split goes by the owning module and the parameter's name, not by its shape: FSDP (``use_orig_params``) and
    DeepSpeed ZeRO-3 have already replaced each parameter by a flat shard (often empty) when the optimizer is built.
    """
    params = [p for p in model.parameters() if p.requires_grad]  # .parameters() already de-duplicates ties
    if decay_all:
        return [{"params": params, "weight_decay": weight_decay}]
    undecayed = {id(p) for module in model.modules() for name, p in module.named_parameters(recurse=False)
                 if name == "bias" or isinstance(module, _NORMS)}
    decay = [p for p in params if id(p) not in undecayed]
    no_decay = [p for p in params if id(p) in undecayed]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


_NORMS = tuple(getattr(nn, name) for name in ("LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm1d") if hasattr(nn, name))


def lr_multiplier(
    step: int, *, warmup_steps: int, total_steps: int, schedule: Schedule = "cosine", min_lr_ratio: float = 0.1
) -> float:
    """Factor applied to the peak learning rate at optimizer step ``step`` (0-based).

    Linear warmup from ``1/(warmup_steps+1)`` to 1 over ``warmup_steps`` steps, then ``cosine`` (or ``linear``)
    decay down to ``min_lr_ratio`` at ``total_steps``, or ``constant``. Past ``total_steps`` it stays at the floor.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_adamw(
    param_groups: list[dict],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    fused: bool,
) -> torch.optim.AdamW:
    """AdamW; ``fused=True`` uses the single-kernel CUDA implementation."""
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, **kwargs)


#: The optimizer settings of each parameter group that a resume takes from the run's config, not the checkpoint.
GROUP_SETTINGS = ("weight_decay", "betas", "eps")


class StepSchedule(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` whose restore from a checkpoint keeps the position (the step count) but applies this run's
    settings: the peak learning rate (``base_lrs`` and each group's ``initial_lr``), each group's weight decay, betas
    and eps, and the schedule's shape and length (``lr_lambda`` is this run's). The learning rate of the next step is
    recomputed from them, so a resume with a lower ``learning_rate`` trains at it from its first step.

    Lightning restores the optimizer first and the schedulers after it, under every strategy, so this is the last
    word on the optimizer's settings after a resume. ``total_steps`` travels in the scheduler's state, so a resume
    over a longer schedule says that the decay is re-stretched.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr_lambda: Callable[[int], float], total_steps: int,
                 schedule: str = "cosine") -> None:
        self.total_steps = total_steps
        self.schedule = schedule
        self._configured = [{key: group[key] for key in GROUP_SETTINGS if key in group}
                            for group in optimizer.param_groups]
        super().__init__(optimizer, lr_lambda)
        self._configured_base_lrs = list(self.base_lrs)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("_configured", None)
        state.pop("_configured_base_lrs", None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        configured, base_lrs = self._configured, self._configured_base_lrs
        total, schedule = self.total_steps, self.schedule
        super().load_state_dict(state_dict)
        saved_total = state_dict.get("total_steps")
        self._configured, self._configured_base_lrs = configured, base_lrs
        self.total_steps, self.schedule = total, schedule
        self.base_lrs = list(base_lrs)
        groups = self.optimizer.param_groups
        restored = [group["lr"] for group in groups]
        lrs = [base * fn(self.last_epoch) for base, fn in zip(self.base_lrs, self.lr_lambdas, strict=True)]
        for group, settings, base, lr in zip(groups, configured, self.base_lrs, lrs, strict=True):
            group.update(settings)
            group["initial_lr"] = base
            group["lr"] = lr
        self._last_lr = lrs
        if any(not math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0) for a, b in zip(restored, lrs, strict=True)):
            rank_zero_info(f"Resumed after {self.last_epoch} scheduler steps: learning rate {restored[0]:.6g} (the "
                           f"checkpoint's) -> {lrs[0]:.6g} (this run's settings)")
        if isinstance(saved_total, int) and saved_total != total and schedule != "constant":
            rank_zero_info(f"The learning-rate schedule now spans {total} optimizer steps (the checkpoint's spanned "
                           f"{saved_total}): the {schedule} decay is re-stretched from step {self.last_epoch} on. Set "
                           f"model.optim.schedule_steps={saved_total} to keep the old schedule")
