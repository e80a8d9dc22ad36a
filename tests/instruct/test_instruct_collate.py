"""The book's instruction collate, prompt masking and length-grouped batches."""

from __future__ import annotations

import pytest
import torch

from lit_llm.data.collate import InstructionCollate, LengthGroupedSampler, collate_instructions

try:  # the book's package (its ch07 also needs psutil) is the reference; tests comparing with it skip without it
    from llms_from_scratch import ch07
except ImportError:
    ch07 = None
needs_book = pytest.mark.skipif(ch07 is None, reason="llms_from_scratch.ch07 (and psutil) not installed")

# The book's worked example (section 7.3).
BATCH = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]
PAD = 50256


def _book(batch, **kwargs):
    return ch07.custom_collate_fn(batch, pad_token_id=PAD, **kwargs)


def test_matches_the_books_worked_example():
    inputs, targets = collate_instructions(BATCH, pad_token_id=PAD)
    if ch07 is not None:
        book_inputs, book_targets = _book(BATCH)
        assert torch.equal(inputs, book_inputs) and torch.equal(targets, book_targets)
    # The values printed in the book, spelled out.
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, PAD, PAD, PAD], [7, 8, 9, PAD, PAD]]
    assert targets.tolist() == [[1, 2, 3, 4, PAD], [6, PAD, -100, -100, -100], [8, 9, PAD, -100, -100]]


@needs_book
@pytest.mark.parametrize("allowed", [1, 2, 3, 4, 5, 6, 100])
def test_allowed_max_length_truncates_like_the_book(allowed):
    inputs, targets = collate_instructions(BATCH, pad_token_id=PAD, allowed_max_length=allowed)
    book_inputs, book_targets = _book(BATCH, allowed_max_length=allowed)
    assert torch.equal(inputs, book_inputs) and torch.equal(targets, book_targets)
    assert inputs.shape == (3, min(allowed, 5))


@needs_book
def test_random_batches_match_the_book():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        batch = [torch.randint(0, 50000, (int(n),), generator=gen).tolist()
                 for n in torch.randint(1, 12, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen)]
        ours = collate_instructions(batch, pad_token_id=PAD, allowed_max_length=8)
        book = _book(batch, allowed_max_length=8)
        assert torch.equal(ours[0], book[0]) and torch.equal(ours[1], book[1])


def test_prompt_masking_hides_exactly_the_prompt_tokens():
    prompt_lengths = [3, 1, 2]
    inputs, targets = collate_instructions(BATCH, pad_token_id=PAD, prompt_lengths=prompt_lengths)
    _, unmasked = collate_instructions(BATCH, pad_token_id=PAD)
    for row, (ids, p) in enumerate(zip(BATCH, prompt_lengths)):
        # Target j predicts token j + 1: the first p - 1 targets are prompt tokens, hidden; the rest are unchanged.
        assert targets[row, : p - 1].eq(-100).all()
        assert torch.equal(targets[row, p - 1 :], unmasked[row, p - 1 :])
        learnt = [t for t in targets[row].tolist() if t != -100]
        assert learnt == ids[p:] + [PAD]  # the response tokens and one end-of-text
    assert torch.equal(inputs, collate_instructions(BATCH, pad_token_id=PAD)[0])


def test_masked_prompt_longer_than_the_limit_leaves_no_target():
    _, targets = collate_instructions([[1, 2, 3, 4, 5, 6]], pad_token_id=PAD, allowed_max_length=3,
                                      prompt_lengths=[5])
    assert targets.eq(-100).all()


def test_end_of_text_inside_an_example_is_learnt():
    """Padding is known by position, so an end-of-text token in the text itself stays a target (the book masks it)."""
    _, targets = collate_instructions([[1, PAD, 2], [3]], pad_token_id=PAD)
    assert targets.tolist() == [[PAD, 2, PAD], [PAD, -100, -100]]


@needs_book
def test_collate_object_reads_items():
    items = [{"ids": ids, "prompt_len": 2} for ids in BATCH]
    plain = InstructionCollate(PAD, allowed_max_length=4)(items)
    masked = InstructionCollate(PAD, allowed_max_length=4, mask_prompt=True)(items)
    assert torch.equal(plain[0], _book(BATCH, allowed_max_length=4)[0])
    assert torch.equal(plain[1], _book(BATCH, allowed_max_length=4)[1])
    assert masked[1][:, 0].eq(-100).all() and torch.equal(masked[1][:, 1:], plain[1][:, 1:])


def test_length_grouped_sampler_groups_and_varies_by_epoch():
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 200, (1000,), generator=gen).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=8, group_batches=16, seed=3)
    order0 = list(sampler)
    assert sorted(order0) == list(range(1000))  # every example once
    spread = [max(lengths[i] for i in order0[b : b + 8]) - min(lengths[i] for i in order0[b : b + 8])
              for b in range(0, 1000, 8)]
    random_order = torch.randperm(1000, generator=gen).tolist()
    random_spread = [max(lengths[i] for i in random_order[b : b + 8]) - min(lengths[i] for i in random_order[b : b + 8])
                     for b in range(0, 1000, 8)]
    assert sum(spread) < sum(random_spread) / 4  # far less padding than random batches
    sampler.set_epoch(1)
    assert list(sampler) != order0
    sampler.set_epoch(0)
    assert list(sampler) == order0  # a function of (seed, epoch): resumable


def test_length_grouped_sampler_resumes_mid_epoch():
    lengths = list(range(100))
    sampler = LengthGroupedSampler(lengths, batch_size=4, group_batches=5, seed=0)
    full = list(sampler)
    sampler.load_state_dict({"epoch": 0, "yielded": 40})
    assert list(sampler) == full[40:]
