"""The language-model head and its cross-entropy, fused and computed a chunk of tokens at a time.

``chunked_head_loss(hidden, weight, targets)`` returns what
``F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=-100)`` returns, but never holds the
(N, V) logits, or their gradient, whole: the forward walks over ``chunk_size`` rows at a time and computes each
chunk's loss and, right away, its gradients, keeping only the (N, C) gradient of ``hidden`` and the (V, C) gradient
of ``weight`` for the backward. At a batch of 64 x 1024 tokens and a 50,304-token vocabulary the logits alone are
6.6 GB in bf16, and the plain head keeps at least that from the forward to the backward (eager PyTorch keeps their
float32 log-softmax, twice that); here the working memory beyond the two saved gradients is a few
(chunk_size, V) float32 tensors. The three matmuls are the same as the plain head's (logits, gradient of the hidden
states, gradient of the weight), so this saves memory, not FLOPs.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

__all__ = ["chunked_head_loss", "next_token_loss", "triton_interpreting"]


def triton_interpreting() -> bool:
    """Whether Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``), so that
    :mod:`lit_llm.model.fused_loss` runs without a GPU (slowly; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits`` ``(B, T, V)`` against ``targets`` ``(B, T)``; ``-100`` targets are ignored.

    Computed in float32 even when the logits are bf16 (``bf16-true``), so the loss keeps its precision.
    """
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction=reduction
    )


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` would compute in: the autocast dtype when autocast is on."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and hidden.dtype != torch.float64:  # autocast leaves float64 alone
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def check_head_loss_shapes(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    """A ``ValueError`` naming the mismatch when ``hidden`` (..., C), ``weight`` (V, C) and ``targets`` (...) do not fit
    together as a head loss's arguments."""
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be (V, C) with C = hidden's last dim; got weight {tuple(weight.shape)} and hidden "
            f"{tuple(hidden.shape)}"
        )
    if tuple(hidden.shape[:-1]) != tuple(targets.shape):
        raise ValueError(
            f"targets' shape {tuple(targets.shape)} must equal hidden's leading dims {tuple(hidden.shape[:-1])}"
        )


class _ChunkedHeadLoss(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk; backward only scales the saved gradients."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_size: int,
        ignore_index: int,
        compute_dtype: torch.dtype,
        need_hidden_grad: bool,
        need_weight_grad: bool,
    ) -> torch.Tensor:
        n, c = hidden.shape
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            valid = targets != ignore_index
            # a tensor, not a Python int: no data-dependent control flow, no host sync
            denom = valid.sum().clamp(min=1).to(torch.float32)
            safe_targets = torch.where(valid, targets, torch.zeros_like(targets)).unsqueeze(1)

            loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden_chunks: list[torch.Tensor] = []
            grad_weight = None
            if need_weight_grad:
                grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for start in range(0, n, chunk_size):
                h = hidden[start : start + chunk_size].to(compute_dtype)
                t = safe_targets[start : start + chunk_size]
                v = valid[start : start + chunk_size]
                logits = (h @ w.t()).float()  # (chunk, V): the matmul in the compute dtype, the softmax in float32
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, t).squeeze(1)
                loss_sum = loss_sum + torch.where(v, lse - picked, torch.zeros_like(lse)).sum()
                if not (need_hidden_grad or need_weight_grad):
                    continue
                # d(mean loss)/d(logits) = (softmax - one_hot) / n_valid, zero on ignored rows
                scale = (v.to(torch.float32) / denom).unsqueeze(1)
                probs = torch.exp(logits - lse.unsqueeze(1))
                probs = probs.scatter_add(1, t, -torch.ones_like(picked).unsqueeze(1))
                g = (probs * scale).to(compute_dtype)
                del logits, probs
                if need_hidden_grad:
                    grad_hidden_chunks.append(g @ w)
                if grad_weight is not None:
                    if compute_dtype == torch.float32:
                        grad_weight.addmm_(g.t(), h)
                    else:
                        grad_weight.add_((g.t() @ h).to(torch.float32))
            loss = loss_sum / denom

        grad_hidden = None
        if need_hidden_grad:
            grad_hidden = torch.cat(grad_hidden_chunks) if grad_hidden_chunks else hidden.new_zeros((0, c))
        ctx.hidden_dtype = hidden.dtype
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = (grad_hidden * grad_output).to(ctx.hidden_dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def chunked_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 8192,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, without materialising the logits.

    Equal to ``F.cross_entropy(F.linear(hidden, weight).float().flatten(0, -2), targets.flatten(),
    ignore_index=ignore_index)``, autocast included (matmuls in the autocast dtype, softmax in float32), except
    that a batch whose targets are all ``ignore_index`` gives 0 with zero gradients instead of NaN.

    The forward computes the loss and the gradients of ``hidden`` and ``weight`` ``chunk_size`` rows at a time, so
    the (N, V) logits and their gradient are never held whole; it saves only the (N, C) and (V, C) gradients for
    the backward, which scales them by the incoming gradient. Same three matmuls as the plain head: it saves memory,
    not FLOPs. A gradient that is not needed (``requires_grad`` off, or grad mode off) is not computed.

    Args:
        hidden: (..., C) final hidden states, after the final LayerNorm.
        weight: (V, C) head weight (may be the tied token-embedding weight).
        targets: (...) int64 target ids, same leading shape as ``hidden``.
        chunk_size: rows of logits computed at once; peak extra memory is about ``chunk_size * V`` float32 values.
        ignore_index: target value that does not count towards the loss or the mean.

    Returns:
        A float32 scalar.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    check_head_loss_shapes(hidden, weight, targets)
    grad_on = torch.is_grad_enabled()
    return _ChunkedHeadLoss.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        targets.reshape(-1),
        int(chunk_size),
        int(ignore_index),
        _compute_dtype(hidden),
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
    )
