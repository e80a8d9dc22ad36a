"""The DPO loss (Rafailov et al. 2023, "Direct Preference Optimization"; the book's chapter 7 bonus) and its inputs.

For a prompt ``x`` with a preferred response ``y_w`` and a dispreferred one ``y_l``, the policy ``pi`` and the
frozen reference ``pi_ref`` give the sequence log-probabilities ``log pi(y | x)`` (a sum over the response's tokens,
the paper's; or their mean, the book's notebook). With

    h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))

the losses are

- ``sigmoid`` (DPO, the paper's equation 7 and the book's): ``-log sigmoid(beta * h)``;
- ``ipo`` (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences"):
  ``(h - 1 / (2 * beta))**2``;
- ``hinge`` (SLiC, Zhao et al. 2023): ``max(0, 1 - beta * h)``;

each averaged over the batch. The implicit rewards are ``beta * (log pi(y|x) - log pi_ref(y|x))`` for the chosen and
the rejected response; their difference is the reward margin, and the reward accuracy is the fraction of pairs whose
chosen reward is the larger.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

LossType = Literal["sigmoid", "ipo", "hinge"]
Reduction = Literal["sum", "mean"]


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, reduction: Reduction = "sum",
                      ignore_index: int = -100) -> torch.Tensor:
    """Log-probability of each row's target tokens, ``(B,)``: their sum (``sum``) or mean (``mean``).

    Args:
        logits: ``(B, T, V)`` next-token logits; computed in float32 whatever their dtype.
        targets: ``(B, T)`` token ids, ``ignore_index`` where a position does not count (prompt, padding).
        reduction: ``sum`` over the counted tokens (the paper's sequence log-probability) or their ``mean`` (the
            book's DPO notebook). A row with no counted token gives 0.
        ignore_index: Target value of positions that do not count.
    """
    per_token = -F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index,
                                 reduction="none").view(targets.shape)
    total = per_token.sum(-1)  # ignored positions contribute exactly 0
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum(-1).clamp(min=1)


@dataclass
class PreferenceLoss:
    """The DPO loss of a batch and what is logged beside it (the rewards are detached).

    Attributes:
        loss: The batch mean of the per-pair losses (differentiable).
        chosen_rewards: ``(B,)`` ``beta * (policy - reference)`` log-probability of the chosen responses.
        rejected_rewards: ``(B,)`` the same for the rejected responses.
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        """``(B,)`` chosen minus rejected reward."""
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> torch.Tensor:
        """Fraction of pairs whose chosen reward exceeds the rejected one (a 0-dim float tensor)."""
        return (self.chosen_rewards > self.rejected_rewards).float().mean()


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: LossType = "sigmoid",
) -> PreferenceLoss:
    """The DPO (or IPO, hinge) loss of a batch of pairs from their sequence log-probabilities ``(B,)``.

    Args:
        policy_chosen: ``log pi(y_w | x)`` of the model being trained.
        policy_rejected: ``log pi(y_l | x)``.
        reference_chosen: ``log pi_ref(y_w | x)`` (no gradient flows into it).
        reference_rejected: ``log pi_ref(y_l | x)``.
        beta: How far the policy may move from the reference (the paper's beta; the book uses 0.1).
        loss_type: ``sigmoid`` (DPO), ``ipo`` or ``hinge``; see the module docstring.
    """
    chosen_ratio = policy_chosen - reference_chosen.detach()
    rejected_ratio = policy_rejected - reference_rejected.detach()
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}: use sigmoid, ipo or hinge")
    return PreferenceLoss(losses.mean(), (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())
