"""Conversational finetuning data: multi-turn transcripts -> a chat template's ids -> loss on every assistant turn.

Records come in the ``messages``, ShareGPT or Alpaca formats (:mod:`lit_llm.data.conversations`), from the same
sources as every DataModule (local files, ``https://`` with a sha256, ``hf:``, ``builtin:chat``). Each
conversation is rendered with the chat template (:mod:`lit_llm.data.chat_template`; ChatML by default) and
becomes one item ``{"ids": [...], "targets": [...]}`` of equal lengths, where ``targets[i]`` is the token after
``ids[i]`` when that token belongs to an assistant turn (its content and end-of-turn marker) and ``-100``
otherwise: every assistant turn is learnt, nothing else. Trailing positions with nothing to learn are cut.

A conversation longer than ``max_length`` tokens loses its oldest ``[user, assistant]`` exchanges (the system
message stays) until it fits, or is dropped, or stops the run (``data.overlong``); an answer is never cut in half.
A malformed record (unknown role, two assistant messages in a row, empty content, ...) stops the run with its index,
or is skipped and counted (``data.malformed``). The template travels with the model: it is stored in every
checkpoint, used by ``generate --chat`` and ``serve``, and exported by ``convert to-hf`` as the tokenizer's
``chat_template``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from lit_llm.data.base import SPLIT_ORDER, GPTDataModule, record_source_problems, split_positions
from lit_llm.data.chat_template import DEFAULT_TEMPLATE, ChatTemplate, get_chat_template
from lit_llm.data.collate import IGNORE_INDEX, TargetCollate
from lit_llm.data.conversations import (
    FORMATS,
    BadConversation,
    Format,
    Message,
    conversation_problem,
    exchanges,
    fit_conversation,
    to_messages,
)
from lit_llm.data.instruct import PromptedSplits
from lit_llm.data.packed import PackedCollate, PackedDataset
from lit_llm.data.sampler import ResumableLoader
from lit_llm.data.tokenizer import Tokenizer
from lit_llm.errors import ConfigError, DataError

Split = Literal["train", "val", "test"]


def conversation_item(template: ChatTemplate, tokenizer: Tokenizer, messages: Sequence[Message]) -> dict[str, list]:
    """One training item of a conversation: ``{"ids", "targets"}``, targets already shifted.

    ``targets[i]`` is ``ids[i + 1]`` when that token is in an assistant span of the template (the answer and its
    end-of-turn marker), else ``-100``. Positions after the last learnt target are left out (they teach nothing).
    """
    ids, mask = template.encode(tokenizer, messages)
    targets = [ids[i + 1] if mask[i + 1] else IGNORE_INDEX for i in range(len(ids) - 1)] + [IGNORE_INDEX]
    learnt = [i for i, t in enumerate(targets) if t != IGNORE_INDEX]
    end = learnt[-1] + 1 if learnt else 0
    return {"ids": ids[:end], "targets": targets[:end]}


class TargetExamples(Dataset):
    """Items ``{"ids": list[int], "targets": list[int]}`` (see :func:`conversation_item`); ``items`` is the list."""

    def __init__(self, items: list[dict[str, list]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list]:
        return self.items[index]

    @property
    def lengths(self) -> list[int]:
        """Tokens of each item."""
        return [len(item["ids"]) for item in self.items]


class ChatDataModule(PromptedSplits, GPTDataModule):
    """Conversations from any source, rendered with a chat template, loss on every assistant turn.

    Batches are ``(inputs, targets)`` (:class:`~lit_llm.data.collate.TargetCollate`) for training, validation and
    ``test``; ``predict`` yields one prompt per assistant turn of the test conversations (its true earlier turns and
    the assistant header), which :class:`~lit_llm.tasks.ChatTask` answers and scores by exact match. The items of
    each split are ``datasets[split].items``.

    Args:
        source: The conversations: ``builtin:chat`` (generated, offline), a JSON / JSONL / parquet file (or a list of
            them), an ``https://`` URL (with ``sha256``), or ``hf:<dataset>[:<config>]``.
        sha256: SHA-256 of a URL ``source`` (required for URLs).
        hf_split: Split of an ``hf:`` source.
        val_source: Explicit validation conversations (local files or ``hf:``).
        test_source: Explicit test conversations (local files or ``hf:``).
        format: ``messages`` (``{"messages": [{role, content}], "system"?}``), ``sharegpt`` (``{"conversations":
            [{from, value}]}``), ``alpaca`` (the book's instruction/input/output records), or ``auto`` (each record
            by the field it has).
        chat_template: ``chatml`` (default for new models), ``alpaca`` or ``phi3`` (the book's styles), a ``.jinja``
            file, or an inline Jinja chat template with ``{% generation %}`` around each assistant answer and its
            end-of-turn marker. Stored in every checkpoint and exported with the model.
        special_tokens: Tokens to add to the tokenizer as special tokens besides the template's own (ChatML adds
            ``<|im_start|>`` and ``<|im_end|>``); the model's vocabulary grows to hold them.
        split: How ``source`` is cut: ``book`` keeps the file order (train, test, validation), ``shuffle`` draws the
            parts at random with ``seed``.
        split_fractions: ``[train, test, val]`` fractions of ``source`` (sum 1).
        tokenizer: ``gpt2``, ``train`` (a byte-level BPE trained on the training conversations), a tokenizer path or
            Hub name, or a lit_llm ``.ckpt`` / run directory to reuse a pretrained model's.
        tokenizer_vocab_size: Size of the BPE trained when ``tokenizer == "train"`` (before the special tokens).
        context_length: The model's context length; LightningCLI links it from the model.
        max_length: Longest item in tokens; ``null`` means ``context_length``.
        overlong: A conversation longer than ``max_length``: ``drop_oldest`` (drop its oldest user/assistant
            exchanges, keeping the system message, until it fits; dropped whole when even its last exchange does
            not), ``drop`` (drop it) or ``error`` (stop, naming it). Counts are logged.
        malformed: A record that is no well-formed conversation: ``error`` (stop, naming its index and the problem)
            or ``skip`` (count, log the first few).
        group_by_length: Batch conversations of similar length together (less padding; seeded, resumable).
        packing: Pack several training conversations into each row of ``max_length`` tokens instead of padding
            them: no token attends across conversations and positions restart in each (see docs/instruction.md,
            Packing). Training batches become ``(inputs, targets, documents)`` and ``batch_size`` counts rows.
            Validation and test batches stay padded. Not with ``group_by_length``.
        batch_size: Conversations per batch (rows with ``packing``); also the most test prompts generated together.
        shuffle: Shuffle the training conversations every epoch (seeded; exact mid-epoch resume).
        drop_last: Drop the last incomplete training batch.
        num_workers: DataLoader worker processes.
        pin_memory: Pin batches in page-locked memory; ``null`` means when CUDA is available.
        seed: Seed of the training order and of ``split: shuffle``.
        cache_dir: Downloads and trained tokenizers; ``null`` means ``$LIT_LLM_CACHE`` or ``~/.cache/lit_llm``.
    """

    #: The test record field holding the expected answer (read by the task's scoring).
    reference_field = "reference"
    #: Special tokens added to the configured tokenizer; initial weights (``model.init_weights``) trained without
    #: them get that many new embedding rows.
    added_tokens = 0

    def __init__(
        self,
        source: str | list[str] = "builtin:chat",
        sha256: str | None = None,
        hf_split: str = "train",
        val_source: str | list[str] | None = None,
        test_source: str | list[str] | None = None,
        format: Format = "auto",
        chat_template: str = DEFAULT_TEMPLATE,
        special_tokens: list[str] | None = None,
        split: Literal["book", "shuffle"] = "book",
        split_fractions: tuple[float, float, float] = (0.85, 0.10, 0.05),
        tokenizer: str = "gpt2",
        tokenizer_vocab_size: int = 4096,
        context_length: int = 1024,
        max_length: int | None = None,
        overlong: Literal["drop_oldest", "drop", "error"] = "drop_oldest",
        malformed: Literal["error", "skip"] = "error",
        group_by_length: bool = False,
        packing: bool = False,
        batch_size: int = 8,
        shuffle: bool = True,
        drop_last: bool = True,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 123,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.chat_template = _validate(locals())
        self.save_hyperparameters()
        self.set_common(tokenizer=tokenizer, tokenizer_vocab_size=tokenizer_vocab_size, batch_size=batch_size,
                        shuffle=shuffle, drop_last=drop_last, num_workers=num_workers, pin_memory=pin_memory,
                        seed=seed, cache_dir=cache_dir, quality=None)
        self.hparams.pop("quality", None)
        self.source = source
        self.sha256 = sha256
        self.hf_split = hf_split
        self.val_source = val_source
        self.test_source = test_source
        self.format = format
        self.split = split
        self.split_fractions = tuple(float(f) for f in split_fractions)
        self.context_length = context_length
        self.max_length = max_length if max_length is not None else context_length
        self.overlong = overlong
        self.malformed = malformed
        self.group_by_length = group_by_length
        self.packing = packing
        self.packed_train: PackedDataset | None = None
        self._conversations: dict[Split, list[list[Message]]] | None = None
        self._origin: dict[Split, tuple[str, list[int]]] = {}
        self.datasets: dict[Split, TargetExamples] = {}
        self.test_records: list[dict[str, Any]] = []
        self.test_prompt_ids: list[list[int]] = []
        self._train_loader: ResumableLoader | None = None

    # ---- tokenizer and template ----------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer with the chat template's special tokens added (the model's vocabulary includes them)."""
        if self._tokenizer is None:
            base = GPTDataModule.tokenizer.fget(self)  # type: ignore[attr-defined]
            self._tokenizer = self.chat_template.prepare_tokenizer(base)
            self.added_tokens = self._tokenizer.vocab_size - base.vocab_size
            self.chat_template.stop_id(self._tokenizer)  # refuse a template without a one-token end marker now
        return self._tokenizer

    @property
    def stop_id(self) -> int:
        """Id of the template's end-of-turn marker: generation stops there."""
        return self.chat_template.stop_id(self.tokenizer)

    @property
    def template_name(self) -> str:
        """The chat template, named for logs."""
        return self.chat_template.describe()

    def tokenizer_texts(self) -> Iterator[str]:
        """The training conversations as the template renders them, cut at the special tokens (so the BPE learns
        no merges inside them); validation and test text never shape the vocabulary."""
        specials = [*self.chat_template.special_tokens, "<|endoftext|>"]
        for messages in self.conversations()["train"]:
            text, _ = self.chat_template.render(messages)
            for token in specials:
                text = text.replace(token, "\0")
            yield from (piece for piece in text.split("\0") if piece)

    def state_dict(self) -> dict:
        """The tokenizer and the chat template, so the checkpoint carries both."""
        return {**super().state_dict(), "chat_template": self.chat_template.to_dict()}

    # ---- records ---------------------------------------------------------------------------------------------

    def conversations(self) -> dict[Split, list[list[Message]]]:
        """The well-formed conversations of each split (malformed ones skipped or refused; loaded once)."""
        if self._conversations is None:
            self._conversations = self._split_conversations()
        return self._conversations

    def _split_conversations(self) -> dict[Split, list[list[Message]]]:
        source = self._load(self.source, "data.source")
        if not source:
            raise DataError(f"data.source={self.source}: no records")
        positions = split_positions(len(source), split=self.split, fractions=self.split_fractions, seed=self.seed,
                                    val_given=self.val_source is not None, test_given=self.test_source is not None)
        loaded = {"data.source": source}
        origin: dict[Split, tuple[str, list[int]]] = {name: ("data.source", positions[name]) for name in SPLIT_ORDER}
        for name, spec in (("val", self.val_source), ("test", self.test_source)):
            if spec is not None:
                key = f"data.{name}_source"
                loaded[key] = self._load(spec, key)
                origin[name] = (key, list(range(len(loaded[key]))))
        out: dict[Split, list[list[Message]]] = {}
        for name in SPLIT_ORDER:
            key, indices = origin[name]
            kept, bad = [], []
            for i in indices:
                messages, problem = self._parse(loaded[key][i])
                if problem is None:
                    kept.append(messages)
                elif self.malformed == "error":
                    raise DataError(f"{key}: record {i} is no well-formed conversation: it {problem}. Fix or remove "
                                    "it, or set data.malformed=skip to skip such records.")
                else:
                    bad.append((i, problem))
            if bad:
                shown = "; ".join(f"record {i}: {p}" for i, p in bad[:3])
                rank_zero_warn(f"data.malformed=skip: skipped {len(bad)} of {len(indices)} {name} records of {key} "
                               f"({shown}{' ...' if len(bad) > 3 else ''})")
            out[name] = kept
            self._origin[name] = (key, [i for i in indices if i not in {b for b, _ in bad}])
        if not out["train"]:
            raise DataError(f"data.source={self.source}: the training split holds no conversation ({len(source)} "
                            f"records, split_fractions {list(self.split_fractions)}); add records or raise the train "
                            "fraction.")
        return out

    def _parse(self, record: Any) -> tuple[list[Message], str | None]:
        if not isinstance(record, dict):
            return [], f"is a {type(record).__name__}, not an object"
        try:
            messages = to_messages(record, self.format)
        except BadConversation as err:
            return [], str(err)
        return messages, conversation_problem(messages)

    # ---- Lightning hooks -------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download the records (once, on one process) and load or train the tokenizer."""
        _ = self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        """Render and tokenize every split (in memory), apply the ``overlong`` policy and log what it did."""
        if self.datasets:
            return
        conversations = self.conversations()
        tok = self.tokenizer
        for name in SPLIT_ORDER:
            self.datasets[name] = self._items(name, conversations[name])
        self._test_prompts(conversations["test"])
        sizes = " / ".join(f"{len(self.datasets[n])} {n}" for n in ("train", "val", "test"))
        rank_zero_info(f"Chat data: {sizes} conversations; template {self.template_name}; items of at most "
                       f"{self.max_length} tokens; {len(self.test_prompt_ids)} test answers to score")
        if self.packing:
            self.packed_train = PackedDataset(self.datasets["train"].items, self.max_length)
            rank_zero_info(f"Packing: {self.packed_train.summary()}")
        trainer = self.trainer
        if trainer is not None and trainer.is_global_zero:
            tok.save(trainer.default_root_dir)

    def _items(self, name: Split, conversations: list[list[Message]]) -> TargetExamples:
        tok, template, limit = self.tokenizer, self.chat_template, self.max_length
        items: list[dict[str, list]] = []
        shortened = turns_dropped = dropped = 0
        key, indices = self._origin[name]
        for index, messages in zip(indices, conversations):
            item = conversation_item(template, tok, messages)
            if len(item["ids"]) > limit:
                if self.overlong == "error":
                    raise DataError(
                        f"{key}: record {index} is {len(item['ids'])} tokens, longer than max_length={limit}. Set "
                        "data.overlong=drop_oldest (drop its oldest exchanges) or drop, or raise data.max_length "
                        "(and model.context_length)."
                    )
                kept, gone = None, 0
                if self.overlong == "drop_oldest":
                    kept, gone = fit_conversation(
                        messages, lambda m: len(conversation_item(template, tok, m)["ids"]), limit)
                if kept is None:
                    dropped += 1
                    continue
                item = conversation_item(template, tok, kept)
                shortened += 1
                turns_dropped += gone
            items.append(item)
        if shortened or dropped:
            rank_zero_warn(
                f"{name}: {shortened + dropped} of {len(conversations)} conversations are longer than "
                f"max_length={limit} tokens: {shortened} lost their {turns_dropped} oldest exchanges in all, "
                f"{dropped} were dropped whole (data.overlong={self.overlong})."
            )
        if name == "train" and not items:
            raise DataError(f"no training conversation fits max_length={limit} tokens; raise data.max_length (and "
                            "model.context_length)")
        return TargetExamples(items)

    def _test_prompts(self, conversations: list[list[Message]]) -> None:
        """One prompt per assistant turn of each test conversation: its true earlier turns, oldest exchanges dropped
        while it does not leave room for an answer."""
        tok, template = self.tokenizer, self.chat_template
        limit = self.context_length - 1
        records, prompts, skipped = [], [], 0
        for c, messages in enumerate(conversations):
            turn = 0
            for j, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                turn += 1
                system, pairs = exchanges(messages[: j - 1])
                question = messages[j - 1]
                ids = None
                for start in range(len(pairs) + 1):
                    history = system + [m for pair in pairs[start:] for m in pair] + [question]
                    ids = template.prompt_ids(tok, history)
                    if len(ids) <= limit:
                        break
                    ids = None
                if ids is None:
                    skipped += 1
                    continue
                records.append({"conversation": c, "turn": turn, "messages": history,
                                self.reference_field: message["content"]})
                prompts.append(ids)
        if skipped:
            rank_zero_warn(f"{skipped} test answers are not scored: their question alone does not fit "
                           f"context_length={self.context_length} tokens")
        self.test_records, self.test_prompt_ids = records, prompts

    # ---- loaders ---------------------------------------------------------------------------------------------

    def collate(self) -> TargetCollate:
        """The collate of padded batches: inputs padded with end-of-text, targets with -100."""
        return TargetCollate(self.eos_id)

    def train_dataloader(self) -> DataLoader:
        """Training ``(inputs, targets)`` batches (``(inputs, targets, documents)`` with ``packing``) in a seeded order
        that resumes exactly mid-epoch."""
        self.setup("fit")
        if self.packing:
            assert self.packed_train is not None
            return self._training_loader(self.packed_train, f"packed rows of {self.max_length} tokens",
                                         collate=PackedCollate(self.eos_id, self.max_length))
        dataset = self.datasets["train"]
        lengths = dataset.lengths if self.group_by_length else None
        return self._training_loader(dataset, "conversations", lengths=lengths)


def _validate(args: dict[str, Any]) -> ChatTemplate:
    problems = []
    if not args["source"]:
        problems.append("data.source is empty")
    if not args["tokenizer"]:
        problems.append("data.tokenizer is empty")
    if args["tokenizer"] == "train" and args["tokenizer_vocab_size"] <= 257:
        problems.append(f"data.tokenizer_vocab_size={args['tokenizer_vocab_size']} must be > 257 (256 bytes + eos)")
    if args["context_length"] < 2:
        problems.append(f"data.context_length={args['context_length']} must be >= 2")
    limit = args["max_length"]
    if limit is not None and not 2 <= limit <= args["context_length"]:
        problems.append(f"data.max_length={limit} must be in [2, context_length={args['context_length']}] (the model "
                        "cannot read longer items); lower it, raise model.context_length, or leave it null")
    fractions = list(args["split_fractions"])
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6 or fractions[0] <= 0:
        problems.append(f"data.split_fractions={fractions} must be three fractions [train, test, val] >= 0 summing to "
                        "1, with train > 0")
    if args["format"] not in FORMATS:
        problems.append(f"data.format={args['format']!r} must be one of {', '.join(FORMATS)}")
    if args["split"] not in ("book", "shuffle"):
        problems.append(f"data.split={args['split']!r} must be 'book' (file order) or 'shuffle'")
    if args["overlong"] not in ("drop_oldest", "drop", "error"):
        problems.append(f"data.overlong={args['overlong']!r} must be 'drop_oldest', 'drop' or 'error'")
    if args["malformed"] not in ("error", "skip"):
        problems.append(f"data.malformed={args['malformed']!r} must be 'error' or 'skip'")
    template = None
    try:
        template = get_chat_template(args["chat_template"], args["special_tokens"])
    except ConfigError as err:
        problems.append(f"data.chat_template: {err}")
    if args["packing"] and args["group_by_length"]:
        problems.append("data.packing and data.group_by_length both remove padding, in ways that do not combine: "
                        "set one of them to false")
    problems += record_source_problems(args)
    if problems:
        raise ConfigError("invalid data settings:\n  - " + "\n  - ".join(problems))
    if args["group_by_length"] and not args["shuffle"]:
        warnings.warn("data.group_by_length=true shuffles the batches, so data.shuffle=false is ignored", stacklevel=3)
    assert template is not None
    return template
