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
8. **Packed documents** (``forward(ids, documents=...)``): a row may hold several examples one after another
   (instruction data packed into full rows). ``documents`` ``(B, T)`` numbers each token's example; every example
   then gets the position embeddings ``0, 1, 2, ...`` it would get alone, and a token attends only to the earlier
   tokens of its own example. The book's causal mask becomes a block-diagonal causal mask (:class:`DocumentMask`):
   FlexAttention with a block-sparse mask on CUDA (compiled; blocks no example touches are skipped), otherwise
   ``scaled_dot_product_attention`` or the reference attention with the same mask as a dense ``(B, 1, T, T)``
   tensor. Each example's logits are the ones it gets alone in a row of its own.

Shapes: B batch, T sequence length, C ``emb_dim``, H ``n_heads``, D head size (C // H), V padded vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

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


@dataclass
class DocumentMask:
    """Which keys each query of a packed batch may see, and each token's position within its own document.

    Built once per batch by :meth:`GPTModel.document_mask` and shared by every layer. Exactly one of ``block`` (a
    FlexAttention ``BlockMask``) and ``dense`` (``(B, 1, T, T)`` booleans, True where a query may see a key) is set.

    Attributes:
        positions: ``(B, T)`` position of each token within its document (0 at each document's first token).
        dense: The mask for ``scaled_dot_product_attention`` and the reference attention, or ``None``.
        block: The mask for ``flex_attention``, or ``None``.
    """

    positions: torch.Tensor
    dense: torch.Tensor | None = None
    block: Any | None = None  # torch.nn.attention.flex_attention.BlockMask (imported only when used)


def document_segments(documents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(segments, positions)`` of a ``(B, T)`` document index: a new segment starts wherever the index changes.

    Segments number each row's runs of equal document ids ``1, 2, 3, ...``, so any ids work (padding may be ``-1``)
    and an id that comes back later in a row is a new document; positions count from 0 within each segment.
    """
    if documents.dim() != 2:
        raise ValueError(f"documents must be (batch, tokens), got shape {tuple(documents.shape)}")
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    index = torch.arange(documents.shape[1], device=documents.device).expand_as(documents)
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # each token's segment start
    return starts.cumsum(dim=1), index - first


def dense_document_mask(segments: torch.Tensor) -> torch.Tensor:
    """``(B, 1, T, T)`` booleans: query ``i`` may see key ``j`` when both are in one segment and ``j <= i``."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]


_compiled_create_block_mask: Any = None


def flex_document_mask(segments: torch.Tensor) -> Any:
    """The same mask as :func:`dense_document_mask` as a FlexAttention ``BlockMask`` (128 x 128 blocks; blocks no
    query may see are skipped by the kernel).

    On CUDA ``create_block_mask`` runs compiled (PyTorch's advice): eagerly it evaluates the mask through ``vmap`` at
    a cost of tens of milliseconds per batch, compiled well under one. A new batch's mask reuses the compiled code.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document_causal(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (segments[b, q] == segments[b, kv]) & (kv <= q)

    build = create_block_mask
    if segments.device.type == "cuda":
        global _compiled_create_block_mask
        if _compiled_create_block_mask is None:
            _compiled_create_block_mask = torch.compile(create_block_mask)
        build = _compiled_create_block_mask
    B, T = segments.shape
    return build(same_document_causal, B, None, T, T, device=segments.device)


def flex_attention_available() -> bool:
    """Whether this PyTorch has ``torch.nn.attention.flex_attention`` (2.5 and later)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


_compiled_flex: Any = None


def _flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any) -> torch.Tensor:
    """``flex_attention``, compiled on its own unless it is already being traced into a compiled model.

    Uncompiled, FlexAttention computes the whole score matrix (slow, and no backward pass on CPU); compiled, it is one
    fused kernel that skips the masked blocks. Inside ``torch.compile`` of the whole model (``speed.compile``) the
    call is traced into that graph; otherwise one module-wide compiled copy serves every layer (PyTorch's
    recommended use).
    """
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling() or q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=block_mask)
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)


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

    def forward(
        self, x: torch.Tensor, kv_cache: LayerKVCache | None = None, documents: DocumentMask | None = None
    ) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> 3 x (B, H, T, D)
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if documents is not None:  # departure 8: packed documents see only themselves
            context = self._document_attention(q, k, v, documents)
            return self.out_proj(context.transpose(1, 2).reshape(B, T, -1))
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

    def _document_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: DocumentMask
    ) -> torch.Tensor:
        """Attention within each packed document: FlexAttention's block mask, or the dense mask."""
        if documents.block is not None:
            return _flex_attention(q, k, v, documents.block)
        if self.attention == "sdpa":
            p = self.drop_rate if self.training else 0.0
            return F.scaled_dot_product_attention(q, k, v, attn_mask=documents.dense, dropout_p=p)
        return self._reference_attention(q, k, v, documents.dense)

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

    def forward(
        self, x: torch.Tensor, kv_cache: LayerKVCache | None = None, documents: DocumentMask | None = None
    ) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), kv_cache, documents))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class GPTModel(nn.Module):
    """Token + position embeddings, dropout, ``n_layers`` blocks, final LayerNorm, linear head.

    ``forward`` maps token ids ``(B, T)`` to logits ``(B, T, padded_vocab_size)``; columns from ``vocab_size`` on
    exist only when the vocabulary is padded and are never targets (samplers mask them). With a ``kv_cache`` the ids
    are the tokens that follow the cached ones (see :class:`KVCache`). With ``documents`` each row holds several
    packed examples that never see each other (see :meth:`document_mask`).
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
        #: How packed documents (``forward(..., documents=...)``) attend: ``auto`` uses FlexAttention on CUDA with
        #: ``attention="sdpa"`` (except while attention dropout is on, which FlexAttention lacks) and the dense mask
        #: otherwise; ``flex`` and ``dense`` force one (benchmarks and tests compare them).
        self.document_attention: Literal["auto", "flex", "dense"] = "auto"
        self._counts: dict[bool, int] | None = None

    def forward(
        self,
        in_idx: torch.Tensor,
        kv_cache: KVCache | None = None,
        targets: torch.Tensor | None = None,
        *,
        documents: torch.Tensor | DocumentMask | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, T, V)``; with ``targets`` ``(B, T)`` instead the mean next-token cross-entropy (``-100``
        targets ignored), through the chunked head when ``loss_chunk`` is set, the fused one when ``fused_loss``.

        ``documents`` ``(B, T)`` (or the :class:`DocumentMask` that :meth:`document_mask` built from it) packs several
        examples per row (departure 8); ``None`` is the book's forward.
        """
        start = self._first_position(in_idx, kv_cache)
        documents = self._checked_documents(in_idx, kv_cache, documents)
        tok_embeds = self.tok_emb(in_idx)
        if documents is None:
            pos_embeds = self.pos_emb(torch.arange(start, start + in_idx.shape[1], device=in_idx.device))
        else:
            pos_embeds = self.pos_emb(documents.positions)  # (B, T, C): positions restart at each document
        x = tok_embeds + pos_embeds  # (B, T, C)
        x = self.drop_emb(x)
        x = self._residual_dtype(x)
        x = self._run_blocks(x, kv_cache, documents)
        x = self.final_norm(x)
        if targets is not None:
            return self._head_loss(x, targets)
        logits = self.out_head(x)  # (B, T, V)
        return logits

    def document_mask(self, documents: torch.Tensor) -> DocumentMask:
        """The attention mask and positions of a packed batch, built once and shared by every layer.

        ``documents`` ``(B, T)`` gives each token's document: any integers, a new document starting wherever the
        value changes along the row (padding may be ``-1``, or its own id). A token sees only the tokens of its own
        document up to itself, and its position embedding is its index within its document. The tasks build it
        before calling the compiled model and pass it in; called inside a compiled model (``forward`` given the
        tensor), it breaks the graph there.
        """
        return _build_document_mask(documents, self._uses_flex(documents.device))

    def _uses_flex(self, device: torch.device) -> bool:
        if self.document_attention != "auto":
            return self.document_attention == "flex"
        attention_dropout = self.training and self.config.drop_rate > 0  # FlexAttention has no dropout
        return (device.type == "cuda" and self.config.attention == "sdpa" and not attention_dropout
                and flex_attention_available())

    def _checked_documents(
        self, in_idx: torch.Tensor, kv_cache: KVCache | None, documents: torch.Tensor | DocumentMask | None
    ) -> DocumentMask | None:
        if documents is None:
            return None
        if kv_cache is not None:
            raise ValueError("documents (packed examples) are for training and scoring, not with a KV cache")
        if isinstance(documents, torch.Tensor):
            if documents.shape != in_idx.shape:
                raise ValueError(f"documents has shape {tuple(documents.shape)} but the ids have "
                                 f"{tuple(in_idx.shape)}; give one document index per token")
            return self.document_mask(documents)
        if documents.positions.shape != in_idx.shape:
            raise ValueError(f"the DocumentMask is for shape {tuple(documents.positions.shape)} but the ids have "
                             f"{tuple(in_idx.shape)}")
        return documents

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

    def _run_blocks(
        self, x: torch.Tensor, kv_cache: KVCache | None, documents: DocumentMask | None = None
    ) -> torch.Tensor:
        """The book's ``self.trf_blocks(x)``; with a KV cache each block reads and extends its layer's cache
        (departure 3), and in training with ``activation_checkpointing`` each block is recomputed (departure 4).
        Packed ``documents`` (departure 8) reach every block's attention."""
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
        extra = () if documents is None else (None, documents)
        for block in self.trf_blocks:
            x = checkpoint(block, x, *extra, use_reentrant=False) if recompute else block(x, *extra)
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


@torch.compiler.disable
def _build_document_mask(documents: torch.Tensor, flex: bool) -> DocumentMask:
    """See :meth:`GPTModel.document_mask`; kept out of compiled graphs (the block mask is built eagerly)."""
    segments, positions = document_segments(documents)
    if flex:
        return DocumentMask(positions=positions, block=flex_document_mask(segments))
    return DocumentMask(positions=positions, dense=dense_document_mask(segments))


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
