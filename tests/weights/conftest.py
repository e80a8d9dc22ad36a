"""Fixtures of the weights tests: a small BPE trained on a fixed text and a Hugging Face GPT-2 directory."""

from __future__ import annotations

from pathlib import Path

import pytest
from weights_helpers import TEXT, randomize

from lit_llm.data.tokenizer import Tokenizer, train_bpe


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_bpe([TEXT * 20], vocab_size=300)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer) -> Path:
    """A small random transformers GPT2LMHeadModel saved with save_pretrained, plus our tokenizer beside it."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=tokenizer.vocab_size,
                                     bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id)
    model = transformers.GPT2LMHeadModel(config)
    randomize(model)
    path = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(path)
    tokenizer.save(path)
    return path
