"""Sampling from a GPT: temperature, top-k, top-p, end-of-text stop per row, streaming, KV cache."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch

from lit_llm.errors import ConfigError
from lit_llm.model.gpt import GPTModel


def check_sampling_args(
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    max_new_tokens: int | None = None,
) -> None:
    """Raise one :class:`ConfigError` listing every sampling argument out of range.

    Args:
        temperature: Must be >= 0 (0 is greedy).
        top_k: None, or an integer >= 1.
        top_p: None, or in (0, 1].
        max_new_tokens: None (not checked), or an integer >= 0.
    """
    problems = []
    if temperature is None or temperature < 0:
        problems.append(f"temperature={temperature!r} must be >= 0 (0 decodes greedily)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        problems.append(f"top_k={top_k!r} must be an integer >= 1, or None to keep every token")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        problems.append(f"top_p={top_p!r} must be in (0, 1], or None to keep every token")
    if max_new_tokens is not None and (
        isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0
    ):
        problems.append(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    if problems:
        raise ConfigError("Invalid generation arguments:\n  - " + "\n  - ".join(problems))


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

    Args:
        logits: Scores of the next token, one row per sequence.
        vocab_size: Columns from here on (vocabulary padding) are never chosen.
        temperature: 0 is greedy (argmax); otherwise the logits are divided by it before sampling.
        top_k: Sample among the ``top_k`` highest logits only.
        top_p: Sample among the smallest set of most likely tokens whose probabilities reach ``top_p``
            (nucleus sampling); 1 keeps every token.
        generator: Random generator for reproducible sampling.

    Raises:
        ConfigError: ``temperature < 0``, ``top_k < 1`` or ``top_p`` outside (0, 1].
    """
    check_sampling_args(temperature=temperature, top_k=top_k, top_p=top_p)
    logits = logits.float()
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits[:, :vocab_size]
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        probs_sorted = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the best token always stays.
        drop_sorted = (probs_sorted.cumsum(dim=-1) - probs_sorted) >= top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


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
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield the next token ``(B, 1)`` at each step, so callers can stream.

    The arguments are checked at the call, before the first token is asked for. Rows that produced ``eos_id`` keep
    emitting ``eos_id``; generation ends once every row has. A prompt longer than the model's context is cropped
    from the left, with a warning. Call it under ``model.eval()`` (as :func:`generate` does) to turn dropout off.

    Args:
        model: The GPT (``model.config`` gives the context length and vocabulary size).
        idx: Prompt token ids ``(B, T)``, ``T >= 1``.
        max_new_tokens: Most tokens to generate.
        temperature: 0 decodes greedily; see :func:`sample_next` for this and ``top_k``, ``top_p``, ``generator``.
        top_k: Sample among the k most likely tokens only.
        top_p: Nucleus sampling threshold in (0, 1].
        eos_id: End-of-text id that stops a row.
        generator: Random generator for reproducible sampling.
        use_cache: Keep each layer's keys and values (:class:`~lit_llm.model.gpt.KVCache`) and feed only the newest
            token; the tokens equal those of the cache-free loop. Once the sequence outgrows the context, every
            position embedding shifts at each step, so from then on each step re-runs the last ``context_length``
            tokens exactly as the book's loop does.

    Raises:
        ConfigError: An argument out of range (see :func:`check_sampling_args`).
    """
    idx = checked_prompt(model, idx, temperature=temperature, top_k=top_k, top_p=top_p,
                         max_new_tokens=max_new_tokens)
    return _steps(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator, use_cache)


def checked_prompt(model: GPTModel, idx: torch.Tensor, *, temperature: float, top_k: int | None, top_p: float | None,
                   max_new_tokens: int) -> torch.Tensor:
    """``idx`` after the checks every decoder makes: sampling settings in range, ids of shape (batch, tokens >= 1),
    and a prompt longer than the context cropped to its last ``context_length`` tokens with a warning."""
    check_sampling_args(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens)
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ConfigError(f"idx must hold token ids of shape (batch, tokens) with tokens >= 1, got {tuple(idx.shape)}")
    context_length = model.config.context_length
    if idx.shape[1] > context_length:
        warnings.warn(
            f"The prompt has {idx.shape[1]} tokens but the model's context_length is {context_length}; "
            f"keeping its last {context_length} tokens",
            stacklevel=3,
        )
        idx = idx[:, -context_length:]
    return idx


@torch.no_grad()
def _steps(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_id: int | None,
    generator: torch.Generator | None,
    use_cache: bool,
) -> Iterator[torch.Tensor]:
    cfg = model.config
    ctx = cfg.context_length
    finished = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
    cache = None
    if use_cache and max_new_tokens > 1:  # one new token needs one forward pass; a cache would only cost memory
        cache = model.new_kv_cache(idx.shape[1] + max_new_tokens)
    feed = idx  # what the cached model has not seen yet: the prompt, then each new token
    for _ in range(max_new_tokens):
        if cache is not None and idx.shape[1] > ctx:
            cache = None  # past the context: positions shift every step, the cache no longer applies
        if cache is not None:
            logits = model(feed, kv_cache=cache)[:, -1, :]
        else:
            logits = model(idx[:, -ctx:])[:, -1, :]
        nxt = sample_next(
            logits, vocab_size=cfg.vocab_size, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        if eos_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
            finished |= nxt == eos_id
        idx = torch.cat([idx[:, -ctx:], nxt], dim=1)  # only the last ctx tokens are ever read again
        feed = nxt
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
    use_cache: bool = True,
) -> torch.Tensor:
    """The book's ``generate``: returns ``idx`` with up to ``max_new_tokens`` ids appended (``(B, T + n)``).

    Unlike the book's loop, the end-of-text stop works per row for batches larger than one (finished rows are
    padded with ``eos_id``), and a KV cache makes each step cost one token's work. Runs in eval mode and restores
    the model's mode afterwards. The arguments are those of :func:`generate_tokens`; the returned ids start with
    the whole ``idx``, even when it was cropped to the context for the model.
    """
    steps = generate_tokens(
        model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
        generator=generator, use_cache=use_cache,
    )
    was_training = model.training
    model.eval()
    try:
        new = list(steps)
    finally:
        model.train(was_training)
    return torch.cat([idx, *new], dim=1) if new else idx
