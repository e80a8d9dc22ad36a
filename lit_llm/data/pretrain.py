"""Next-token prediction data: a corpus tokenized once into memory-mapped arrays, read as sliding windows.

``prepare_data`` tokenizes the documents (cached ``Dataset.map``), appends ``<|endoftext|>`` after
every document, and writes one ``.npy`` token array per split into the cache. ``setup`` maps the
arrays and cuts them into the book's windows: ``inputs = ids[i*stride : i*stride+T]`` and
``targets`` the same shifted by one. Each split has its own array, so no window crosses the
train/validation boundary.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Subset

from lit_llm.data import cache
from lit_llm.data.base import GPTDataModule
from lit_llm.data.packing import ROWS_PER_BATCH, Piece, Rows, TokenWindows, write_npy
from lit_llm.data.quality import QualityConfig
from lit_llm.data.sampler import ResumableLoader, ResumableSampler
from lit_llm.data.sources import content_id, load_documents
from lit_llm.data.tokenizer_source import cache_key
from lit_llm.errors import ConfigError, DataError

# Bump when the packed layout changes so old cache entries are not reused.
_FORMAT_VERSION = 1
# BPE training keeps word counts in RAM; a sample of this many characters is plenty for a good vocabulary.
_TOKENIZER_SAMPLE_CHARS = 200_000_000




class PretrainDataModule(GPTDataModule):
    """Packed next-token-prediction data from any text source.

    Args:
        source: The corpus: ``builtin:<name>``, an ``https://`` URL (with ``sha256``), ``hf:<dataset>[:<config>]``,
            or a local file / directory / glob / list of them (``.txt``, ``.md``, ``.json(l)``, ``.csv``, ``.tsv``,
            ``.parquet``).
        tokenizer: A tokenizer directory (e.g. GPT-2's ``encoder.json`` + ``vocab.bpe``), ``tokenizer.json`` or Hub
            name; a lit_llm checkpoint (``.ckpt`` or run directory) to reuse the tokenizer stored in it; or
            ``"train"`` to train a byte-level BPE on the training split.
        tokenizer_vocab_size: Size of the BPE trained when ``tokenizer == "train"``.
        context_length: Tokens per window; LightningCLI links it from the model's context length.
        stride: Step between window starts; ``None`` means ``context_length`` (no overlap). The book's sliding window.
        batch_size: Windows per batch.
        val_split: Fraction of the corpus held out for validation; 0 means no validation loader.
        split_by: How ``val_split`` cuts the corpus: ``"characters"`` (the book's split of the raw text; the tail
            goes to validation), ``"documents"`` (a seeded random choice of whole documents) or ``"tokens"`` (the
            tail of the token stream).
        val_source: An explicit validation corpus (same forms as ``source``) instead of splitting ``source``.
        text_column: Column holding the text in json/csv/parquet/hf sources.
        sha256: SHA-256 of a URL ``source`` (required for URLs).
        hf_split: Split of an ``hf:`` source.
        streaming: Read the source lazily instead of converting it to arrow first (huge or remote corpora); needs
            ``split_by="tokens"`` or ``val_source``.
        shuffle: Shuffle training windows; the order of epoch ``e`` depends only on ``seed`` and ``e``. The position
            in the epoch is saved in checkpoints, so a mid-epoch resume continues with exactly the remaining windows.
        drop_last: Drop the last incomplete training batch (validation never drops).
        num_workers: DataLoader worker processes.
        pin_memory: Pin batches in page-locked memory; ``None`` means when CUDA is available.
        seed: Seed of the training shuffle and of the ``"documents"`` split.
        cache_dir: Where downloads, tokenized data and trained tokenizers go; ``None`` means ``$LIT_LLM_CACHE``
            or ``~/.cache/lit_llm``.
        eval_train_batches: Also evaluate this many training batches (the first ones, in order) at every
            validation, in eval mode without dropout, logged as ``train_eval/loss``: the book's "train loss".
            0 turns it off; -1 evaluates the whole training split.
        quality: The data-quality stage (deduplication, filters, redaction, leakage; see docs/data.md), run on
            ``source`` before tokenization, with leakage checked against ``val_source``; the report goes to
            ``data_quality.json`` in the run folder. ``null``: off.
    """

    def __init__(
        self,
        source: str | list[str] = "builtin:pydoc",
        tokenizer: str = "gpt2",
        tokenizer_vocab_size: int = 4096,
        context_length: int = 256,
        stride: int | None = None,
        batch_size: int = 8,
        val_split: float = 0.1,
        split_by: Literal["characters", "documents", "tokens"] = "characters",
        val_source: str | list[str] | None = None,
        text_column: str = "text",
        sha256: str | None = None,
        hf_split: str = "train",
        streaming: bool = False,
        shuffle: bool = True,
        drop_last: bool = True,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        cache_dir: str | None = None,
        eval_train_batches: int = 0,
        quality: QualityConfig | None = None,
    ) -> None:
        super().__init__()
        self._validate(locals())
        self.save_hyperparameters(ignore=["quality"])
        self.set_common(tokenizer=tokenizer, tokenizer_vocab_size=tokenizer_vocab_size, batch_size=batch_size,
                        shuffle=shuffle, drop_last=drop_last, num_workers=num_workers, pin_memory=pin_memory,
                        seed=seed, cache_dir=cache_dir, quality=quality)
        self.source = source
        self.context_length = context_length
        self.stride = stride if stride is not None else context_length
        self.val_split = val_split
        self.split_by = split_by
        self.val_source = val_source
        self.text_column = text_column
        self.sha256 = sha256
        self.hf_split = hf_split
        self.streaming = streaming
        self.eval_train_batches = eval_train_batches
        self._docs: dict[str, datasets.Dataset | datasets.IterableDataset] = {}
        self.train_dataset: TokenWindows | None = None
        self.val_dataset: TokenWindows | None = None
        self._train_loader: ResumableLoader | None = None

    @staticmethod
    def _validate(args: dict[str, Any]) -> None:
        problems = []
        if not args["source"]:
            problems.append("data.source is empty; try builtin:pydoc or a path to your text")
        if not args["tokenizer"]:
            problems.append("data.tokenizer is empty; give a tokenizer directory, a Hub name like gpt2, or 'train'")
        if args["tokenizer"] == "train" and args["tokenizer_vocab_size"] <= 257:
            problems.append(f"data.tokenizer_vocab_size={args['tokenizer_vocab_size']} must be > 257 (256 bytes + eos)")
        if args["context_length"] < 1:
            problems.append(f"data.context_length={args['context_length']} must be >= 1")
        if args["stride"] is not None and args["stride"] < 1:
            problems.append(f"data.stride={args['stride']} must be >= 1 (or null for stride = context_length)")
        if args["batch_size"] < 1:
            problems.append(f"data.batch_size={args['batch_size']} must be >= 1")
        if not 0 <= args["val_split"] < 1:
            problems.append(f"data.val_split={args['val_split']} must be in [0, 1); use 0 for no validation")
        if args["split_by"] not in ("characters", "documents", "tokens"):
            problems.append(f"data.split_by={args['split_by']!r} must be one of characters, documents, tokens")
        if args["eval_train_batches"] < -1:
            problems.append(f"data.eval_train_batches={args['eval_train_batches']} must be >= 0, or -1 for all")
        if args["num_workers"] < 0:
            problems.append(f"data.num_workers={args['num_workers']} must be >= 0")
        if args["streaming"] and args["split_by"] != "tokens" and args["val_source"] is None:
            problems.append(
                f"data.streaming=true cannot split by {args['split_by']!r} without reading the corpus twice; "
                "set data.split_by=tokens or give data.val_source"
            )
        is_url = isinstance(args["source"], str) and args["source"].startswith(("http://", "https://"))
        if is_url and not args["sha256"]:
            problems.append("data.sha256 is required for a URL data.source; compute it with `sha256sum FILE`")
        val = args["val_source"]
        if any(str(v).startswith(("http://", "https://")) for v in ([val] if isinstance(val, str) else val or [])):
            problems.append("data.val_source cannot be a URL (data.sha256 covers data.source only); download it first")
        if problems:
            raise ConfigError("invalid data settings:\n  - " + "\n  - ".join(problems))
        if val is not None and (args["val_split"] != 0.1 or args["split_by"] != "characters"):
            warnings.warn("data.val_source is set, so data.val_split and data.split_by are ignored", stacklevel=3)

    # ---- tokenizer -------------------------------------------------------------------------------------------

    def tokenizer_key(self) -> str:
        return cache_key(_FORMAT_VERSION, self._corpus_id("source"), self._split_settings(), self.tokenizer_vocab_size)

    def tokenizer_texts(self) -> Iterator[str]:
        """The training side of the corpus (capped), so validation text never shapes the vocabulary."""
        docs = self._documents("source")
        budget = _TOKENIZER_SAMPLE_CHARS
        if isinstance(docs, datasets.IterableDataset):
            parts: list[tuple[datasets.Dataset | datasets.IterableDataset, Any]] = [(docs, None)]
        elif self.val_source is not None or self.val_split == 0:
            parts = [(docs, range(len(docs)))]
        elif self.split_by == "documents":
            parts = [(docs, np.flatnonzero(~self._val_mask(len(docs))))]
        else:  # "tokens" is unknown before tokenizing; the character split is a close stand-in
            k, offset = self._char_cut(docs)
            parts = [(docs, range(k))]
            if offset:
                budget -= offset
                yield docs[k]["text"][:offset]
        for ds, rows in parts:
            part = ds if rows is None else ds.select(rows)
            for batch in part.iter(batch_size=ROWS_PER_BATCH):
                for text in batch["text"]:
                    if budget <= 0:
                        return
                    text = text or ""
                    budget -= len(text)
                    yield text

    # ---- corpus ----------------------------------------------------------------------------------------------

    def _documents(self, which: Literal["source", "val_source"]) -> datasets.Dataset | datasets.IterableDataset:
        if which not in self._docs:
            self._docs[which] = load_documents(
                self.source if which == "source" else self.val_source,
                text_column=self.text_column,
                sha256=self.sha256 if which == "source" else None,
                cache_dir=self.cache_dir,
                hf_split=self.hf_split,
                streaming=self.streaming,
                key=f"data.{which}",
            )
            if self.quality is not None and which == "source":  # cleaned before anything reads it
                against = {"val_source": self._documents("val_source")} if self.val_source is not None else {}
                self._docs[which] = self.quality.documents(self._docs[which], self._corpus_id(which), which,
                                                           streaming=self.streaming, against=against)
        return self._docs[which]

    def _corpus_id(self, which: Literal["source", "val_source"]) -> str:
        docs = self._documents(which)
        if isinstance(docs, datasets.Dataset):
            return content_id(docs)  # derived from the files' bytes (or the hashed data of builtin sources)
        # A stream has no fingerprint: its configuration, and the content digest of local files (an hf: stream is
        # known by its name only).
        spec = self.source if which == "source" else self.val_source
        quality = self.quality.config.settings() if self.quality is not None and which == "source" else None
        return cache_key("stream", spec, self.text_column, self.hf_split, self.sha256, content_id(docs),
                         *([quality] if quality else []))

    def _split_settings(self) -> dict[str, Any]:
        if self.val_source is not None:
            return {"val_source": self._corpus_id("val_source")}
        if self.val_split == 0:
            return {"val_split": 0}
        settings: dict[str, Any] = {"val_split": self.val_split, "split_by": self.split_by}
        if self.split_by == "documents":
            settings["seed"] = self.seed
        return settings

    def _val_mask(self, n_docs: int) -> np.ndarray:
        n_val = max(1, round(self.val_split * n_docs))
        if n_val >= n_docs:
            raise DataError(
                f"data.split_by=documents with data.val_split={self.val_split} leaves no training document "
                f"({n_docs} documents in {self.source}); lower data.val_split or use data.split_by=characters."
            )
        mask = np.zeros(n_docs, dtype=bool)
        mask[np.random.default_rng(self.seed).permutation(n_docs)[:n_val]] = True
        return mask

    def _char_cut(self, docs: datasets.Dataset) -> tuple[int, int]:
        """Where the book's ``int(train_ratio * len(text))`` lands: document ``k`` at character ``offset``."""
        lengths = np.concatenate(
            [pc.utf8_length(b.column("text")).fill_null(0).to_numpy() for b in docs.with_format("arrow").iter(10_000)]
        ).astype(np.int64)
        cut = int((1.0 - self.val_split) * int(lengths.sum()))
        ends = np.cumsum(lengths)
        k = int(np.searchsorted(ends, cut, side="right"))
        return k, cut - (int(ends[k - 1]) if k else 0)

    # ---- packing ---------------------------------------------------------------------------------------------

    @property
    def _dtype(self) -> type:
        return np.uint16 if self.vocab_size < 2**16 else np.uint32

    def _pack_dir(self) -> Path:
        key = cache_key(_FORMAT_VERSION, self._corpus_id("source"), self.tokenizer.fingerprint, self._split_settings())
        return self.cache_dir / "pretrain" / key

    def _split_paths(self) -> dict[str, Path]:
        directory = self._pack_dir()
        has_val = self.val_source is not None or self.val_split > 0
        return {"train": directory / "train.npy", **({"val": directory / "val.npy"} if has_val else {})}

    def _tokenize_batch(self, batch: dict[str, list]) -> dict[str, list]:
        tok, dtype = self.tokenizer, self._dtype
        eos = np.asarray([tok.eos_id], dtype=dtype)
        ids = [np.concatenate([e, eos]) for e in tok.encode_arrays([t or "" for t in batch["text"]], dtype=dtype)]
        return {"ids": ids, "n_tokens": [len(i) for i in ids]}

    def _encode(self, text: str, eos: bool) -> np.ndarray:
        ids = self.tokenizer.encode_arrays([text], dtype=self._dtype)[0]
        return np.append(ids, np.asarray([self.eos_id], dtype=self._dtype)) if eos else ids

    def _tokenized(self, which: Literal["source", "val_source"]) -> datasets.Dataset | datasets.IterableDataset:
        docs = self._documents(which)
        if isinstance(docs, datasets.IterableDataset):
            return docs.map(self._tokenize_batch, batched=True, batch_size=ROWS_PER_BATCH, remove_columns=["text"])
        features = datasets.Features(
            {"ids": datasets.List(datasets.Value(np.dtype(self._dtype).name)), "n_tokens": datasets.Value("int64")}
        )
        return docs.map(
            self._tokenize_batch,
            batched=True,
            batch_size=ROWS_PER_BATCH,
            remove_columns=["text"],
            features=features,
            # An explicit fingerprint (the function is a bound method `datasets` cannot hash stably) makes re-runs
            # with the same corpus and tokenizer load the cached arrow file instead of tokenizing again.
            new_fingerprint=cache_key("tokenize", _FORMAT_VERSION, docs._fingerprint, self.tokenizer.fingerprint),
            desc="Tokenizing",
        )

    def _plan(self) -> dict[str, list[Piece]]:
        """Which tokens go to which split, as ordered pieces (map-style sources)."""
        tok = self._tokenized("source")
        n = len(tok)
        if self.val_source is not None:
            val = self._tokenized("val_source")
            return {"train": [Rows(tok, range(n))], "val": [Rows(val, range(len(val)))]}
        if self.val_split == 0:
            return {"train": [Rows(tok, range(n))]}
        if self.split_by == "documents":
            mask = self._val_mask(n)
            return {"train": [Rows(tok, np.flatnonzero(~mask))], "val": [Rows(tok, np.flatnonzero(mask))]}
        if self.split_by == "characters":
            k, offset = self._char_cut(self._documents("source"))
            if offset == 0:
                return {"train": [Rows(tok, range(k))], "val": [Rows(tok, range(k, n))]}
            # The cut document's head stays in train without eos (the document goes on in val), as in the book.
            text = self._documents("source")[k]["text"]
            return {
                "train": [Rows(tok, range(k)), self._encode(text[:offset], eos=False)],
                "val": [self._encode(text[offset:], eos=True), Rows(tok, range(k + 1, n))],
            }
        counts = tok.select_columns(["n_tokens"]).with_format("numpy")[:]["n_tokens"]
        cut = int((1.0 - self.val_split) * int(counts.sum()))
        ends = np.cumsum(counts)
        k = int(np.searchsorted(ends, cut, side="right"))
        train: list[Piece] = [Rows(tok, range(k))]
        val: list[Piece] = []
        if k < n:
            ids = np.asarray(tok[k]["ids"], dtype=self._dtype)
            head = cut - (int(ends[k - 1]) if k else 0)
            train.append(ids[:head])
            val = [ids[head:], Rows(tok, range(k + 1, n))]
        return {"train": train, "val": val}

    def _pack_stream(self, paths: dict[str, Path]) -> None:
        """Streaming sources: append tokens to raw files (total unknown up front), then convert to .npy."""
        raw_names = {"train": "source", "val": "val_source"} if self.val_source is not None else {"all": "source"}
        raws: dict[str, np.ndarray] = {}
        for name, which in raw_names.items():
            raw = cache.partial_path(paths["train"].with_name(f"{name}.bin"))
            with open(raw, "wb") as f:
                for batch in self._tokenized(which).iter(batch_size=ROWS_PER_BATCH):
                    for ids in batch["ids"]:
                        f.write(np.asarray(ids, dtype=self._dtype).tobytes())
            size = raw.stat().st_size
            raws[name] = np.memmap(raw, dtype=self._dtype, mode="r") if size else np.zeros(0, self._dtype)
        if "all" in raws:
            cut = int((1.0 - self.val_split) * len(raws["all"]))
            raws = {"train": raws["all"][:cut], "val": raws["all"][cut:]}
        for split, path in paths.items():
            write_npy(path, [raws[split]], self._dtype)
        for name in raw_names:
            cache.partial_path(paths["train"].with_name(f"{name}.bin")).unlink(missing_ok=True)

    def prepare_data(self) -> None:
        """Download and tokenize the corpus into ``<cache_dir>/pretrain/<key>/{train,val}.npy`` (once)."""
        paths = self._split_paths()
        directory = paths["train"].parent
        why = (f"key {directory.name}: corpus {self._corpus_id('source')[:16]}, tokenizer "
               f"{self.tokenizer.fingerprint[:12]}, split {self._split_settings()}")
        if all(p.is_file() for p in paths.values()):
            cache.reused("the token arrays", directory, why)
            return
        cache.building("the token arrays", directory, f"no entry for {why}")
        directory.mkdir(parents=True, exist_ok=True)
        if isinstance(self._documents("source"), datasets.IterableDataset):
            self._pack_stream(paths)
        else:
            plan = self._plan()
            # Validation first: train.npy's presence then implies a complete set.
            for split in sorted(paths, reverse=True):
                write_npy(paths[split], plan[split], self._dtype)
        meta = {
            "source": self.source,
            "val_source": self.val_source,
            "tokenizer_fingerprint": self.tokenizer.fingerprint,
            "split": self._split_settings(),
            "tokens": {s: int(np.load(p, mmap_mode="r").shape[0]) for s, p in paths.items()},
        }
        cache.write_atomic(directory / "meta.json", json.dumps(meta, indent=2, default=str))

    # ---- Lightning hooks -------------------------------------------------------------------------------------

    def _windows(self, split: str, path: Path) -> TokenWindows:
        windows = TokenWindows(path, self.context_length, self.stride)
        if len(windows) == 0:
            name = "training" if split == "train" else "validation"
            fix = "lower data.val_split" if split == "train" else "raise data.val_split (or 0 for no validation)"
            raise DataError(
                f"the {name} split of {self.source} has {windows.n_tokens} tokens but one window needs "
                f"{self.context_length + 1} (data.context_length + 1). Lower model.context_length, {fix}, or add text."
            )
        return windows

    def setup(self, stage: str | None = None) -> None:
        """Memory-map the packed arrays as window datasets; save the tokenizer into the run directory."""
        paths = self._split_paths()
        if not all(p.is_file() for p in paths.values()):
            self.prepare_data()  # called outside a Trainer, or the cache was cleared
        self.train_dataset = self._windows("train", paths["train"])
        self.val_dataset = self._windows("val", paths["val"]) if "val" in paths else None
        trainer = self.trainer
        if trainer is not None and trainer.is_global_zero:
            self.tokenizer.save(trainer.default_root_dir)
            if self.quality is not None:
                self.quality.save(trainer.default_root_dir)

    def _loader(self, dataset: TokenWindows, train: bool) -> DataLoader:
        common: dict[str, Any] = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.num_workers > 0,
            # A private generator, so creating an iterator never draws from the global RNG that dropout uses.
            "generator": torch.Generator().manual_seed(self.seed),
        }
        if not train:
            return DataLoader(dataset, shuffle=False, drop_last=False, **common)
        # The training order is a function of (seed, epoch, position), saved in checkpoints: resuming mid-epoch
        # continues with exactly the remaining windows. The sampler shards itself over DDP ranks.
        sampler = ResumableSampler(len(dataset), seed=self.seed, shuffle=self.shuffle)
        self._train_loader = ResumableLoader(dataset, sampler, drop_last=self.drop_last, **common)
        return self._train_loader

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) training windows, batched as ``(inputs[B, T], targets[B, T])``."""
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        if self.drop_last and len(self.train_dataset) < self.batch_size:
            raise DataError(
                f"the training split has {len(self.train_dataset)} windows, fewer than data.batch_size="
                f"{self.batch_size}, so drop_last leaves no batch. Lower data.batch_size or data.stride, "
                "set data.drop_last=false, or add text."
            )
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader | list:
        """Validation windows in order (every window kept); ``[]`` when there is no validation split.

        With ``eval_train_batches``, a list: the validation loader, then the first training batches in order.
        """
        if self.train_dataset is None:
            self.setup("validate")
        if self.val_dataset is None:
            if self.eval_train_batches:
                warnings.warn("data.eval_train_batches needs a validation split; it is ignored", stacklevel=2)
            return []
        val = self._loader(self.val_dataset, train=False)
        if not self.eval_train_batches:
            return val
        n = len(self.train_dataset)
        if self.eval_train_batches > 0:
            n = min(n, self.eval_train_batches * self.batch_size)
        return [val, self._loader(Subset(self.train_dataset, range(n)), train=False)]

    def test_dataloader(self) -> DataLoader | list:
        """The validation windows (pretraining has no separate test split)."""
        return self._val_only()

    def predict_dataloader(self) -> DataLoader | list:
        """The validation windows, scored by ``predict`` (per-window loss and perplexity)."""
        return self._val_only()

    def _val_only(self) -> DataLoader | list:
        if self.train_dataset is None:
            self.setup("validate")
        return [] if self.val_dataset is None else self._loader(self.val_dataset, train=False)

