"""Instruction-finetuning data (the book's chapter 7): records -> prompts -> the book's padded batches.

Each record has an instruction, an optional input and an output. The prompt template (Alpaca by default) turns
instruction and input into the prompt; the example the model trains on is the prompt's tokens followed by the
output's tokens, and the collate (:mod:`lit_llm.data.collate`) appends end-of-text, pads with it and masks the
padding. The test split is kept as records too: the task generates a response for each and scores it.

Prompt and output are tokenized separately and concatenated, so the prompt tokens a model trains on are exactly
those it is given when generating. With the Alpaca and Phi-3 templates (whose response header ends in a newline)
this is the book's tokenization of ``prompt + output`` as one text whenever the output does not start with
whitespace.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from lit_llm.data.base import SPLIT_ORDER, GPTDataModule, record_source_problems, split_positions
from lit_llm.data.collate import InstructionCollate, LengthGroupedSampler
from lit_llm.data.packed import PackedCollate, PackedDataset, instruction_item
from lit_llm.data.prompts import format_prompt
from lit_llm.data.quality import QualityConfig
from lit_llm.data.sampler import ResumableLoader, ResumableSampler
from lit_llm.data.sources import load_records
from lit_llm.errors import ConfigError, DataError

Split = Literal["train", "val", "test"]
_SPLITS: tuple[Split, ...] = SPLIT_ORDER  # type: ignore[assignment]


class Examples(Dataset):
    """Tokenized examples; item ``i`` is ``{"ids": prompt + output ids, "prompt_len": prompt tokens}``."""

    def __init__(self, ids: list[list[int]], prompt_lens: list[int]) -> None:
        self.ids = ids
        self.prompt_lens = prompt_lens

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"ids": self.ids[index], "prompt_len": self.prompt_lens[index]}


class PromptBatches(Dataset):
    """Test prompts in ready-made batches of equal token length (use with ``DataLoader(batch_size=None)``).

    The GPT has no padding mask, so a batch of prompts of one length generates exactly what each prompt would alone.
    Item ``i`` is ``{"index": (B,) positions in the test split, "prompt_ids": (B, T)}``.
    """

    def __init__(self, prompt_ids: Sequence[Sequence[int]], batch_size: int) -> None:
        by_length: dict[int, list[int]] = {}
        for i, ids in enumerate(prompt_ids):
            by_length.setdefault(len(ids), []).append(i)
        self.batches: list[list[int]] = []
        for rows in by_length.values():
            self.batches.extend(rows[b : b + batch_size] for b in range(0, len(rows), batch_size))
        self.batches.sort(key=lambda rows: rows[0])
        self.prompt_ids = prompt_ids

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rows = self.batches[index]
        return {
            "index": torch.tensor(rows, dtype=torch.long),
            "prompt_ids": torch.tensor([list(self.prompt_ids[i]) for i in rows], dtype=torch.long),
        }


class PromptedSplits:
    """What the DataModules of prompted records share (instructions, conversations, preference pairs): loading the
    records of a setting, training batches in a seeded, exactly resumable order (shuffled, grouped by length or packed
    rows), validation and test batches in order, ``[]`` for an empty split, and the test prompts
    (``test_prompt_ids``) in :class:`PromptBatches` for ``predict``. Each DataModule gives its padded-batch
    ``collate()``."""

    def _load(self, spec: str | list[str], key: str) -> list[dict[str, Any]]:
        """The records of the setting ``key`` (``data.source`` with its ``sha256``, ``data.val_source``, ...)."""
        sha = self.sha256 if key == "data.source" else None
        return load_records(spec, sha256=sha, cache_dir=self.cache_dir, hf_split=self.hf_split, key=key).to_list()

    def _common(self, collate: Callable | None = None) -> dict[str, Any]:
        """Settings of every loader; ``collate`` replaces the DataModule's ``collate()`` (packed rows)."""
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.num_workers > 0,
            "collate_fn": collate if collate is not None else self.collate(),
            # A private generator, so creating an iterator never draws from the global RNG that dropout uses.
            "generator": torch.Generator().manual_seed(self.seed),
        }

    def _training_loader(self, dataset: Dataset, unit: str, *, lengths: Sequence[int] | None = None,
                         collate: Callable | None = None) -> ResumableLoader:
        """The training loader of ``dataset`` (``unit`` names its items in errors): batches grouped by ``lengths``
        when given, else shuffled with ``seed``; the loader is kept, its position saved in checkpoints."""
        if self.drop_last and len(dataset) < self.batch_size:
            raise DataError(
                f"the training split has {len(dataset)} {unit}, fewer than data.batch_size={self.batch_size}, so "
                "drop_last leaves no batch. Lower data.batch_size, set data.drop_last=false, or add records."
            )
        if lengths is not None:
            sampler: ResumableSampler = LengthGroupedSampler(lengths, self.batch_size, seed=self.seed)
        else:
            sampler = ResumableSampler(len(dataset), seed=self.seed, shuffle=self.shuffle)
        self._train_loader = ResumableLoader(dataset, sampler, batch_size=self.batch_size, drop_last=self.drop_last,
                                             **self._common(collate))
        return self._train_loader

    def _split_loader(self, split: str, stage: str) -> DataLoader | list:
        self.setup(stage)
        dataset = self.datasets[split]
        if not len(dataset):
            return []
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, drop_last=False, **self._common())

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in order; ``[]`` without a validation split."""
        return self._split_loader("val", "validate")

    def test_dataloader(self) -> DataLoader | list:
        """Test-split batches in order, for ``test`` (the loss on the test split); ``[]`` without a test split."""
        return self._split_loader("test", "test")

    def predict_dataloader(self) -> DataLoader | list:
        """The test prompts in batches of equal length; ``predict`` generates a response for each."""
        self.setup("predict")
        if not self.test_prompt_ids:
            return []
        return DataLoader(self.prompt_batches(), batch_size=None, shuffle=False, num_workers=0)

    def prompt_batches(self) -> PromptBatches:
        """The test prompts as :class:`PromptBatches` of up to ``batch_size`` prompts."""
        self.setup("predict")
        return PromptBatches(self.test_prompt_ids, self.batch_size)


class InstructDataModule(PromptedSplits, GPTDataModule):
    """Instruction records from any source, formatted with a prompt template and batched with the book's collate.

    Batches are ``(inputs, targets)`` for training, validation and ``test`` (loss); ``predict`` yields the test
    prompts (:class:`PromptBatches`). ``test_records`` holds the test split's records, ``test_prompts`` their prompts.

    Args:
        source: The records: ``builtin:instruct`` (generated, offline), a JSON / JSONL / CSV / parquet file (or a
            list of them), an ``https://`` URL (with ``sha256``), or ``hf:<dataset>[:<config>]``.
        sha256: SHA-256 of a URL ``source`` (required for URLs).
        hf_split: Split of an ``hf:`` source.
        val_source: Explicit validation records (local files or ``hf:``); then ``source`` gives none to validation.
        test_source: Explicit test records (local files or ``hf:``); then ``source`` gives none to the test split.
        instruction_field: The records' field holding the instruction.
        input_field: The field holding the optional input; records without it (or ``null``) have an empty input.
            ``null`` here: the records have no input (Dolly's ``context`` is such a field; set it to use it).
        output_field: The field holding the expected response.
        prompt_template: ``alpaca`` (the book's), ``phi3``, or a string with ``{instruction}`` and optionally
            ``{input}``. Stored in the model's checkpoint, so ``generate --chat`` prompts the same way.
        split: How ``source`` is cut: ``book`` keeps the file order (first ``train``, next ``test``, last ``val``
            fractions, like chapter 7); ``shuffle`` draws the parts at random with ``seed``.
        split_fractions: ``[train, test, val]`` fractions of ``source`` (sum 1; the book's 0.85, 0.10, 0.05 give
            935 / 110 / 55 of 1,100 records; rounding leftovers go to validation). Parts given by ``val_source`` /
            ``test_source`` are left out of ``source`` and the other fractions scaled up to fill it.
        tokenizer: ``gpt2`` (the book's; a Hub name, directory or ``tokenizer.json``), ``train`` (a byte-level BPE
            trained on the training split), or a lit_llm ``.ckpt`` / run directory to reuse a pretrained model's.
        tokenizer_vocab_size: Size of the BPE trained when ``tokenizer == "train"``.
        context_length: The model's context length; LightningCLI links it from the model.
        allowed_max_length: Longest training row in tokens (the book's ``allowed_max_length``); ``null`` means
            ``context_length``. Must not exceed ``context_length``.
        mask_prompt: Ignore the prompt's tokens in the loss (the book's exercise 7.2), so only responses are learnt.
        overlong: An example longer than ``allowed_max_length``: ``truncate`` (cut its end, as the book's collate
            does) or ``drop`` it. Either way the count and the longest length are logged.
        empty_output: A record whose output is empty: ``error`` (stop with its index) or ``drop`` (count, warn).
        group_by_length: Batch training examples of similar length together (less padding; seeded, resumable).
        packing: Pack several training examples into each row of ``allowed_max_length`` tokens instead of padding
            each to the batch's longest (see docs/instruction.md, "Packing"): batches are then ``(inputs, targets,
            documents)``, and the model keeps the examples of a row from seeing each other and restarts their
            positions, so each example is learnt as if alone. ``batch_size`` then counts rows, not examples.
            Validation and test batches stay padded. Not with ``group_by_length``.
        batch_size: Examples per batch (rows with ``packing``); also the most test prompts generated together.
        shuffle: Shuffle the training examples every epoch (seeded; exact mid-epoch resume).
        drop_last: Drop the last incomplete training batch (the book does); evaluation keeps every example.
        num_workers: DataLoader worker processes.
        pin_memory: Pin batches in page-locked memory; ``null`` means when CUDA is available.
        seed: Seed of the training order and of ``split: shuffle``.
        cache_dir: Downloads and trained tokenizers; ``null`` means ``$LIT_LLM_CACHE`` or ``~/.cache/lit_llm``.
        quality: The data-quality stage (see docs/data.md): deduplicates, filters and redacts ``source`` before it is
            split, then checks the training split for leakage into the validation and test splits; the report goes
            to ``data_quality.json`` in the run folder. ``null``: off.
    """

    def __init__(
        self,
        source: str | list[str] = "builtin:instruct",
        sha256: str | None = None,
        hf_split: str = "train",
        val_source: str | list[str] | None = None,
        test_source: str | list[str] | None = None,
        instruction_field: str = "instruction",
        input_field: str | None = "input",
        output_field: str = "output",
        prompt_template: str = "alpaca",
        split: Literal["book", "shuffle"] = "book",
        split_fractions: tuple[float, float, float] = (0.85, 0.10, 0.05),
        tokenizer: str = "gpt2",
        tokenizer_vocab_size: int = 4096,
        context_length: int = 1024,
        allowed_max_length: int | None = None,
        mask_prompt: bool = False,
        overlong: Literal["truncate", "drop"] = "truncate",
        empty_output: Literal["error", "drop"] = "error",
        group_by_length: bool = False,
        packing: bool = False,
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
        self.set_common(tokenizer=tokenizer, tokenizer_vocab_size=tokenizer_vocab_size, batch_size=batch_size,
                        shuffle=shuffle, drop_last=drop_last, num_workers=num_workers, pin_memory=pin_memory,
                        seed=seed, cache_dir=cache_dir, quality=quality)
        self.source = source
        self.sha256 = sha256
        self.hf_split = hf_split
        self.val_source = val_source
        self.test_source = test_source
        self.fields = {"instruction": instruction_field, "input": input_field, "output": output_field}
        self.prompt_template = prompt_template
        self.split = split
        self.split_fractions = tuple(float(f) for f in split_fractions)
        self.context_length = context_length
        self.allowed_max_length = allowed_max_length if allowed_max_length is not None else context_length
        self.mask_prompt = mask_prompt
        self.overlong = overlong
        self.empty_output = empty_output
        self.group_by_length = group_by_length
        self.packing = packing
        self.packed_train: PackedDataset | None = None
        self._records: dict[Split, list[dict[str, Any]]] | None = None
        self._rows: dict[Split, list[tuple[str, str, str]]] = {}
        self.datasets: dict[Split, Examples] = {}
        self.test_records: list[dict[str, Any]] = []
        self.test_prompts: list[str] = []
        self.test_prompt_ids: list[list[int]] = []
        self._train_loader: ResumableLoader | None = None

    # ---- records ---------------------------------------------------------------------------------------------

    def records(self) -> dict[Split, list[dict[str, Any]]]:
        """The original records of each split, after the ``empty_output: drop`` policy (loaded once)."""
        if self._records is None:
            self._records = self._split_records()
        return self._records

    def _split_records(self) -> dict[Split, list[dict[str, Any]]]:
        source = self._load(self.source, "data.source")
        text_fields = [f for f in self.fields.values() if f is not None]
        if self.quality is not None:
            source = [r for _, r in self.quality.rows("source", source, text_fields, dedup_only=True)]
        checked = [self._row(r, i, "data.source") for i, r in enumerate(source)]
        positions = split_positions(len(source), split=self.split, fractions=self.split_fractions, seed=self.seed,
                                    val_given=self.val_source is not None, test_given=self.test_source is not None)
        # Each split's records as (key of the file they came from, index in it), so errors can name them.
        origin: dict[Split, tuple[str, list[int]]] = {name: ("data.source", positions[name]) for name in _SPLITS}
        loaded: dict[str, tuple[list[dict[str, Any]], list[tuple[str, str, str]]]] = {"data.source": (source, checked)}
        for name, spec in (("val", self.val_source), ("test", self.test_source)):
            if spec is not None:
                key = f"data.{name}_source"
                records = self._load(spec, key)
                loaded[key] = (records, [self._row(r, i, key) for i, r in enumerate(records)])
                origin[name] = (key, list(range(len(records))))
        input_field = self.fields["input"]
        if input_field is not None and not any(input_field in r for r in source):
            rank_zero_warn(
                f"data.input_field={input_field!r} is not a field of {self.source} (fields: {sorted(source[0])}); "
                "every input is empty. Set data.input_field to the field holding the inputs, or to null if the "
                "records have none."
            )
        splits: dict[Split, list[dict[str, Any]]] = {}
        for name in _SPLITS:
            key, indices = origin[name]
            records, rows = loaded[key]
            empty = [i for i in indices if not rows[i][2].strip()]
            if empty and self.empty_output == "error":
                raise DataError(
                    f"{key}: record {empty[0]} has an empty {self.fields['output']!r} ({len(empty)} such records in "
                    f"the {name} split). Fix or remove those records, or set data.empty_output=drop to skip them."
                )
            if empty:
                rank_zero_warn(f"data.empty_output=drop: dropped {len(empty)} {name} records with an empty output "
                               f"({key} records {empty[:5]}{' ...' if len(empty) > 5 else ''})")
                dropped = set(empty)
                indices = [i for i in indices if i not in dropped]
            splits[name] = [records[i] for i in indices]
            self._rows[name] = [rows[i] for i in indices]
        if self.quality is not None:
            kept = [i for i, _ in self.quality.rows("train", splits["train"], text_fields, leakage_only=True,
                                                    against={"val": splits["val"], "test": splits["test"]})]
            splits["train"], self._rows["train"] = [splits["train"][i] for i in kept], [self._rows["train"][i]
                                                                                        for i in kept]
        if not splits["train"]:
            raise DataError(
                f"data.source={self.source}: the training split is empty ({len(source)} records, split_fractions "
                f"{list(self.split_fractions)}); add records or raise the train fraction."
            )
        return splits

    def _row(self, record: dict[str, Any], index: int, key: str) -> tuple[str, str, str]:
        """``(instruction, input, output)`` of a record, checked; errors name the record and the field."""
        values = []
        for role in ("instruction", "input", "output"):
            field = self.fields[role]
            value = record.get(field) if field is not None else None
            if value is None:
                if role == "input":
                    values.append("")
                    continue
                known = sorted(k for k, v in record.items() if v is not None)
                raise DataError(
                    f"{key}: record {index} has no {field!r} field (its fields: {known}). Add it, or set "
                    f"data.{role}_field to the field that holds the {role}."
                )
            if isinstance(value, (list, dict)):
                raise DataError(
                    f"{key}: record {index} field {field!r} holds a {type(value).__name__}, not text; set "
                    f"data.{role}_field to a text field."
                )
            values.append(str(value))
        instruction, input_, output = values
        if not instruction.strip():
            raise DataError(f"{key}: record {index} has an empty {self.fields['instruction']!r}; fix or remove it.")
        return instruction, input_, output

    # ---- tokenizer -------------------------------------------------------------------------------------------

    def tokenizer_texts(self) -> Iterator[str]:
        """The training split's prompts and outputs, so test and validation text never shape the vocabulary."""
        self.records()
        for instruction, input_, output in self._rows["train"]:
            yield format_prompt(self.prompt_template, instruction, input_) + output

    # ---- Lightning hooks -------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download the records (once, on one process) and load or train the tokenizer."""
        _ = self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        """Tokenize every split (in memory), apply the ``overlong`` policy and log what it did."""
        if self.datasets:
            return
        records = self.records()
        tok = self.tokenizer
        for name in _SPLITS:
            rows = self._rows[name]
            prompts = [format_prompt(self.prompt_template, ins, inp) for ins, inp, _ in rows]
            prompt_ids = tok.encode_batch(prompts) if prompts else []
            output_ids = tok.encode_batch([out for _, _, out in rows]) if rows else []
            ids = [p + o for p, o in zip(prompt_ids, output_ids)]
            lens = [len(p) for p in prompt_ids]
            if name == "test":
                self.test_records, self.test_prompts, self.test_prompt_ids = list(records["test"]), prompts, prompt_ids
            self.datasets[name] = self._apply_overlong(name, ids, lens)
        sizes = " / ".join(f"{len(self.datasets[n])} {n}" for n in ("train", "val", "test"))
        rank_zero_info(f"Instruction data: {sizes} examples; template {self.prompt_template!r}; "
                       f"rows of at most {self.allowed_max_length} tokens")
        if self.packing:
            self.packed_train = self.pack(self.datasets["train"])
            rank_zero_info(f"Packing: {self.packed_train.summary()}")
        self._warn_long_prompts()
        trainer = self.trainer
        if trainer is not None and trainer.is_global_zero:
            tok.save(trainer.default_root_dir)
            if self.quality is not None:
                self.quality.save(trainer.default_root_dir)

    def _apply_overlong(self, name: Split, ids: list[list[int]], lens: list[int]) -> Examples:
        limit = self.allowed_max_length
        long = [i for i, x in enumerate(ids) if len(x) > limit]
        if long:
            longest = max(len(ids[i]) for i in long)
            action = "dropped" if self.overlong == "drop" else "truncated (their ends are cut)"
            rank_zero_warn(
                f"{len(long)} of {len(ids)} {name} examples are longer than allowed_max_length={limit} tokens "
                f"(longest {longest}): {action} by data.overlong={self.overlong}."
            )
            if self.overlong == "drop":
                keep = sorted(set(range(len(ids))) - set(long))
                ids, lens = [ids[i] for i in keep], [lens[i] for i in keep]
        if self.mask_prompt:
            unanswered = sum(1 for n in lens if n >= limit)
            if unanswered:
                rank_zero_warn(
                    f"{unanswered} {name} examples have a prompt of allowed_max_length={limit} tokens or more, so "
                    "with data.mask_prompt=true they have no target left; they add nothing to the loss. Raise "
                    "data.allowed_max_length (and model.context_length) or set data.overlong=drop."
                )
        if name == "train" and not ids:
            raise DataError(f"no training example is left after data.overlong=drop (allowed_max_length={limit})")
        return Examples(ids, lens)

    def pack(self, examples: Examples) -> PackedDataset:
        """The examples as :func:`~lit_llm.data.packed.instruction_item` items, packed into rows of
        ``allowed_max_length`` tokens (the labels the book's collate gives them, prompt masking included)."""
        items = [instruction_item(ids, n, self.mask_prompt, self.eos_id, self.allowed_max_length)
                 for ids, n in zip(examples.ids, examples.prompt_lens)]
        return PackedDataset(items, self.allowed_max_length)

    def _warn_long_prompts(self) -> None:
        long = sum(1 for p in self.test_prompt_ids if len(p) >= self.context_length)
        if long:
            rank_zero_warn(
                f"{long} test prompts have context_length={self.context_length} tokens or more; generation keeps only "
                "their last tokens"
            )

    def collate(self) -> InstructionCollate:
        """The book's collate of padded batches (prompt masking with ``mask_prompt``)."""
        return InstructionCollate(self.eos_id, self.allowed_max_length, self.mask_prompt)

    def train_dataloader(self) -> DataLoader:
        """Training ``(inputs, targets)`` batches (``(inputs, targets, documents)`` with ``packing``) in a seeded order
        that resumes exactly mid-epoch."""
        self.setup("fit")
        if self.packing:
            assert self.packed_train is not None
            return self._training_loader(self.packed_train, f"packed rows of {self.allowed_max_length} tokens",
                                         collate=PackedCollate(self.eos_id, self.allowed_max_length))
        dataset = self.datasets["train"]
        lengths = [len(x) for x in dataset.ids] if self.group_by_length else None
        return self._training_loader(dataset, "examples", lengths=lengths)


def _validate(args: dict[str, Any]) -> None:
    problems = []
    for key in ("source", "tokenizer", "instruction_field", "output_field"):
        if not args[key]:
            problems.append(f"data.{key} is empty")
    if args["tokenizer"] == "train" and args["tokenizer_vocab_size"] <= 257:
        problems.append(f"data.tokenizer_vocab_size={args['tokenizer_vocab_size']} must be > 257 (256 bytes + eos)")
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
        problems.append(
            f"data.split_fractions={fractions} must be three fractions [train, test, val] >= 0 summing to 1, with "
            "train > 0 (the book's: [0.85, 0.10, 0.05])"
        )
    if args["split"] not in ("book", "shuffle"):
        problems.append(f"data.split={args['split']!r} must be 'book' (file order) or 'shuffle'")
    if args["overlong"] not in ("truncate", "drop"):
        problems.append(f"data.overlong={args['overlong']!r} must be 'truncate' or 'drop'")
    if args["empty_output"] not in ("error", "drop"):
        problems.append(f"data.empty_output={args['empty_output']!r} must be 'error' or 'drop'")
    if args["packing"] and args["group_by_length"]:
        problems.append("data.packing and data.group_by_length both remove padding, in ways that do not combine: "
                        "set one of them to false")
    problems += record_source_problems(args)
    if problems:
        raise ConfigError("invalid data settings:\n  - " + "\n  - ".join(problems))
    if args["group_by_length"] and not args["shuffle"]:
        warnings.warn("data.group_by_length=true shuffles the batches, so data.shuffle=false is ignored", stacklevel=3)
