"""Packing short finetuning examples into full rows, with each example kept apart from the others.

Instruction and conversation examples are short (the book's 1,100 records average 56 GPT-2 tokens), so padded
batches spend much of their compute on padding. Packing lays several examples end to end in one row of at most
``max_length`` tokens; the batch carries a third tensor, ``documents``, numbering the examples of each row, with which
the GPT keeps every example from attending to the others and restarts its position embeddings (see
``lit_llm.model.gpt.GPTModel.document_mask``). Each example's loss and gradient are then those of the example alone.

Items are ``{"ids": [...], "targets": [...]}`` of equal length, the targets already shifted (``targets[i]`` is the
label of position ``i``; ``-100`` where nothing is learnt). :func:`instruction_item` makes them from an instruction
example exactly as the book's collate labels it; a conversation data module produces them directly.

The packing is computed once, at setup, from the examples' lengths alone (best-fit decreasing, deterministic), and
:class:`PackedDataset`'s item is one pack: a shuffling sampler then shuffles whole packs, and a mid-epoch resume is
exact because the packs of a run never change.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from lit_llm.data.collate import IGNORE_INDEX

__all__ = ["PackedCollate", "PackedDataset", "instruction_item", "pack_lengths", "packing_efficiency"]

#: ``documents`` value of padding tokens (a document of its own: padding sees only padding).
PAD_DOCUMENT = -1


def instruction_item(
    ids: Sequence[int],
    prompt_len: int,
    mask_prompt: bool,
    eos_id: int,
    max_length: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, list[int]]:
    """One instruction example as a packable ``{"ids", "targets"}`` item, labelled as the book's collate labels it.

    The collate (:func:`lit_llm.data.collate.collate_instructions`) appends end-of-text and shifts by one, so the
    inputs are the example's ids and the targets its ids from the second on followed by end-of-text; with
    ``mask_prompt`` the targets before the response (the first ``prompt_len - 1``) are ``ignore_index``. Both are
    cut to ``max_length`` as the collate cuts its rows. The item's row in a padded batch is exactly these tokens
    followed by padding.

    Args:
        ids: The example's token ids (prompt and response, without end-of-text).
        prompt_len: Tokens of the prompt at the start of ``ids``.
        mask_prompt: Ignore the prompt tokens' targets.
        eos_id: The end-of-text id, the last target.
        max_length: Longest item; ``None`` keeps every token.
        ignore_index: Target value the loss ignores.

    Returns:
        ``{"ids": inputs, "targets": targets}``, lists of equal length ``min(len(ids), max_length)``.
    """
    if not ids:
        raise ValueError("an example needs at least one token")
    inputs = list(ids)
    targets = inputs[1:] + [int(eos_id)]
    first = max(prompt_len - 1, 0) if mask_prompt else 0
    targets[:first] = [ignore_index] * min(first, len(targets))
    if max_length is not None:
        inputs, targets = inputs[:max_length], targets[:max_length]
    return {"ids": inputs, "targets": targets}


def pack_lengths(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Bin-pack examples of these lengths into rows of at most ``max_length`` tokens (best-fit decreasing).

    Longest first, each example goes into the open row that it fills most tightly (the one with the least room left
    that still holds it), or opens a new row. Ties go to the example and the row that came first, so the result is a
    function of ``lengths`` and ``max_length`` alone. Rows list their examples in the order they were placed.

    Args:
        lengths: Tokens of each example; each must be in ``[1, max_length]``.
        max_length: Tokens a row holds.

    Returns:
        The rows, each a list of indices into ``lengths``.
    """
    if max_length < 1:
        raise ValueError(f"max_length={max_length} must be >= 1")
    bad = [i for i, n in enumerate(lengths) if not 1 <= n <= max_length]
    if bad:
        raise ValueError(f"example {bad[0]} has {lengths[bad[0]]} tokens; packed examples need 1 to "
                         f"max_length={max_length} tokens ({len(bad)} such examples): cut or drop them first")
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, row) of the rows with room, sorted
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        at = bisect.bisect_left(room, (n, -1))
        if at < len(room):
            left, row = room.pop(at)
        else:
            left, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if left - n > 0:
            bisect.insort(room, (left - n, row))
    return rows


def packing_efficiency(lengths: Sequence[int], rows: Sequence[Sequence[int]], max_length: int) -> float:
    """Share of the rows' token slots that hold tokens: ``sum(lengths) / (len(rows) * max_length)``."""
    return sum(lengths[i] for row in rows for i in row) / max(len(rows) * max_length, 1)


class PackedDataset(Dataset):
    """Examples packed into rows; item ``i`` is row ``i``: ``{"ids", "targets", "lengths"}``, its examples joined.

    Args:
        items: The examples, ``{"ids": [...], "targets": [...]}`` of equal length, each at most ``max_length``
            tokens (apply the data module's ``overlong`` policy first).
        max_length: Tokens per row.

    Attributes:
        packs: The rows, each a list of example indices (see :func:`pack_lengths`).
        efficiency: Share of the rows' token slots that hold tokens.
    """

    def __init__(self, items: Sequence[dict[str, Sequence[int]]], max_length: int) -> None:
        for i, item in enumerate(items):
            if len(item["ids"]) != len(item["targets"]):
                raise ValueError(f"example {i} has {len(item['ids'])} ids but {len(item['targets'])} targets; "
                                 "give one target per position")
        self.items = items
        self.max_length = max_length
        lengths = [len(item["ids"]) for item in items]
        self.packs = pack_lengths(lengths, max_length)
        self.efficiency = packing_efficiency(lengths, self.packs, max_length)
        self.n_tokens = sum(lengths)

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        examples = [self.items[i] for i in self.packs[index]]
        return {
            "ids": [t for x in examples for t in x["ids"]],
            "targets": [t for x in examples for t in x["targets"]],
            "lengths": [len(x["ids"]) for x in examples],
        }

    def summary(self) -> str:
        """One line for the log: examples, rows, and how full the rows are."""
        n = len(self.items)
        return (f"packed {n} examples ({self.n_tokens:,} tokens) into {len(self.packs)} rows of {self.max_length} "
                f"tokens, {n / max(len(self.packs), 1):.1f} examples per row; packing efficiency "
                f"{self.efficiency:.1%} (tokens / (rows x {self.max_length}))")


@dataclass(frozen=True)
class PackedCollate:
    """Batches of :class:`PackedDataset` rows as ``(inputs, targets, documents)``, each ``(B, T)`` int64.

    ``documents`` numbers the examples of each row ``0, 1, 2, ...``; padding (end-of-text inputs, ``ignore_index``
    targets) is document ``-1``. A picklable callable, for DataLoader workers.

    Attributes:
        pad_token_id: Input id of padding (end-of-text).
        max_length: Row length of the packing; with ``pad_to_max_length`` every batch is ``max_length`` wide.
        pad_to_max_length: Pad every batch to ``max_length`` (one shape for the whole run: a compiled model and
            FlexAttention compile once), or to the batch's longest row (``False``; packed rows are nearly full, so
            this saves little).
        ignore_index: Target value of padding.
    """

    pad_token_id: int
    max_length: int
    pad_to_max_length: bool = True
    ignore_index: int = IGNORE_INDEX

    def __call__(self, rows: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not rows:
            raise ValueError("PackedCollate needs at least one row")
        width = self.max_length if self.pad_to_max_length else max(len(r["ids"]) for r in rows)
        inputs = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        targets = torch.full((len(rows), width), self.ignore_index, dtype=torch.long)
        documents = torch.full((len(rows), width), PAD_DOCUMENT, dtype=torch.long)
        for b, row in enumerate(rows):
            n = len(row["ids"])
            if n > width:
                raise ValueError(f"a packed row has {n} tokens, more than max_length={width}")
            inputs[b, :n] = torch.as_tensor(row["ids"], dtype=torch.long)
            targets[b, :n] = torch.as_tensor(row["targets"], dtype=torch.long)
            documents[b, :n] = torch.repeat_interleave(torch.arange(len(row["lengths"])),
                                                       torch.as_tensor(row["lengths"]))
        return inputs, targets, documents
