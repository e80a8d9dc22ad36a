"""Fixtures of the evaluation tests."""

from __future__ import annotations

import random

import pytest
from eval_helpers import sentence


@pytest.fixture(scope="session")
def eval_tokenizer():
    """A byte-level BPE of about 300 tokens trained on sentences of the helpers' words."""
    from lit_llm.data.tokenizer import train_bpe

    rng = random.Random(0)
    return train_bpe([sentence(rng, 12) + "." for _ in range(400)], vocab_size=300)
