"""GPT-2 style byte-level BPE over Hugging Face ``tokenizers``.

One wrapper class serves every task: it loads OpenAI's GPT-2 files (``encoder.json`` +
``vocab.bpe``), the Hugging Face layout (``vocab.json`` + ``merges.txt`` or ``tokenizer.json``),
a Hub name, or trains a fresh byte-level BPE on any corpus. Encoding the book's text with the
GPT-2 files gives exactly the ids of ``tiktoken.get_encoding("gpt2")``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

from lit_llm.errors import ConfigError, DataError

EOS_TOKEN = "<|endoftext|>"

# A Hub id is `name` or `owner/name`; anything with other separators is meant as a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")

_LAYOUTS = (
    "a directory with encoder.json + vocab.bpe (OpenAI GPT-2 layout), "
    "a directory with vocab.json + merges.txt, "
    "a directory with tokenizer.json, a path to a tokenizer.json file, "
    "or a Hugging Face Hub name such as 'gpt2' or 'openai-community/gpt2'"
)


class Tokenizer:
    """GPT-2 style byte-level BPE.

    Args:
        backend: The Hugging Face ``tokenizers.Tokenizer`` doing the work.
        eos_token: The end-of-text token; it must be in the backend's vocabulary.

    Attributes:
        backend: The wrapped ``tokenizers.Tokenizer``.
        eos_token: ``"<|endoftext|>"`` unless given otherwise.
        eos_id: Id of ``eos_token`` (50256 for GPT-2).
        vocab_size: Number of ids, special tokens included (50257 for GPT-2).
    """

    def __init__(self, backend: tokenizers.Tokenizer, eos_token: str = EOS_TOKEN) -> None:
        eos_id = backend.token_to_id(eos_token)
        if eos_id is None:
            raise DataError(
                f"the tokenizer has no {eos_token!r} token; lit_llm separates documents with it. "
                "Use a GPT-2 style tokenizer, or train one with `data.tokenizer: train`."
            )
        self.backend = backend
        self.eos_token = eos_token
        self.eos_id: int = eos_id
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, fingerprint={self.fingerprint[:12]})"

    def encode(self, text: str, allowed_special: bool = True) -> list[int]:
        """Encode ``text`` to token ids.

        Args:
            text: The text to encode.
            allowed_special: If True, ``"<|endoftext|>"`` in ``text`` becomes ``eos_id``;
                if False it is encoded as ordinary characters (tiktoken's ``disallowed_special=()``).

        Returns:
            The token ids.
        """
        if allowed_special:
            return self.backend.encode(text, add_special_tokens=False).ids
        # Bypass the added-token matcher by running the pipeline's stages by hand.
        if self.backend.normalizer is not None:
            text = self.backend.normalizer.normalize_str(text)
        pieces = self.backend.pre_tokenizer.pre_tokenize_str(text) if self.backend.pre_tokenizer else [(text, None)]
        return [tok.id for piece, _ in pieces for tok in self.backend.model.tokenize(piece)]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode several texts in parallel (special tokens allowed).

        Args:
            texts: The texts to encode.

        Returns:
            One list of ids per text.
        """
        # encode_batch_fast skips offset tracking, which we never use.
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [enc.ids for enc in encode(texts, add_special_tokens=False)]

    def encode_arrays(self, texts: Sequence[str], dtype: type = np.int64, max_chars: int = 1 << 20) -> list[np.ndarray]:
        """Encode texts of any length with bounded memory (special tokens allowed).

        ``tokenizers`` keeps tokens and offsets per id (~100 bytes each), so one huge call can need
        gigabytes. Texts are cut into pieces of about ``max_chars`` at boundaries the GPT-2
        pre-tokenizer never merges across, encoded a few pieces at a time, and returned as compact
        arrays; the ids equal ``encode(text)``'s.

        Args:
            texts: The texts to encode.
            dtype: NumPy dtype of the returned arrays.
            max_chars: Approximate size of the pieces encoded per call.

        Returns:
            One 1-D array of ids per text.
        """
        pieces: list[str] = []
        owner: list[int] = []
        for i, text in enumerate(texts):
            for piece in _split_for_encoding(text, max_chars):
                pieces.append(piece)
                owner.append(i)
        arrays: list[list[np.ndarray]] = [[] for _ in texts]
        start = 0
        while start < len(pieces):
            end, size = start, 0
            while end < len(pieces) and (end == start or size + len(pieces[end]) <= 4 * max_chars):
                size += len(pieces[end])
                end += 1
            for i, ids in zip(owner[start:end], self.encode_batch(pieces[start:end])):
                arrays[i].append(np.asarray(ids, dtype=dtype))
            start = end
        return [np.concatenate(a) if len(a) != 1 else a[0] for a in arrays]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Decode ids back to text, keeping special tokens so ``decode(encode(x)) == x``.

        Args:
            ids: Token ids, a list or a 1-D tensor.

        Returns:
            The decoded text.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` into ``directory`` (created if missing).

        Args:
            directory: Where to write.

        Returns:
            The path of the written ``tokenizer.json``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "tokenizer.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        tmp.replace(path)
        return path

    def to_json(self) -> str:
        """Serialise to the ``tokenizer.json`` format."""
        return self.backend.to_str()

    @classmethod
    def from_json(cls, s: str, eos_token: str = EOS_TOKEN) -> Tokenizer:
        """Build a tokenizer from a ``tokenizer.json`` string.

        Args:
            s: The JSON text written by ``to_json``.
            eos_token: The end-of-text token.

        Returns:
            The tokenizer.

        Raises:
            DataError: ``s`` is not a tokenizer's JSON (e.g. the damaged copy stored in a checkpoint).
        """
        try:
            backend = tokenizers.Tokenizer.from_str(s)
        except Exception as err:  # tokenizers raises a bare Exception (or TypeError for a non-string)
            raise DataError(f"the stored tokenizer is not a valid tokenizer.json ({err}); the file holding it is "
                            "damaged: use another copy, or pass the tokenizer the model was trained with") from err
        return cls(backend, eos_token=eos_token)

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 hex digest of everything that decides the ids.

        Covers the model (vocabulary, merges, settings), added tokens, normalizer and
        pre-tokenizer; not the decoder, padding or truncation. The same vocabulary and merges
        give the same fingerprint whichever file layout they were loaded from.
        """
        spec = json.loads(self.backend.to_str())
        model = dict(spec.get("model") or {})
        # tokenizers writes merges as "a b" strings or as [a, b] pairs depending on version.
        if "merges" in model:
            model["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        canonical = {
            "model": model,
            "added_tokens": [(t["id"], t["content"], t.get("special", False)) for t in spec.get("added_tokens", [])],
            "normalizer": spec.get("normalizer"),
            "pre_tokenizer": spec.get("pre_tokenizer"),
        }
        blob = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _safe_cut(text: str, lo: int, hi: int) -> int | None:
    """A cut in ``text[lo:hi]`` that leaves GPT-2's pre-tokens intact, or None.

    The GPT-2 regex never joins ``X\\nY`` (X, Y not whitespace) into one pre-token, and a single
    space before a non-space always starts the next one; cutting there changes no id.
    """
    for sep, after in (("\n", 1), (" ", 0)):
        i = text.rfind(sep, lo + 1, hi)
        while i > lo:
            if not text[i - 1].isspace() and i + 1 < len(text) and not text[i + 1].isspace():
                return i + after
            i = text.rfind(sep, lo + 1, i)
    return None


def _split_for_encoding(text: str, max_chars: int) -> list[str]:
    pieces, start = [], 0
    while len(text) - start > max_chars:
        hi = start + max_chars
        cut = _safe_cut(text, start + max_chars // 2, hi)
        while cut is None and hi < len(text):  # no safe cut nearby: look further rather than cut a pre-token
            cut, hi = _safe_cut(text, hi - 1, min(len(text), hi + max_chars)), hi + max_chars
        if cut is None:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _byte_level(model: models.Model) -> tokenizers.Tokenizer:
    """The GPT-2 pipeline: byte-level pre-tokenizer (GPT-2 regex, no prefix space) and decoder."""
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _from_vocab_merges(vocab: Path, merges: Path) -> Tokenizer:
    try:
        backend = _byte_level(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as err:  # tokenizers raises plain Exception on malformed files
        raise DataError(
            f"could not read the BPE files {vocab} and {merges}: {err}. "
            "They must be a JSON token->id map and a merges file with one 'a b' pair per line."
        ) from err
    # GPT-2's files list <|endoftext|> in the vocabulary; registering it makes it atomic.
    if backend.token_to_id(EOS_TOKEN) is None:
        raise DataError(f"{vocab} has no {EOS_TOKEN!r} entry; a GPT-2 vocabulary has it as id 50256.")
    backend.add_special_tokens([EOS_TOKEN])
    return Tokenizer(backend)


def _from_tokenizer_json(path: Path) -> Tokenizer:
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:
        raise DataError(f"could not read {path} as a tokenizer.json: {err}") from err
    return Tokenizer(backend)


def _from_directory(directory: Path) -> Tokenizer:
    if (directory / "tokenizer.json").is_file():
        return _from_tokenizer_json(directory / "tokenizer.json")
    if (directory / "encoder.json").is_file() and (directory / "vocab.bpe").is_file():
        return _from_vocab_merges(directory / "encoder.json", directory / "vocab.bpe")
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return _from_vocab_merges(directory / "vocab.json", directory / "merges.txt")
    found = sorted(p.name for p in directory.iterdir())[:20]
    raise DataError(f"no tokenizer files in {directory} (found {found}). Expected {_LAYOUTS}.")


def _from_hub(name: str) -> Tokenizer:
    try:
        backend = tokenizers.Tokenizer.from_pretrained(name)
    except Exception as err:
        raise DataError(
            f"could not download the tokenizer {name!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
            "The machine may be offline (or HF_HUB_OFFLINE=1 is set and it is not cached). Pass a local directory "
            "with encoder.json + vocab.bpe, vocab.json + merges.txt, or tokenizer.json instead."
        ) from err
    return Tokenizer(backend)


def load_tokenizer(source: str | Path) -> Tokenizer:
    """Load a byte-level BPE tokenizer from local files or the Hugging Face Hub.

    Args:
        source: A directory holding ``encoder.json`` + ``vocab.bpe``, ``vocab.json`` +
            ``merges.txt`` or ``tokenizer.json``; a path to a ``tokenizer.json`` file; or a Hub
            name such as ``"gpt2"`` (downloaded and cached by ``huggingface_hub``).

    Returns:
        The tokenizer.

    Raises:
        DataError: The path does not exist and is no Hub name, the files are malformed, or the
            Hub download failed.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_directory(path)
    if path.is_file():
        return _from_tokenizer_json(path)
    if isinstance(source, str) and _HUB_ID.match(source) and not source.endswith(".json"):
        return _from_hub(source)
    raise DataError(f"tokenizer path {str(source)!r} does not exist (cwd: {Path.cwd()}). Expected {_LAYOUTS}.")


def _without_eos(texts: Iterable[str]) -> Iterator[str]:
    # The trainer does not know <|endoftext|> is atomic, so it would learn merges inside it.
    for text in texts:
        yield from (piece for piece in text.split(EOS_TOKEN) if piece)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE on ``texts``.

    The 256 byte symbols and ``"<|endoftext|>"`` are always in the vocabulary, so any text
    round-trips; ``eos_id`` is decided by training (0 here, unlike GPT-2's 50256).

    Args:
        texts: The training texts (any iterable; consumed once).
        vocab_size: Target vocabulary size including the 257 base symbols; a small corpus
            may yield fewer.
        min_frequency: Minimum count for a pair to be merged.

    Returns:
        The trained tokenizer.

    Raises:
        ConfigError: ``vocab_size`` is not above 257.
        DataError: ``texts`` is empty.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size <= len(alphabet) + 1:
        raise ConfigError(
            f"tokenizer vocab_size={vocab_size} is too small: a byte-level BPE needs {len(alphabet)} byte symbols "
            f"+ {EOS_TOKEN}, so choose a value above {len(alphabet) + 1} (e.g. 4096)."
        )
    seen = 0

    def counted(stream: Iterable[str]) -> Iterator[str]:
        nonlocal seen
        for text in stream:
            seen += 1
            yield text

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend = _byte_level(models.BPE())
    backend.train_from_iterator(counted(_without_eos(texts)), trainer=trainer)
    if seen == 0:
        raise DataError("cannot train a tokenizer on an empty corpus: no non-empty text was given.")
    return Tokenizer(backend)
