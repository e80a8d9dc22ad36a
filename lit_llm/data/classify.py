"""Labelled text for classification finetuning (the book's chapter 6), from any source ``load_records`` reads.

The pipeline, in order (every step seeded and deterministic):

1. read ``source`` (and ``val_source`` / ``test_source`` when given) and take ``text_column`` and ``label_column``;
2. optionally balance ``source`` by undersampling every class to the size of the smallest (the book's
   ``create_balanced_dataset``): the classes are concatenated in label order, each larger class as a seeded random
   sample of its rows;
3. shuffle with ``seed`` and cut into train/validation/test by ``split`` (the book's ``random_split``: train gets
   ``int(n * f_train)`` rows, validation ``int(n * f_val)``, test the rest). Splits given as files are not cut from
   ``source``. Both random draws are NumPy's legacy ``RandomState(seed)`` permutations, the generator pandas'
   ``DataFrame.sample(random_state=seed)`` uses, so the book's spam split is reproduced row for row;
4. map labels to ids: the sorted unique training labels, or the order ``labels`` gives;
5. tokenize, cut every text to ``max_length`` tokens (counted and reported, never silently), and pad with
   ``<|endoftext|>``: to the longest training text (``pad_to: longest_train``, the book; validation and test texts
   are cut to that length too) or to each batch's longest text (``pad_to: batch``).

Batches are dicts: ``input_ids`` ``(B, T)`` token ids, ``labels`` ``(B,)`` class ids and ``lengths`` ``(B,)`` the
number of real (non-pad) tokens of each row, which ``last_nonpad`` and ``mean`` pooling need. Padding is on the right.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from lit_llm.data.base import GPTDataModule
from lit_llm.data.quality import QualityConfig
from lit_llm.data.sampler import ResumableLoader, ResumableSampler
from lit_llm.data.sources import FileFormat, load_records
from lit_llm.errors import ConfigError, DataError

Label = str | int
SPLITS = ("train", "val", "test")
_SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test", "predict": "prediction"}
# hf: sources given as val_source / test_source read these splits of the Hub dataset (files ignore it).
_HF_SPLITS = {"val": "validation", "test": "test"}


def label_key(value: Any) -> str:
    """The name of a raw label: ``"spam"`` stays ``"spam"``; ``1``, ``1.0`` and ``"1"`` are all ``"1"``."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


@dataclass
class _Rows:
    """The texts and raw label names of one split, with where each row came from (for error messages)."""

    texts: list[str]
    labels: list[str]
    origin: list[int]  # row number (0-based) in its source
    source_key: str


@dataclass
class Truncation:
    """How many texts of a split were cut to fit, and by how much."""

    split: str
    cut: int
    total: int
    limit: int
    max_cut: int
    mean_cut: float


class EncodedTexts(Dataset):
    """Token ids (already cut to length) and class ids (``-1`` when unknown) of one split."""

    def __init__(self, ids: list[list[int]], labels: list[int], texts: list[str] | None = None) -> None:
        self.ids = ids
        self.labels = labels
        self.texts = texts

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"input_ids": self.ids[index], "label": self.labels[index]}
        if self.texts is not None:
            item["text"] = self.texts[index]
        return item


class PadCollate:
    """Right-pad token ids with ``pad_id`` to ``length`` (or to the batch's longest row when ``length`` is None).

    Returns the batch dict of this module: ``input_ids`` ``(B, T)``, ``labels`` ``(B,)``, ``lengths`` ``(B,)`` and,
    for prediction, ``text`` (a list of the input strings).
    """

    def __init__(self, pad_id: int, length: int | None = None) -> None:
        self.pad_id = pad_id
        self.length = length

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        lengths = [len(item["input_ids"]) for item in items]
        width = self.length if self.length is not None else max(lengths)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        for row, item in enumerate(items):
            input_ids[row, : lengths[row]] = torch.as_tensor(item["input_ids"], dtype=torch.long)
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": torch.tensor([item["label"] for item in items], dtype=torch.long),
            "lengths": torch.tensor(lengths, dtype=torch.long),
        }
        if "text" in items[0]:
            batch["text"] = [item["text"] for item in items]
        return batch


class ClassifyDataModule(GPTDataModule):
    """Labelled texts for a classifier: split, label-mapped, tokenized and padded like the book's spam data.

    Args:
        source: The labelled data: ``builtin:reviews`` (generated offline), a local ``.csv``/``.tsv``/``.json``/
            ``.jsonl``/``.parquet`` file (or several), an ``https://`` URL with ``sha256`` (zip archives too), or
            ``hf:<dataset>[:<config>]``.
        text_column: Column holding the text.
        label_column: Column holding the label (strings or numbers).
        labels: The classes in id order, e.g. ``[ham, spam]``; default: the sorted unique training labels
            (numerically sorted when all are numbers). Every listed class needs training examples, and every label
            in the data must be listed.
        val_source: A validation file instead of cutting one from ``source`` (same forms; an ``hf:`` source reads its
            ``validation`` split).
        test_source: A test file instead of cutting one from ``source`` (an ``hf:`` source reads its ``test`` split).
        predict_source: Texts to label with ``predict``: a ``.txt`` file with one text per line, or a file in the
            format of ``source`` (``text_column`` required, labels optional and copied to the output). Default: the
            test split.
        split: Fractions of ``source`` for train, validation and test (the book's 70/10/20). A split given as a file
            takes no share: the rest of ``source`` is divided in proportion to the remaining fractions. A zero
            fraction means no such split.
        balance: Undersample every class of ``source`` to the size of the smallest (the book balances 747 spam with
            747 ham).
        seed: Seed of the balancing, the split and the training shuffle (the book uses 123).
        pad_to: ``longest_train``: pad every text to the longest training text and cut validation/test texts to that
            length (the book); ``batch``: pad each batch to its longest text.
        max_length: Most tokens per text; longer texts are cut (and counted in a warning). Default: the model's
            context length, which is also the upper bound.
        context_length: The model's context length; LightningCLI links it from ``model.context_length``.
        tokenizer: ``gpt2`` (the book), a tokenizer directory / ``tokenizer.json`` / Hub name, a lit_llm checkpoint
            (``.ckpt`` or run directory) to reuse the tokenizer of a pretrained model, or ``train`` to train a
            byte-level BPE on the training texts.
        tokenizer_vocab_size: Size of the BPE trained when ``tokenizer == "train"``.
        batch_size: Texts per batch.
        shuffle: Shuffle the training texts each epoch (seeded; resumable mid-epoch from a checkpoint).
        drop_last: Drop the last incomplete training batch (the book does).
        num_workers: DataLoader worker processes.
        pin_memory: Pin batches in page-locked memory; ``None`` means when CUDA is available.
        sha256: SHA-256 of a URL ``source`` (required for URLs).
        hf_split: Split of an ``hf:`` ``source``.
        file_format: Read the files as ``csv``/``tsv``/``json``/``jsonl``/``parquet`` whatever their extension
            (e.g. ``tsv`` for the SMS Spam Collection's ``SMSSpamCollection``).
        column_names: Names of the columns of CSV/TSV files without a header row, e.g. ``[label, text]``.
        archive_member: The file to read from a zip archive ``source``, e.g. ``SMSSpamCollection``.
        cache_dir: Where downloads and trained tokenizers go; ``None`` means ``$LIT_LLM_CACHE`` or
            ``~/.cache/lit_llm``.
        quality: The data-quality stage (see docs/data.md): deduplicates, filters and redacts ``source`` before it is
            balanced and split, then checks the training split for leakage into the validation and test splits;
            the report goes to ``data_quality.json`` in the run folder. ``null``: off.
    """

    def __init__(
        self,
        source: str | list[str] = "builtin:reviews",
        text_column: str = "text",
        label_column: str = "label",
        labels: list[Label] | None = None,
        val_source: str | list[str] | None = None,
        test_source: str | list[str] | None = None,
        predict_source: str | None = None,
        split: tuple[float, float, float] = (0.7, 0.1, 0.2),
        balance: bool = False,
        seed: int = 123,
        pad_to: Literal["longest_train", "batch"] = "longest_train",
        max_length: int | None = None,
        context_length: int = 1024,
        tokenizer: str = "gpt2",
        tokenizer_vocab_size: int = 4096,
        batch_size: int = 8,
        shuffle: bool = True,
        drop_last: bool = True,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        sha256: str | None = None,
        hf_split: str = "train",
        file_format: FileFormat | None = None,
        column_names: list[str] | None = None,
        archive_member: str | None = None,
        cache_dir: str | None = None,
        quality: QualityConfig | None = None,
    ) -> None:
        super().__init__()
        self._validate(locals())
        self.save_hyperparameters(ignore=["quality"])
        self.set_common(tokenizer=tokenizer, tokenizer_vocab_size=tokenizer_vocab_size, batch_size=batch_size,
                        shuffle=shuffle, drop_last=drop_last, num_workers=num_workers, pin_memory=pin_memory,
                        seed=seed, cache_dir=cache_dir, quality=quality)
        self.source = source
        self.text_column = text_column
        self.label_column = label_column
        self.labels = None if labels is None else [label_key(x) for x in labels]
        self.val_source = val_source
        self.test_source = test_source
        self.predict_source = predict_source
        self.split = tuple(float(f) for f in split)
        self.balance = balance
        self.pad_to = pad_to
        self.max_length = max_length if max_length is not None else context_length
        self.context_length = context_length
        self.sha256 = sha256
        self.hf_split = hf_split
        self.file_format = file_format
        self.column_names = column_names
        self.archive_member = archive_member
        self._rows: dict[str, _Rows] | None = None
        self._label_names: list[str] | None = None
        self.datasets: dict[str, EncodedTexts] = {}
        self.pad_length: int | None = None
        self.truncation: dict[str, Truncation] = {}
        self._train_loader: ResumableLoader | None = None

    @staticmethod
    def _validate(args: dict[str, Any]) -> None:
        problems = []
        if not args["source"]:
            problems.append("data.source is empty; try builtin:reviews or a path to your labelled data")
        if not args["text_column"] or not args["label_column"]:
            problems.append("data.text_column and data.label_column must name columns of data.source")
        split = args["split"]
        if len(split) != 3 or any(f < 0 for f in split) or not math.isclose(sum(split), 1.0, abs_tol=1e-6):
            problems.append(f"data.split={list(split)} must be three fractions >= 0 (train, val, test) summing to 1")
        elif split[0] == 0:
            problems.append(f"data.split={list(split)} leaves nothing to train on; give the train fraction a share")
        if args["pad_to"] not in ("longest_train", "batch"):
            problems.append(f"data.pad_to={args['pad_to']!r} must be longest_train or batch")
        if args["context_length"] < 1:
            problems.append(f"data.context_length={args['context_length']} must be >= 1")
        max_length = args["max_length"]
        if max_length is not None and not 1 <= max_length <= args["context_length"]:
            problems.append(
                f"data.max_length={max_length} must be between 1 and the model's context length "
                f"({args['context_length']}); raise model.context_length or lower data.max_length"
            )
        if args["batch_size"] < 1:
            problems.append(f"data.batch_size={args['batch_size']} must be >= 1")
        if args["num_workers"] < 0:
            problems.append(f"data.num_workers={args['num_workers']} must be >= 0")
        if args["tokenizer"] == "train" and args["tokenizer_vocab_size"] <= 257:
            problems.append(f"data.tokenizer_vocab_size={args['tokenizer_vocab_size']} must be > 257 (256 bytes + eos)")
        labels = args["labels"]
        if labels is not None:
            names = [label_key(x) for x in labels]
            if len(names) < 2 or len(set(names)) != len(names):
                problems.append(f"data.labels={list(labels)} must list at least two distinct classes")
        is_url = isinstance(args["source"], str) and args["source"].startswith(("http://", "https://"))
        if is_url and not args["sha256"]:
            problems.append("data.sha256 is required for a URL data.source; compute it with `sha256sum FILE`")
        for key in ("val_source", "test_source", "predict_source"):
            value = args[key]
            if any(str(v).startswith(("http://", "https://")) for v in ([value] if isinstance(value, str) else
                                                                          value or [])):
                problems.append(f"data.{key} cannot be a URL (data.sha256 covers data.source only); download it first")
        if problems:
            raise ConfigError("invalid data settings:\n  - " + "\n  - ".join(problems))

    # ---- records -------------------------------------------------------------------------------------------------

    def _read(self, spec: str | list[str], key: str, hf_split: str, *, labelled: bool = True) -> _Rows:
        is_source = key == "data.source"
        records = load_records(
            spec,
            sha256=self.sha256 if is_source else None,
            cache_dir=self.cache_dir,
            hf_split=hf_split,
            key=key,
            file_format=self.file_format if not str(spec).startswith(("builtin:", "hf:")) else None,
            column_names=self.column_names if not str(spec).startswith(("builtin:", "hf:")) else None,
            archive_member=self.archive_member if is_source else None,
        )
        columns = list(records.column_names)
        wanted = [("text_column", self.text_column)] + ([("label_column", self.label_column)] if labelled else [])
        for name, column in wanted:
            if column not in columns:
                hint = "" if self.column_names else " (a CSV/TSV without a header row needs data.column_names)"
                raise DataError(
                    f"data.{name}={column!r} is not a column of {key}={spec}; columns found: {columns}. Set "
                    f"data.{name} to the column that holds the {name.split('_')[0]}{hint}."
                )
        texts = list(records[self.text_column])
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise DataError(
                    f"{key}={spec}: row {i} has {'an empty' if isinstance(text, str) else 'no'} text in column "
                    f"{self.text_column!r} ({text!r}); remove the row or fill it in."
                )
        if self.label_column in columns:
            raw = list(records[self.label_column])
            missing = [i for i, v in enumerate(raw) if v is None or (isinstance(v, float) and math.isnan(v))]
            if missing and labelled:
                raise DataError(
                    f"{key}={spec}: {len(missing)} row(s) have no label in column {self.label_column!r} (first: row "
                    f"{missing[0]}); label them or remove them."
                )
            labels = ["" if v is None or (isinstance(v, float) and math.isnan(v)) else label_key(v) for v in raw]
        else:
            labels = [""] * len(texts)
        return _Rows(texts, labels, list(range(len(texts))), key)

    def _balanced(self, rows: _Rows, order: list[str]) -> _Rows:
        """Every class undersampled to the size of the smallest, classes in ``order`` (the book's balancing)."""
        by_class: dict[str, list[int]] = {}
        for i, label in enumerate(rows.labels):
            by_class.setdefault(label, []).append(i)
        size = min(len(v) for v in by_class.values())
        keep: list[int] = []
        for name in order:
            members = by_class.get(name, [])
            if len(members) > size:
                # A fresh generator per class, as each DataFrame.sample(random_state=seed) call in the book has.
                members = [members[j] for j in np.random.RandomState(self.seed).permutation(len(members))[:size]]
            keep.extend(members)
        counts = {name: min(len(by_class.get(name, [])), size) for name in order}
        rank_zero_info(f"data.balance: {len(rows.texts)} texts -> {len(keep)} ({counts})")
        return _select(rows, keep)

    def _split(self, rows: _Rows) -> dict[str, _Rows]:
        """The book's seeded shuffle and cut, over the splits that have no file of their own."""
        given = {"val": self.val_source is not None, "test": self.test_source is not None}
        fractions = {"train": self.split[0], "val": 0.0 if given["val"] else self.split[1],
                     "test": 0.0 if given["test"] else self.split[2]}
        total = sum(fractions.values())
        n = len(rows.texts)
        order = np.random.RandomState(self.seed).permutation(n)
        n_train = int(n * fractions["train"] / total)
        n_val = int(n * fractions["val"] / total)
        cuts = {"train": order[:n_train], "val": order[n_train : n_train + n_val]}
        cuts["test"] = order[n_train + n_val :] if fractions["test"] > 0 else order[:0]
        if fractions["val"] > 0 and fractions["test"] == 0:  # no test split: the remainder belongs to validation
            cuts["val"] = order[n_train:]
        return {name: _select(rows, idx.tolist()) for name, idx in cuts.items()}

    def _records(self) -> dict[str, _Rows]:
        """The train/val/test rows with their raw label names (computed once)."""
        if self._rows is not None:
            return self._rows
        rows = self._read(self.source, "data.source", self.hf_split)
        if self.quality is not None:
            rows = self._cleaned("source", rows, dedup_only=True)
        if self.balance:
            present = sorted(set(rows.labels), key=_sort_key(rows.labels))
            # Classes in id order; labels the list lacks are kept too, so that the label check reports them.
            order = [*self.labels, *(x for x in present if x not in self.labels)] if self.labels else present
            rows = self._balanced(rows, order)
        splits = self._split(rows)
        for name, spec in (("val", self.val_source), ("test", self.test_source)):
            if spec is not None:
                splits[name] = self._read(spec, f"data.{name}_source", _HF_SPLITS[name])
        if self.quality is not None:
            splits["train"] = self._cleaned("train", splits["train"], against={s: splits[s] for s in ("val", "test")})
        if not splits["train"].texts:
            raise DataError(f"data.source={self.source} leaves no training text after the split; add data.")
        self._rows = splits
        self._label_names = self._check_labels(splits)
        return splits

    def _cleaned(self, name: str, rows: _Rows, against: dict[str, _Rows] | None = None,
                 dedup_only: bool = False) -> _Rows:
        """``rows`` through data.quality: every rule but leakage (``dedup_only``), or leakage against ``against``."""
        assert self.quality is not None
        kept = self.quality.rows(name, [{"text": t} for t in rows.texts], ["text"], dedup_only=dedup_only,
                                 leakage_only=not dedup_only,
                                 against={k: [{"text": t} for t in v.texts] for k, v in (against or {}).items()})
        cleaned = _select(rows, [i for i, _ in kept])
        cleaned.texts = [record["text"] for _, record in kept]  # redaction may have changed them
        return cleaned

    def _check_labels(self, splits: dict[str, _Rows]) -> list[str]:
        train = splits["train"]
        counts: dict[str, int] = {}
        for label in train.labels:
            counts[label] = counts.get(label, 0) + 1
        if self.labels is not None:
            names = list(self.labels)
            unknown = sorted(set(counts) - set(names))
            if unknown:
                raise DataError(
                    f"the training data has label(s) {unknown} that data.labels={names} does not list "
                    f"(labels found: {sorted(counts)}); add them to data.labels or remove those rows."
                )
            empty = [name for name in names if name not in counts]
            if empty:
                raise DataError(
                    f"class(es) {empty} of data.labels={names} have no training example (training label counts: "
                    f"{counts}); remove them from data.labels or add examples."
                )
        else:
            names = sorted(counts, key=_sort_key(train.labels))
            if len(names) < 2:
                raise DataError(
                    f"the training data has a single label {names}; a classifier needs at least two classes "
                    f"(check data.label_column={self.label_column!r})."
                )
        known = set(names)
        for split in ("val", "test"):
            rows = splits[split]
            unseen = [(i, label) for i, label in zip(rows.origin, rows.labels) if label not in known]
            if unseen:
                values = sorted({label for _, label in unseen})
                where = "training labels" if self.labels is None else "data.labels"
                raise DataError(
                    f"the {_SPLIT_NAMES[split]} split ({rows.source_key}) has label(s) {values} that are not among the "
                    f"{where} {names}: {len(unseen)} row(s), first row {unseen[0][0]}. A classifier cannot predict a "
                    "class it never trained on; fix or remove those rows (or add training examples of the class)."
                )
        return names

    def examples(self, split: Literal["train", "val", "test"]) -> list[tuple[str, str]]:
        """The ``(text, label name)`` pairs of a split, in order, after balancing and splitting (before tokenizing)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rows = self._records()[split]
        return list(zip(rows.texts, rows.labels))

    # ---- labels and tokenizer --------------------------------------------------------------------------------------

    @property
    def label_names(self) -> list[str]:
        """Class names in id order; available before ``setup`` (reads the data on first access)."""
        if self._label_names is None:
            self._records()
        assert self._label_names is not None
        return self._label_names

    @property
    def num_classes(self) -> int:
        """Number of classes (the classifier head's outputs)."""
        return len(self.label_names)

    def tokenizer_texts(self) -> Iterator[str]:
        """The training split's texts."""
        return iter(self._records()["train"].texts)

    @property
    def pad_id(self) -> int:
        """The padding id: ``<|endoftext|>`` (50256 for GPT-2), as in the book."""
        return self.tokenizer.eos_id

    # ---- encoding --------------------------------------------------------------------------------------------------

    def _encode(self, split: str, texts: list[str], limit: int) -> list[list[int]]:
        """Token ids of ``texts``, each cut to ``limit`` tokens; cuts are counted and reported in a warning."""
        ids = self.tokenizer.encode_batch(texts) if texts else []
        cuts = [len(x) - limit for x in ids if len(x) > limit]
        if cuts:
            report = Truncation(split, len(cuts), len(ids), limit, max(cuts), sum(cuts) / len(cuts))
            self.truncation[split] = report
            to_train = split != "train" and self.pad_to == "longest_train" and limit < self.max_length
            reason = (f"the longest training text ({limit} tokens; data.pad_to=longest_train cuts the other splits to "
                      "it, as the book does)" if to_train else f"data.max_length={limit} tokens")
            fix = ("Set data.pad_to=batch to keep them up to data.max_length tokens" if to_train else
                   f"Raise data.max_length (at most model.context_length={self.context_length}) to keep more of them")
            warnings.warn(
                f"{report.cut} of {report.total} {_SPLIT_NAMES[split]} texts are longer than {reason} and were cut "
                f"(by 1 to {report.max_cut} tokens, {report.mean_cut:.1f} on average). {fix}.",
                stacklevel=3,
            )
        else:
            self.truncation.pop(split, None)
        return [x[:limit] for x in ids]

    def setup(self, stage: str | None = None) -> None:
        """Tokenize the splits and fix the padded length (once); save the tokenizer into the run directory."""
        if not self.datasets:
            self._tokenize_splits()
        trainer = self.trainer
        if trainer is not None and trainer.is_global_zero:
            self.tokenizer.save(trainer.default_root_dir)
            if self.quality is not None:
                self.quality.save(trainer.default_root_dir)

    def _tokenize_splits(self) -> None:
        rows = self._records()
        ids = {"train": self._encode("train", rows["train"].texts, self.max_length)}
        if self.pad_to == "longest_train":
            self.pad_length = max(len(x) for x in ids["train"])
            limit = self.pad_length
        else:
            self.pad_length, limit = None, self.max_length
        for split in ("val", "test"):
            ids[split] = self._encode(split, rows[split].texts, limit)
        index = {name: i for i, name in enumerate(self.label_names)}
        self.datasets = {
            split: EncodedTexts(ids[split], [index[label] for label in rows[split].labels]) for split in SPLITS
        }

    def _predict_dataset(self) -> EncodedTexts:
        if self.predict_source is None:
            rows = self._records()["test"]
        elif Path(str(self.predict_source)).suffix.lower() == ".txt":
            path = Path(self.predict_source).expanduser()
            if not path.is_file():
                raise DataError(f"data.predict_source={self.predict_source!r} does not exist (cwd: {Path.cwd()})")
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            if not lines:
                raise DataError(f"data.predict_source={self.predict_source!r} holds no text; add one text per line.")
            rows = _Rows(lines, [""] * len(lines), list(range(len(lines))), "data.predict_source")
        else:
            rows = self._read(self.predict_source, "data.predict_source", self.hf_split, labelled=False)
        limit = self.pad_length if self.pad_to == "longest_train" and self.pad_length else self.max_length
        ids = self._encode("predict", rows.texts, limit)
        index = {name: i for i, name in enumerate(self.label_names)}
        # Labels of prediction texts are optional and may name classes the model does not know: -1 then.
        return EncodedTexts(ids, [index.get(label, -1) for label in rows.labels], texts=rows.texts)

    # ---- loaders ---------------------------------------------------------------------------------------------------

    def _collate(self) -> PadCollate:
        return PadCollate(self.pad_id, self.pad_length if self.pad_to == "longest_train" else None)

    def _loader(self, dataset: EncodedTexts, train: bool = False) -> DataLoader:
        common: dict[str, Any] = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.num_workers > 0,
            "collate_fn": self._collate(),
        }
        if not train:
            return DataLoader(dataset, shuffle=False, drop_last=False, **common)
        # Seeded order saved in checkpoints (see lit_llm.data.sampler): a mid-epoch resume continues exactly.
        sampler = ResumableSampler(len(dataset), seed=self.seed, shuffle=self.shuffle)
        self._train_loader = ResumableLoader(dataset, sampler, drop_last=self.drop_last, **common)
        return self._train_loader

    def _dataset(self, split: str) -> EncodedTexts:
        if not self.datasets:
            self.setup()
        return self.datasets[split]

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (the last incomplete one dropped when ``drop_last``)."""
        dataset = self._dataset("train")
        if self.drop_last and len(dataset) < self.batch_size:
            raise DataError(
                f"the training split has {len(dataset)} texts, fewer than data.batch_size={self.batch_size}, so "
                "drop_last leaves no batch. Lower data.batch_size, set data.drop_last=false, or add data."
            )
        return self._loader(dataset, train=True)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in order; ``[]`` when there is no validation split."""
        dataset = self._dataset("val")
        return self._loader(dataset) if len(dataset) else []

    def test_dataloader(self) -> DataLoader:
        """Test batches in order."""
        dataset = self._dataset("test")
        if not len(dataset):
            raise DataError(
                "there is no test split: data.split gives test a zero fraction and data.test_source is not set; "
                "give test a share of data.split or set data.test_source."
            )
        return self._loader(dataset)

    def predict_dataloader(self) -> DataLoader:
        """Batches of ``predict_source`` (default: the test split), each with its texts under ``text``."""
        if not self.datasets:
            self.setup()
        return self._loader(self._predict_dataset())

    # ---- checkpoints -----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The tokenizer, the class names and the padding, so a checkpoint alone can classify new text."""
        return {
            **super().state_dict(),
            "label_names": list(self.label_names),
            "pad_to": self.pad_to,
            "pad_length": self.pad_length,
            "max_length": self.max_length,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check that the checkpoint was trained with this tokenizer and these classes.

        Raises:
            DataError: The checkpoint's tokenizer or class names differ from the configured ones.
        """
        super().load_state_dict(state_dict)
        names = state_dict.get("label_names")
        if names is not None and list(names) != self.label_names:
            raise DataError(
                f"the checkpoint's classes {list(names)} differ from this data's {self.label_names}; set "
                f"data.labels: {list(names)} (the checkpoint's order) or use the data it was trained on."
            )


def _select(rows: _Rows, index: Sequence[int]) -> _Rows:
    return _Rows([rows.texts[i] for i in index], [rows.labels[i] for i in index], [rows.origin[i] for i in index],
                 rows.source_key)


def _sort_key(labels: Sequence[str]) -> Any:
    """Numeric order when every label is a number (so 2 < 10), else string order."""
    def is_number(s: str) -> bool:
        try:
            float(s)
        except ValueError:
            return False
        return True

    if labels and all(is_number(x) for x in set(labels)):
        return float
    return str
