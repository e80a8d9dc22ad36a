"""The book's instruction collate (chapter 7's ``custom_collate_fn``), prompt masking, length-grouped batches, and
the padded collate of already-shifted ``{"ids", "targets"}`` items (conversations).

For each tokenized example the collate appends one end-of-text token, pads the batch to its longest example with
end-of-text, and shifts by one: ``inputs = padded[:-1]``, ``targets = padded[1:]``. Padding targets become ``-100``
(ignored by the loss) except the first end-of-text after each example, which the model must learn to emit so that
generation stops. Both tensors are finally cut to ``allowed_max_length`` tokens.

One difference from the book, on purpose: the book finds padding by comparing targets with the pad id, so an
end-of-text token *inside* an example's text would also be masked; here padding is known by position, so only real
padding is masked. The two agree whenever the examples hold no end-of-text token, as in the book's data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lit_llm.data.sampler import ResumableSampler

IGNORE_INDEX = -100


def collate_instructions(
    batch: Sequence[Sequence[int]],
    pad_token_id: int = 50256,
    ignore_index: int = IGNORE_INDEX,
    allowed_max_length: int | None = None,
    prompt_lengths: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a batch of token-id lists into ``(inputs, targets)`` the way the book's ``custom_collate_fn`` does.

    Args:
        batch: One list of token ids per example (prompt and response, without end-of-text).
        pad_token_id: The end-of-text id, appended once to each example and used as padding (50256 for GPT-2).
        ignore_index: Target value the loss ignores.
        allowed_max_length: Cut inputs and targets to this many tokens; ``None`` keeps the batch's full length.
        prompt_lengths: Tokens of each example's prompt (instruction, input and response header); their targets
            become ``ignore_index`` so that only the response and its end-of-text are learnt. ``None``: no masking.

    Returns:
        ``inputs`` and ``targets``, both ``(batch, T)`` int64, ``T = min(longest example, allowed_max_length)``.
    """
    if not batch:
        raise ValueError("collate_instructions needs at least one example")
    width = max(len(ids) for ids in batch)  # the appended end-of-text is the last target, never an input
    padded = torch.full((len(batch), width + 1), pad_token_id, dtype=torch.long)
    targets_keep = torch.zeros((len(batch), width), dtype=torch.bool)
    for row, ids in enumerate(batch):
        n = len(ids)
        if n:
            padded[row, :n] = torch.as_tensor(ids, dtype=torch.long)
        # Target j predicts token j + 1: tokens 1..n-1 of the example, then the appended end-of-text (at j = n - 1).
        first = max(prompt_lengths[row] - 1, 0) if prompt_lengths is not None else 0
        targets_keep[row, first:n] = True
    inputs = padded[:, :width]
    targets = padded[:, 1:].masked_fill(~targets_keep, ignore_index)
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return inputs.contiguous(), targets.contiguous()


@dataclass(frozen=True)
class InstructionCollate:
    """A picklable collate function (DataLoader workers pickle it) over items ``{"ids": [...], "prompt_len": n}``.

    Attributes:
        pad_token_id: End-of-text id.
        allowed_max_length: Longest ``inputs``/``targets`` row; ``None`` for no limit.
        mask_prompt: Ignore the prompt tokens' targets.
        ignore_index: Target value the loss ignores.
    """

    pad_token_id: int
    allowed_max_length: int | None = None
    mask_prompt: bool = False
    ignore_index: int = IGNORE_INDEX

    def __call__(self, items: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        return collate_instructions(
            [item["ids"] for item in items],
            pad_token_id=self.pad_token_id,
            ignore_index=self.ignore_index,
            allowed_max_length=self.allowed_max_length,
            prompt_lengths=[item["prompt_len"] for item in items] if self.mask_prompt else None,
        )


class LengthGroupedSampler(ResumableSampler):
    """A :class:`ResumableSampler` whose epochs put examples of similar length in the same batch.

    Each epoch's seeded permutation is cut into chunks of ``group_batches`` batches; each chunk is sorted by length
    (longest first) and cut into batches, and the full batches are shuffled (the same seed) while an incomplete
    last one stays last. Batches then hold examples of similar length, so padding wastes less compute, yet the
    order still changes every epoch. The order is a function of ``(seed, epoch)``, so mid-epoch resumes stay exact.
    Under several ranks, consecutive runs of ``batch_size * num_replicas`` examples are grouped, which gives each
    rank's batch similar lengths too.

    Args:
        lengths: Length of each example (e.g. its token count).
        batch_size: Examples per batch on one rank.
        group_batches: Batches sorted together; larger groups pad less but vary the order less.
        seed: Seed of the shuffle.
        drop_last: See :class:`ResumableSampler`.
        num_replicas: See :class:`ResumableSampler`.
        rank: See :class:`ResumableSampler`.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        group_batches: int = 64,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(len(lengths), seed=seed, shuffle=True, drop_last=drop_last, num_replicas=num_replicas,
                         rank=rank)
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.group_batches = group_batches

    def _permutation(self, epoch: int) -> list[int]:
        cached = getattr(self, "_grouped_cache", None)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        order = super()._permutation(epoch)
        step = self.batch_size * self.num_replicas
        chunk = step * self.group_batches
        batches: list[list[int]] = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start : start + chunk], key=lambda i: -self.lengths[i])
            batches.extend(part[b : b + step] for b in range(0, len(part), step))
        tail = [batches.pop()] if batches and len(batches[-1]) < step else []
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()] + tail
        grouped = [i for batch in shuffled for i in batch]
        self._grouped_cache = (epoch, grouped)
        return grouped


def collate_targets(
    items: Sequence[dict],
    pad_token_id: int,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad items ``{"ids": [...], "targets": [...]}`` (targets already shifted: ``targets[i]`` is what the model
    should predict after ``ids[i]``, or ``ignore_index``) into ``(inputs, targets)`` of the batch's longest item.

    Inputs are padded with ``pad_token_id`` (end-of-text, as the book's collate), targets with ``ignore_index``, so
    padding never reaches the loss. This is the collate of conversation data (:mod:`lit_llm.data.chat`).

    Returns:
        ``inputs`` and ``targets``, both ``(batch, T)`` int64.
    """
    if not items:
        raise ValueError("collate_targets needs at least one item")
    width = max(len(item["ids"]) for item in items)
    inputs = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    targets = torch.full((len(items), width), ignore_index, dtype=torch.long)
    for row, item in enumerate(items):
        ids, tgt = item["ids"], item["targets"]
        if len(ids) != len(tgt):
            raise ValueError(f"item {row} has {len(ids)} ids but {len(tgt)} targets; they must be equally long")
        if ids:
            inputs[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            targets[row, : len(tgt)] = torch.as_tensor(tgt, dtype=torch.long)
    return inputs, targets


@dataclass(frozen=True)
class TargetCollate:
    """A picklable :func:`collate_targets` (DataLoader workers pickle it).

    Attributes:
        pad_token_id: End-of-text id, the inputs' padding.
        ignore_index: Target value the loss ignores, the targets' padding.
    """

    pad_token_id: int
    ignore_index: int = IGNORE_INDEX

    def __call__(self, items: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        return collate_targets(items, self.pad_token_id, self.ignore_index)
