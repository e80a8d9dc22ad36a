"""Sampling from a GPT: temperature, top-k, top-p, end-of-text stop per row, streaming."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lit_llm.model import GPTModel


def sample_next(
    logits: torch.Tensor,
    *,
    vocab_size: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token id for each row of ``logits`` ``(B, V)``; returns ``(B, 1)``.

    ``temperature == 0`` is greedy (argmax). Columns from ``vocab_size`` on (vocabulary padding) are never chosen.
    """
    logits = logits.float()
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits[:, :vocab_size]
    if temperature <= 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the best token always stays.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def generate_tokens(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token ``(B, 1)`` at each step, so callers can stream.

    Rows that produced ``eos_id`` keep emitting ``eos_id``; generation ends once every row has.
    The input is cropped from the left to the model's context length.
    """
    cfg = model.config
    finished = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits = model(idx[:, -cfg.context_length :])[:, -1, :]
        nxt = sample_next(
            logits, vocab_size=cfg.vocab_size, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        if eos_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
            finished |= nxt == eos_id
        idx = torch.cat([idx, nxt], dim=1)
        yield nxt
        if eos_id is not None and bool(finished.all()):
            return


def generate(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The book's ``generate``: returns ``idx`` with up to ``max_new_tokens`` ids appended (``(B, T + n)``).

    Unlike the book's loop, the end-of-text stop works per row for batches larger than one.
    """
    was_training = model.training
    model.eval()
    try:
        new = list(
            generate_tokens(
                model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
                generator=generator,
            )
        )
    finally:
        model.train(was_training)
    return torch.cat([idx, *new], dim=1) if new else idx
