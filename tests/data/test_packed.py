"""lit_llm.data.packed: instruction items labelled as the book's collate labels them, the bin packing, the packed
collate."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_llm.data.collate import collate_instructions
from lit_llm.data.packed import (
    PAD_DOCUMENT,
    PackedCollate,
    PackedDataset,
    instruction_item,
    pack_lengths,
    packing_efficiency,
)

EOS = 50256


@pytest.mark.parametrize("mask_prompt", [False, True])
@pytest.mark.parametrize("max_length", [None, 12])
def test_instruction_items_are_the_books_collate_rows(mask_prompt, max_length):
    """Each item is its example's row of the book's padded batch, without the padding."""
    rng = random.Random(0)
    examples = [[rng.randrange(50_000) for _ in range(rng.randint(1, 20))] for _ in range(30)]
    prompt_lens = [rng.randint(1, len(x) + 2) for x in examples]  # some prompts as long as the whole example
    inputs, targets = collate_instructions(examples, pad_token_id=EOS, allowed_max_length=max_length,
                                           prompt_lengths=prompt_lens if mask_prompt else None)
    for row, (ids, n) in enumerate(zip(examples, prompt_lens)):
        item = instruction_item(ids, n, mask_prompt, EOS, max_length)
        width = len(item["ids"])
        assert width == len(item["targets"]) == min(len(ids), max_length or len(ids))
        assert item["ids"] == inputs[row, :width].tolist()
        assert item["targets"] == targets[row, :width].tolist()
        assert (targets[row, width:] == -100).all()  # the rest of the padded row trains nothing


def test_instruction_item_by_hand():
    assert instruction_item([5, 6, 7, 8], 2, False, EOS) == {"ids": [5, 6, 7, 8], "targets": [6, 7, 8, EOS]}
    assert instruction_item([5, 6, 7, 8], 2, True, EOS) == {"ids": [5, 6, 7, 8], "targets": [-100, 7, 8, EOS]}
    assert instruction_item([5, 6, 7, 8], 9, True, EOS, 3) == {"ids": [5, 6, 7], "targets": [-100] * 3}
    with pytest.raises(ValueError, match="at least one token"):
        instruction_item([], 0, False, EOS)


def test_best_fit_decreasing_by_hand():
    # Longest first: 7 opens row 0 (room 3), 6 opens row 1 (room 4), 4 fills row 1, 3 fills row 0, 2 opens row 2.
    assert pack_lengths([3, 7, 2, 6, 4], 10) == [[1, 0], [3, 4], [2]]
    assert pack_lengths([], 10) == []
    with pytest.raises(ValueError, match="example 1 has 11 tokens.*max_length=10"):
        pack_lengths([3, 11], 10)
    with pytest.raises(ValueError, match="example 0 has 0 tokens"):
        pack_lengths([0], 10)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 64), max_size=300), st.integers(64, 200))
def test_packing_places_every_example_once_within_the_rows(lengths, max_length):
    rows = pack_lengths(lengths, max_length)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= max_length for row in rows)
    assert rows == pack_lengths(list(lengths), max_length)  # a function of the lengths alone
    # Best fit never leaves two rows that would fit in one (no row is at most half full twice).
    loads = sorted(sum(lengths[i] for i in row) for row in rows)
    assert len(loads) < 2 or loads[0] + loads[1] > max_length
    if lengths:
        assert len(rows) >= -(-sum(lengths) // max_length)


def test_packing_is_efficient_on_alpaca_like_lengths():
    rng = random.Random(1)
    lengths = [min(max(int(rng.gauss(56, 8)), 40), 91) for _ in range(2_000)]
    rows = pack_lengths(lengths, 1024)
    assert packing_efficiency(lengths, rows, 1024) > 0.98
    assert packing_efficiency([4, 4], [[0], [1]], 8) == 0.5


def items(lengths: list[int]) -> list[dict[str, list[int]]]:
    """Example ``k`` holds tokens ``100 k + i`` and targets ``-(100 k + i)``, so rows show where each came from."""
    return [{"ids": [100 * k + i for i in range(n)], "targets": [-(100 * k + i) - 1 for i in range(n)]}
            for k, n in enumerate(lengths)]


def test_packed_dataset_rows_join_their_examples():
    ds = PackedDataset(items([3, 7, 2, 6, 4]), 10)
    assert len(ds) == 3 and ds.packs == [[1, 0], [3, 4], [2]]
    assert ds[0] == {"ids": [100, 101, 102, 103, 104, 105, 106, 0, 1, 2],
                     "targets": [-(100 + i) - 1 for i in range(7)] + [-1, -2, -3], "lengths": [7, 3]}
    assert ds.efficiency == pytest.approx(22 / 30)
    assert "packed 5 examples (22 tokens) into 3 rows of 10 tokens" in ds.summary()
    with pytest.raises(ValueError, match="example 0 has 2 ids but 1 targets"):
        PackedDataset([{"ids": [1, 2], "targets": [3]}], 10)


@pytest.mark.parametrize("pad_to_max_length", [True, False])
def test_packed_collate_numbers_the_documents_and_pads(pad_to_max_length):
    ds = PackedDataset(items([3, 7, 2, 6, 4]), 10)
    collate = PackedCollate(pad_token_id=EOS, max_length=12, pad_to_max_length=pad_to_max_length)
    inputs, targets, documents = collate([ds[0], ds[2]])
    width = 12 if pad_to_max_length else 10
    assert inputs.shape == targets.shape == documents.shape == (2, width)
    assert inputs.dtype == targets.dtype == documents.dtype == torch.long
    assert documents[0].tolist() == [0] * 7 + [1] * 3 + [PAD_DOCUMENT] * (width - 10)
    assert documents[1].tolist() == [0] * 2 + [PAD_DOCUMENT] * (width - 2)
    assert inputs[0, :10].tolist() == ds[0]["ids"] and targets[0, :10].tolist() == ds[0]["targets"]
    assert (inputs[1, 2:] == EOS).all() and (targets[1, 2:] == -100).all()
    with pytest.raises(ValueError, match="a packed row has 10 tokens, more than max_length=8"):
        PackedCollate(EOS, 8)([ds[0]])
