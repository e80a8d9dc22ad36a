"""The language-model head and its cross-entropy with the softmax and its gradient in one Triton kernel.

``fused_head_loss(hidden, weight, targets)`` returns what ``next_token_loss(F.linear(hidden, weight), targets)``
returns (the mean cross-entropy over the targets that are not ``ignore_index``, in float32) with the same three
matmuls, but the work on the (tokens x vocabulary) logits is one kernel instead of three passes:

- The plain head, compiled, writes the logits, reads them for the log-softmax's max and sum, and in the backward
  reads them again and writes their gradient into a second (tokens x vocabulary) buffer. At 128 x 1024 tokens and a
  50,304-token vocabulary each of those buffers is 13 GB in bf16; the loss's two kernels over them took 8 % of a
  GPT-2 124M training step's GPU time on an H100 (docs/benchmarks.md).
- Here one kernel, in the forward, computes each row's log-sum-exp and loss and writes the row's gradient,
  ``(softmax - one_hot) / n_valid``, over the logits in place. The backward is two matmuls on that buffer; the
  incoming gradient (a scalar) scales their much smaller outputs. The separate gradient buffer never exists (the
  training step's peak memory is set elsewhere, so the peak did not fall).

The kernel runs on CUDA GPUs. ``TRITON_INTERPRET=1`` runs it on the CPU with Triton's interpreter (slowly; for
tests). The caller (``GPTModel``) keeps it out of ``torch.compile``'s graph, so the compiled part of the model ends at
the final LayerNorm.

Unlike ``F.cross_entropy``, a batch whose targets are all ``ignore_index`` gives 0 (with zero gradients), not NaN; a
target outside ``[0, vocabulary)`` that is not ``ignore_index`` makes the loss NaN, which ``NonFiniteGuard`` reports
(the check costs no host synchronisation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lit_llm.model.losses import _compute_dtype, check_head_loss_shapes, triton_interpreting

__all__ = ["fused_head_loss"]

#: Launch settings of the kernel: columns per loop iteration, warps per program, and how many programs walk the rows
#: (``None``: one program per row; a number: that many programs, each taking every n-th row).
BLOCK = 16384
NUM_WARPS = 16
PROGRAMS: int | None = None


@triton.jit
def _cross_entropy_rows(logits_ptr, row_stride, targets_ptr, loss_ptr, inv_count_ptr, n_rows, n_cols, ignore_index,
                        BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr):
    """Each row's loss, and (``WRITE_GRAD``) its gradient written over its logits; program p takes rows p, p + P, ..."""
    cols = tl.arange(0, BLOCK)
    first = tl.program_id(0).to(tl.int64)  # int64 offsets: N x V exceeds 2**31 at real batch sizes
    for row in range(first, n_rows, tl.num_programs(0)):
        ptr = logits_ptr + row * row_stride
        target = tl.load(targets_ptr + row)

        # pass 1: running max and sum of exponentials (online softmax), in float32
        m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
        d = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
        for start in range(0, n_cols, BLOCK):
            x = tl.load(ptr + start + cols, mask=start + cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(d)

        ignored = target == ignore_index
        in_range = (target >= 0) & (target < n_cols)
        picked = tl.load(ptr + target, mask=in_range & ~ignored, other=0.0).to(tl.float32)
        loss = tl.where(ignored, 0.0, tl.where(in_range, lse - picked, float("nan")))
        tl.store(loss_ptr + row, loss)

        if WRITE_GRAD:
            # pass 2: d(mean loss)/d(logits) = (softmax - one_hot(target)) / n_valid, zero on an ignored row
            scale = tl.where(ignored, 0.0, tl.load(inv_count_ptr))
            for start in range(0, n_cols, BLOCK):
                idx = start + cols
                mask = idx < n_cols
                x = tl.load(ptr + idx, mask=mask, other=float("-inf")).to(tl.float32)
                p = tl.exp(x - lse)
                g = tl.where(idx == target, p - 1.0, p) * scale
                tl.store(ptr + idx, g.to(logits_ptr.dtype.element_ty), mask=mask)


def _loss_and_gradient_in_place(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                                write_grad: bool = True, block: int = BLOCK, num_warps: int = NUM_WARPS,
                                programs: int | None = PROGRAMS) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (N, V) against ``targets`` (N,); with ``write_grad``, ``logits`` is overwritten
    by the loss's gradient with respect to them. ``block``, ``num_warps`` and ``programs`` are the launch settings
    (``bench/loss_kernel.py`` tries others)."""
    n, v = logits.shape
    valid = targets != ignore_index
    inv_count = 1.0 / valid.sum().clamp(min=1).to(torch.float32)  # a tensor: no host synchronisation
    losses = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        grid = (n if programs is None else max(1, min(n, programs)),)
        _cross_entropy_rows[grid](logits, logits.stride(0), targets, losses, inv_count.reshape(1), n, v, ignore_index,
                                  BLOCK=min(block, triton.next_power_of_2(v)), WRITE_GRAD=write_grad,
                                  num_warps=num_warps)
    return losses.sum() * inv_count


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                compute_dtype: torch.dtype) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(compute_dtype)
            w = weight.to(compute_dtype)
            logits = h @ w.t()  # (N, V), becomes its own gradient below
            needs_grad = any(ctx.needs_input_grad[:2])
            loss = _loss_and_gradient_in_place(logits, targets, ignore_index, write_grad=needs_grad)
        if needs_grad:
            ctx.save_for_backward(h, w, logits)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        h, w, grad_logits = ctx.saved_tensors
        grad_hidden = grad_weight = None
        scale = grad_output.to(h.dtype)
        with torch.autocast(h.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_hidden = (grad_logits @ w).mul_(scale).to(ctx.hidden_dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = (grad_logits.t() @ h).mul_(scale).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


@torch.compiler.disable
def fused_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, the softmax and its gradient fused.

    Equal to ``F.cross_entropy(F.linear(hidden, weight).float().flatten(0, -2), targets.flatten(),
    ignore_index=ignore_index)``, autocast included (the matmuls in the autocast dtype, the softmax in float32,
    the logits' gradient in the matmuls' dtype as autocast's backward has it), except for an all-ignored batch (0)
    and an out-of-range target (NaN); see the module's docstring.

    Args:
        hidden: (..., C) final hidden states, after the final LayerNorm.
        weight: (V, C) head weight (may be the tied token-embedding weight).
        targets: (...) int64 target ids, same leading shape as ``hidden``.
        ignore_index: target value that does not count towards the loss or the mean.

    Returns:
        A float32 scalar.
    """
    if hidden.device.type != "cuda" and not triton_interpreting():
        raise RuntimeError(
            f"fused_head_loss runs a Triton kernel on CUDA GPUs; these tensors are on {hidden.device.type} "
            "(set TRITON_INTERPRET=1 to run it with Triton's CPU interpreter)"
        )
    check_head_loss_shapes(hidden, weight, targets)
    return _FusedHeadLoss.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1).contiguous(),
                                int(ignore_index), _compute_dtype(hidden))
