"""What every lit_llm DataModule shares, so each task's DataModule holds only what is its own.

:class:`GPTDataModule` is a ``LightningDataModule`` that

- takes the settings every DataModule has (tokenizer, batch size, loader options, seed, cache folder, the
  ``quality`` stage) through :meth:`GPTDataModule.set_common`;
- resolves its tokenizer once, on first access, from ``data.tokenizer`` (training a BPE on the texts the subclass
  names in :meth:`GPTDataModule.tokenizer_texts` when the setting is ``train``), and exposes ``vocab_size`` and
  ``eos_id``;
- stores the tokenizer in checkpoints and refuses a checkpoint trained with another one
  (:class:`~lit_llm.data.tokenizer_source.StoresTokenizer`);
- tells the resumable training loader each batch training takes, so a checkpoint saves the position of training
  (:class:`~lit_llm.data.sampler.CountsConsumedBatches`).

A subclass keeps its own explicit ``__init__`` signature (its parameters and their docs are the config's schema and
``--help``) and calls :meth:`set_common` from it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from lit_llm.data.prompts import get_template
from lit_llm.data.quality import QualityConfig, QualityGate, quality_hparams
from lit_llm.data.sampler import CountsConsumedBatches
from lit_llm.data.sources import default_cache_dir
from lit_llm.data.tokenizer import Tokenizer
from lit_llm.data.tokenizer_source import StoresTokenizer, resolve_tokenizer, texts_key
from lit_llm.errors import ConfigError


class GPTDataModule(CountsConsumedBatches, StoresTokenizer, pl.LightningDataModule):
    """Base of the task DataModules: shared settings, the tokenizer, checkpointed tokenizer and loader position."""

    def set_common(self, *, tokenizer: str, tokenizer_vocab_size: int, batch_size: int, shuffle: bool,
                   drop_last: bool, num_workers: int, pin_memory: bool | None, seed: int, cache_dir: str | None,
                   quality: QualityConfig | None) -> None:
        """Keep the settings every DataModule has (call after ``save_hyperparameters(ignore=["quality"])``)."""
        self.tokenizer_source = tokenizer
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.seed = seed
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.quality = QualityGate(quality, self.cache_dir) if quality is not None else None
        # Plain data in checkpoints: weights-only loading refuses a dataclass.
        self.hparams["quality"] = quality_hparams(self.quality)
        self._tokenizer: Tokenizer | None = None

    # ---- tokenizer -------------------------------------------------------------------------------------------------

    def tokenizer_texts(self) -> Iterable[str]:
        """The texts a ``train`` tokenizer learns from: the training side only, so validation and test text never
        shape the vocabulary."""
        raise NotImplementedError

    def tokenizer_key(self) -> str:
        """The cache key of a BPE trained on :meth:`tokenizer_texts` (default: a hash of those texts)."""
        return texts_key(self.tokenizer_texts())

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer, loaded (or trained and cached) on first access; works before ``prepare_data``."""
        if self._tokenizer is None:
            self._tokenizer = resolve_tokenizer(
                self.tokenizer_source, train_texts=self.tokenizer_texts, vocab_size=self.tokenizer_vocab_size,
                cache_dir=self.cache_dir, key=self.tokenizer_key,
            )
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of token ids (the model's vocabulary size)."""
        return self.tokenizer.vocab_size

    @property
    def eos_id(self) -> int:
        """Id of ``<|endoftext|>``: the end of every document or example, and the book's padding."""
        return self.tokenizer.eos_id


#: The book's order of the three parts of one record file (chapter 7: first train, next test, last validation).
SPLIT_ORDER: tuple[str, str, str] = ("train", "test", "val")


def split_sizes(n: int, fractions: tuple[float, float, float], *, val_given: bool, test_given: bool
                ) -> tuple[int, int, int]:
    """Records of a source going to train, test and validation (the book's ``int(n * fraction)`` cuts).

    A part given by its own source (``val_given`` / ``test_given``) takes nothing from this one, and the other
    fractions are scaled up to fill it; without a validation part the rounding leftovers train.
    """
    f_train, f_test, f_val = fractions
    if test_given:
        f_test = 0.0
    if val_given:
        f_val = 0.0
    total = f_train + f_test + f_val
    n_train, n_test = int(n * f_train / total), int(n * f_test / total)
    if f_val == 0.0:
        return n - n_test, n_test, 0
    return n_train, n_test, n - n_train - n_test


def split_positions(n: int, *, split: str, fractions: tuple[float, float, float], seed: int, val_given: bool,
                    test_given: bool) -> dict[str, list[int]]:
    """Positions in a source of ``n`` records that each split takes: in file order (``split: book``) or drawn at
    random with ``seed`` (``split: shuffle``); see :func:`split_sizes` for the counts."""
    order = np.arange(n) if split != "shuffle" else np.random.default_rng(seed).permutation(n)
    out, start = {}, 0
    for name, count in zip(SPLIT_ORDER, split_sizes(n, fractions, val_given=val_given, test_given=test_given)):
        out[name] = order[start : start + count].tolist()
        start += count
    return out


def record_source_problems(args: dict[str, Any]) -> list[str]:
    """The setting problems every DataModule of prompted records shares (instructions, preference pairs): batch and
    worker counts, a URL ``source`` without its ``sha256``, URLs where only local files are read, and the prompt
    template (when the DataModule has one). ``args`` are the DataModule's constructor arguments."""
    problems = []
    if args["batch_size"] < 1:
        problems.append(f"data.batch_size={args['batch_size']} must be >= 1")
    if args["num_workers"] < 0:
        problems.append(f"data.num_workers={args['num_workers']} must be >= 0")
    is_url = isinstance(args["source"], str) and args["source"].startswith(("http://", "https://"))
    if is_url and not args["sha256"]:
        problems.append("data.sha256 is required for a URL data.source; compute it with `sha256sum FILE`")
    for key in ("val_source", "test_source"):
        value = args[key]
        specs = [value] if isinstance(value, str) else value or []
        if any(str(v).startswith(("http://", "https://")) for v in specs):
            problems.append(f"data.{key} cannot be a URL (data.sha256 covers data.source only); download it first")
    if "prompt_template" in args:
        try:
            get_template(args["prompt_template"])
        except ConfigError as err:
            problems.append(f"data.prompt_template: {err}")
    return problems
