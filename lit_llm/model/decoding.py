"""Fast decoding: a static, preallocated KV cache for a batch of independent sequences, and a decode step that runs
eagerly, as a captured CUDA graph, or compiled with ``torch.compile``.

The growing :class:`~lit_llm.model.gpt.KVCache` of :func:`lit_llm.model.sampling.generate_tokens` is simple, but on a
GPU one decode step of a small GPT costs far more in kernel launches than in arithmetic: GPT-2 124M at batch 1 decodes
more slowly with it than by re-running the whole sequence. Decoding fast needs every tensor a step touches to keep
its shape and its address from step to step, so that the step can be recorded once as a CUDA graph and replayed:

- :class:`StaticKVCache` holds ``(slots, H, max_len, D)`` keys and values per layer, allocated once. Each slot (row)
  is an independent sequence with its own length: a decode step writes each row's new key and value at that row's
  position and attends over the buffer with a per-row mask that hides the keys after the row's position (the
  attention of :class:`~lit_llm.model.gpt.MultiHeadAttention` reads the mask from the cache's ``attn_mask``).
- :class:`Decoder` fills a slot with a prompt (:meth:`Decoder.prefill`: the model's own forward, eager) and advances
  a batch of slots by one token each (:meth:`Decoder.decode`): eager, replaying a CUDA graph captured once per batch
  size bucket, or through ``torch.compile(mode="reduce-overhead")`` (fused kernels, and CUDA graphs on GPUs).
- :func:`generate_tokens_static` is :func:`~lit_llm.model.sampling.generate_tokens` on top of them: the same arguments
  and, in fp32 greedy decoding, the same tokens.

The server's scheduler (:mod:`lit_llm.serve.engine`) keeps one :class:`Decoder` for the life of the process and lets
requests join and leave its slots between steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import torch

from lit_llm.errors import ConfigError
from lit_llm.model.gpt import GPTModel
from lit_llm.model.sampling import checked_prompt, sample_next

#: How the decode step runs: ``eager``; ``cuda-graph`` (recorded once per batch-size bucket, then replayed: no
#: compilation, CUDA only); ``compile`` (``torch.compile(mode="reduce-overhead")``: fused kernels, plus CUDA graphs
#: on GPUs; compiles once per bucket); ``auto``: ``cuda-graph`` on CUDA devices, else ``eager``.
DecodeMode = Literal["auto", "eager", "cuda-graph", "compile"]
DECODE_MODES: tuple[str, ...] = ("auto", "eager", "cuda-graph", "compile")

# In eager mode a step attends over the cached keys rounded up to this many (a whole-buffer step wastes work on a
# CPU); the graph modes always attend over the whole buffer, whose shape must not change.
_KEY_BLOCK = 64


class StaticLayerCache:
    """One layer's keys and values in a :class:`StaticKVCache`: ``(slots, H, max_len, D)`` buffers.

    The attention calls :meth:`update` with the new keys and values and reads :attr:`attn_mask`; both follow the
    owner's current step (a prefill of some slots, or a decode step over the first ``rows`` slots).
    """

    def __init__(self, owner: StaticKVCache, k: torch.Tensor, v: torch.Tensor) -> None:
        self.owner = owner
        self.k = k
        self.v = v

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values ``(b, H, T, D)``; return the keys/values the queries attend to."""
        o = self.owner
        if o.prefill_row is not None:
            # A prompt from position 0: it attends to itself only (plain causal attention, as the model's own cache).
            rows = slice(o.prefill_row, o.prefill_row + k.shape[0])
            self.k[rows, :, : k.shape[2]] = k
            self.v[rows, :, : k.shape[2]] = v
            return k, v
        rows = k.shape[0]
        where = (o.row_index[:rows], slice(None), o.positions[:rows])  # one new token per row, at its own position
        self.k[where] = k[:, :, 0]
        self.v[where] = v[:, :, 0]
        return self.k[:rows, :, : o.keys], self.v[:rows, :, : o.keys]

    @property
    def attn_mask(self) -> torch.Tensor | None:
        """``(rows, 1, 1, keys)``: True where a row may see a key (positions up to its own); None in a prefill."""
        o = self.owner
        if o.prefill_row is not None:
            return None
        rows = self.k.shape[0] if o.rows is None else o.rows
        return (o.key_index[: o.keys] <= o.positions[:rows, None])[:, None, None, :]


class StaticKVCache:
    """Keys and values of every layer for ``slots`` independent sequences of up to ``max_len`` tokens each.

    Allocated once; the buffers, the per-row positions and the row indices keep their addresses for the life of the
    cache, which is what lets a decode step be replayed as a CUDA graph.

    Args:
        model: The GPT whose layers it caches (sizes, device and dtype come from it).
        slots: Sequences held at once (the largest batch of a decode step).
        max_len: Most tokens per sequence; at most (and by default) the model's ``context_length``.
    """

    def __init__(self, model: GPTModel, slots: int, max_len: int | None = None) -> None:
        cfg = model.config
        if slots < 1:
            raise ConfigError(f"slots={slots} must be >= 1")
        self.max_len = cfg.context_length if max_len is None else min(max_len, cfg.context_length)
        if self.max_len < 1:
            raise ConfigError(f"max_len={max_len} must be >= 1")
        self.slots = slots
        weight = model.tok_emb.weight
        device, dtype = weight.device, weight.dtype
        shape = (slots, cfg.n_heads, self.max_len, cfg.head_dim)
        #: Position of the token each row feeds in the next decode step (also where its key and value go).
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        self.row_index = torch.arange(slots, device=device)
        self.key_index = torch.arange(self.max_len, device=device)
        self.layers = [
            StaticLayerCache(self, torch.zeros(shape, device=device, dtype=dtype),
                             torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(cfg.n_layers)
        ]
        if hasattr(torch, "_dynamo") and hasattr(torch._dynamo, "mark_static_address"):
            # torch.compile's CUDA graphs replay only when mutated tensors keep their addresses: say that they do.
            for tensor in (self.positions, *(t for layer in self.layers for t in (layer.k, layer.v))):
                torch._dynamo.mark_static_address(tensor)
        #: Set during a prefill: the first slot being filled. ``GPTModel.forward`` then runs its usual causal path.
        self.prefill_row: int | None = None
        #: Rows and keys of the current decode step.
        self.rows: int | None = None
        self.keys = self.max_len

    @property
    def pos(self) -> int:
        """What ``GPTModel.forward`` asks a cache for: the position of the first fed token (a prefill starts at 0)."""
        return 0


class Decoder:
    """Prefill and decode steps over a :class:`StaticKVCache`.

    Args:
        model: An eval-mode GPT.
        slots: Sequences decoded together at most.
        max_len: Most tokens per sequence (default: the model's ``context_length``).
        mode: How decode steps run (see :data:`DecodeMode`).
    """

    def __init__(self, model: GPTModel, slots: int, max_len: int | None = None, mode: DecodeMode = "auto") -> None:
        if mode not in DECODE_MODES:
            raise ConfigError(f"decode mode {mode!r} is not one of {', '.join(DECODE_MODES)}")
        device = model.tok_emb.weight.device
        if mode == "auto":
            mode = "cuda-graph" if device.type == "cuda" else "eager"
        if mode == "cuda-graph" and device.type != "cuda":
            raise ConfigError(f"decode mode 'cuda-graph' needs a CUDA device but the model is on {device}; "
                              "use 'eager' or 'compile'")
        self.model = model
        self.mode = mode
        self.cache = StaticKVCache(model, slots, max_len)
        self.vocab_size = model.config.vocab_size
        self._ids = torch.zeros(slots, 1, dtype=torch.long, device=device)
        if hasattr(torch, "_dynamo") and hasattr(torch._dynamo, "mark_static_address"):
            torch._dynamo.mark_static_address(self._ids)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self._compiled = torch.compile(self._step, mode="reduce-overhead") if mode == "compile" else None

    @property
    def slots(self) -> int:
        return self.cache.slots

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def bucket(self, rows: int) -> int:
        """The batch size a step over ``rows`` rows runs at: the next power of two, at most ``slots``. The graph modes
        record one graph per bucket, so a handful serve every batch size."""
        size = 1
        while size < rows:
            size *= 2
        return min(size, self.slots)

    @torch.no_grad()
    def prefill(self, row: int, ids: torch.Tensor) -> torch.Tensor:
        """Fill slots ``row, row + 1, ...`` with prompts ``ids`` ``(b, T)`` (from position 0, replacing what they held);
        returns the logits of each prompt's next token ``(b, V)``. Runs the model's own forward, eagerly."""
        b, T = ids.shape
        if row < 0 or row + b > self.slots:
            raise ValueError(f"slots {row}..{row + b - 1} are outside the cache's {self.slots} slots")
        if T > self.max_len:
            raise ValueError(f"a prompt of {T} tokens does not fit the cache's {self.max_len} positions")
        self.cache.prefill_row = row
        try:
            return self.model(ids, kv_cache=self.cache)[:, -1, :]
        finally:
            self.cache.prefill_row = None

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor | Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """Feed ``tokens[i]`` at position ``positions[i]`` of slot ``i`` for the first ``len(positions)`` slots;
        return the logits of each slot's next token ``(len(positions), V)``.

        A slot's position is the number of tokens it already holds (its prompt, then one more per step). Slots
        with nothing to decode may be fed any token at position 0. The returned tensor may be overwritten by the
        next step: read it before calling again.
        """
        n = len(positions)
        if not 1 <= n <= self.slots:
            raise ValueError(f"a decode step takes 1 to {self.slots} rows, got {n}")
        top = max(positions)
        if top >= self.max_len or min(positions) < 0:
            raise ValueError(f"positions must be in [0, {self.max_len}), got {min(positions)}..{top}")
        rows = self.bucket(n)
        cache = self.cache
        if isinstance(tokens, torch.Tensor):
            self._ids[:n, 0].copy_(tokens.reshape(-1))
        else:
            self._ids[:n, 0].copy_(torch.tensor(list(tokens), dtype=torch.long))
        padded = list(positions) + [0] * (rows - n)
        cache.positions[:rows].copy_(torch.tensor(padded, dtype=torch.long))
        cache.rows = rows
        if self.mode == "eager":
            cache.keys = min(self.max_len, -(-(top + 1) // _KEY_BLOCK) * _KEY_BLOCK)
            return self._step(rows)[:n]
        cache.keys = self.max_len
        if self.mode == "compile":
            torch.compiler.cudagraph_mark_step_begin()
            return self._compiled(rows)[:n]
        graph = self._graphs.get(rows)
        if graph is None:
            graph = self._graphs[rows] = self._capture(rows)
        graph[0].replay()
        return graph[1][:n]

    def warmup(self) -> None:
        """Record (or compile) the decode step of every batch-size bucket now, rather than on first use."""
        if self.mode == "eager":
            return
        sizes = sorted({self.bucket(n) for n in range(1, self.slots + 1)})
        for rows in sizes:
            self.decode([0] * rows, [0] * rows)

    def _step(self, rows: int) -> torch.Tensor:
        """One token for each of the first ``rows`` slots: ``GPTModel.forward`` with per-row positions."""
        m = self.model
        cache = self.cache
        ids = self._ids[:rows]
        x = m.tok_emb(ids) + m.pos_emb(cache.positions[:rows, None])  # (rows, 1, C)
        x = m.drop_emb(x)
        for block, layer in zip(m.trf_blocks, cache.layers):
            x = block(x, layer)
        return m.out_head(m.final_norm(x))[:, -1, :]

    def _capture(self, rows: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Run on a side stream first (as PyTorch's CUDA graph docs ask) so lazy initialisation is not recorded.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(rows)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._step(rows)
        self._pool = graph.pool()  # the buckets' graphs share one memory pool
        return graph, out


def generate_tokens_static(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    mode: DecodeMode = "auto",
) -> Iterator[torch.Tensor]:
    """:func:`~lit_llm.model.sampling.generate_tokens` with a :class:`Decoder`: yields the next token ``(B, 1)`` at
    each step; the same arguments, checks and stops, and in fp32 greedy decoding the same tokens.

    The static cache holds the prompt and the new tokens up to the model's context; past it, each step re-runs the
    last ``context_length`` tokens, exactly as the book's loop does. Call it under ``model.eval()``.

    Args:
        model: The GPT.
        idx: Prompt token ids ``(B, T)``; the rows are decoded together.
        max_new_tokens: Most tokens to generate.
        temperature: See :func:`~lit_llm.model.sampling.sample_next`, as ``top_k``, ``top_p`` and ``generator``.
        top_k: Sample among the k most likely tokens only.
        top_p: Nucleus sampling threshold in (0, 1].
        eos_id: End-of-text id that stops a row (finished rows keep emitting it).
        generator: Random generator for reproducible sampling.
        mode: How decode steps run (see :data:`DecodeMode`).
    """
    idx = checked_prompt(model, idx, temperature=temperature, top_k=top_k, top_p=top_p,
                         max_new_tokens=max_new_tokens)
    return _static_steps(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator, mode)


@torch.no_grad()
def _static_steps(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_id: int | None,
    generator: torch.Generator | None,
    mode: DecodeMode,
) -> Iterator[torch.Tensor]:
    if max_new_tokens == 0:
        return
    ctx = model.config.context_length
    B, T = idx.shape
    # The last new token is never fed back, so the cache needs T + max_new_tokens - 1 positions.
    decoder = Decoder(model, B, max_len=min(ctx, T + max_new_tokens - 1), mode=mode)
    finished = torch.zeros(B, 1, dtype=torch.bool, device=idx.device)
    window = idx  # the last ctx tokens, for the steps past the context
    logits = decoder.prefill(0, idx)
    pos = T  # position of the token fed next
    for step in range(max_new_tokens):
        nxt = sample_next(
            logits, vocab_size=model.config.vocab_size, temperature=temperature, top_k=top_k, top_p=top_p,
            generator=generator,
        )
        if eos_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
            finished |= nxt == eos_id
        window = torch.cat([window[:, -ctx:], nxt], dim=1)
        yield nxt
        if eos_id is not None and bool(finished.all()):
            return
        if step + 1 == max_new_tokens:
            return
        if pos < ctx:
            logits = decoder.decode(nxt, [pos] * B)
            pos += 1
        else:  # past the context every position shifts at each step: re-run the window (the book's loop)
            logits = model(window[:, -ctx:])[:, -1, :]
