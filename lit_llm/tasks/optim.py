"""AdamW with decay / no-decay parameter groups, and the learning-rate schedules of the book's appendix D."""

from __future__ import annotations

import math
from typing import Literal

import torch
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
