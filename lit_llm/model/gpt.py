"""The GPT of "Build a Large Language Model (From Scratch)", chapter 4, Lightning-free.

Names follow the book (``tok_emb``, ``pos_emb``, ``drop_emb``, ``trf_blocks``, ``att``, ``ff``, ``norm1``,
``norm2``, ``final_norm``, ``out_head``), and ``GPTModel.forward`` is the book's forward line for line: embed tokens
and positions, dropout, the blocks, the final norm, the head. Every departure from the book, each behind an option
or a named helper and each held to the book's arithmetic by tests:

1. **Fused projections**: the query/key/value projections are one ``qkv`` Linear (one matmul instead of three).
2. **Fused attention**: ``scaled_dot_product_attention`` instead of the explicit-mask softmax, which stays as
   ``attention="reference"``.
3. **KV cache** (generation): ``forward(ids, kv_cache)`` feeds only the tokens after the cached ones; each layer keeps
   the keys and values it has seen (as the book's chapter 4 bonus material does). Training never passes one.
4. **Activation checkpointing** (``activation_checkpointing``): the blocks' activations are recomputed in the
   backward pass instead of kept.
5. **Low-precision residual** (``autocast_residual``): under autocast the residual stream is carried in bf16.
6. **Loss inside the model** (``forward(ids, targets=...)``): the next-token cross-entropy of the book's
   ``calc_loss_batch``, computed here so that a compiled model fuses it with the head; optionally chunked
   (``loss_chunk``) or in one Triton kernel (``fused_loss``).
7. **Options of the config**: ``bias`` (LayerNorm and Linear biases can be dropped), ``tie_weights`` (head tied to
   the token embedding, as OpenAI's GPT-2), ``pad_vocab_multiple`` (vocabulary rows padded for fast matmuls; the padded
   columns are never targets), ``init`` (GPT-2's ``normal(0, 0.02)`` initialisation or PyTorch's defaults).

Shapes: B batch, T sequence length, C ``emb_dim``, H ``n_heads``, D head size (C // H), V padded vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lit_llm.model.config import GPTConfig
from lit_llm.model.losses import chunked_head_loss, next_token_loss


class Linear(nn.Linear):
    """``nn.Linear`` that re-initialises itself with ``normal(0, std)`` whenever ``reset_parameters`` runs.

    Sharded strategies build the model on the meta device and call ``reset_parameters`` on each module to
    materialise it, so the GPT-2 initialisation has to live here rather than in a one-off loop over modules.
    ``std=None`` keeps PyTorch's default initialisation (what the book's model uses).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, std: float | None = None, **kw):
        self.std = std
        super().__init__(in_features, out_features, bias=bias, **kw)

    def reset_parameters(self) -> None:
        if self.std is None:
            return super().reset_parameters()
        nn.init.normal_(self.weight, mean=0.0, std=self.std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Embedding(nn.Embedding):
    """``nn.Embedding`` with the same ``reset_parameters`` contract as :class:`Linear`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, std: float | None = None, **kw):
        self.std = std
        super().__init__(num_embeddings, embedding_dim, **kw)

    def reset_parameters(self) -> None:
        if self.std is None:
            return super().reset_parameters()
        nn.init.normal_(self.weight, mean=0.0, std=self.std)


class LayerKVCache:
    """Keys and values of one attention layer, preallocated as ``(B, H, max_len, D)`` on the first write.

    Allocation waits for the first keys so the buffers take their batch size, device and dtype (bf16 under autocast).

    Args:
        max_len: Most tokens the layer will hold.

    Attributes:
        length: Tokens written so far; the next keys go to positions ``length, length + 1, ...``.
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values ``(B, H, T, D)`` after the cached ones; return all of them ``(B, H, length, D)``."""
        B, H, T, D = k.shape
        if self.k is None:
            self.k = k.new_empty(B, H, self.max_len, D)
            self.v = v.new_empty(B, H, self.max_len, D)
        elif self.k.shape[0] != B:
            raise ValueError(f"KV cache was filled with batch size {self.k.shape[0]} but got a batch of {B}")
        end = self.length + T
        if end > self.max_len:
            raise ValueError(
                f"KV cache holds {self.max_len} tokens: cannot add {T} to the {self.length} cached; "
                "make the cache longer or call reset()"
            )
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """The key/value caches of every layer of a GPT, for generating one token per forward pass.

    Pass it to ``GPTModel.forward(idx, kv_cache=cache)``: the first call (the prompt) fills it, each later call
    feeds only the new token(s) and gets their position embeddings from ``cache.pos``.

    Args:
        n_layers: Number of transformer blocks of the model.
        max_len: Most tokens the cache will hold (at most the model's ``context_length``).
    """

    def __init__(self, n_layers: int, max_len: int) -> None:
        self.max_len = max_len
        self.layers = [LayerKVCache(max_len) for _ in range(n_layers)]

    @property
    def pos(self) -> int:
        """Tokens cached so far: the absolute position of the next token."""
        return self.layers[0].length

    def reset(self) -> None:
        """Forget the cached tokens, keeping the buffers for reuse with the same batch size."""
        for layer in self.layers:
            layer.length = 0


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with a fused query/key/value projection."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        std, proj_std = _init_stds(config)
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.drop_rate = config.drop_rate
        self.attention = config.attention
        self.qkv = Linear(config.emb_dim, 3 * config.emb_dim, bias=config.qkv_bias, std=std)
        self.out_proj = Linear(config.emb_dim, config.emb_dim, bias=config.bias, std=proj_std)
        self.dropout = nn.Dropout(config.drop_rate)  # on attention weights (reference path)

    def forward(self, x: torch.Tensor, kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> 3 x (B, H, T, D)
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        visible = None
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # (B, H, S, D): the cached tokens followed by these T
            # A batched static cache (lit_llm.model.decoding) holds rows of different lengths: it says which of its
            # keys each row may see, (B, 1, T, S) booleans. The growing KVCache has no such attribute.
            visible = getattr(kv_cache, "attn_mask", None)
        if visible is not None:
            if self.attention == "sdpa":
                context = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
            else:
                context = self._reference_attention(q, k, v, visible)
        elif self.attention == "sdpa":
            p = self.drop_rate if self.training else 0.0
            S = k.shape[-2]
            if S == T:  # no cached tokens before these: plain causal attention
                context = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, H, T, D)
            elif T == 1:  # one new token sees every cached one, so no mask is needed
                context = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
            else:
                # is_causal aligns the mask top-left, but these queries are the *last* T of S positions.
                visible = ~_future_mask(T, S, q.device)
                context = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=p)
        else:
            context = self._reference_attention(q, k, v)
        # -1, not C: under tensor parallelism this process holds n_heads * head_dim < C of the heads' outputs.
        return self.out_proj(context.transpose(1, 2).reshape(B, T, -1))

    def _reference_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The book's attention (chapter 3): scores, causal mask with -inf, scaled softmax, dropout, weighted sum.

        With a KV cache the T queries are the last T of the S keys' positions, so the mask is offset by S - T;
        ``visible`` (a static cache's per-row mask) replaces the causal mask.
        """
        attn_scores = q @ k.transpose(-2, -1)  # (B, H, T, S)
        mask = _future_mask(q.shape[-2], k.shape[-2], q.device) if visible is None else ~visible
        attn_scores = attn_scores.masked_fill(mask, float("-inf"))
        attn_weights = torch.softmax(attn_scores / self.head_dim**0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)
        return attn_weights @ v  # (B, H, T, D)


class FeedForward(nn.Module):
    """Position-wise MLP: C -> 4C -> GELU (tanh approximation, as the book's GELU) -> C."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        std, proj_std = _init_stds(config)
        self.layers = nn.Sequential(
            Linear(config.emb_dim, 4 * config.emb_dim, bias=config.bias, std=std),
            nn.GELU(approximate="tanh"),
            Linear(4 * config.emb_dim, config.emb_dim, bias=config.bias, std=proj_std),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: ``x + drop(att(norm1(x)))`` then ``x + drop(ff(norm2(x)))``.

    Sharded strategies wrap each block as one unit.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.emb_dim, eps=1e-5, bias=config.bias)
        self.att = MultiHeadAttention(config)
        self.norm2 = nn.LayerNorm(config.emb_dim, eps=1e-5, bias=config.bias)
        self.ff = FeedForward(config)
        self.drop_shortcut = nn.Dropout(config.drop_rate)

    def forward(self, x: torch.Tensor, kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), kv_cache))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class GPTModel(nn.Module):
    """Token + position embeddings, dropout, ``n_layers`` blocks, final LayerNorm, linear head.

    ``forward`` maps token ids ``(B, T)`` to logits ``(B, T, padded_vocab_size)``; columns from ``vocab_size`` on
    exist only when the vocabulary is padded and are never targets (samplers mask them). With a ``kv_cache`` the ids
    are the tokens that follow the cached ones (see :class:`KVCache`).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        std = 0.02 if config.init == "gpt2" else None
        V = config.padded_vocab_size
        self.tok_emb = Embedding(V, config.emb_dim, std=std)
        self.pos_emb = Embedding(config.context_length, config.emb_dim, std=std)
        self.drop_emb = nn.Dropout(config.drop_rate)
        self.trf_blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.emb_dim, eps=1e-5, bias=config.bias)
        self.out_head = Linear(config.emb_dim, V, bias=False, std=std)
        if config.tie_weights:
            self.out_head.weight = self.tok_emb.weight
        #: Recompute each block's activations in the backward pass instead of keeping them (training only): saves
        #: most activation memory for about a third more compute. Set by the task's ``activation_checkpointing``.
        self.activation_checkpointing = False
        #: Under autocast, carry the residual stream (embeddings and every block's output) in the autocast dtype
        #: (bf16) instead of float32. LayerNorm still computes in float32 and the weights stay float32; it halves the
        #: memory traffic of the elementwise work between the matmuls. Set by the task's ``low_precision_residual``.
        self.autocast_residual = False
        #: With ``targets``, compute the head and its cross-entropy together this many tokens at a time
        #: (:func:`~lit_llm.model.losses.chunked_head_loss`),
        #: never holding the (tokens x vocabulary) logits; ``None``: the
        #: plain head. Set by the task's ``chunked_loss``.
        self.loss_chunk: int | None = None
        #: With ``targets``, compute the head's cross-entropy with lit_llm's Triton kernel
        #: (:func:`~lit_llm.model.fused_loss.fused_head_loss`:
        #: the softmax and its gradient in one pass over the logits, the
        #: gradient written in place); CUDA GPUs only. Set by the task's ``fused_loss``.
        self.fused_loss = False
        self._counts: dict[bool, int] | None = None

    def forward(
        self, in_idx: torch.Tensor, kv_cache: KVCache | None = None, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``(B, T, V)``; with ``targets`` ``(B, T)`` instead the mean next-token cross-entropy (``-100``
        targets ignored), through the chunked head when ``loss_chunk`` is set, the fused one when ``fused_loss``."""
        start = self._first_position(in_idx, kv_cache)
        tok_embeds = self.tok_emb(in_idx)
        pos_embeds = self.pos_emb(torch.arange(start, start + in_idx.shape[1], device=in_idx.device))
        x = tok_embeds + pos_embeds  # (B, T, C)
        x = self.drop_emb(x)
        x = self._residual_dtype(x)
        x = self._run_blocks(x, kv_cache)
        x = self.final_norm(x)
        if targets is not None:
            return self._head_loss(x, targets)
        logits = self.out_head(x)  # (B, T, V)
        return logits

    def _first_position(self, in_idx: torch.Tensor, kv_cache: KVCache | None) -> int:
        """The absolute position of ``in_idx``'s first token (after the cached ones), checked against the context."""
        T = in_idx.shape[1]
        start = 0 if kv_cache is None else kv_cache.pos
        if start + T > self.config.context_length:
            cached = f" after {start} cached tokens" if start else ""
            raise ValueError(
                f"Input sequence has {T} tokens{cached} but the model's context_length is "
                f"{self.config.context_length}; crop the input to its last {self.config.context_length} tokens "
                "or use a model with a longer context"
            )
        return start

    def _residual_dtype(self, x: torch.Tensor) -> torch.Tensor:
        """Departure 5: under autocast with ``autocast_residual``, the residual stream in the autocast dtype."""
        if self.autocast_residual and torch.is_autocast_enabled(x.device.type):
            return x.to(torch.get_autocast_dtype(x.device.type))
        return x

    def _run_blocks(self, x: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        """The book's ``self.trf_blocks(x)``; with a KV cache each block reads and extends its layer's cache
        (departure 3), and in training with ``activation_checkpointing`` each block is recomputed (departure 4)."""
        if kv_cache is not None:
            if len(kv_cache.layers) != len(self.trf_blocks):
                raise ValueError(
                    f"KVCache has {len(kv_cache.layers)} layers but the model has {len(self.trf_blocks)}; "
                    "build it with model.new_kv_cache(max_len)"
                )
            for block, layer_cache in zip(self.trf_blocks, kv_cache.layers):
                x = block(x, layer_cache)
            return x
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.trf_blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return x

    def _head_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Departure 6: the head and the book's next-token cross-entropy, chunked or fused when asked."""
        if self.loss_chunk:
            return chunked_head_loss(x, self.out_head.weight, targets, chunk_size=self.loss_chunk)
        if self.fused_loss:
            from lit_llm.model.fused_loss import fused_head_loss  # imports Triton, so only when used

            return fused_head_loss(x, self.out_head.weight, targets)
        return next_token_loss(self.out_head(x), targets)

    def new_kv_cache(self, max_len: int | None = None) -> KVCache:
        """An empty :class:`KVCache` for this model holding ``max_len`` tokens (default: ``context_length``)."""
        n = self.config.context_length if max_len is None else min(max_len, self.config.context_length)
        return KVCache(len(self.trf_blocks), n)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameters counted once each (a tied embedding and head count once).

        Sharded strategies replace each rank's parameters by its shard; :meth:`record_parameter_counts`, called once
        the model is complete and before it is sharded, keeps the full counts for then.
        """
        if self._counts is not None:
            return self._counts[trainable_only]
        return sum(_full_numel(p) for p in self.parameters() if p.requires_grad or not trainable_only)

    def record_parameter_counts(self) -> None:
        """Remember the parameter counts now (full model); :meth:`num_parameters` returns them from then on."""
        self._counts = None
        self._counts = {flag: self.num_parameters(trainable_only=flag) for flag in (False, True)}

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token by the PaLM formula ``6 N + 12 L d T``.

        ``N`` counts the parameters that do matmul work: everything but the embedding lookups, plus the output
        head (which is the token embedding when tied). The formula assumes every parameter trains; with frozen
        layers (LoRA, a classifier training its last block) the real count is lower (a frozen matrix skips its
        weight gradient, and layers below all trainable ones skip the backward pass), so MFU reads high there.
        """
        c = self.config
        T = seq_len or c.context_length
        n = self.num_parameters() - c.context_length * c.emb_dim  # minus the position embedding
        if not c.tie_weights:
            n -= c.padded_vocab_size * c.emb_dim  # the token embedding is a lookup, unless it is also the head
        return 6.0 * n + 12.0 * c.n_layers * c.emb_dim * T


def _full_numel(p: torch.Tensor) -> int:
    """Elements of a parameter; DeepSpeed ZeRO-3 empties partitioned parameters and keeps the count in ``ds_numel``."""
    return int(getattr(p, "ds_numel", p.numel()))


def _future_mask(T: int, S: int, device: torch.device) -> torch.Tensor:
    """``(T, S)`` boolean mask, True where query ``i`` (position ``S - T + i``) must not see key ``j``."""
    return torch.triu(torch.ones(T, S, dtype=torch.bool, device=device), diagonal=S - T + 1)


def _init_stds(config: GPTConfig) -> tuple[float | None, float | None]:
    """(std of ordinary layers, std of the projections that write into the residual stream)."""
    if config.init == "pytorch":
        return None, None
    return 0.02, 0.02 / math.sqrt(2 * config.n_layers)


# The book's class name is GPTModel; GPT is the short alias used across lit_llm.
GPT = GPTModel
