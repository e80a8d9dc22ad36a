"""How lit_llm's caches are keyed by content, reported, and kept free of partial files.

- :func:`files_digest`: the xxHash-128 of local files' bytes, which keys every cache built from them (the ``datasets``
  arrow files, the packed token arrays, trained tokenizers, data-quality results). A file replaced by different text
  under the same name, size and modification time gets a new digest. Text files are checked to be UTF-8 in the same
  pass. A digest is recorded under ``<cache>/content/`` and reused only while the file's size, modification time,
  change time and inode all match the record: the change time (``st_ctime``) moves on every write and rename and no
  program can set it back, so a replaced file is always read again.
- :func:`reused` / :func:`building`: the one log line a cache lookup prints, with the key it matched or missed.
- :func:`partial_path` / :func:`sweep`: files being written carry the writer's host and process id in their name;
  at the next start, those whose writer is gone (a killed run) are removed, never a live writer's.
- :func:`check_writable`: a cache folder that cannot be written is reported as such, not as an unreadable corpus.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import xxhash

from lit_llm.errors import DataError, StorageError

_CHUNK = 1 << 20
# A digest is recorded only for a file last changed this long before it was read: file times tick in steps of a few
# milliseconds, so a file rewritten in the same tick as it was read would otherwise keep its old record.
RACY_NS = 2_000_000_000
# A partial file untouched this long is stale whoever wrote it (also for writers on other hosts sharing the cache).
STALE_S = 24 * 3600
# The `datasets` library's own partial files (tempfiles of Dataset.map, *.incomplete builder folders) carry no owner;
# a live writer touches them every batch, so one idle this long is a leftover.
IDLE_S = 3600
# The folders of a cache root that lit_llm writes (and sweeps).
_FOLDERS = ("pretrain", "tokenizers", "quality", "downloads", "extracted", "content", "datasets")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


# ---- log lines -------------------------------------------------------------------------------------------------------

def _info(message: str) -> None:
    from pytorch_lightning.utilities import rank_zero_info

    rank_zero_info(message)


def reused(what: str, path: Path | str, why: str) -> None:
    """Log that the cache entry ``path`` of ``what`` is reused, and the key it matched."""
    _info(f"Cache: reusing {what} from {path} ({why})")


def building(what: str, path: Path | str, why: str) -> None:
    """Log that ``what`` is built into ``path`` because no entry matched."""
    _info(f"Cache: building {what} in {path} ({why})")


# ---- content digests -------------------------------------------------------------------------------------------------

def _signature(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _guess_encoding(head: bytes) -> tuple[str, str]:
    """What a file that is not UTF-8 probably is: (a description, its name for ``iconv``)."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16 (it starts with a UTF-16 byte-order mark)", "UTF-16"
    if head.count(0) > len(head) // 4:
        return "UTF-16 (every other byte is zero)", "UTF-16LE" if head[1:2] == b"\0" else "UTF-16BE"
    return "Latin-1 / Windows-1252", "CP1252"


def _not_utf8(path: Path, key: str, offset: int, data: bytes, reason: str) -> DataError:
    with open(path, "rb") as f:
        looks, encoding = _guess_encoding(f.read(4096))
    converted = path.with_name(f"{path.stem}.utf8{path.suffix}")
    return DataError(
        f"{key}: {path} is not UTF-8 text: byte {offset} ({data!r}) is {reason}; it looks like {looks}. Convert it "
        f"to UTF-8, e.g. `iconv -f {encoding} -t UTF-8 {path} > {converted}`, and read the converted file."
    )


def _complete(data: bytes) -> int:
    """The length of ``data`` without a multi-byte UTF-8 character cut off at its end (it goes with the next
    block)."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        byte = data[n - back]
        if byte & 0xC0 == 0x80:  # a continuation byte: look further back for the lead byte
            continue
        # The lead byte says the character's length (an invalid one counts as 1: the check reports it).
        need = 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4 if byte >> 3 == 0b11110 else 1
        return n if back >= need else n - back
    return n


def _is_utf8(data: bytes) -> bool:
    """Arrow's UTF-8 validation of ``data`` as one string, without copying it (several times faster than decoding)."""
    offsets = pa.py_buffer(struct.pack("<ii", 0, len(data)))
    try:
        pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(data)]).validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _hash_file(path: Path, key: str, utf8: bool) -> str:
    digest = xxhash.xxh3_128()
    offset, carry = 0, b""  # bytes checked so far; the start of a character cut off at the end of the last block
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
            if utf8:
                data = carry + block if carry else block
                cut = _complete(data)
                if not _is_utf8(data[:cut]):
                    try:
                        data[:cut].decode("utf-8")
                    except UnicodeDecodeError as err:  # where, and why, in Python's words
                        raise _not_utf8(path, key, offset + err.start, data[err.start:err.start + 8],
                                        err.reason) from None
                offset, carry = offset + cut, data[cut:]
    if carry:
        try:
            carry.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _not_utf8(path, key, offset + err.start, carry[err.start:], err.reason) from None
    return digest.hexdigest()


def file_digest(path: Path, *, record_dir: Path | None = None, key: str = "data.source", utf8: bool = False) -> str:
    """The xxHash-128 of a file's bytes, read in full unless a record of the same file still matches.

    Args:
        path: The file.
        record_dir: Where digests are recorded (``<cache>/content``); ``None`` reads the file every time.
        key: The config key named in errors.
        utf8: Also check that the file is UTF-8 text (in the same pass).

    Raises:
        DataError: ``utf8`` and the file is not UTF-8 (the message names the byte offset and how to convert it).
    """
    path = Path(path)
    st = path.stat()
    record = None
    if record_dir is not None:
        name = xxhash.xxh3_64_hexdigest(str(path.resolve()).encode("utf-8", "surrogateescape"))
        record = record_dir / f"{name}.json"
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            saved = json.loads(record.read_text(encoding="utf-8"))
            if saved["signature"] == _signature(st) and (saved["utf8"] or not utf8):
                return str(saved["digest"])
    started = time.time_ns()
    digest = _hash_file(path, key, utf8)
    after = path.stat()
    if record is not None and _signature(after) == _signature(st) and started - st.st_ctime_ns > RACY_NS:
        with contextlib.suppress(OSError):
            write_atomic(record, json.dumps({"path": str(path), "signature": _signature(st), "digest": digest,
                                             "utf8": utf8}))
    return digest


def files_digest(files: Iterable[Path], *, cache_dir: Path | None = None, key: str = "data.source",
                 utf8: bool = False) -> str:
    """One digest of several files' contents, in order (see :func:`file_digest`); names do not count."""
    record_dir = cache_dir / "content" if cache_dir is not None else None
    digest = xxhash.xxh3_128()
    for path in files:
        digest.update(file_digest(path, record_dir=record_dir, key=key, utf8=utf8).encode() + b"\0")
    return digest.hexdigest()


# ---- writing ---------------------------------------------------------------------------------------------------------

def partial_path(path: Path) -> Path:
    """The name ``path`` is written under until it is complete: ``<name>.<host>-<pid>.tmp``, so that :func:`sweep`
    can tell whether its writer is still running."""
    return path.with_name(f"{path.name}.{_host()}-{os.getpid()}.tmp")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`partial_path` and a rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_OURS = re.compile(r"^.+\.(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)\.tmp$")
# Names earlier versions used: <name>.<pid>.tmp, <stem>.<pid>.tmp.npy, <name>.<pid>.tmp.bin
_EARLIER = re.compile(r"^.+\.(?P<pid>\d+)\.tmp(\.npy|\.bin)?$")
_DATASETS_TMP = re.compile(r"^tmp[a-z0-9_]{8}$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _last_write(path: Path) -> float:
    if path.is_dir():
        return max((p.stat().st_mtime for p in path.rglob("*")), default=path.stat().st_mtime)
    return path.stat().st_mtime


def _stale_reason(path: Path, now: float) -> str | None:
    """Why ``path`` is a partial file nobody is writing any more, or None (not a partial file, or a live writer's)."""
    age = now - _last_write(path)
    match = _OURS.match(path.name) or _EARLIER.match(path.name)
    if match is not None:
        host = match.groupdict().get("host") or _host()
        pid = int(match["pid"])
        if host == _host() and pid != os.getpid() and not _alive(pid):
            return f"its writer, process {pid}, is gone"
        if age > STALE_S:
            return f"untouched for {age / 3600:.0f} hours"
        return None
    in_datasets = "datasets" in path.parts
    if in_datasets and (_DATASETS_TMP.match(path.name) or path.name.endswith(".incomplete")) and age > IDLE_S:
        return f"a partial file of the datasets library untouched for {age / 60:.0f} minutes"
    if path.suffix == ".part" and age > STALE_S:  # downloads and extractions of earlier versions
        return f"untouched for {age / 3600:.0f} hours"
    return None


def _candidates(root: Path) -> Iterator[Path]:
    for folder in _FOLDERS:
        base = root / folder
        if not base.is_dir():
            continue
        stack = [base]
        while stack:
            directory = stack.pop()
            with contextlib.suppress(OSError):
                for entry in directory.iterdir():
                    name = entry.name
                    if ".tmp" in name or name.endswith((".part", ".incomplete")) or _DATASETS_TMP.match(name):
                        yield entry
                    elif entry.is_dir() and not entry.is_symlink():
                        stack.append(entry)


def sweep(root: Path) -> list[Path]:
    """Remove the partial files of cache writes that did not finish (their writer was killed); return them.

    A partial file is removed when its writer is a process of this host that no longer runs, or when nobody has
    written to it for a day (``datasets``' own partial files, which name no writer: an hour). A live writer's file,
    here or on another host sharing the cache, is left alone.
    """
    removed = []
    now = time.time()
    for path in _candidates(root):
        try:
            reason = _stale_reason(path, now)
            if reason is None:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue  # removed meanwhile (its writer finished, or another run swept it)
        except OSError:
            continue  # not ours to remove (permissions): harmless
        removed.append(path)
        _info(f"Cache: removed {path}, a partial file of a write that did not finish ({reason})")
    return removed


_checked: set[Path] = set()


def prepare(root: Path) -> None:
    """Once per process and cache root: check that it can be written, and sweep it (:func:`sweep`)."""
    root = Path(root).expanduser()
    if root in _checked:
        return
    check_writable(root)
    sweep(root)
    _checked.add(root)


def check_writable(root: Path) -> None:
    """Raise a :class:`StorageError` naming the cache folder (and how to choose another) when it cannot be written."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        if isinstance(err, (FileExistsError, NotADirectoryError)):
            reason = f"{err.filename or root} is a file, not a folder"
        raise StorageError(
            f"the cache folder {root} cannot be written ({reason}); lit_llm keeps downloads, tokenized data and "
            "trained tokenizers there. Set data.cache_dir (or the LIT_LLM_CACHE environment variable) to a writable "
            "folder."
        ) from err
