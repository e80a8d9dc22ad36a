"""lit_llm.data.sources: every source form, downloads with checksums, and the errors users see."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest

from lit_llm.data import load_documents
from lit_llm.data.builtin import available_builtins
from lit_llm.data.sources import load_records
from lit_llm.errors import ConfigError, DataError


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub offline mode. The libraries read the env vars at import, so patch their constants too."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def _texts(ds: datasets.Dataset) -> list[str]:
    assert ds.column_names == ["text"]
    return list(ds["text"])


def test_builtin_pydoc_is_real_deterministic_text(tmp_path: Path) -> None:
    a = load_records("builtin:pydoc", cache_dir=tmp_path)
    b = load_documents("builtin:pydoc", cache_dir=tmp_path)
    assert len(a) == len(b) >= 50
    assert list(a["title"]) == sorted(a["title"])
    assert sum(len(t) for t in b["text"]) > 300_000
    assert "assert" in " ".join(b["text"][:3])
    assert a._fingerprint == load_records("builtin:pydoc", cache_dir=tmp_path)._fingerprint


def test_unknown_builtin_lists_available(tmp_path: Path) -> None:
    assert "pydoc" in available_builtins()
    with pytest.raises(DataError, match="unknown builtin.*builtin:nope.*builtin:pydoc"):
        load_documents("builtin:nope", cache_dir=tmp_path)


def test_text_files_one_document_each(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("second\n\nfile ☃\n", encoding="utf-8")
    (root / "a.md").write_text("first", encoding="utf-8")
    (root / "sub" / "c.text").write_text("third", encoding="utf-8")
    (root / ".hidden.txt").write_text("hidden", encoding="utf-8")
    (root / "notes.pdf").write_bytes(b"%PDF")  # unsupported files in a directory are skipped
    cache = tmp_path / "cache"
    assert _texts(load_documents(str(root), cache_dir=cache)) == ["first", "second\n\nfile ☃\n", "third"]
    assert _texts(load_documents(str(root / "b.txt"), cache_dir=cache)) == ["second\n\nfile ☃\n"]
    # A glob plus an overlapping path: sorted, each file once.
    docs = load_documents([str(root / "*.txt"), str(root / "b.txt"), str(root / "a.md")], cache_dir=cache)
    assert _texts(docs) == ["second\n\nfile ☃\n", "first"]
    assert _texts(load_documents(str(root / "**" / "*.text"), cache_dir=cache)) == ["third"]


def test_tabular_formats_and_text_column(tmp_path: Path) -> None:
    records = [{"body": "one", "id": 1}, {"body": "two", "id": 2}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "r.json").write_text(json.dumps(records))
    (tmp_path / "r.csv").write_text("id,body\n1,one\n2,two\n")
    (tmp_path / "r.tsv").write_text("id\tbody\n1\tone\n2\ttwo\n")
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "r.parquet"))
    for name in ("r.jsonl", "r.json", "r.csv", "r.tsv", "r.parquet"):
        path = str(tmp_path / name)
        assert _texts(load_documents(path, text_column="body", cache_dir=tmp_path / "c")) == ["one", "two"], name
        assert sorted(load_records(path, cache_dir=tmp_path / "c").column_names) == ["body", "id"]


def test_missing_text_column_lists_columns(tmp_path: Path) -> None:
    (tmp_path / "r.jsonl").write_text('{"body": "x", "id": 1}\n')
    with pytest.raises(DataError) as err:
        load_documents(str(tmp_path / "r.jsonl"), cache_dir=tmp_path / "c")
    assert "data.text_column='text'" in str(err.value) and "['body', 'id']" in str(err.value)
    with pytest.raises(DataError, match="not text"):
        load_documents(str(tmp_path / "r.jsonl"), text_column="id", cache_dir=tmp_path / "c")


def test_missing_path_names_path_cwd_and_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        load_documents("no/such/file.txt", cache_dir=tmp_path)
    msg = str(err.value)
    assert "no/such/file.txt" in msg and str(tmp_path) in msg and "builtin:" in msg and "hf:" in msg
    with pytest.raises(DataError, match="Did you mean hf:someone/corpus"):
        load_documents("someone/corpus", cache_dir=tmp_path, key="data.source")


def test_empty_and_mixed_and_unmatched(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt is empty"):
        load_documents(str(tmp_path / "empty.txt"), cache_dir=tmp_path / "c")
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(DataError, match="none.json"):
        load_documents(str(tmp_path / "none.json"), cache_dir=tmp_path / "c")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.jsonl").write_text('{"text": "b"}\n')
    with pytest.raises(DataError, match="mixes file types"):
        load_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="matches no files"):
        load_documents(str(tmp_path / "*.parquet"), cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="cannot tell how to read"):
        (tmp_path / "x.docx").write_text("x")
        load_documents(str(tmp_path / "x.docx"), cache_dir=tmp_path / "c")


def test_streaming_local_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    ds = load_documents(str(tmp_path), streaming=True, cache_dir=tmp_path / "c")
    assert isinstance(ds, datasets.IterableDataset)
    assert [r["text"] for r in ds] == ["alpha", "beta"]
    assert [r["text"] for r in load_documents("builtin:pydoc", streaming=True)][:1] == [
        load_documents("builtin:pydoc")[0]["text"]
    ]


def test_list_with_remote_source_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="only local paths"):
        load_documents([str(tmp_path), "builtin:pydoc"], cache_dir=tmp_path)


def test_hf_offline_fails_fast_with_fix(offline: None, tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_documents("hf:lit-llm-tests/no-such-dataset:cfg", cache_dir=tmp_path)
    msg = str(err.value)
    assert "'lit-llm-tests/no-such-dataset'" in msg and "'cfg'" in msg
    assert "HF_HUB_OFFLINE" in msg and "local files" in msg


# ---- URLs -----------------------------------------------------------------------------------------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """A local HTTP server over a temp directory: (base URL, served dir, paths requested)."""
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []

    class Counting(_Handler):
        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Counting, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root, requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_url_download_verified_and_cached(server: tuple[str, Path, list[str]], tmp_path: Path) -> None:
    base, root, requests = server
    data = "a downloaded document ✓\n".encode()
    (root / "doc.txt").write_bytes(data)
    cache = tmp_path / "cache"
    docs = load_documents(f"{base}/doc.txt", sha256=_sha(data), cache_dir=cache)
    assert _texts(docs) == [data.decode()]
    assert load_documents(f"{base}/doc.txt", sha256=_sha(data).upper(), cache_dir=cache)[0]["text"] == data.decode()
    assert requests == ["/doc.txt"]  # the second call used the cache
    assert [p.name.endswith("-doc.txt") for p in (cache / "downloads").iterdir()] == [True]


def test_url_bad_hash_keeps_nothing(server: tuple[str, Path, list[str]], tmp_path: Path) -> None:
    base, root, _ = server
    data = b"tampered"
    (root / "doc.txt").write_bytes(data)
    wrong = "0" * 64
    with pytest.raises(DataError) as err:
        load_documents(f"{base}/doc.txt", sha256=wrong, cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert f"{base}/doc.txt" in msg and wrong in msg and _sha(data) in msg
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []


def test_url_needs_sha256(server: tuple[str, Path, list[str]], tmp_path: Path) -> None:
    base, _, requests = server
    with pytest.raises(ConfigError, match=r"data.sha256 is required.*sha256sum FILE"):
        load_documents(f"{base}/doc.txt", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="not a SHA-256"):
        load_documents(f"{base}/doc.txt", sha256="abc", cache_dir=tmp_path)
    assert requests == []


def test_url_missing_file_and_zip(server: tuple[str, Path, list[str]], tmp_path: Path) -> None:
    base, root, _ = server
    with pytest.raises(DataError, match="could not download"):
        load_documents(f"{base}/missing.txt", sha256="0" * 64, cache_dir=tmp_path / "cache")
    with zipfile.ZipFile(root / "corpus.zip", "w") as zf:
        zf.writestr("corpus/b.txt", "bee")
        zf.writestr("corpus/a.txt", "ay")
        zf.writestr("__MACOSX/corpus/._a.txt", "junk")
    sha = _sha((root / "corpus.zip").read_bytes())
    assert _texts(load_documents(f"{base}/corpus.zip", sha256=sha, cache_dir=tmp_path / "cache")) == ["ay", "bee"]


# ---- files the extension does not describe: file_format, column_names, archive_member ---------------------------


def _spam_zip(path: Path) -> Path:
    """A zip laid out like the UCI SMS Spam Collection: an extension-less headerless TSV beside a readme."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("SMSSpamCollection", "ham\tOk lar... see you\nspam\tWIN a prize now, text 80082\nham\tOn my way\n")
        zf.writestr("readme", "SMS Spam Collection v.1\n")
    return path


def test_headerless_tsv_with_column_names(tmp_path: Path) -> None:
    (tmp_path / "sms.tsv").write_text("ham\tfirst text\nspam\tsecond, with a comma\n")
    ds = load_records(str(tmp_path / "sms.tsv"), column_names=["label", "text"], cache_dir=tmp_path / "c")
    assert ds.column_names == ["label", "text"]
    assert list(ds["label"]) == ["ham", "spam"] and list(ds["text"]) == ["first text", "second, with a comma"]
    # Without column_names the first row is taken as the header (the reason the option exists).
    assert load_records(str(tmp_path / "sms.tsv"), cache_dir=tmp_path / "c").column_names == ["ham", "first text"]
    docs = load_documents(str(tmp_path / "sms.tsv"), column_names=["label", "text"], cache_dir=tmp_path / "c")
    assert _texts(docs) == ["first text", "second, with a comma"]


def test_file_format_overrides_the_extension(tmp_path: Path) -> None:
    (tmp_path / "SMSSpamCollection").write_text("ham\tone\nspam\ttwo\n")
    with pytest.raises(DataError, match=r"extension ''.*data.file_format"):
        load_records(str(tmp_path / "SMSSpamCollection"), cache_dir=tmp_path / "c")
    ds = load_records(str(tmp_path / "SMSSpamCollection"), file_format="tsv", column_names=["label", "text"],
                      cache_dir=tmp_path / "c")
    assert list(ds["text"]) == ["one", "two"]
    (tmp_path / "rows.data").write_text('{"text": "a"}\n{"text": "b"}\n')
    assert _texts(load_documents(str(tmp_path / "rows.data"), file_format="jsonl", cache_dir=tmp_path / "c")) == [
        "a", "b"]


def test_file_option_mistakes_are_config_errors(tmp_path: Path) -> None:
    (tmp_path / "r.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ConfigError, match=r"data.column_names names the columns of CSV/TSV.*\['json'\]"):
        load_records(str(tmp_path / "r.jsonl"), column_names=["a"], cache_dir=tmp_path / "c")
    with pytest.raises(ConfigError) as err:
        load_records("builtin:reviews", file_format="xlsx", column_names=["a", "a"], cache_dir=tmp_path / "c")
    msg = str(err.value)  # every problem in one message
    assert "not to builtin:reviews" in msg and "'xlsx' is not one of" in msg and "must be distinct" in msg
    with pytest.raises(ConfigError, match=r"data.archive_member='x' is set but data.source .*r.jsonl.* not a .zip"):
        load_records(str(tmp_path / "r.jsonl"), archive_member="x", cache_dir=tmp_path / "c")


def test_archive_member_local_and_missing_member_lists_members(tmp_path: Path) -> None:
    archive = _spam_zip(tmp_path / "sms.zip")
    ds = load_records(str(archive), archive_member="SMSSpamCollection", file_format="tsv",
                      column_names=["label", "text"], cache_dir=tmp_path / "c")
    assert list(ds["label"]) == ["ham", "spam", "ham"] and ds[1]["text"] == "WIN a prize now, text 80082"
    with pytest.raises(DataError) as err:
        load_records(str(archive), archive_member="SMSSpam.tsv", file_format="tsv", cache_dir=tmp_path / "c")
    assert "has no member 'SMSSpam.tsv'" in str(err.value) and "['SMSSpamCollection', 'readme']" in str(err.value)
    # Without archive_member, an archive with no file of a known type names its members and both options.
    with pytest.raises(DataError) as err:
        load_records(str(archive), cache_dir=tmp_path / "c")
    msg = str(err.value)
    assert "['SMSSpamCollection', 'readme']" in msg and "data.archive_member" in msg and "data.file_format" in msg


def test_archive_member_by_path_and_ambiguous_base_name(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as zf:
        zf.writestr("a/data.csv", "text\nfrom a\n")
        zf.writestr("b/data.csv", "text\nfrom b\n")
    with pytest.raises(DataError, match="several members named 'data.csv'"):
        load_records(str(tmp_path / "two.zip"), archive_member="data.csv", cache_dir=tmp_path / "c")
    ds = load_records(str(tmp_path / "two.zip"), archive_member="b/data.csv", cache_dir=tmp_path / "c")
    assert list(ds["text"]) == ["from b"]


def test_url_zip_archive_member(server: tuple[str, Path, list[str]], tmp_path: Path) -> None:
    base, root, requests = server
    archive = _spam_zip(root / "sms+spam+collection.zip")
    sha = _sha(archive.read_bytes())
    options = dict(archive_member="SMSSpamCollection", file_format="tsv", column_names=["label", "text"])
    ds = load_records(f"{base}/sms+spam+collection.zip", sha256=sha, cache_dir=tmp_path / "c", **options)
    assert list(ds["text"]) == ["Ok lar... see you", "WIN a prize now, text 80082", "On my way"]
    with pytest.raises(DataError, match=r"members found: \['SMSSpamCollection', 'readme'\]"):
        load_records(f"{base}/sms+spam+collection.zip", sha256=sha, cache_dir=tmp_path / "c",
                     **{**options, "archive_member": "nope"})
    assert requests == ["/sms+spam+collection.zip"]  # downloaded once, then read from the cache
