"""Turn one ``source`` string into a Hugging Face dataset, the same way for every DataModule.

Accepted forms (also as a list of local paths):

- ``builtin:<name>``: a corpus shipped with Python (see ``lit_llm.data.builtin``), works offline.
- ``https://...`` / ``http://...``: downloaded once into ``<cache_dir>/downloads/`` and verified
  against a required SHA-256; then read like a local file (zip archives are extracted).
- ``hf:<dataset>`` or ``hf:<dataset>:<config>``: ``datasets.load_dataset`` (Hub or its cache).
- a local file, directory (supported files inside, recursively, sorted), or glob.
  ``.txt``/``.md``/``.text``: one document per file; ``.json``/``.jsonl``, ``.csv``, ``.tsv``,
  ``.parquet``: one record per row.

Three options of :func:`load_records` read files that the extension alone does not describe: ``file_format`` (read
every file as ``csv``/``tsv``/``json``/``jsonl``/``parquet``/``text`` whatever its name), ``column_names`` (a
CSV/TSV file without a header row: its columns' names, and the first row is data), and ``archive_member`` (read one
file of a zip archive, by its path inside the archive or its unique base name, e.g. the SMS Spam Collection's
``SMSSpamCollection``).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import datasets

from lit_llm.data import cache
from lit_llm.data.builtin import load_builtin
from lit_llm.errors import ConfigError, DataError, StorageError

Records = datasets.Dataset | datasets.IterableDataset

# File extension -> (datasets builder, extra builder kwargs).
_FILE_TYPES: dict[str, tuple[str, dict]] = {
    ".txt": ("text", {"sample_by": "document"}),
    ".md": ("text", {"sample_by": "document"}),
    ".text": ("text", {"sample_by": "document"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".parquet": ("parquet", {}),
}
_ARCHIVES = (".zip",)
FileFormat = Literal["text", "json", "jsonl", "csv", "tsv", "parquet"]
# data.file_format -> the extension whose reader it selects.
_FORMAT_SUFFIX: dict[str, str] = {
    "text": ".txt", "json": ".json", "jsonl": ".jsonl", "csv": ".csv", "tsv": ".tsv", "parquet": ".parquet",
}
_FORMS = (
    "builtin:<name> (e.g. builtin:pydoc), an https:// URL with data.sha256, hf:<dataset>[:<config>], "
    "or a local file / directory / glob / list of them (.txt .md .text .json .jsonl .csv .tsv .parquet, .zip)"
)
_CHUNK = 1 << 20
# A damaged zip archive: bad headers (BadZipFile, EOFError, ValueError, OSError from a seek to a negative offset), an
# unknown compression method (NotImplementedError), an "encrypted" flag (RuntimeError), corrupt deflate data
# (zlib.error), an undecodable (UnicodeDecodeError) or empty (IndexError) member name.
_BAD_ARCHIVE = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, NotImplementedError, RuntimeError,
                IndexError)


def default_cache_dir() -> Path:
    """The cache root: ``$LIT_LLM_CACHE`` or ``~/.cache/lit_llm``."""
    return Path(os.environ.get("LIT_LLM_CACHE", "~/.cache/lit_llm")).expanduser()


def _sibling(key: str, name: str) -> str:
    # "data.source" -> "data.sha256": errors name the key the user actually sets.
    prefix, dot, _ = key.rpartition(".")
    return f"{prefix}{dot}{name}"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _check_sha256(sha256: str | None, url: str, key: str) -> str:
    sha_key = _sibling(key, "sha256")
    if not sha256:
        raise ConfigError(
            f"{sha_key} is required for URL sources ({url}): every download is verified. Download the file once, "
            f"compute it with `sha256sum FILE`, and set {sha_key}: <64 hex digits>."
        )
    sha256 = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ConfigError(f"{sha_key}={sha256!r} is not a SHA-256 hex digest (64 hex digits from `sha256sum FILE`).")
    return sha256


def download(url: str, sha256: str | None, cache_dir: str | Path | None = None, *, key: str = "data.source") -> Path:
    """Download ``url`` once into ``<cache_dir>/downloads/`` and verify its SHA-256.

    The file is written to a temporary name, verified, then renamed, so a file under its final
    name is always complete and verified; later calls return it without touching the network.

    Args:
        url: An ``http://`` or ``https://`` URL.
        sha256: The expected SHA-256 hex digest (required).
        cache_dir: Cache root; defaults to ``default_cache_dir()``.
        key: The config key named in error messages.

    Returns:
        The path of the verified file.

    Raises:
        ConfigError: ``sha256`` is missing or malformed.
        DataError: The download failed or the hash does not match.
    """
    sha256 = _check_sha256(sha256, url, key)
    base = os.path.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path)) or "download"
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base)
    url_tag = hashlib.sha256(url.encode("utf-8")).hexdigest()[:8]
    dest = Path(cache_dir or default_cache_dir()).expanduser() / "downloads" / f"{url_tag}-{sha256[:12]}-{base}"
    if dest.is_file():
        if _file_sha256(dest) == sha256:  # checked again: a file in the cache is outside input too
            cache.reused(f"the download of {url}", dest, f"sha256 {sha256[:12]}... matched")
            return dest
        dest.unlink()
        cache.building(f"the download of {url}", dest, "the cached file no longer matches its sha256")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.partial_path(dest)
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            while block := response.read(_CHUNK):
                digest.update(block)
                out.write(block)
    except (urllib.error.URLError, OSError) as err:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"{key}: could not download {url}: {err}. Check the URL and the network, or download the file "
            f"yourself and set {key} to its local path."
        ) from err
    actual = digest.hexdigest()
    if actual != sha256:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"{key}: SHA-256 mismatch for {url}: expected {sha256}, got {actual}. The file was not kept. "
            f"If the file changed on purpose, set {_sibling(key, 'sha256')} to the new hash."
        )
    os.replace(tmp, dest)
    return dest


def _extract(archive: Path, cache_dir: Path, key: str = "data.source") -> Path:
    tag = cache.files_digest([archive], cache_dir=cache_dir)[:16]  # by content: a replaced archive is extracted anew
    dest = cache_dir / "extracted" / f"{archive.stem}-{tag}"
    if dest.is_dir():
        cache.reused(f"the files of {archive}", dest, f"content xxh3:{tag}")
        return dest
    cache.building(f"the files of {archive}", dest, f"no entry for content xxh3:{tag}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.partial_path(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)  # extractall drops absolute paths and ".." components
        os.replace(tmp, dest)
    except _BAD_ARCHIVE as err:  # what zipfile raises on a damaged archive besides BadZipFile (found by fuzzing)
        raise DataError(f"{key}: {archive} is not a valid zip archive ({type(err).__name__}: {err}); download it "
                        f"again, or extract it yourself and point {key} at the files") from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _visible(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return not any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _expand_dir(directory: Path, cache_dir: Path, key: str = "data.source") -> list[Path]:
    found: list[Path] = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and _visible(p, directory)):
        suffix = path.suffix.lower()
        if suffix in _ARCHIVES:
            found.extend(_expand_dir(_extract(path, cache_dir, key), cache_dir, key))
        elif suffix in _FILE_TYPES:
            found.append(path)
    return found


def _expand_existing(path: Path, cache_dir: Path, key: str) -> list[Path]:
    if path.is_dir():
        files = _expand_dir(path, cache_dir, key)
        if not files:
            raise DataError(
                f"{key}: the directory {path} holds no supported files ({' '.join(sorted(_FILE_TYPES))} .zip)."
            )
        return files
    if path.suffix.lower() in _ARCHIVES:
        root = _extract(path, cache_dir, key)
        files = _expand_dir(root, cache_dir, key)
        if not files:
            raise DataError(
                f"{key}: the archive {path.name} holds no file with a supported extension "
                f"({' '.join(sorted(_FILE_TYPES))}); members found: {_members(root)}. Choose one with "
                f"{_sibling(key, 'archive_member')} and say how to read it with {_sibling(key, 'file_format')}."
            )
        return files
    return [path]


def _members(root: Path) -> list[str]:
    """The files of an extracted archive, as paths inside it."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and _visible(p, root))


def _expand_local(spec: str | Path, cache_dir: Path, key: str) -> list[Path]:
    text = os.path.expanduser(str(spec))
    path = Path(text)
    if path.exists():
        return _expand_existing(path, cache_dir, key)
    if glob.has_magic(text):
        matches = sorted(glob.glob(text, recursive=True))
        if not matches:
            raise DataError(f"{key}: the glob {text!r} matches no files (cwd: {Path.cwd()}).")
        return [f for m in matches for f in _expand_existing(Path(m), cache_dir, key)]
    hint = ""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(spec)):
        hint = f" Did you mean hf:{spec}?"
    raise DataError(f"{key}: {str(spec)!r} does not exist (cwd: {Path.cwd()}). Accepted forms: {_FORMS}.{hint}")


def _archive_member(archive: Path, member: str, cache_dir: Path, key: str) -> Path:
    """The file ``member`` of a zip archive: its path inside the archive, or a base name that only one file has."""
    member_key = _sibling(key, "archive_member")
    if archive.suffix.lower() not in _ARCHIVES:
        raise ConfigError(
            f"{member_key}={member!r} is set but {key} ({archive}) is not a .zip archive; "
            f"remove {member_key} or point {key} at the archive."
        )
    root = _extract(archive, cache_dir, key)
    members = _members(root)
    wanted = member.strip("/")
    matches = [m for m in members if m == wanted] or [m for m in members if m.rsplit("/", 1)[-1] == wanted]
    if len(matches) != 1:
        problem = "has no member" if not matches else "has several members named"
        raise DataError(
            f"{key}: the archive {archive.name} {problem} {member!r} ({member_key}); members found: {members}. "
            f"Set {member_key} to one of them (its path inside the archive)."
        )
    return root / matches[0]


def _file_type(path: Path, key: str, file_format: str | None = None) -> str:
    if file_format is not None:
        return file_format
    suffix = path.suffix.lower()
    if suffix not in _FILE_TYPES:
        raise DataError(
            f"{key}: cannot tell how to read {path} from its extension {suffix!r}; "
            f"supported: {' '.join(sorted(_FILE_TYPES))} (and .zip archives of them). If the file is one of these "
            f"formats under another name, set {_sibling(key, 'file_format')} to one of {', '.join(_FORMAT_SUFFIX)}."
        )
    return "tsv" if suffix == ".tsv" else _FILE_TYPES[suffix][0]


def _load_files(
    files: list[Path],
    *,
    cache_dir: Path,
    streaming: bool,
    key: str,
    sha256: str | None = None,
    file_format: str | None = None,
    column_names: list[str] | None = None,
) -> Records:
    if not files:  # e.g. an archive with no file of a known type
        raise DataError(f"{key}: no file to read; supported: {' '.join(sorted(_FILE_TYPES))} (and .zip archives).")
    kinds = {_file_type(f, key, file_format) for f in files}
    if column_names is not None and not kinds <= {"csv", "tsv"}:
        raise ConfigError(
            f"{_sibling(key, 'column_names')} names the columns of CSV/TSV files without a header row, but {key} "
            f"holds {sorted(kinds)} files; remove it (other formats name their columns themselves)."
        )
    if len(kinds) > 1:
        examples = {k: next(str(f) for f in files if _file_type(f, key) == k) for k in sorted(kinds)}
        raise DataError(
            f"{key}: mixes file types {sorted(kinds)} (e.g. {examples}); one source must hold one type. "
            "Convert the files to one format or point at one kind of file with a glob."
        )
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"{key}: {f} is empty; remove it from the source or add text to it.")
    if sha256 is not None:
        if len(files) == 1:
            actual = _file_sha256(files[0])
            if actual != sha256.strip().lower():
                raise DataError(f"{key}: SHA-256 mismatch for {files[0]}: expected {sha256}, got {actual}.")
        else:
            warnings.warn(
                f"{_sibling(key, 'sha256')} is only checked for URLs and single files; ignored for {len(files)} files.",
                stacklevel=3,
            )
    suffix = _FORMAT_SUFFIX[file_format] if file_format is not None else files[0].suffix.lower()
    builder, kwargs = _FILE_TYPES[suffix]
    if column_names is not None:
        # The first row is data, not a header.
        kwargs = {**kwargs, "column_names": list(column_names), "header": None}
    if builder == "json":
        for f in files:
            _check_json_start(f, key)
    # The files' content names the `datasets` config, so its arrow cache and fingerprint (and every cache keyed by
    # them) change when the text does, even under the same names, sizes and modification times.
    digest = cache.files_digest(files, cache_dir=cache_dir, key=key, utf8=builder != "parquet")
    where = str(files[0]) if len(files) == 1 else f"{len(files)} files ({files[0]}, ...)"
    try:
        with local_only():
            reader = datasets.load_dataset_builder(builder, f"{CONTENT_PREFIX}{digest}",
                                                   data_files=[str(f) for f in files],
                                                   cache_dir=str(cache_dir / "datasets"), **kwargs)
            if streaming:
                ds = reader.as_streaming_dataset(split="train")
            else:
                cached = Path(reader.cache_dir, "dataset_info.json").is_file()
                if cached:
                    cache.reused(f"{key} records", reader.cache_dir, f"content xxh3:{digest}")
                else:
                    cache.building(f"{key} records", reader.cache_dir, f"no entry for content xxh3:{digest}")
                reader.download_and_prepare()
                ds = reader.as_dataset(split="train")
    except Exception as err:  # builders raise many types (ArrowInvalid, DatasetGenerationError, ...)
        from lit_llm.diagnose import diagnose

        if isinstance(storage := diagnose(err), StorageError):  # the cache's disk, not the corpus
            raise storage from err
        read_as = f"{builder} with column_names={list(column_names)}" if column_names is not None else builder
        raise DataError(f"{key}: could not read {where} as {read_as}: {type(err).__name__}: {err}") from err
    if not streaming and len(ds) == 0:
        raise DataError(f"{key}: {files[0] if len(files) == 1 else files} holds no records; add data.")
    return ds


#: The start of the ``datasets`` config name of local files: ``content-<xxh3-128 of their bytes>``.
CONTENT_PREFIX = "content-"


def content_id(ds: Records) -> str | None:
    """What identifies a loaded dataset's content, for cache keys.

    A map-style dataset's ``datasets`` fingerprint (for local files it derives from their content, see
    :data:`CONTENT_PREFIX`); for a stream of local files, their content digest; ``None`` for other streams (an ``hf:``
    stream is known by its name only).
    """
    fingerprint = getattr(ds, "_fingerprint", None)
    if isinstance(ds, datasets.Dataset) and isinstance(fingerprint, str):
        return fingerprint
    name = ds.info.config_name if ds.info is not None else None
    return name if isinstance(name, str) and name.startswith(CONTENT_PREFIX) else None


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """``datasets`` reading local files touches no network: no download counter, no Hub lookup.

    ``load_dataset`` / ``load_dataset_builder`` send a request to count the use of a packaged builder ("text", "json",
    ...) even for local files; its settings (``datasets.config``, read from ``HF_UPDATE_DOWNLOAD_COUNTS`` and
    ``HF_HUB_OFFLINE`` at import) are switched off while local files are read, and restored after.
    """
    saved = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS, datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS, datasets.config.HF_HUB_OFFLINE = False, True
    try:
        yield
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS, datasets.config.HF_HUB_OFFLINE = saved


def _check_json_start(path: Path, key: str) -> None:
    """Refuse a JSON / JSON Lines file that does not start with an object or an array.

    A records file always does; and pyarrow's JSON reader (26.x) crashes the whole process (a segmentation fault, no
    exception) when a file's first JSON value is ``null``, so such a file must never reach it.
    """
    with open(path, "rb") as f:
        head = f.read(64).lstrip(b" \t\r\n")
    if head.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
        head = head[3:].lstrip(b" \t\r\n")
    if head and head[:1] not in (b"{", b"["):
        raise DataError(f"{key}: {path} does not start with a JSON object or array (it starts with {head[:16]!r}); "
                        "write one object per line (JSON Lines) or one array of objects (JSON).")


def _load_hf(spec: str, *, hf_split: str, streaming: bool, key: str) -> Records:
    name, _, config = spec.partition(":")
    if not name:
        raise ConfigError(f"{key}: {('hf:' + spec)!r} names no dataset; write hf:<dataset> or hf:<dataset>:<config>.")
    try:
        return datasets.load_dataset(name, config or None, split=hf_split, streaming=streaming)
    except Exception as err:  # network, offline mode, unknown name/config/split all land here
        raise DataError(
            f"{key}: could not load the Hugging Face dataset {name!r} (config {config or None!r}, split "
            f"{hf_split!r}; {_sibling(key, 'hf_split')} picks the split): {type(err).__name__}: {err}. Check the name "
            "and the network (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE must be unset to download), or download the "
            f"data and set {key} to the local files."
        ) from err


def load_records(
    source: str | Sequence[str],
    *,
    sha256: str | None = None,
    cache_dir: str | Path | None = None,
    hf_split: str = "train",
    streaming: bool = False,
    key: str = "data.source",
    file_format: FileFormat | None = None,
    column_names: Sequence[str] | None = None,
    archive_member: str | None = None,
) -> Records:
    """Load a source with all of its columns.

    Args:
        source: See the module docstring for the accepted forms.
        sha256: Expected SHA-256 of a URL source (required for URLs; checked for a single local file).
        cache_dir: Cache root for downloads, extracted archives and arrow files; defaults to
            ``$LIT_LLM_CACHE`` or ``~/.cache/lit_llm``. ``hf:`` sources use Hugging Face's own cache.
        hf_split: The split of an ``hf:`` dataset.
        streaming: Return an ``IterableDataset`` that reads lazily.
        key: The config key named in error messages.
        file_format: Read every file as this format (``csv``, ``tsv``, ``json``, ``jsonl``, ``parquet`` or
            ``text``) instead of deciding by its extension; for files named without one (``SMSSpamCollection``).
        column_names: The columns of CSV/TSV files that have no header row; the first row is then read as data.
        archive_member: Read only this file of a zip archive source (local or URL): its path inside the archive,
            or its base name when no other member has it. The error lists the members when it is not found.

    Returns:
        A dataset with one record per row.

    Raises:
        ConfigError: The source is malformed (e.g. a URL without ``sha256``), or an option does not apply to it.
        DataError: The source is missing, empty, unreadable or failed to download, or the archive member is not in
            the archive.
    """
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache.prepare(cache_root)  # writable, and no partial files of killed runs left in it
    if isinstance(source, (str, Path)):
        specs = [str(source)]
    else:
        specs = [str(s) for s in source]
    if not specs or any(not s.strip() for s in specs):
        raise ConfigError(f"{key} is empty; give one of: {_FORMS}.")
    names = _check_file_options(specs, key, file_format, column_names, archive_member)
    read = {"cache_dir": cache_root, "streaming": streaming, "key": key, "file_format": file_format,
            "column_names": names}
    if len(specs) == 1:
        spec = specs[0]
        if spec.startswith("builtin:"):
            ds = load_builtin(spec.removeprefix("builtin:"), key=key)
            if not streaming:
                return ds
            stream = ds.to_iterable_dataset()
            stream.info.config_name = f"{CONTENT_PREFIX}{ds._fingerprint}"  # the fingerprint hashes the content
            return stream
        if spec.startswith("hf:"):
            return _load_hf(spec.removeprefix("hf:"), hf_split=hf_split, streaming=streaming, key=key)
        if spec.startswith(("http://", "https://")):
            path = download(spec, sha256, cache_root, key=key)
            if archive_member is not None:
                return _load_files([_archive_member(path, archive_member, cache_root, key)], **read)
            return _load_files(_expand_local(path, cache_root, key), **read)
        if archive_member is not None:
            path = Path(spec).expanduser()
            if not path.is_file():
                _expand_local(spec, cache_root, key)  # raises the usual "does not exist" message
            return _load_files([_archive_member(path, archive_member, cache_root, key)], sha256=sha256, **read)
    elif any(s.startswith(("builtin:", "hf:", "http://", "https://")) for s in specs):
        raise ConfigError(f"{key}: a list may hold only local paths or globs; got {specs}. Use one remote source.")
    files: list[Path] = []
    seen: set[Path] = set()
    for spec in specs:
        for f in _expand_local(spec, cache_root, key):
            if f.resolve() not in seen:  # overlapping globs/directories must not duplicate documents
                seen.add(f.resolve())
                files.append(f)
    return _load_files(files, sha256=sha256, **read)


def _check_file_options(
    specs: list[str],
    key: str,
    file_format: str | None,
    column_names: Sequence[str] | None,
    archive_member: str | None,
) -> list[str] | None:
    """Refuse file options that cannot apply; return ``column_names`` as a list (or None)."""
    problems = []
    remote = [s for s in specs if s.startswith(("builtin:", "hf:"))]
    given = [name for name, value in (("file_format", file_format), ("column_names", column_names),
                                       ("archive_member", archive_member)) if value is not None]
    if remote and given:
        problems.append(f"{', '.join(_sibling(key, g) for g in given)} apply to files and URLs, not to {remote[0]}; "
                        "remove them")
    if file_format is not None and file_format not in _FORMAT_SUFFIX:
        problems.append(f"{_sibling(key, 'file_format')}={file_format!r} is not one of {', '.join(_FORMAT_SUFFIX)}")
    names = None
    if column_names is not None:
        names = [str(c) for c in ([column_names] if isinstance(column_names, str) else column_names)]
        if not names or any(not c.strip() for c in names) or len(set(names)) != len(names):
            problems.append(f"{_sibling(key, 'column_names')}={names} must be distinct, non-empty column names, "
                            "one per column of the file (e.g. [label, text])")
    if archive_member is not None and (len(specs) != 1 or not archive_member.strip()):
        problems.append(f"{_sibling(key, 'archive_member')}={archive_member!r} needs one archive as {key} "
                        f"(got {specs}) and a non-empty member name")
    if problems:
        raise ConfigError(f"invalid {key} options:\n  - " + "\n  - ".join(problems))
    return names


def load_documents(
    source: str | Sequence[str],
    *,
    text_column: str = "text",
    sha256: str | None = None,
    cache_dir: str | Path | None = None,
    hf_split: str = "train",
    streaming: bool = False,
    key: str = "data.source",
    file_format: FileFormat | None = None,
    column_names: Sequence[str] | None = None,
    archive_member: str | None = None,
) -> Records:
    """Load a source as documents: a dataset whose only column, ``text``, holds one document per row.

    Args:
        source: See the module docstring for the accepted forms.
        text_column: The column that holds the text (renamed to ``text``; other columns dropped).
        sha256: Expected SHA-256 of a URL source.
        cache_dir: Cache root; see ``load_records``.
        hf_split: The split of an ``hf:`` dataset.
        streaming: Return an ``IterableDataset``.
        key: The config key named in error messages.
        file_format: See ``load_records``.
        column_names: See ``load_records``.
        archive_member: See ``load_records``.

    Returns:
        The documents.

    Raises:
        ConfigError: See ``load_records``.
        DataError: See ``load_records``; also when ``text_column`` is missing or not text.
    """
    ds = load_records(source, sha256=sha256, cache_dir=cache_dir, hf_split=hf_split, streaming=streaming, key=key,
                      file_format=file_format, column_names=column_names, archive_member=archive_member)
    column_key = _sibling(key, "text_column")
    columns = ds.column_names
    if columns is not None:  # unknown for some streaming datasets until read
        if text_column not in columns:
            raise DataError(
                f"{column_key}={text_column!r} is not a column of {source}; columns found: {columns}. "
                f"Set {column_key} to the column that holds the text."
            )
        feature = ds.features[text_column] if ds.features is not None else None
        if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise DataError(
                f"{column_key}={text_column!r} in {source} holds {feature}, not text; "
                f"set {column_key} to a string column (columns: {columns})."
            )
    ds = ds.select_columns([text_column])
    return ds if text_column == "text" else ds.rename_column(text_column, "text")
