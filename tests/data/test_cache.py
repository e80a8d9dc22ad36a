"""Caches are keyed by content: a corpus replaced under the same name, size and modification time is read and
tokenized anew (never a stale cache reused), each reuse or build says so in one log line, text that is not UTF-8 is
named with its byte offset, and partial files of killed writers are swept at the next start."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lit_llm.data import ClassifyDataModule, InstructDataModule, PretrainDataModule, cache
from lit_llm.data.quality import QualityConfig
from lit_llm.data.sources import load_documents, load_records
from lit_llm.data.tokenizer import train_bpe
from lit_llm.errors import DataError, StorageError

WORDS = ["river", "stone", "light", "cloud", "amber", "quiet", "north", "ember", "delta", "orbit"]


def _prose(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words)) + "."


def replace_keeping_stat(path: Path, data: bytes) -> None:
    """Write ``data`` over ``path`` and set its modification time back: same name, size and mtime."""
    before = path.stat()
    assert len(data) == before.st_size, "the replacement must have the same size"
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    tok = train_bpe([_prose(300, s) for s in range(20)], vocab_size=300)
    return str(tok.save(tmp_path_factory.mktemp("tok")))


def _pretrain(tmp_path: Path, source: Path, tokenizer: str, **kwargs: object) -> PretrainDataModule:
    dm = PretrainDataModule(source=str(source), tokenizer=tokenizer, context_length=8, batch_size=2,
                            cache_dir=str(tmp_path / "cache"), **kwargs)  # type: ignore[arg-type]
    dm.prepare_data()  # as the Trainer does, before setup
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("streaming", [False, True])
def test_a_replaced_corpus_is_tokenized_anew(streaming, tmp_path, tok_dir, caplog):
    """Same name, same size, same mtime, different words: the new tokens are used, and the log says it rebuilt."""
    corpus = tmp_path / "corpus.txt"
    old, new = "river stone " * 100, "cloud amber " * 100
    assert len(old) == len(new)
    corpus.write_text(old, encoding="utf-8")
    kwargs = {"split_by": "tokens", "streaming": streaming}
    with caplog.at_level(logging.INFO):
        first = _pretrain(tmp_path, corpus, tok_dir, **kwargs).train_dataset.ids.tolist()
        caplog.clear()
        again = _pretrain(tmp_path, corpus, tok_dir, **kwargs)
    assert again.train_dataset.ids.tolist() == first
    assert "Cache: reusing the token arrays" in caplog.text and "Cache: building" not in caplog.text
    caplog.clear()
    replace_keeping_stat(corpus, new.encode())
    with caplog.at_level(logging.INFO):
        fresh = _pretrain(tmp_path, corpus, tok_dir, **kwargs).train_dataset.ids.tolist()
    tok = again.tokenizer
    assert fresh != first
    assert tok.decode(fresh).startswith("cloud amber cloud")
    assert "Cache: building the token arrays" in caplog.text and "Cache: reusing the token arrays" not in caplog.text


def test_a_replaced_corpus_trains_a_new_tokenizer_and_cleans_anew(tmp_path, caplog):
    """The trained BPE and the data-quality result are keyed by the corpus content too."""
    corpus = tmp_path / "corpus.txt"
    docs_a = "\n".join(["alpha beta gamma delta"] * 50)
    docs_b = "\n".join(["omega sigma kappa zeta"] * 50)
    assert len(docs_a) == len(docs_b)
    corpus.write_text(docs_a, encoding="utf-8")
    settings = {"tokenizer_vocab_size": 280, "quality": QualityConfig(exact=True, near={"enabled": False},
                                                                      filters={"enabled": False})}
    a = _pretrain(tmp_path, corpus, "train", val_split=0, **settings)
    vocab_a = set(a.tokenizer.to_json().split('"'))
    replace_keeping_stat(corpus, docs_b.encode())
    with caplog.at_level(logging.INFO):
        b = _pretrain(tmp_path, corpus, "train", val_split=0, **settings)
    vocab_b = set(b.tokenizer.to_json().split('"'))
    assert "omega" in b.tokenizer.decode(b.train_dataset.ids.tolist())
    assert any("sigma" in t for t in vocab_b - vocab_a)  # a BPE learned from the new text
    assert "Cache: building a trained tokenizer" in caplog.text
    assert "Cache: building the cleaned documents of data.source" in caplog.text


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_replaced_records_are_read_anew(suffix, tmp_path):
    """Classification and instruction records (json, csv) come from the same content-keyed reader."""
    path = tmp_path / f"records{suffix}"
    rows = [{"text": "good", "label": 1}, {"text": "bads", "label": 0}]
    swapped = [{"text": "okay", "label": 1}, {"text": "poor", "label": 0}]

    def dump(records: list[dict]) -> bytes:
        if suffix == ".json":
            return json.dumps(records).encode()
        return ("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in records)).encode()

    path.write_bytes(dump(rows))
    assert load_records(str(path), cache_dir=tmp_path / "cache").to_list() == rows
    replace_keeping_stat(path, dump(swapped))
    assert load_records(str(path), cache_dir=tmp_path / "cache").to_list() == swapped


def test_classify_and_instruct_modules_see_the_replaced_records(tmp_path, tok_dir):
    reviews = tmp_path / "reviews.csv"
    rows = [f"{_prose(6, i)},{i % 2}\n" for i in range(40)]
    reviews.write_text("text,label\n" + "".join(rows), encoding="utf-8")
    first = ClassifyDataModule(source=str(reviews), tokenizer=tok_dir, context_length=32, batch_size=2,
                               cache_dir=str(tmp_path / "cache"))
    first.setup("fit")
    flipped = "text,label\n" + "".join(r[:-2] + ("0" if r[-2] == "1" else "1") + "\n" for r in rows)
    replace_keeping_stat(reviews, flipped.encode())
    second = ClassifyDataModule(source=str(reviews), tokenizer=tok_dir, context_length=32, batch_size=2,
                                cache_dir=str(tmp_path / "cache"))
    second.setup("fit")
    assert second.datasets["train"].labels == [1 - x for x in first.datasets["train"].labels]

    tasks = tmp_path / "tasks.json"
    records = [{"instruction": f"Say {w}", "input": "", "output": w} for w in WORDS * 4]
    tasks.write_text(json.dumps(records), encoding="utf-8")
    dm = InstructDataModule(source=str(tasks), tokenizer=tok_dir, batch_size=2, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    before = sorted(r["output"] for r in dm.test_records)
    swapped = [{**r, "output": r["output"][::-1]} for r in records]
    replace_keeping_stat(tasks, json.dumps(swapped).encode())
    dm = InstructDataModule(source=str(tasks), tokenizer=tok_dir, batch_size=2, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    assert sorted(r["output"] for r in dm.test_records) == sorted(w[::-1] for w in before)


def test_a_recorded_digest_still_notices_a_replacement(tmp_path, monkeypatch):
    """The per-file record is reused only while size, mtime, ctime and inode match: writing the file moves its ctime,
    which os.utime cannot set back."""
    monkeypatch.setattr(cache, "RACY_NS", 0)  # record even a file written just now
    path = tmp_path / "a.txt"
    path.write_bytes(b"0123456789" * 100)
    records = tmp_path / "content"
    first = cache.file_digest(path, record_dir=records)
    assert len(list(records.glob("*.json"))) == 1

    def no_read(*args, **kwargs):
        raise AssertionError("read the file although its record matches")

    with monkeypatch.context() as m:
        m.setattr(cache, "_hash_file", no_read)
        assert cache.file_digest(path, record_dir=records) == first  # unchanged: the record is used
    time.sleep(0.02)  # more than one tick of the file clock
    replace_keeping_stat(path, b"9876543210" * 100)
    assert cache.file_digest(path, record_dir=records) != first


def test_a_digest_is_not_recorded_for_a_file_changed_within_the_clock_tick(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"fresh")
    cache.file_digest(path, record_dir=tmp_path / "content")
    assert not (tmp_path / "content").exists()  # written just now: read again next time


def test_a_replaced_zip_archive_is_extracted_anew(tmp_path):
    archive = tmp_path / "corpus.zip"

    def make(text: str) -> None:
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("a.txt", text)

    make("first words")
    assert load_documents(str(archive), cache_dir=tmp_path / "cache")["text"] == ["first words"]
    stat = archive.stat()
    make("other words")
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert load_documents(str(archive), cache_dir=tmp_path / "cache")["text"] == ["other words"]


@pytest.mark.parametrize("encoding,looks", [("latin-1", "Latin-1"), ("utf-16", "UTF-16")])
def test_text_that_is_not_utf8_is_named_with_its_byte_offset(encoding, looks, tmp_path):
    path = tmp_path / "old.txt"
    text = "plain ascii first, then café"
    path.write_bytes(text.encode(encoding))
    offset = text.encode(encoding).index("é".encode(encoding)) if encoding == "latin-1" else 0
    with pytest.raises(DataError) as err:
        load_documents(str(path), cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert f"{path} is not UTF-8 text: byte {offset} " in message and looks in message
    assert "iconv" in message and "DatasetGenerationError" not in message


def test_an_unwritable_cache_is_named_not_the_corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("words", encoding="utf-8")
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(StorageError) as err:
        load_documents(str(corpus), cache_dir=blocker / "cache")
    message = str(err.value)
    assert f"the cache folder {blocker / 'cache'} cannot be written" in message
    assert "data.cache_dir" in message and "LIT_LLM_CACHE" in message and str(corpus) not in message


# ---- partial files -----------------------------------------------------------------------------------------------

def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_sweep_removes_only_partial_files_whose_writer_is_gone(tmp_path, caplog):
    root = tmp_path / "cache"
    folder = root / "pretrain" / "abc"
    folder.mkdir(parents=True)
    host = cache._host()
    dead, alive = _dead_pid(), os.getppid()
    killed = folder / f"train.npy.{host}-{dead}.tmp"
    earlier = folder / f"val.{dead}.tmp.npy"  # the name of earlier versions
    live = folder / f"train.npy.{host}-{alive}.tmp"
    elsewhere = folder / f"train.npy.otherhost-{dead}.tmp"  # another host's writer: only age tells
    old_elsewhere = folder / f"val.npy.otherhost-{dead}.tmp"
    finished = folder / "train.npy"
    for path in (killed, earlier, live, elsewhere, old_elsewhere, finished):
        path.write_bytes(b"x")
    day_ago = time.time() - cache.STALE_S - 60
    os.utime(old_elsewhere, (day_ago, day_ago))
    map_tmp = root / "datasets" / "text" / "tmpabcd1234"  # Dataset.map's tempfile
    map_tmp.parent.mkdir(parents=True)
    map_tmp.write_bytes(b"x")
    hour_ago = time.time() - cache.IDLE_S - 60
    os.utime(map_tmp, (hour_ago, hour_ago))
    with caplog.at_level(logging.INFO):
        removed = cache.sweep(root)
    assert set(removed) == {killed, earlier, old_elsewhere, map_tmp}
    assert live.exists() and elsewhere.exists() and finished.exists()
    assert f"Cache: removed {killed}, a partial file of a write that did not finish (its writer, process {dead}, " \
           "is gone)" in caplog.text


def test_a_killed_packing_leaves_a_partial_file_that_the_next_start_removes(tmp_path, tok_dir, caplog):
    """A process killed (SIGKILL) inside write_npy leaves its partial array; the next DataModule start removes it."""
    target = tmp_path / "cache" / "pretrain" / "k" / "train.npy"
    target.parent.mkdir(parents=True)
    script = (
        "import os, signal, sys, numpy as np\n"
        "import lit_llm.data.packing as packing\n"
        "def chunks(piece):\n"
        "    yield piece[:10]\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "packing._piece_chunks = chunks\n"
        f"packing.write_npy(__import__('pathlib').Path({str(target)!r}), [np.arange(100)], np.uint16)\n"
    )
    child = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2])
    assert child.returncode == -9
    leftovers = list(target.parent.glob("train.npy.*.tmp"))
    assert len(leftovers) == 1 and not target.exists()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_prose(100, 1), encoding="utf-8")
    with caplog.at_level(logging.INFO):
        _pretrain(tmp_path, corpus, tok_dir)
    assert not leftovers[0].exists()
    assert f"Cache: removed {leftovers[0]}" in caplog.text


def test_a_cached_download_altered_on_disk_is_downloaded_again(tmp_path, monkeypatch, caplog):
    """Served from a loopback HTTP server: the cached file's SHA-256 is checked on every reuse."""
    import functools
    import hashlib
    import http.server
    import threading

    from lit_llm.data.sources import download

    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    served = tmp_path / "served"
    served.mkdir()
    (served / "c.txt").write_bytes(b"the real text")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/c.txt"
        sha = hashlib.sha256(b"the real text").hexdigest()
        path = download(url, sha, tmp_path / "cache")
        with caplog.at_level(logging.INFO):
            assert download(url, sha, tmp_path / "cache") == path
        assert "Cache: reusing the download" in caplog.text and "matched" in caplog.text
        path.write_bytes(b"the fake text")  # same size
        with caplog.at_level(logging.INFO):
            assert download(url, sha, tmp_path / "cache").read_bytes() == b"the real text"
        assert "no longer matches its sha256" in caplog.text
    finally:
        server.shutdown()


def test_the_utf8_check_agrees_with_python_across_block_boundaries(tmp_path, monkeypatch):
    """Arrow's validation in blocks (7 bytes here, so characters are cut at block ends) accepts exactly what Python's
    decoder accepts, and names the same byte offset."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    monkeypatch.setattr(cache, "_CHUNK", 7)
    path = tmp_path / "t.txt"
    pieces = st.one_of(st.text(max_size=6).map(lambda t: t.encode("utf-8")), st.binary(max_size=3))

    @settings(max_examples=400, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(pieces, max_size=12).map(b"".join))
    def check(data: bytes) -> None:
        path.write_bytes(data)
        try:
            data.decode("utf-8")
            expected = None
        except UnicodeDecodeError as err:
            expected = err.start
        try:
            cache.file_digest(path, utf8=True)
            found = None
        except DataError as err:
            found = int(str(err).split(" is not UTF-8 text: byte ")[1].split(" ")[0])
        assert found == expected, data

    check()
