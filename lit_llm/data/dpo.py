"""Preference data for DPO (the book's chapter 7 bonus): records -> prompt, chosen and rejected token ids -> batches.

A preference record pairs one prompt with a preferred (``chosen``) and a dispreferred (``rejected``) response. Three
forms are read, told apart by their fields (or fixed with ``format``):

- ``book``: ``instruction``, ``input`` (optional) and ``chosen``, ``rejected``, as the book's
  ``instruction-data-with-preference.json`` (which also has the ``output`` of chapter 7; it is kept, not used);
- ``prompt``: ``prompt``, ``chosen``, ``rejected`` as texts; the prompt takes the template's instruction place;
- ``conversation``: messages ``{"role": ..., "content": ...}``: ``prompt`` a list of messages and ``chosen`` /
  ``rejected`` the assistant's message (or a list holding it), or, with no ``prompt`` field, ``chosen`` and
  ``rejected`` whole conversations sharing every message but the last (the Anthropic HH / UltraFeedback form). The
  conversation must be one user turn (a system message before it is put in front of the instruction): lit_llm's
  prompt templates have no place for earlier turns.

The prompt is formatted with the prompt template the model was instruction-finetuned with (Alpaca by default), then
prompt, chosen and rejected are tokenized separately: the prompt's tokens are exactly those the model is given
when it generates, and each response ends with end-of-text (``append_eos``) so that the model learns to stop after
the preferred answer. The collate (:func:`collate_preferences`, the book's DPO ``custom_collate_fn``) pads chosen and
rejected rows to one length with end-of-text and masks the prompt and the padding out of the targets.

Records that cannot teach a preference — chosen equal to rejected, an empty response or prompt, a conversation of
several turns, a pair longer than ``allowed_max_length`` — are "bad records": ``bad_records: error`` stops with one
message that counts each kind and names the first record of each; ``skip`` drops them and says how many of each.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from lit_llm.data.base import GPTDataModule, record_source_problems, split_positions
from lit_llm.data.collate import IGNORE_INDEX
from lit_llm.data.instruct import PromptedSplits
from lit_llm.data.prompts import format_prompt
from lit_llm.data.quality import QualityConfig
from lit_llm.data.sampler import ResumableLoader
from lit_llm.errors import ConfigError, DataError

Split = Literal["train", "val", "test"]
RecordFormat = Literal["auto", "book", "prompt", "conversation"]
_SPLITS: tuple[Split, ...] = ("train", "test", "val")  # the book's order of the three parts of one file

#: Why a record is bad, by kind (the messages of ``bad_records``).
BAD_KINDS = {
    "identical": "chosen and rejected are the same text",
    "empty_response": "an empty chosen or rejected response",
    "empty_prompt": "an empty prompt (instruction)",
    "multi_turn": "a conversation of more than one user turn (or chosen and rejected that disagree before the "
                  "last message)",
    "too_long": "prompt + response longer than allowed_max_length tokens",
}


# ---- the collate ------------------------------------------------------------------------------------------------


def collate_preferences(
    batch: Sequence[dict[str, Any]],
    pad_token_id: int,
    allowed_max_length: int | None = None,
    mask_prompt: bool = True,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, torch.Tensor]:
    """The book's DPO collate: chosen and rejected rows padded to one length, prompt and padding masked.

    Each row is ``prompt + response`` (the response ending with end-of-text when the data module appends it),
    padded with ``pad_token_id`` to the longest chosen or rejected row of the batch. ``inputs`` are the rows without
    their last position and ``targets`` the rows shifted by one, with ``ignore_index`` where the predicted token is
    padding or (with ``mask_prompt``) part of the prompt, so a row's log-probability sums over its response only.
    Both are finally cut to ``allowed_max_length`` tokens (the book's ``allowed_max_length``).

    Args:
        batch: Items ``{"index": i, "prompt": ids, "chosen": ids, "rejected": ids}``.
        pad_token_id: The padding id (end-of-text).
        allowed_max_length: Cut rows to this many tokens; ``None`` keeps the batch's full length.
        mask_prompt: Ignore the prompt's targets (the book's ``mask_prompt_tokens=True``).
        ignore_index: Target value of ignored positions.

    Returns:
        ``index`` ``(B,)`` and ``chosen_inputs``, ``chosen_targets``, ``rejected_inputs``, ``rejected_targets``, each
        ``(B, T)`` int64 with one ``T`` for chosen and rejected, so the two can go through the model as one batch.
    """
    if not batch:
        raise ValueError("collate_preferences needs at least one example")
    width = max(len(item["prompt"]) + len(item[key]) for item in batch for key in ("chosen", "rejected"))
    out: dict[str, torch.Tensor] = {"index": torch.tensor([int(item["index"]) for item in batch], dtype=torch.long)}
    for key in ("chosen", "rejected"):
        rows = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        keep = torch.zeros((len(batch), width - 1), dtype=torch.bool)
        for r, item in enumerate(batch):
            ids = list(item["prompt"]) + list(item[key])
            rows[r, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            # Target j predicts token j + 1: the response's tokens are targets len(prompt) - 1 .. len(ids) - 2.
            first = max(len(item["prompt"]) - 1, 0) if mask_prompt else 0
            keep[r, first : len(ids) - 1] = True
        inputs, targets = rows[:, :-1], rows[:, 1:].masked_fill(~keep, ignore_index)
        if allowed_max_length is not None:
            inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
        out[f"{key}_inputs"], out[f"{key}_targets"] = inputs.contiguous(), targets.contiguous()
    return out


@dataclass(frozen=True)
class PreferenceCollate:
    """A picklable :func:`collate_preferences` with its settings (DataLoader workers pickle it)."""

    pad_token_id: int
    allowed_max_length: int | None = None
    mask_prompt: bool = True

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_preferences(items, self.pad_token_id, self.allowed_max_length, self.mask_prompt)


class PreferencePairs(Dataset):
    """Tokenized pairs; item ``i`` is ``{"index": i, "prompt": ids, "chosen": ids, "rejected": ids}``."""

    def __init__(self, prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]]) -> None:
        self.prompts, self.chosen, self.rejected = prompts, chosen, rejected

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"index": index, "prompt": self.prompts[index], "chosen": self.chosen[index],
                "rejected": self.rejected[index]}

    def token_count(self) -> int:
        """Tokens of all chosen and rejected rows (prompt included), as the model reads them."""
        return sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(self.prompts, self.chosen, self.rejected))


# ---- the data module --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pair:
    instruction: str
    input: str
    chosen: str
    rejected: str


class DPODataModule(PromptedSplits, GPTDataModule):
    """Preference pairs from any source, formatted with a prompt template and batched with the book's DPO collate.

    Batches are dicts (see :func:`collate_preferences`) for training, validation and ``test``; ``predict`` and the
    task's responses after training use the test prompts (:class:`~lit_llm.data.instruct.PromptBatches`).
    ``test_records`` holds the test split's records in the book's layout (``instruction``, ``input``, ``chosen``,
    ``rejected``, plus a book record's other fields); responses are scored against ``chosen``.

    Args:
        source: The records: ``builtin:preference`` (generated, offline), a JSON / JSONL / CSV / parquet file (or a
            list of them), an ``https://`` URL (with ``sha256``), or ``hf:<dataset>[:<config>]``.
        sha256: SHA-256 of a URL ``source`` (required for URLs).
        hf_split: Split of an ``hf:`` source.
        val_source: Explicit validation records (local files or ``hf:``); then ``source`` gives none to validation.
        test_source: Explicit test records (local files or ``hf:``); then ``source`` gives none to the test split.
        format: ``book``, ``prompt`` or ``conversation`` (see the module docstring); ``auto`` decides by the first
            record's fields: ``instruction`` -> book, a text ``prompt`` -> prompt, messages -> conversation.
        instruction_field: The book form's instruction field.
        input_field: The book form's optional input field (``null``: none).
        prompt_field: The prompt field of the prompt and conversation forms.
        chosen_field: The preferred response's field.
        rejected_field: The dispreferred response's field.
        prompt_template: The template the model was instruction-finetuned with: ``alpaca`` (the book's), ``phi3``,
            or a string with ``{instruction}`` (``"{instruction}"`` alone feeds prompts unchanged).
        split: How ``source`` is cut: ``book`` keeps the file order (first ``train``, next ``test``, last ``val``
            fractions, like the book); ``shuffle`` draws the parts at random with ``seed``.
        split_fractions: ``[train, test, val]`` fractions of ``source`` (the book's 0.85, 0.10, 0.05).
        tokenizer: The tokenizer of the model DPO starts from: usually its lit_llm checkpoint (``.ckpt`` or run
            directory), or ``gpt2`` for OpenAI GPT-2 weights, a directory or ``tokenizer.json``.
        context_length: The model's context length; LightningCLI links it from the model.
        allowed_max_length: Longest prompt + response in tokens; ``null`` means ``context_length``.
        truncate: Cut pairs longer than ``allowed_max_length`` to it (as the book's collate does) instead of treating
            them as bad records; a pair whose prompt leaves no room for a response token stays bad.
        mask_prompt: Score responses only (the book's ``mask_prompt_tokens=True``); ``false`` also scores the prompt,
            which cancels in the DPO loss but not in the log-probabilities.
        append_eos: End each response with end-of-text, so the model learns where the preferred answer stops (the
            book's DPO collate does not append it).
        bad_records: ``error`` (stop with a count of each kind and its first record) or ``skip`` (drop, count, warn).
        batch_size: Pairs per batch (each is two rows for the model); also the most test prompts generated together.
        shuffle: Shuffle the training pairs every epoch (seeded; exact mid-epoch resume).
        drop_last: Drop the last incomplete training batch; evaluation keeps every pair.
        num_workers: DataLoader worker processes.
        pin_memory: Pin batches in page-locked memory; ``null`` means when CUDA is available.
        seed: Seed of the training order and of ``split: shuffle``.
        cache_dir: Downloads; ``null`` means ``$LIT_LLM_CACHE`` or ``~/.cache/lit_llm``.
        quality: The data-quality stage (``lit_llm.data.quality``): exact and near-duplicate pairs of ``source`` are
            removed before the split (their prompt and both responses compared), and the training split is checked
            for leakage into the validation and test splits. ``null``: off.
    """

    def __init__(
        self,
        source: str | list[str] = "builtin:preference",
        sha256: str | None = None,
        hf_split: str = "train",
        val_source: str | list[str] | None = None,
        test_source: str | list[str] | None = None,
        format: RecordFormat = "auto",
        instruction_field: str = "instruction",
        input_field: str | None = "input",
        prompt_field: str = "prompt",
        chosen_field: str = "chosen",
        rejected_field: str = "rejected",
        prompt_template: str = "alpaca",
        split: Literal["book", "shuffle"] = "book",
        split_fractions: tuple[float, float, float] = (0.85, 0.10, 0.05),
        tokenizer: str = "gpt2",
        context_length: int = 1024,
        allowed_max_length: int | None = None,
        truncate: bool = False,
        mask_prompt: bool = True,
        append_eos: bool = True,
        bad_records: Literal["error", "skip"] = "error",
        batch_size: int = 8,
        shuffle: bool = True,
        drop_last: bool = True,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 123,
        cache_dir: str | None = None,
        quality: QualityConfig | None = None,
    ) -> None:
        super().__init__()
        _validate(locals())
        self.save_hyperparameters(ignore=["quality"])
        self.set_common(tokenizer=tokenizer, tokenizer_vocab_size=0, batch_size=batch_size, shuffle=shuffle,
                        drop_last=drop_last, num_workers=num_workers, pin_memory=pin_memory, seed=seed,
                        cache_dir=cache_dir, quality=quality)
        self.source = source
        self.sha256 = sha256
        self.hf_split = hf_split
        self.val_source = val_source
        self.test_source = test_source
        self.format = format
        self.fields = {"instruction": instruction_field, "input": input_field, "prompt": prompt_field,
                       "chosen": chosen_field, "rejected": rejected_field, "output": chosen_field}
        self.prompt_template = prompt_template
        self.split = split
        self.split_fractions = tuple(float(f) for f in split_fractions)
        self.context_length = context_length
        self.allowed_max_length = allowed_max_length if allowed_max_length is not None else context_length
        self.truncate = truncate
        self.mask_prompt = mask_prompt
        self.append_eos = append_eos
        self.bad_records = bad_records
        self._splits: dict[Split, tuple[list[dict[str, Any]], list[_Pair | None], list[str], list[int]]] | None = None
        self.datasets: dict[Split, PreferencePairs] = {}
        self.test_records: list[dict[str, Any]] = []
        self.test_prompt_ids: list[list[int]] = []
        self.skipped: Counter[str] = Counter()
        self._train_loader: ResumableLoader | None = None

    @property
    def reference_field(self) -> str:
        """Field of a test record that a response is scored against: the chosen response."""
        return self.fields["chosen"]

    # ---- records ---------------------------------------------------------------------------------------------

    def _text_fields(self, records: list[dict[str, Any]]) -> list[str]:
        """The fields the quality stage compares: the prompt's and both responses'."""
        form = self._record_format(records[0], "data.source") if records else "book"
        f = self.fields
        prompt = [f["instruction"], *([f["input"]] if f["input"] else [])] if form == "book" else [f["prompt"]]
        return [*prompt, f["chosen"], f["rejected"]]

    def _record_format(self, record: dict[str, Any], key: str) -> str:
        if self.format != "auto":
            return self.format
        f = self.fields
        prompt = record.get(f["prompt"])
        if isinstance(prompt, list) or (prompt is None and isinstance(record.get(f["chosen"]), list)):
            return "conversation"
        if isinstance(prompt, str):
            return "prompt"
        if f["instruction"] in record:
            return "book"
        raise DataError(
            f"{key}: cannot tell the preference format of the records (fields {sorted(record)}): expected "
            f"{f['instruction']!r} (book form), {f['prompt']!r} (prompt or conversation form) or message lists in "
            f"{f['chosen']!r}. Set data.format and the data.*_field options to the records' fields."
        )

    def _pair(self, record: dict[str, Any], index: int, key: str, form: str) -> tuple[_Pair | None, str]:
        """The record as a pair, or ``(None, bad kind)``; a missing field stops at once (it is a setting problem)."""
        f = self.fields
        for role in ("chosen", "rejected", *(("instruction",) if form == "book" else ())):
            if record.get(f[role]) is None:
                known = sorted(k for k, v in record.items() if v is not None)
                raise DataError(f"{key}: record {index} has no {f[role]!r} field (its fields: {known}). Add it, or set "
                                f"data.{role}_field to the field that holds the {role} (data.format={form}).")
        if form == "book":
            input_field = f["input"]
            input_ = record.get(input_field) if input_field is not None else None
            instruction, input_ = _text(record[f["instruction"]]), _text(input_ or "")
            chosen, rejected = _text(record[f["chosen"]]), _text(record[f["rejected"]])
        elif form == "prompt":
            if record.get(f["prompt"]) is None:
                raise DataError(f"{key}: record {index} has no {f['prompt']!r} field (its fields: {sorted(record)}); "
                                "set data.prompt_field, or data.format for records of another form")
            instruction, input_ = _text(record[f["prompt"]]), ""
            chosen, rejected = _text(record[f["chosen"]]), _text(record[f["rejected"]])
        else:
            parsed = _conversation_pair(record.get(f["prompt"]), record[f["chosen"]], record[f["rejected"]], index, key)
            if parsed is None:
                return None, "multi_turn"
            instruction, chosen, rejected = parsed
            input_ = ""
        if not instruction.strip():
            return None, "empty_prompt"
        if not chosen.strip() or not rejected.strip():
            return None, "empty_response"
        if chosen.strip() == rejected.strip():
            return None, "identical"
        return _Pair(instruction, input_, chosen, rejected), ""

    def _test_record(self, record: dict[str, Any], pair: _Pair, form: str) -> dict[str, Any]:
        """A test record in the book's layout: the book form's record as it is, the others rebuilt."""
        if form == "book":
            return dict(record)
        f = self.fields
        return {"instruction": pair.instruction, "input": pair.input, f["chosen"]: pair.chosen,
                f["rejected"]: pair.rejected}

    def _split_records(self) -> dict[Split, tuple[list[dict[str, Any]], list[_Pair | None], list[str], list[int]]]:
        """Each split's records, their pairs (``None`` for a bad record), bad kinds and positions in their file."""
        source = self._load(self.source, "data.source")
        if not source:
            raise DataError(f"data.source={self.source}: no records")
        if self.quality is not None:
            source = [r for _, r in self.quality.rows("source", source, self._text_fields(source), dedup_only=True)]
        loaded = {"data.source": source}
        positions = split_positions(len(source), split=self.split, fractions=self.split_fractions, seed=self.seed,
                                    val_given=self.val_source is not None, test_given=self.test_source is not None)
        origin: dict[Split, tuple[str, list[int]]] = {name: ("data.source", positions[name]) for name in _SPLITS}
        for name, spec in (("val", self.val_source), ("test", self.test_source)):
            if spec is not None:
                key = f"data.{name}_source"
                loaded[key] = self._load(spec, key)
                origin[name] = (key, list(range(len(loaded[key]))))
        if self.quality is not None:  # the training pairs against the validation and test pairs
            records = {name: [loaded[origin[name][0]][i] for i in origin[name][1]] for name in _SPLITS}
            kept = [i for i, _ in self.quality.rows("train", records["train"], self._text_fields(source),
                                                    leakage_only=True,
                                                    against={"val": records["val"], "test": records["test"]})]
            origin["train"] = (origin["train"][0], [origin["train"][1][i] for i in kept])
        out = {}
        for name in _SPLITS:
            key, indices = origin[name]
            records = loaded[key]
            form = self._record_format(records[0], key) if records else "book"
            parsed = [self._pair(records[i], i, key, form) for i in indices]
            test_rows = [self._test_record(records[i], p, form) if p is not None else {}
                         for i, (p, _) in zip(indices, parsed)]
            out[name] = (test_rows, [p for p, _ in parsed], [bad for _, bad in parsed], indices)
        self._key_of = {name: origin[name][0] for name in _SPLITS}
        if not origin["train"][1]:
            raise DataError(f"data.source={self.source}: the training split is empty ({len(source)} records, "
                            f"split_fractions {list(self.split_fractions)}); add records or raise the train fraction.")
        return out

    # ---- tokenizer -------------------------------------------------------------------------------------------

    def tokenizer_texts(self) -> Iterator[str]:
        """DPO continues a trained model, so it takes that model's tokenizer and never trains one."""
        raise ConfigError("data.tokenizer=train: preference tuning continues a trained model; set data.tokenizer to "
                          "its checkpoint (or run directory), or to gpt2 for OpenAI's GPT-2 weights")

    # ---- Lightning hooks -------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download the records (once, on one process) and load the tokenizer."""
        _ = self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        """Read, check and tokenize every split (in memory); apply ``bad_records`` and say what it did."""
        if self.datasets:
            return
        if self._splits is None:
            self._splits = self._split_records()
        tok = self.tokenizer
        eos = [tok.eos_id] if self.append_eos else []
        limit = self.allowed_max_length
        found: dict[str, list[tuple[Split, int]]] = {}
        kept: dict[Split, list[int]] = {}
        encoded: dict[Split, tuple[list[list[int]], list[list[int]], list[list[int]]]] = {}
        for name in _SPLITS:
            _, pairs, bad, positions = self._splits[name]
            good = [i for i, p in enumerate(pairs) if p is not None]
            prompts = tok.encode_batch([format_prompt(self.prompt_template, pairs[i].instruction, pairs[i].input)
                                        for i in good]) if good else []
            chosen = [ids + eos for ids in tok.encode_batch([pairs[i].chosen for i in good])] if good else []
            rejected = [ids + eos for ids in tok.encode_batch([pairs[i].rejected for i in good])] if good else []
            keep = []
            for j, i in enumerate(good):
                longest = len(prompts[j]) + max(len(chosen[j]), len(rejected[j]))
                if longest > limit and (not self.truncate or len(prompts[j]) >= limit):
                    bad[i] = "too_long"
                else:
                    keep.append(j)
            for i, kind in enumerate(bad):
                if kind:
                    found.setdefault(kind, []).append((name, positions[i]))
            kept[name] = [good[j] for j in keep]
            encoded[name] = ([prompts[j] for j in keep], [chosen[j] for j in keep], [rejected[j] for j in keep])
        self._apply_bad_records(found)
        for name in _SPLITS:
            test_rows = self._splits[name][0]
            self.datasets[name] = PreferencePairs(*encoded[name])
            if name == "test":
                self.test_records = [test_rows[i] for i in kept[name]]
                self.test_prompt_ids = encoded[name][0]
        if not len(self.datasets["train"]):
            raise DataError("no training pair is left after data.bad_records=skip; fix the records")
        sizes = " / ".join(f"{len(self.datasets[n])} {n}" for n in ("train", "val", "test"))
        rank_zero_info(f"Preference data: {sizes} pairs; template {self.prompt_template!r}; rows of at most {limit} "
                       "tokens")
        trainer = self.trainer
        if trainer is not None and trainer.is_global_zero:
            tok.save(trainer.default_root_dir)
            if self.quality is not None:
                self.quality.save(trainer.default_root_dir)

    def _apply_bad_records(self, found: dict[str, list[tuple[Split, int]]]) -> None:
        if not found:
            return
        lines = []
        for kind, where in found.items():
            split, position = where[0]
            lines.append(f"{len(where)} with {BAD_KINDS[kind]} (first: {self._key_of[split]} record {position})")
        if self.bad_records == "error":
            long = (f" (allowed_max_length={self.allowed_max_length}; data.truncate=true cuts long pairs instead)"
                    if "too_long" in found else "")
            raise DataError("bad preference records:\n  - " + "\n  - ".join(lines)
                            + f"\nFix or remove them, or set data.bad_records=skip to drop them{long}.")
        self.skipped = Counter({kind: len(where) for kind, where in found.items()})
        rank_zero_warn("data.bad_records=skip dropped " + "; ".join(lines))

    # ---- loaders ---------------------------------------------------------------------------------------------

    def collate(self) -> PreferenceCollate:
        """The collate of every loader (and of the task's reference pass)."""
        return PreferenceCollate(self.eos_id, self.allowed_max_length, self.mask_prompt)

    def ordered_loader(self, split: Split, batch_size: int | None = None) -> DataLoader:
        """All pairs of ``split`` in order, on this process (for the task's pass of the reference model)."""
        self.setup("fit")
        common = {**self._common(), "num_workers": 0, "persistent_workers": False}
        return DataLoader(self.datasets[split], batch_size=batch_size or self.batch_size, shuffle=False, **common)

    def train_dataloader(self) -> DataLoader:
        """Training batches in a seeded order that resumes exactly mid-epoch."""
        self.setup("fit")
        return self._training_loader(self.datasets["train"], "pairs")


# ---- record helpers ---------------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    if isinstance(value, (list, dict)):
        raise DataError(f"a preference record holds a {type(value).__name__} where text is expected: {value!r:.80}; "
                        "set data.format: conversation for message lists, or the data.*_field options")
    return str(value)


def _messages(value: Any, what: str, index: int, key: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise DataError(f"{key}: record {index}: {what} must be a list of messages {{role, content}} (data.format: "
                        f"conversation), got {value!r:.80}")
    return [{"role": str(m["role"]), "content": _text(m["content"])} for m in value]


def _conversation_pair(prompt: Any, chosen: Any, rejected: Any, index: int, key: str) -> tuple[str, str, str] | None:
    """``(instruction, chosen, rejected)`` of a conversation record; ``None`` when it is not one user turn."""
    chosen_m = _messages(chosen, "chosen", index, key)
    rejected_m = _messages(rejected, "rejected", index, key)
    if prompt is None:  # whole conversations: the shared messages before the last are the prompt
        if chosen_m[:-1] != rejected_m[:-1]:
            return None
        prompt_m, chosen_m, rejected_m = chosen_m[:-1], chosen_m[-1:], rejected_m[-1:]
    else:
        prompt_m = _messages(prompt, "prompt", index, key) if not isinstance(prompt, str) else [
            {"role": "user", "content": prompt}]
    if len(chosen_m) != 1 or len(rejected_m) != 1 or chosen_m[0]["role"] != "assistant" or \
            rejected_m[0]["role"] != "assistant":
        return None
    system = [m["content"] for m in prompt_m if m["role"] == "system"]
    user = [m["content"] for m in prompt_m if m["role"] == "user"]
    if len(user) != 1 or len(system) + len(user) != len(prompt_m) or prompt_m[-1]["role"] != "user":
        return None
    instruction = "\n\n".join([*system, user[0]])
    return instruction, chosen_m[0]["content"], rejected_m[0]["content"]


def _validate(args: dict[str, Any]) -> None:
    problems = []
    for key in ("source", "tokenizer", "chosen_field", "rejected_field"):
        if not args[key]:
            problems.append(f"data.{key} is empty")
    if args["context_length"] < 2:
        problems.append(f"data.context_length={args['context_length']} must be >= 2")
    allowed = args["allowed_max_length"]
    if allowed is not None and not 2 <= allowed <= args["context_length"]:
        problems.append(
            f"data.allowed_max_length={allowed} must be in [2, context_length={args['context_length']}] (the model "
            "cannot read longer rows); lower it, raise model.context_length, or leave it null"
        )
    fractions = list(args["split_fractions"])
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6 or fractions[0] <= 0:
        problems.append(f"data.split_fractions={fractions} must be three fractions [train, test, val] >= 0 summing "
                        "to 1, with train > 0 (the book's: [0.85, 0.10, 0.05])")
    choices = {"split": ("book", "shuffle"), "bad_records": ("error", "skip"),
               "format": ("auto", "book", "prompt", "conversation")}
    for key, allowed_values in choices.items():
        if args[key] not in allowed_values:
            problems.append(f"data.{key}={args[key]!r} must be one of {', '.join(allowed_values)}")
    problems += record_source_problems(args)
    if problems:
        raise ConfigError("invalid data settings:\n  - " + "\n  - ".join(problems))
