"""One way for every DataModule to get its tokenizer from the ``data.tokenizer`` setting.

Accepted forms: ``"train"`` (a byte-level BPE trained on the task's training text and cached), a lit_llm
checkpoint (``.ckpt`` file or run directory: the tokenizer stored in it, so finetuning a model pretrained with a
trained BPE uses that same BPE), a tokenizer directory or ``tokenizer.json`` file, or a Hub name such as ``gpt2``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

from lit_llm.data import cache
from lit_llm.data.tokenizer import Tokenizer, load_tokenizer, train_bpe
from lit_llm.errors import DataError


def cache_key(*parts: object) -> str:
    """A short stable hash of JSON-able settings, for cache file names."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def texts_key(texts: Iterable[str]) -> str:
    """A short hash of a sequence of texts: the cache key of a BPE trained on exactly those texts."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]


def trained_tokenizer(
    texts: Callable[[], Iterable[str]], vocab_size: int, cache_dir: Path, key: str
) -> Tokenizer:
    """A BPE of ``vocab_size`` trained on ``texts()``, cached under ``cache_dir/tokenizers`` by ``key``.

    ``key`` must identify the training text (for example a hash of the source and split settings); the file is
    written atomically, so concurrent ranks never read half a tokenizer.
    """
    path = cache_dir / "tokenizers" / f"bpe{vocab_size}-{key}.json"
    why = f"key {key}: the training text and vocab_size={vocab_size}"
    if path.is_file():
        cache.reused("the trained tokenizer", path, why)
        return Tokenizer.from_json(path.read_text(encoding="utf-8"))
    cache.building("a trained tokenizer", path, f"no entry for {why}")
    tokenizer = train_bpe(texts(), vocab_size)
    cache.write_atomic(path, tokenizer.to_json())
    return tokenizer


def checkpoint_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer stored in a lit_llm checkpoint (the DataModule state) or saved beside it."""
    from lit_llm.weights.files import torch_load  # lazily: only checkpoints need torch's loader

    ckpt_file = path / "last.ckpt" if path.is_dir() else path
    ckpt = torch_load(ckpt_file)
    for value in ckpt.values() if isinstance(ckpt, dict) else ():
        if isinstance(value, dict) and "tokenizer_json" in value:
            return Tokenizer.from_json(value["tokenizer_json"])
    try:
        return load_tokenizer(ckpt_file.parent)
    except DataError:
        raise DataError(
            f"data.tokenizer={str(path)!r}: the checkpoint holds no tokenizer and none is saved beside it; pass the "
            "tokenizer the model was trained with (a directory, tokenizer.json or Hub name)"
        ) from None


def resolve_tokenizer(
    source: str,
    *,
    train_texts: Callable[[], Iterable[str]] | None = None,
    vocab_size: int = 4096,
    cache_dir: Path | None = None,
    key: Callable[[], str] = lambda: "",
) -> Tokenizer:
    """Load the tokenizer that ``data.tokenizer = source`` names (see the module docstring for the forms).

    Args:
        source: The setting's value.
        train_texts: Called for the training text when ``source == "train"``.
        vocab_size: Vocabulary of a trained BPE.
        cache_dir: Cache root for trained BPEs.
        key: Returns what identifies the training text in the cache (see :func:`trained_tokenizer`); called only
            for ``"train"``, as it may have to read the data.
    """
    if source == "train":
        if train_texts is None or cache_dir is None:
            raise DataError("data.tokenizer='train' is not supported by this data module; pass a tokenizer path")
        return trained_tokenizer(train_texts, vocab_size, cache_dir, key())
    path = Path(source).expanduser()
    if path.suffix == ".ckpt" or (path.is_dir() and (path / "last.ckpt").is_file()):
        if not path.exists():
            raise DataError(f"data.tokenizer={source!r}: checkpoint not found (cwd: {Path.cwd()})")
        return checkpoint_tokenizer(path)
    return load_tokenizer(source)


def tokenizer_state(tokenizer: Tokenizer) -> dict[str, str]:
    """What a DataModule's ``state_dict`` stores of its tokenizer: the tokenizer itself and its fingerprint."""
    return {"tokenizer_json": tokenizer.to_json(), "tokenizer_fingerprint": tokenizer.fingerprint}


def check_tokenizer_state(state: dict, tokenizer: Tokenizer, source: str) -> None:
    """Raise a :class:`DataError` when a checkpoint's tokenizer (from :func:`tokenizer_state`) is not ``tokenizer``.

    Args:
        state: A DataModule state from a checkpoint.
        tokenizer: The tokenizer this run configured.
        source: The ``data.tokenizer`` setting, named in the message.
    """
    saved = state.get("tokenizer_fingerprint")
    if saved is not None and saved != tokenizer.fingerprint:
        raise DataError(
            f"tokenizer mismatch between the checkpoint ({saved[:12]}) and data.tokenizer={source!r} "
            f"({tokenizer.fingerprint[:12]}). Use the tokenizer the checkpoint was trained with: it is saved as "
            "tokenizer.json in the run directory (set data.tokenizer to that file)."
        )


class StoresTokenizer:
    """DataModule mixin: checkpoints hold the tokenizer, and loading one trained with another tokenizer stops.

    The DataModule provides ``tokenizer`` and ``tokenizer_source`` (the ``data.tokenizer`` setting); one that stores
    more extends both methods through ``super()``.
    """

    tokenizer: Tokenizer
    tokenizer_source: str

    def state_dict(self) -> dict:
        """The tokenizer, so a checkpoint records which ids its weights mean."""
        return tokenizer_state(self.tokenizer)

    def load_state_dict(self, state_dict: dict) -> None:
        """Check that the checkpoint was trained with this tokenizer.

        Raises:
            DataError: The checkpoint's tokenizer differs from the configured one.
        """
        check_tokenizer_state(state_dict, self.tokenizer, self.tokenizer_source)
