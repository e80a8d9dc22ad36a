"""Data quality before a token is trained on: exact and near-duplicates, heuristic filters, redaction, leakage.

One stage for every kind of data lit_llm reads. It looks at the text of each record (the configured ``fields``
joined by newlines; nested values such as a conversation's messages contribute every string inside them) and
decides, record by record in input order, with the first rule that fires:

1. ``filters``: length bounds, control characters, alphabetic-character ratio, repeated lines, repeated word
   n-grams (cheap rules that catch junk; defaults in :class:`FilterConfig`);
2. ``leakage``: the record shares a word n-gram (13 words by default) with a validation/test split or a named
   evaluation file; reported, and removed when ``leakage.action`` is ``remove``;
3. ``exact``: the record's text equals an earlier kept record's after normalisation (Unicode NFKC, case folded,
   whitespace collapsed);
4. ``near``: the Jaccard similarity of its set of word shingles with an earlier kept record's is at least
   ``near.threshold``. MinHash signatures (``datasketch``) cut into LSH bands find the candidates; the similarity
   that decides is the exact one of the two shingle sets.

The first record of every group of duplicates is kept, so the result depends only on the input order and the
settings. Checks read the text as it was given; ``redact`` (off by default) replaces e-mail addresses, phone
numbers and IP addresses in what is written out.

Hashing, filters, redaction and n-grams run in ``num_proc`` worker processes over batches; the duplicate
decisions run in the calling process, in order. Records stream through: at most ``2 * num_proc`` batches are in
flight. What grows with the corpus is per kept record, never its text: in memory an 8-byte text hash, its
signature (``4 * near.num_perm`` bytes) and its LSH band keys; on disk, in a temporary file removed at the end,
its distinct shingle hashes (8 bytes each, about one per word), read back only to compare candidates exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import re
import string
import tempfile
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lit_llm.data import cache
from lit_llm.errors import ConfigError, DataError

# Bump when a rule changes what it removes, so cached results are not reused.
QUALITY_VERSION = 1
RULES = (
    "empty", "too_short", "too_long", "control_chars", "low_alpha", "repeated_lines", "repeated_ngrams",
    "leakage", "exact_duplicate", "near_duplicate",
)
_MASK64 = (1 << 64) - 1
_PRIME = np.uint64(1099511628211)  # FNV-1a's 64-bit prime: an odd multiplier, so invertible modulo 2**64
_PRIME_INVERSE = np.uint64(pow(1099511628211, -1, 1 << 64))
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd]")
_NOT_LETTERS = re.compile(r"[\W\d_]+")
_SPACE = re.compile(r"\s+")
_ASCII_LETTERS = string.ascii_letters.encode()
_ASCII_SPACE = string.whitespace.encode()
_ASCII_CONTROL = bytes([*range(0, 9), 11, 12, *range(14, 32), 127])
# Redaction patterns: deliberately plain (no attempt at every format), documented in docs/data.md.
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])")
_PHONE = re.compile(r"(?<![\w.])\+?\d{1,3}?[ .-]?\(?\d{2,4}\)?[ .-]?\d{3,4}[ .-]?\d{3,4}(?![\w.])")
_EXAMPLE_CHARS = 200


# ---- settings ------------------------------------------------------------------------------------------------


@dataclass
class NearDuplicateConfig:
    """MinHash LSH near-duplicate detection.

    Args:
        enabled: Remove near-duplicates.
        threshold: Jaccard similarity of two records' shingle sets at or above which the later one is removed
            (compared exactly for the candidates that MinHash LSH finds).
        shingle_size: Words per shingle (records shorter than this are one shingle).
        num_perm: MinHash permutations: more gives a closer estimate of the similarity and costs time and memory.
        seed: Seed of the MinHash permutations.
    """

    enabled: bool = True
    threshold: float = 0.8
    shingle_size: int = 5
    num_perm: int = 128
    seed: int = 1


@dataclass
class FilterConfig:
    """Heuristic filters; a record failing any of them is removed (a ``None`` bound is off).

    Args:
        enabled: Apply the filters.
        min_chars: Fewest characters (after stripping surrounding whitespace); 1 removes empty records.
        max_chars: Most characters.
        min_words: Fewest whitespace-separated words.
        max_words: Most words.
        max_control_fraction: Largest share of control characters (C0/C1 other than tab and newlines, and the
            Unicode replacement character U+FFFD that broken decoding leaves).
        min_alpha_fraction: Smallest share of letters among the non-space characters.
        max_repeated_line_fraction: Largest share of non-empty lines that repeat an earlier line of the record
            (checked from ``min_lines`` lines on).
        min_lines: Lines a record needs before repeated lines are judged.
        max_repeated_ngram_fraction: Largest share of word n-grams that repeat an earlier n-gram of the record
            (checked from ``min_ngram_words`` words on: a short answer that restates its question is not junk).
        repeated_ngram_size: Words per n-gram of the repeated-n-gram rule.
        min_ngram_words: Words a record needs before repeated n-grams are judged.
    """

    enabled: bool = True
    min_chars: int | None = 1
    max_chars: int | None = None
    min_words: int | None = None
    max_words: int | None = None
    max_control_fraction: float | None = 0.01
    min_alpha_fraction: float | None = 0.25
    max_repeated_line_fraction: float | None = 0.3
    min_lines: int = 4
    max_repeated_ngram_fraction: float | None = 0.5
    repeated_ngram_size: int = 5
    min_ngram_words: int = 50


@dataclass
class RedactConfig:
    """Personal data replaced by placeholders in the written text (checks still read the original).

    Args:
        enabled: Redact.
        email: Replace e-mail addresses with ``<EMAIL>``.
        phone: Replace phone numbers (7 to 15 digits, optionally grouped by spaces, dots, dashes or a bracketed
            area code, optionally with ``+`` country code) with ``<PHONE>``.
        ip: Replace IPv4 and full IPv6 addresses with ``<IP>``.
    """

    enabled: bool = False
    email: bool = True
    phone: bool = True
    ip: bool = True


@dataclass
class LeakageConfig:
    """Overlap between the training data and evaluation data.

    Args:
        enabled: Check for leakage. A DataModule checks its training split against its validation and test splits;
            the ``clean`` command against ``against``.
        n: Words per n-gram; a training record leaks when it shares at least one n-gram with an evaluation
            record (a record shorter than ``n`` words counts as one n-gram of all its words).
        against: More evaluation data to check against: sources in any form ``data.source`` takes.
        fields: Fields holding the text of the ``against`` records; ``None`` means the fields the training data is
            checked by.
        action: ``report`` the leaking records (kept), or ``remove`` them from training.
    """

    enabled: bool = True
    n: int = 13
    against: list[str] = field(default_factory=list)
    fields: list[str] | None = None
    action: Literal["report", "remove"] = "report"


@dataclass
class QualityConfig:
    """The data-quality stage (``data.quality``); every part has documented defaults (docs/data.md).

    Args:
        exact: Remove exact duplicates after normalisation (NFKC, case folded, whitespace collapsed).
        near: Near-duplicate detection (MinHash LSH).
        filters: Heuristic filters.
        redact: Redaction of e-mail addresses, phone numbers and IP addresses.
        leakage: N-gram overlap with evaluation data.
        num_proc: Worker processes for hashing and filters (1: in the calling process).
        batch_size: Records per batch sent to a worker.
        examples: Removed records quoted per rule in the report.
    """

    exact: bool = True
    near: NearDuplicateConfig = field(default_factory=NearDuplicateConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    redact: RedactConfig = field(default_factory=RedactConfig)
    leakage: LeakageConfig = field(default_factory=LeakageConfig)
    num_proc: int = 1
    batch_size: int = 1000
    examples: int = 5

    def __post_init__(self) -> None:
        # jsonargparse and YAML give nested settings as dicts; build the typed parts (and refuse unknown keys).
        for name, kind in (("near", NearDuplicateConfig), ("filters", FilterConfig), ("redact", RedactConfig),
                           ("leakage", LeakageConfig)):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                setattr(self, name, _build(kind, value, f"data.quality.{name}"))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], key: str = "data.quality") -> QualityConfig:
        """Settings from a mapping (YAML/JSON), refusing unknown keys with their valid names.

        Raises:
            ConfigError: A key is unknown or a value is out of range.
        """
        config = _build(cls, values, key)
        config.check(key)
        return config

    def check(self, key: str = "data.quality") -> None:
        """Raise one :class:`ConfigError` naming every setting out of range."""
        problems = []
        near, filters, leakage = self.near, self.filters, self.leakage
        if not 0 < near.threshold <= 1:
            problems.append(f"{key}.near.threshold={near.threshold} must be in (0, 1] (a Jaccard similarity)")
        if near.shingle_size < 1:
            problems.append(f"{key}.near.shingle_size={near.shingle_size} must be >= 1 (words per shingle)")
        if near.num_perm < 16:
            problems.append(f"{key}.near.num_perm={near.num_perm} must be >= 16 (128 is a good default)")
        if not 0 <= near.seed < 2**32:
            problems.append(f"{key}.near.seed={near.seed} must be in [0, 2**32)")
        for name in ("min_chars", "max_chars", "min_words", "max_words"):
            value = getattr(filters, name)
            if value is not None and value < 0:
                problems.append(f"{key}.filters.{name}={value} must be >= 0 (or null for no bound)")
        for low, high in (("min_chars", "max_chars"), ("min_words", "max_words")):
            a, b = getattr(filters, low), getattr(filters, high)
            if a is not None and b is not None and a > b:
                problems.append(f"{key}.filters.{low}={a} is above {key}.filters.{high}={b}")
        for name in ("max_control_fraction", "min_alpha_fraction", "max_repeated_line_fraction",
                     "max_repeated_ngram_fraction"):
            value = getattr(filters, name)
            if value is not None and not 0 <= value <= 1:
                problems.append(f"{key}.filters.{name}={value} must be a fraction in [0, 1] (or null for off)")
        if filters.repeated_ngram_size < 1 or filters.min_lines < 1 or filters.min_ngram_words < 1:
            problems.append(f"{key}.filters.repeated_ngram_size, min_ngram_words and min_lines must be >= 1")
        if leakage.n < 1:
            problems.append(f"{key}.leakage.n={leakage.n} must be >= 1 (words per n-gram; 13 is the usual choice)")
        if leakage.action not in ("report", "remove"):
            problems.append(f"{key}.leakage.action={leakage.action!r} must be 'report' or 'remove'")
        if self.num_proc < 1:
            problems.append(f"{key}.num_proc={self.num_proc} must be >= 1")
        if self.batch_size < 1:
            problems.append(f"{key}.batch_size={self.batch_size} must be >= 1")
        if self.examples < 0:
            problems.append(f"{key}.examples={self.examples} must be >= 0")
        if problems:
            raise ConfigError(f"invalid {key} settings:\n  - " + "\n  - ".join(problems))

    def settings(self) -> dict[str, Any]:
        """The settings that decide what is removed (``num_proc``, ``batch_size`` and ``examples`` do not)."""
        values = asdict(self)
        for name in ("num_proc", "batch_size", "examples"):
            values.pop(name)
        return values


def _build(kind: type, values: Mapping[str, Any], key: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{key} must be a mapping of settings, got {values!r}")
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{key}: unknown setting(s) {unknown}; valid: {sorted(known)}")
    try:
        return kind(**values)
    except TypeError as err:
        raise ConfigError(f"{key}: {err}") from err


# ---- text ----------------------------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """The form exact duplicates are compared in: Unicode NFKC, case folded, whitespace runs as one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def record_text(record: Mapping[str, Any], text_fields: Sequence[str]) -> str:
    """The text the checks read: the fields' strings (nested ones too, in order) joined by newlines."""
    parts: list[str] = []
    for name in text_fields:
        _strings(record.get(name), parts)
    return "\n".join(parts)


def _strings(value: Any, out: list[str]) -> None:
    if value is None:
        return
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, Mapping):
        for item in value.values():
            _strings(item, out)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _strings(item, out)
    elif not isinstance(value, (bool, int, float)):
        out.append(str(value))


def word_hashes(norm: str) -> np.ndarray:
    """A stable 64-bit hash of every word of a normalised text (words separated by single spaces).

    Vectorised over the UTF-8 bytes: word ``[s, e)`` hashes to ``sum(b[i] * P**(i - s))`` modulo 2**64, computed
    from prefix sums and the inverse powers of the odd multiplier ``P``. Stable across processes and runs (Python's
    own ``hash`` of a string is salted per process).
    """
    data = np.frombuffer(norm.encode("utf-8"), dtype=np.uint8)
    if data.size == 0:
        return np.zeros(0, dtype=np.uint64)
    n = data.size
    spaces = np.flatnonzero(data == 32)
    starts = np.concatenate(([0], spaces + 1))
    ends = np.concatenate((spaces, [n]))
    with np.errstate(over="ignore"):
        powers = np.empty(n + 1, dtype=np.uint64)
        powers[0] = 1
        powers[1:] = _PRIME
        np.multiply.accumulate(powers, out=powers)
        inverse = np.empty(n + 1, dtype=np.uint64)
        inverse[0] = 1
        inverse[1:] = _PRIME_INVERSE
        np.multiply.accumulate(inverse, out=inverse)
        prefix = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum((data.astype(np.uint64) + np.uint64(1)) * powers[:n], out=prefix[1:])
        hashes = (prefix[ends] - prefix[starts]) * inverse[starts]
        hashes ^= hashes >> np.uint64(29)
        hashes *= np.uint64(0xBF58476D1CE4E5B9)
        hashes ^= hashes >> np.uint64(32)
    return hashes


def gram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """64-bit hashes of every window of ``n`` word ids (one hash of all of them when there are fewer than ``n``)."""
    if len(ids) == 0:
        return np.zeros(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        if len(ids) < n:
            h = np.uint64(len(ids))
            for x in ids:
                h = h * _PRIME + x
            hashes = np.asarray([h], dtype=np.uint64)
        else:
            count = len(ids) - n + 1
            hashes = np.full(count, n, dtype=np.uint64)
            for j in range(n):
                hashes = hashes * _PRIME + ids[j : j + count]
        # A final mix (murmur3's finaliser) so that nearby polynomial values spread over all 64 bits.
        hashes ^= hashes >> np.uint64(33)
        hashes *= np.uint64(0xFF51AFD7ED558CCD)
        hashes ^= hashes >> np.uint64(33)
    return hashes


def _char_counts(text: str) -> tuple[int, int, int]:
    """Control characters, non-space characters and letters of ``text``."""
    if text.isascii():
        # bytes.translate deletes in C at memory speed; the regular expressions below are far slower.
        data = text.encode("ascii")
        control = len(data) - len(data.translate(None, _ASCII_CONTROL))
        visible = len(data) - len(data.translate(None, _ASCII_SPACE))
        letters = len(data) - len(data.translate(None, _ASCII_LETTERS))
        return control, visible, letters
    control = len(_CONTROL.findall(text))
    visible = len(_SPACE.sub("", text))
    letters = sum(len(part) for part in _NOT_LETTERS.split(text))
    return control, visible, letters


def redact_text(text: str, config: RedactConfig) -> tuple[str, dict[str, int]]:
    """``text`` with the enabled kinds of personal data replaced, and how many of each were replaced."""
    counts: dict[str, int] = {}
    for kind, patterns, tag in (("email", (_EMAIL,), "<EMAIL>"), ("ip", (_IPV4, _IPV6), "<IP>"),
                                ("phone", (_PHONE,), "<PHONE>")):
        if not getattr(config, kind):
            continue
        for pattern in patterns:
            text, n = pattern.subn(tag, text)
            if n:
                counts[kind] = counts.get(kind, 0) + n
    return text, counts


def _redact_value(value: Any, config: RedactConfig, counts: dict[str, int]) -> Any:
    if isinstance(value, str):
        text, found = redact_text(value, config)
        for kind, n in found.items():
            counts[kind] = counts.get(kind, 0) + n
        return text
    if isinstance(value, Mapping):
        return {k: _redact_value(v, config, counts) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_value(v, config, counts) for v in value]
    return value


# ---- the per-record work (runs in worker processes) ----------------------------------------------------------


class Banding:
    """How MinHash signatures are cut into LSH bands, and which candidates are worth an exact comparison.

    Records are candidates of each other when they share a band. Bands of ``rows`` values are as long as they can be
    while a pair at the threshold still shares at least one band with probability >= 0.995
    (``1 - (1 - t**rows)**bands``); longer bands give fewer candidates. A candidate whose MinHash estimate is more
    than four standard errors (``sqrt(t * (1 - t) / num_perm)``) below the threshold is dropped without a look;
    every other one is decided by the exact Jaccard similarity of the two shingle sets.
    """

    def __init__(self, near: NearDuplicateConfig) -> None:
        t, n = near.threshold, near.num_perm
        self.threshold = t
        self.floor = t - 4 * math.sqrt(t * (1 - t) / n)
        rows = 1
        for r in range(n, 0, -1):
            if 1 - (1 - t**r) ** (n // r) >= 0.995:
                rows = r
                break
        self.rows, self.bands = rows, n // rows
        mixers = np.random.default_rng(near.seed).integers(1, 2**63, size=(self.bands, rows), dtype=np.uint64)
        self._mixers = mixers | np.uint64(1)

    def keys(self, signature: np.ndarray) -> list[int]:
        """One 64-bit key per band (a random linear form of the band's values, different for every band)."""
        values = signature[: self.bands * self.rows].astype(np.uint64).reshape(self.bands, self.rows)
        with np.errstate(over="ignore"):
            keys = (values * self._mixers).sum(axis=1, dtype=np.uint64)
            keys ^= keys >> np.uint64(31)
        return keys.tolist()


class _BandIndex:
    """The kept records: one dict per band from key to the first kept record with it, their signatures, and their
    shingle sets in a temporary file (read back only to compare a candidate exactly), so memory holds no text."""

    def __init__(self, banding: Banding, num_perm: int) -> None:
        self.banding = banding
        self.tables: list[dict[int, int]] = [{} for _ in range(banding.bands)]
        self.signatures = np.zeros((1024, num_perm), dtype=np.uint32)
        self.offsets = np.zeros(1025, dtype=np.int64)  # shingles of record k: file items [offsets[k], offsets[k+1])
        self.size = 0
        self._file = tempfile.TemporaryFile(prefix="lit_llm_shingles_")

    def _shingles(self, key: int) -> np.ndarray:
        start, end = int(self.offsets[key]), int(self.offsets[key + 1])
        data = os.pread(self._file.fileno(), (end - start) * 8, start * 8)
        return np.frombuffer(data, dtype=np.uint64)

    def best(self, signature: np.ndarray, bands: list[int], shingles: np.ndarray) -> tuple[int, float]:
        """The earliest kept record whose Jaccard similarity with ``shingles`` is highest and at least the threshold:
        ``(key, similarity)``, or ``(-1, 0.0)``."""
        candidates = {key for table, band in zip(self.tables, bands) if (key := table.get(band)) is not None}
        if not candidates:
            return -1, 0.0
        keys = np.fromiter(sorted(candidates), dtype=np.int64, count=len(candidates))
        estimates = (self.signatures[keys] == signature).mean(axis=1)
        best, best_sim = -1, 0.0
        for key in keys[estimates >= self.banding.floor].tolist():
            other = self._shingles(key)
            common = len(np.intersect1d(shingles, other, assume_unique=True))
            similarity = common / (len(shingles) + len(other) - common)
            if similarity >= self.banding.threshold and similarity > best_sim:
                best, best_sim = key, similarity
        return best, best_sim

    def add(self, signature: np.ndarray, bands: list[int], shingles: np.ndarray) -> int:
        key = self.size
        if key == len(self.signatures):
            self.signatures = np.concatenate([self.signatures, np.zeros_like(self.signatures)])
            self.offsets = np.concatenate([self.offsets, np.zeros(len(self.offsets) - 1, dtype=np.int64)])
        self.signatures[key] = signature
        self._file.write(shingles.astype(np.uint64).tobytes())
        self._file.flush()
        self.offsets[key + 1] = self.offsets[key] + len(shingles)
        for table, band in zip(self.tables, bands):
            table.setdefault(band, key)
        self.size += 1
        return key

    def close(self) -> None:
        self._file.close()


@dataclass
class _Facts:
    """What a worker found about one record."""

    rule: str | None  # the filter that fired
    detail: str
    digest: int  # hash of the normalised text
    signature: np.ndarray | None  # MinHash values
    bands: list[int] | None  # one hash per LSH band of the signature
    shingles: np.ndarray | None  # the distinct shingle hashes, for exact comparisons
    leaks: list[int]  # evaluation records sharing an n-gram
    leak_grams: int  # how many of the record's n-grams are evaluation n-grams
    redacted: dict[str, Any] | None  # the fields that redaction changed
    redactions: dict[str, int]


class _Analyser:
    """The per-record checks, given the settings and the evaluation n-grams; picklable into worker processes."""

    def __init__(self, config: QualityConfig, text_fields: Sequence[str], eval_grams: np.ndarray,
                 eval_ids: np.ndarray) -> None:
        self.config = config
        self.fields = list(text_fields)
        self.eval_grams = eval_grams
        self.eval_ids = eval_ids
        self.banding = Banding(config.near)
        self._minhash: Any = None
        self._memo: dict[int, np.ndarray] = {}

    def _grams(self, ids: np.ndarray, n: int) -> np.ndarray:
        """The distinct word n-grams of a record (memoised per record: several rules may ask for one ``n``)."""
        if n not in self._memo:
            self._memo[n] = np.unique(gram_hashes(ids, n))
        return self._memo[n]

    def _signature(self, ids: np.ndarray) -> np.ndarray:
        from datasketch import MinHash

        near = self.config.near
        if self._minhash is None:
            # One MinHash per process, cleared for each record: its permutations are computed once.
            self._minhash = MinHash(num_perm=near.num_perm, seed=near.seed, hashfunc=int, scheme="affine32")
        grams = self._grams(ids, near.shingle_size)
        # MinHash's 32-bit scheme takes 32-bit values: fold the 64-bit shingle hashes.
        folded = ((grams >> np.uint64(32)) ^ grams) & np.uint64(0xFFFFFFFF)
        m = self._minhash
        m.clear()
        m.update_batch(folded.tolist())
        return m.hashvalues.copy()

    def _filter(self, text: str, ids: np.ndarray) -> tuple[str | None, str]:
        f = self.config.filters
        stripped = text.strip()
        n_chars = len(stripped)
        if n_chars == 0:
            return "empty", "no text"
        if f.min_chars is not None and n_chars < f.min_chars:
            return "too_short", f"{n_chars} characters < min_chars={f.min_chars}"
        if f.max_chars is not None and n_chars > f.max_chars:
            return "too_long", f"{n_chars} characters > max_chars={f.max_chars}"
        if f.min_words is not None and len(ids) < f.min_words:
            return "too_short", f"{len(ids)} words < min_words={f.min_words}"
        if f.max_words is not None and len(ids) > f.max_words:
            return "too_long", f"{len(ids)} words > max_words={f.max_words}"
        control, visible, letters = _char_counts(stripped)
        if f.max_control_fraction is not None and control / n_chars > f.max_control_fraction:
            return "control_chars", f"{control / n_chars:.3f} of characters are control characters"
        if f.min_alpha_fraction is not None:
            alpha = letters / visible if visible else 0.0
            if alpha < f.min_alpha_fraction:
                return "low_alpha", f"{alpha:.3f} of non-space characters are letters"
        if f.max_repeated_line_fraction is not None:
            lines = [line for line in (raw.strip() for raw in stripped.splitlines()) if line]
            if len(lines) >= f.min_lines:
                repeated = 1 - len(set(lines)) / len(lines)
                if repeated > f.max_repeated_line_fraction:
                    return "repeated_lines", f"{repeated:.3f} of lines repeat an earlier line"
        if f.max_repeated_ngram_fraction is not None and len(ids) >= max(f.min_ngram_words, f.repeated_ngram_size):
            total = len(ids) - f.repeated_ngram_size + 1
            repeated = 1 - len(self._grams(ids, f.repeated_ngram_size)) / total
            if repeated > f.max_repeated_ngram_fraction:
                return "repeated_ngrams", (f"{repeated:.3f} of word {f.repeated_ngram_size}-grams repeat an "
                                           "earlier one")
        return None, ""

    def __call__(self, batch: list[dict[str, Any]]) -> list[_Facts]:
        config = self.config
        out = []
        for values in batch:
            text = record_text(values, self.fields)
            norm = normalize(text)
            ids = word_hashes(norm)
            self._memo = {}
            rule, detail = self._filter(text, ids) if config.filters.enabled else (None, "")
            leaks: list[int] = []
            leak_grams = 0
            signature = None
            if rule is None:
                if len(self.eval_grams) and ids.size:
                    grams = self._grams(ids, config.leakage.n)
                    pos = np.searchsorted(self.eval_grams, grams)
                    pos[pos == len(self.eval_grams)] = 0
                    hit = self.eval_grams[pos] == grams
                    leak_grams = int(hit.sum())
                    if leak_grams:
                        leaks = sorted(set(self.eval_ids[pos[hit]].tolist()))[:5]
                if config.near.enabled:
                    signature = self._signature(ids)
            digest = int.from_bytes(hashlib.blake2b(norm.encode("utf-8"), digest_size=8).digest(), "little")
            redacted = None
            counts: dict[str, int] = {}
            if config.redact.enabled and rule is None:
                changed = {}
                for name in self.fields:
                    if name in values:
                        before = counts.copy()
                        new = _redact_value(values[name], config.redact, counts)
                        if counts != before:
                            changed[name] = new
                redacted = changed or None
            bands = shingles = None
            if signature is not None:
                bands = self.banding.keys(signature)
                shingles = self._grams(ids, config.near.shingle_size)
            out.append(_Facts(rule, detail, digest, signature, bands, shingles, leaks, leak_grams, redacted, counts))
        return out


_WORKER: _Analyser | None = None


def _init_worker(analyser: _Analyser) -> None:
    global _WORKER
    _WORKER = analyser


def _work(batch: list[dict[str, Any]]) -> list[_Facts]:
    assert _WORKER is not None
    return _WORKER(batch)


# ---- the report ----------------------------------------------------------------------------------------------


@dataclass
class QualityReport:
    """What the stage did: counts and examples per rule, the settings, and the sizes in and out.

    ``removed`` counts records per rule; ``flagged`` counts leaking records that ``leakage.action: report`` kept.
    ``examples`` quotes up to ``examples`` records per rule with their index (0-based, in input order) and, for
    duplicates, the index of the kept record they duplicate; for leakage, the evaluation records they overlap.
    """

    name: str = "data"
    settings: dict[str, Any] = field(default_factory=dict)
    fields: list[str] = field(default_factory=list)
    against: dict[str, int] = field(default_factory=dict)
    records_in: int = 0
    records_out: int = 0
    chars_in: int = 0
    chars_out: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    flagged: dict[str, int] = field(default_factory=dict)
    redacted: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seconds: float = 0.0
    version: int = QUALITY_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-able data."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> QualityReport:
        """A report read back from :meth:`to_dict`'s output."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def summary(self) -> str:
        """A few lines for the log: sizes in and out, then the records each rule removed or flagged."""
        removed = self.records_in - self.records_out
        share = f" ({removed / self.records_in:.1%})" if self.records_in else ""
        lines = [f"data quality [{self.name}]: {self.records_in:,} records in, {self.records_out:,} kept, "
                 f"{removed:,} removed{share}; {self.chars_in:,} -> {self.chars_out:,} characters"]
        for rule in RULES:
            if self.removed.get(rule):
                lines.append(f"  {rule}: {self.removed[rule]:,} removed")
            if self.flagged.get(rule):
                lines.append(f"  {rule}: {self.flagged[rule]:,} flagged (kept; leakage.action=report)")
        if self.redacted:
            lines.append("  redacted: " + ", ".join(f"{n:,} {kind}" for kind, n in sorted(self.redacted.items())))
        if self.seconds > 0 and self.chars_in:
            lines.append(f"  {self.seconds:.1f} s")
        return "\n".join(lines)


# ---- the stage -----------------------------------------------------------------------------------------------


class Cleaner:
    """Runs the stage over records and keeps its report.

    Example:
        >>> cleaner = Cleaner(QualityConfig(), ["text"])
        >>> kept = [record for _, record in cleaner.run(records)]
        >>> print(cleaner.report.summary())

    Args:
        config: The settings.
        text_fields: The fields whose text is checked (and redacted).
        against: Evaluation data by name (``"val"``, a file name, ...): iterables of records. A training record
            sharing a ``leakage.n``-gram with one of them is a leak.
        against_fields: Fields of the ``against`` records; default ``config.leakage.fields`` or ``text_fields``.
        name: What the report calls the data.
    """

    def __init__(
        self,
        config: QualityConfig,
        text_fields: Sequence[str],
        *,
        against: Mapping[str, Iterable[Mapping[str, Any]]] | None = None,
        against_fields: Sequence[str] | None = None,
        name: str = "data",
    ) -> None:
        config.check()
        if not text_fields:
            raise ConfigError("data.quality needs at least one text field to read")
        self.config = config
        self.fields = list(text_fields)
        self.report = QualityReport(name=name, settings=config.settings(), fields=self.fields)
        eval_fields = list(against_fields or config.leakage.fields or self.fields)
        self._eval_names: list[str] = []
        grams, ids = [], []
        if config.leakage.enabled:
            for label, records in (against or {}).items():
                count = 0
                for index, record in enumerate(records):
                    count += 1
                    norm = normalize(record_text(record, eval_fields))
                    if not norm:
                        continue
                    hashes = np.unique(gram_hashes(word_hashes(norm), config.leakage.n))
                    grams.append(hashes)
                    ids.append(np.full(len(hashes), len(self._eval_names), dtype=np.int64))
                    self._eval_names.append(f"{label}[{index}]")
                self.report.against[label] = count
        if grams:
            all_grams, all_ids = np.concatenate(grams), np.concatenate(ids)
            order = np.argsort(all_grams, kind="stable")
            self._eval_grams, self._eval_ids = all_grams[order], all_ids[order]
        else:
            self._eval_grams, self._eval_ids = np.zeros(0, np.uint64), np.zeros(0, np.int64)

    def _batches(self, records: Iterable[Mapping[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        batch: list[dict[str, Any]] = []
        for record in records:
            batch.append(dict(record))
            if len(batch) == self.config.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _facts(self, records: Iterable[Mapping[str, Any]]) -> Iterator[tuple[list[dict[str, Any]], list[_Facts]]]:
        analyser = _Analyser(self.config, self.fields, self._eval_grams, self._eval_ids)
        if self.config.num_proc == 1:
            for batch in self._batches(records):
                yield batch, analyser(batch)
            return
        # fork where the platform has it: workers start at once, sharing the parent's imports.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        pending: deque[tuple[list[dict[str, Any]], Future]] = deque()
        with ProcessPoolExecutor(self.config.num_proc, mp_context=context, initializer=_init_worker,
                                 initargs=(analyser,)) as pool:
            for batch in self._batches(records):
                pending.append((batch, pool.submit(_work, batch)))
                # Bounded look-ahead: a stream is never read faster than it is processed.
                if len(pending) >= 2 * self.config.num_proc:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()

    def _example(self, rule: str, index: int, text: str, **detail: Any) -> None:
        examples = self.report.examples.setdefault(rule, [])
        if len(examples) < self.config.examples:
            snippet = text if len(text) <= _EXAMPLE_CHARS else text[:_EXAMPLE_CHARS] + "..."
            examples.append({"index": index, "text": snippet, **detail})

    def run(
        self,
        records: Iterable[Mapping[str, Any]],
        on_removed: Callable[[int, dict[str, Any], str], None] | None = None,
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield ``(index, record)`` for every record kept, in input order (redacted when ``redact`` is on).

        ``self.report`` is complete once the iterator is exhausted.

        Args:
            records: The records (dicts); read once, in order.
            on_removed: Called with ``(index, record, rule)`` for every removed record.
        """

        config, report = self.config, self.report
        start = time.perf_counter()
        near = config.near
        band_index = _BandIndex(Banding(near), near.num_perm) if near.enabled else None
        kept_index: list[int] = []  # input index of each kept record in the band index
        seen: dict[int, int] = {}  # normalised-text hash -> input index of the kept record
        index = -1
        leak_action = config.leakage.action
        try:
            for batch, facts in self._facts(records):
                for record, fact in zip(batch, facts):
                    index += 1
                    text = record_text(record, self.fields)
                    report.records_in += 1
                    report.chars_in += len(text)
                    rule = fact.rule
                    detail: dict[str, Any] = {"reason": fact.detail} if rule else {}
                    if rule is None and fact.leaks:
                        names = [self._eval_names[i] for i in fact.leaks]
                        if leak_action == "remove":
                            rule, detail = "leakage", {"overlaps": names, "shared_ngrams": fact.leak_grams}
                        else:
                            report.flagged["leakage"] = report.flagged.get("leakage", 0) + 1
                            self._example("leakage", index, text, overlaps=names, shared_ngrams=fact.leak_grams,
                                          kept=True)
                    if rule is None and config.exact:
                        first = seen.get(fact.digest)
                        if first is not None:
                            rule, detail = "exact_duplicate", {"duplicate_of": first}
                    if rule is None and band_index is not None and fact.signature is not None:
                        best, similarity = band_index.best(fact.signature, fact.bands, fact.shingles)
                        if best >= 0:
                            rule = "near_duplicate"
                            detail = {"duplicate_of": kept_index[best], "jaccard": round(similarity, 4)}
                    if rule is not None:
                        report.removed[rule] = report.removed.get(rule, 0) + 1
                        self._example(rule, index, text, **detail)
                        if on_removed is not None:
                            on_removed(index, record, rule)
                        continue
                    if config.exact:
                        seen[fact.digest] = index
                    if band_index is not None and fact.signature is not None:
                        band_index.add(fact.signature, fact.bands, fact.shingles)
                        kept_index.append(index)
                    if fact.redacted:
                        record = {**record, **fact.redacted}
                        for kind, n in fact.redactions.items():
                            report.redacted[kind] = report.redacted.get(kind, 0) + n
                        report.chars_out += len(record_text(record, self.fields))
                    else:
                        report.chars_out += len(text)
                    report.records_out += 1
                    yield index, record
        finally:
            if band_index is not None:
                band_index.close()
        report.seconds = time.perf_counter() - start


def clean_records(
    records: Iterable[Mapping[str, Any]],
    config: QualityConfig,
    text_fields: Sequence[str],
    *,
    against: Mapping[str, Iterable[Mapping[str, Any]]] | None = None,
    name: str = "data",
) -> tuple[list[tuple[int, dict[str, Any]]], QualityReport]:
    """Run the stage over records held in memory: the ``(index, record)`` pairs kept, and the report."""
    cleaner = Cleaner(config, text_fields, against=against, name=name)
    kept = list(cleaner.run(records))
    return kept, cleaner.report


# ---- fields, caching and DataModules ---------------------------------------------------------------------------

# Which fields hold the text of the record shapes lit_llm reads, tried in order when none are named.
KNOWN_FIELDS: tuple[tuple[str, ...], ...] = (
    ("text",),
    ("instruction", "input", "output"),
    ("messages",),
    ("conversations",),
    ("prompt", "chosen", "rejected"),
)


def guess_fields(columns: Sequence[str], key: str = "--fields") -> list[str]:
    """The text fields of records with these columns: the first shape of :data:`KNOWN_FIELDS` they have.

    Raises:
        DataError: No known shape matches.
    """
    present = set(columns)
    for shape in KNOWN_FIELDS:
        found = [name for name in shape if name in present]
        if found and found[0] == shape[0]:
            return found
    raise DataError(f"cannot tell which fields hold the text (columns: {list(columns)}); name them with {key}")


def content_key(records: Iterable[Mapping[str, Any]]) -> str:
    """A hash of records' content (for cache keys of data held in memory)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, default=str).encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]


def cache_path(cache_dir: Path, *parts: object) -> Path:
    """Where a cleaned result is cached: keyed by the data's identity and the settings that decide removals."""
    key = hashlib.sha256(json.dumps([QUALITY_VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()
    return cache_dir / "quality" / key[:16]


def write_report(report: QualityReport | Sequence[QualityReport], path: Path) -> None:
    """Write one report (or several, as a list) as JSON, atomically."""
    data: Any = report.to_dict() if isinstance(report, QualityReport) else [r.to_dict() for r in report]
    cache.write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str))


class QualityGate:
    """The stage as a DataModule uses it: cached results and the reports for the run folder and the log.

    Args:
        config: ``data.quality``.
        cache_dir: The DataModule's cache root; results go to ``<cache_dir>/quality/<key>``.
    """

    def __init__(self, config: QualityConfig | Mapping[str, Any], cache_dir: Path) -> None:
        self.config = config if isinstance(config, QualityConfig) else QualityConfig.from_dict(config)
        self.config.check()
        self.cache_dir = cache_dir
        self.reports: dict[str, QualityReport] = {}

    def _with(self, **changes: Any) -> QualityConfig:
        values = {f.name: getattr(self.config, f.name) for f in fields(self.config)}
        for name, value in changes.items():
            part, _, sub = name.partition("__")
            if sub:
                values[part] = type(values[part])(**{**asdict(values[part]), sub: value})
            else:
                values[part] = value
        return QualityConfig(**values)

    def against_files(self) -> dict[str, list[dict[str, Any]]]:
        """The records of ``leakage.against`` sources, by source (read in memory: evaluation sets are small)."""
        from lit_llm.data.sources import load_records

        out = {}
        if self.config.leakage.enabled:
            for i, spec in enumerate(self.config.leakage.against):
                out[spec] = load_records(spec, cache_dir=self.cache_dir, key=f"data.quality.leakage.against[{i}]"
                                         ).to_list()
        return out

    def rows(
        self,
        name: str,
        records: Sequence[Mapping[str, Any]],
        text_fields: Sequence[str],
        *,
        against: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
        leakage_only: bool = False,
        dedup_only: bool = False,
    ) -> list[tuple[int, dict[str, Any]]]:
        """Clean records held in memory (cached by content and settings): the ``(index, record)`` pairs kept.

        Args:
            name: The report's name (``train``, ``source``, ...).
            records: The records.
            text_fields: Their text fields.
            against: Evaluation records by name, for the leakage check.
            leakage_only: Run only the leakage check (the other rules already ran on these records).
            dedup_only: Run every rule but leakage.
        """
        config = self.config
        if leakage_only:
            config = self._with(exact=False, near__enabled=False, filters__enabled=False, redact__enabled=False)
        elif dedup_only:
            config = self._with(leakage__enabled=False)
        against = {**(against or {}), **self.against_files()} if config.leakage.enabled else {}
        if leakage_only and not any(len(v) for v in against.values()):
            return list(enumerate(dict(r) for r in records))
        path = cache_path(self.cache_dir, "rows", content_key(records), list(text_fields), config.settings(),
                          {k: content_key(v) for k, v in against.items()}) / "result.json"
        why = f"key {path.parent.name}: the {len(records)} records' content and the data.quality settings"
        if path.is_file():
            cache.reused(f"the data-quality result of {name}", path.parent, why)
            cached = json.loads(path.read_text(encoding="utf-8"))
            report = QualityReport.from_dict(cached["report"])
            kept = [(i, dict(records[i]) if r is None else r) for i, r in zip(cached["kept"], cached["records"])]
        else:
            cache.building(f"the data-quality result of {name}", path.parent, f"no entry for {why}")
            kept, report = clean_records(records, config, text_fields, against=against, name=name)
            redacted = [r if r != records[i] else None for i, r in kept]
            cache.write_atomic(path, json.dumps({"kept": [i for i, _ in kept], "records": redacted,
                                                 "report": report.to_dict()}, default=str))
        report.name = name
        self._keep(report)
        return kept

    def documents(self, docs: Any, identity: str, name: str, *, streaming: bool,
                  against: Mapping[str, Iterable[Mapping[str, Any]]] | None = None) -> Any:
        """Clean a ``datasets`` corpus of ``text`` documents into ``<cache>/quality/<key>/data.jsonl`` (once).

        Args:
            docs: A ``datasets.Dataset`` or ``IterableDataset`` with a ``text`` column.
            identity: What identifies the corpus (its fingerprint, or its source settings for a stream).
            name: The report's name.
            streaming: Return the cleaned corpus as an ``IterableDataset``.
            against: Evaluation documents by name, for the leakage check.

        Returns:
            The cleaned corpus, read back with ``datasets`` (streamed when ``streaming``).
        """

        against = {**(against or {}), **self.against_files()} if self.config.leakage.enabled else {}
        against_ids = {label: _identity(records) for label, records in against.items()}
        directory = cache_path(self.cache_dir, "documents", identity, self.config.settings(), against_ids)
        data, report_path = directory / "data.jsonl", directory / "report.json"
        why = f"key {directory.name}: corpus {str(identity)[:16]} and the data.quality settings"
        if data.is_file() and report_path.is_file():
            cache.reused(f"the cleaned documents of data.{name}", directory, why)
        else:
            cache.building(f"the cleaned documents of data.{name}", directory, f"no entry for {why}")
            directory.mkdir(parents=True, exist_ok=True)
            cleaner = Cleaner(self.config, ["text"], against=against, name=name)
            tmp = cache.partial_path(data)
            try:
                with open(tmp, "w", encoding="utf-8") as out:
                    for _, record in cleaner.run({"text": r["text"]} for r in docs):
                        out.write(json.dumps({"text": record["text"]}, ensure_ascii=False) + "\n")
                os.replace(tmp, data)
            finally:
                tmp.unlink(missing_ok=True)
            write_report(cleaner.report, report_path)
        report = QualityReport.from_dict(json.loads(report_path.read_text(encoding="utf-8")))
        report.name = name
        self._keep(report)
        if report.records_out == 0:
            raise DataError(f"data.quality removed every document of data.{name} ({report.records_in} read); "
                            f"see {report_path} for what each rule removed, and loosen data.quality")
        from lit_llm.data.sources import load_records  # keyed by content, and no network, like every local file

        return load_records(str(data), cache_dir=self.cache_dir, streaming=streaming, key=f"data.{name}")

    def _keep(self, report: QualityReport) -> None:
        from pytorch_lightning.utilities import rank_zero_info

        if report.name not in self.reports or self.reports[report.name] != report:
            rank_zero_info(report.summary())
        self.reports[report.name] = report

    def save(self, run_dir: str | Path) -> Path | None:
        """Write the reports of this run into ``<run_dir>/data_quality.json``; the path, or None when none ran."""
        if not self.reports:
            return None
        path = Path(run_dir) / "data_quality.json"
        write_report(list(self.reports.values()), path)
        return path


def quality_hparams(gate: QualityGate | None) -> dict[str, Any] | None:
    """``data.quality`` as plain data for a DataModule's hyperparameters (checkpoints load weights-only)."""
    return None if gate is None else asdict(gate.config)


def _identity(records: Iterable[Mapping[str, Any]]) -> str:
    """A ``datasets`` fingerprint when there is one, else a hash of the records."""
    fingerprint = getattr(records, "_fingerprint", None)
    return fingerprint if isinstance(fingerprint, str) else content_key(records)
