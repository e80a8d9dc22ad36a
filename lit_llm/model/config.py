"""The GPT's shape and options, and the named presets.

This module imports no torch, so configs can be read and validated cheaply.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

from lit_llm.errors import ConfigError

# The book's GPT_CONFIG_124M and its bigger siblings (chapter 5, "Loading pretrained weights from OpenAI").
# Small presets train on a CPU in minutes.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-124m": dict(emb_dim=768, n_layers=12, n_heads=12, context_length=1024, vocab_size=50257),
    "gpt2-355m": dict(emb_dim=1024, n_layers=24, n_heads=16, context_length=1024, vocab_size=50257),
    "gpt2-774m": dict(emb_dim=1280, n_layers=36, n_heads=20, context_length=1024, vocab_size=50257),
    "gpt2-1558m": dict(emb_dim=1600, n_layers=48, n_heads=25, context_length=1024, vocab_size=50257),
    # Larger shapes for sharded training (FSDP / DeepSpeed ZeRO-3), in the layout of the GPT-3 paper's table 2.1
    # (13B rounded to 40 heads of 128), with context 2048. Not GPT-2 releases: no pretrained weights exist for them.
    "gpt-2.7b": dict(emb_dim=2560, n_layers=32, n_heads=32, context_length=2048, vocab_size=50257),
    "gpt-6.7b": dict(emb_dim=4096, n_layers=32, n_heads=32, context_length=2048, vocab_size=50257),
    "gpt-13b": dict(emb_dim=5120, n_layers=40, n_heads=40, context_length=2048, vocab_size=50257),
    "gpt-20b": dict(emb_dim=6144, n_layers=44, n_heads=48, context_length=2048, vocab_size=50257),
    "tiny": dict(emb_dim=64, n_layers=2, n_heads=4, context_length=64, vocab_size=512),
    "mini": dict(emb_dim=128, n_layers=4, n_heads=4, context_length=128, vocab_size=4096),
    "small": dict(emb_dim=256, n_layers=6, n_heads=8, context_length=256, vocab_size=8192),
}


@dataclass
class GPTConfig:
    """Shape and options of the GPT. The defaults are the book's ``GPT_CONFIG_124M``.

    Args:
        vocab_size: Number of token ids. When training through ``lit_llm.train`` it comes from the tokenizer.
        context_length: Longest sequence the model accepts (positions in the position embedding).
        emb_dim: Width of the residual stream.
        n_heads: Attention heads per layer; must divide ``emb_dim``.
        n_layers: Number of transformer blocks.
        drop_rate: Dropout on embeddings, attention weights and both residual branches.
        qkv_bias: Bias in the query/key/value projection (OpenAI's GPT-2 weights have one).
        bias: Bias in the other linear layers and the LayerNorms. ``False`` gives bias-free layers.
        tie_weights: Share the token embedding with the output head (GPT-2 does; the book's model does not).
        pad_vocab_multiple: Pad the embedding and head rows up to a multiple of this (64 -> 50,304 for GPT-2)
            for faster matmuls. Padding ids are never targets and never sampled. 1 disables padding.
        attention: ``"sdpa"`` (fused ``scaled_dot_product_attention``) or ``"reference"`` (the book's explicit
            mask + softmax, kept as the reference the fast path is tested against).
        init: ``"gpt2"`` (normal(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers)) or ``"pytorch"``
            (PyTorch's default initialisation, as the book's model uses).
    """

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    bias: bool = True
    tie_weights: bool = False
    pad_vocab_multiple: int = 64
    attention: Literal["sdpa", "reference"] = "sdpa"
    init: Literal["gpt2", "pytorch"] = "gpt2"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise one :class:`ConfigError` that lists every inconsistent field."""
        problems = []
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "pad_vocab_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"model.{name}={value!r} must be a positive integer")
        if not problems and self.emb_dim % self.n_heads:
            problems.append(
                f"model.emb_dim={self.emb_dim} is not divisible by model.n_heads={self.n_heads}; "
                "choose n_heads that divides emb_dim"
            )
        if not 0.0 <= self.drop_rate < 1.0:
            problems.append(f"model.drop_rate={self.drop_rate!r} must be in [0, 1)")
        if self.attention not in ("sdpa", "reference"):
            problems.append(f"model.attention={self.attention!r} must be 'sdpa' or 'reference'")
        if self.init not in ("gpt2", "pytorch"):
            problems.append(f"model.init={self.init!r} must be 'gpt2' or 'pytorch'")
        if problems:
            raise ConfigError("Invalid model config:\n  - " + "\n  - ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and output head: ``vocab_size`` rounded up to ``pad_vocab_multiple``."""
        return math.ceil(self.vocab_size / self.pad_vocab_multiple) * self.pad_vocab_multiple

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GPTConfig:
        """A preset by name (``gpt2-124m``, ``gpt2-355m``, ``gpt2-774m``, ``gpt2-1558m``, ``gpt-2.7b``, ``gpt-6.7b``,
        ``gpt-13b``, ``gpt-20b``, ``tiny``, ``mini``, ``small``) with any field overridden."""
        if name not in PRESETS:
            raise ConfigError(f"Unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> GPTConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GPTConfig:
        """Build from a dict, refusing keys that are not fields (with the list of valid ones)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"Unknown model config key(s) {unknown}; valid keys are {sorted(known)}")
        return cls(**values)
