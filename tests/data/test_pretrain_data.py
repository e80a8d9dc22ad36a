"""PretrainDataModule: the book's windows and split, caching, trained tokenizers, errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import lit_llm.data.tokenizer_source as tokenizing
from lit_llm.data import PretrainDataModule
from lit_llm.data.packing import TokenWindows, num_windows
from lit_llm.data.tokenizer import Tokenizer, load_tokenizer, train_bpe
from lit_llm.errors import ConfigError, DataError

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"

WORDS = ["river", "stone", "light", "cloud", "amber", "quiet", "north", "ember", "delta", "orbit"]


def _prose(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words)) + "."


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small byte-level BPE saved as tokenizer.json (vocab ~300), shared by the module's tests."""
    tok = train_bpe([_prose(300, s) for s in range(20)] + ["aaaa bbbb"] * 20, vocab_size=300)
    return str(tok.save(tmp_path_factory.mktemp("tok")))


@pytest.fixture
def tok(tok_dir: str) -> Tokenizer:
    return load_tokenizer(tok_dir)


def _dm(tmp_path: Path, source: str | list[str], tok_dir: str, **kwargs: object) -> PretrainDataModule:
    kwargs = {"context_length": 16, "batch_size": 2, "cache_dir": str(tmp_path / "cache"), **kwargs}
    return PretrainDataModule(source=source, tokenizer=tok_dir, **kwargs)  # type: ignore[arg-type]


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("n,ctx,stride", [(10, 4, 4), (10, 4, 1), (9, 4, 4), (5, 4, 1), (4, 4, 1), (100, 7, 3)])
def test_window_count_and_shift_match_the_book(n: int, ctx: int, stride: int) -> None:
    ids = np.arange(1000, 1000 + n, dtype=np.uint16)
    windows = TokenWindows(ids, ctx, stride)
    book = list(range(0, n - ctx, stride))  # GPTDatasetV1's loop
    assert len(windows) == num_windows(n, ctx, stride) == len(book)
    for i, start in enumerate(book):
        x, y = windows[i]
        assert x.dtype == y.dtype == torch.int64
        assert x.tolist() == ids[start : start + ctx].tolist()
        assert y.tolist() == ids[start + 1 : start + ctx + 1].tolist()
    with pytest.raises(IndexError):
        windows[len(windows)]


def test_characters_split_is_the_books_split(tmp_path: Path, tok_dir: str, tok: Tokenizer) -> None:
    text = _prose(400)
    dm = _dm(tmp_path, _write(tmp_path / "doc.txt", text), tok_dir)
    dm.prepare_data()
    dm.setup("fit")
    split = int(0.9 * len(text))
    assert dm.train_dataset.ids.tolist() == tok.encode(text[:split])
    assert dm.val_dataset.ids.tolist() == tok.encode(text[split:]) + [tok.eos_id]
    assert dm.train_dataset.ids.dtype == np.uint16


def test_no_window_crosses_the_split(tmp_path: Path, tok_dir: str, tok: Tokenizer) -> None:
    text = "aaaa " * 180 + "bbbb " * 20  # the 90 % character cut falls exactly between the a's and the b's
    dm = _dm(tmp_path, _write(tmp_path / "ab.txt", text), tok_dir, context_length=8, stride=1)
    dm.setup("fit")
    for dataset, allowed in ((dm.train_dataset, {"a", " "}), (dm.val_dataset, {"b", " "})):
        assert len(dataset) > 0
        for i in range(len(dataset)):
            x, y = dataset[i]
            seen = set(tok.decode(torch.cat([x, y[-1:]])).replace("<|endoftext|>", ""))
            assert seen <= allowed, (i, seen)


def _docs_of(ids: np.ndarray, tok: Tokenizer) -> list[str]:
    return [d for d in tok.decode(ids.tolist()).split("<|endoftext|>") if d]


def test_documents_split_partitions_documents(tmp_path: Path, tok_dir: str, tok: Tokenizer) -> None:
    docs = [f"document {i}: " + _prose(30, i) for i in range(20)]
    src = _write(tmp_path / "d.jsonl", "\n".join(json.dumps({"body": d}) for d in docs))
    dm = _dm(tmp_path, src, tok_dir, split_by="documents", val_split=0.2, text_column="body", seed=3)
    dm.setup("fit")
    train, val = _docs_of(dm.train_dataset.ids, tok), _docs_of(dm.val_dataset.ids, tok)
    assert len(val) == 4 and not set(train) & set(val) and sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d in train]  # corpus order kept inside a split
    other = _dm(tmp_path, src, tok_dir, split_by="documents", val_split=0.2, text_column="body", seed=4)
    other.setup("fit")
    assert _docs_of(other.val_dataset.ids, tok) != val  # the seed picks the documents


def test_tokens_split_and_streaming_agree(tmp_path: Path, tok_dir: str, tok: Tokenizer) -> None:
    docs = [_prose(40, i) for i in range(7)]
    for i, d in enumerate(docs):
        _write(tmp_path / f"{i}.txt", d)
    stream = np.concatenate([tok.encode(d) + [tok.eos_id] for d in docs])
    packed = {}
    for streaming in (False, True):
        dm = _dm(tmp_path, str(tmp_path / "*.txt"), tok_dir, split_by="tokens", val_split=0.25, streaming=streaming)
        dm.setup("fit")
        packed[streaming] = (dm.train_dataset.ids.tolist(), dm.val_dataset.ids.tolist())
        cut = int(0.75 * len(stream))
        assert packed[streaming] == (stream[:cut].tolist(), stream[cut:].tolist())
    with pytest.raises(ConfigError, match="streaming"):
        _dm(tmp_path, str(tmp_path / "*.txt"), tok_dir, streaming=True)


def test_val_source_and_no_validation(tmp_path: Path, tok_dir: str, tok: Tokenizer) -> None:
    train_text, val_text = _prose(200, 1), _prose(100, 2)
    dm = _dm(tmp_path, _write(tmp_path / "t.txt", train_text), tok_dir, val_source=_write(tmp_path / "v.txt", val_text))
    dm.setup("fit")
    assert dm.train_dataset.ids.tolist() == tok.encode(train_text) + [tok.eos_id]
    assert dm.val_dataset.ids.tolist() == tok.encode(val_text) + [tok.eos_id]
    none = _dm(tmp_path, str(tmp_path / "t.txt"), tok_dir, val_split=0)
    none.setup("fit")
    assert none.val_dataloader() == [] and none.val_dataset is None


def test_corpus_shorter_than_a_window(tmp_path: Path, tok_dir: str, tok: Tokenizer) -> None:
    text = "river stone light"
    dm = _dm(tmp_path, _write(tmp_path / "short.txt", text), tok_dir, context_length=64, val_split=0)
    n = len(tok.encode(text)) + 1
    with pytest.raises(DataError, match=rf"training split .* has {n} tokens but one window needs 65") as err:
        dm.setup("fit")
    assert "model.context_length" in str(err.value)
    dm = _dm(tmp_path, _write(tmp_path / "long.txt", _prose(200)), tok_dir, context_length=64)
    with pytest.raises(DataError, match="validation split .* needs 65.*raise data.val_split"):
        dm.setup("fit")


def test_empty_and_missing_sources(tmp_path: Path, tok_dir: str) -> None:
    with pytest.raises(DataError, match="empty.txt is empty"):
        _dm(tmp_path, _write(tmp_path / "empty.txt", ""), tok_dir).prepare_data()
    with pytest.raises(DataError, match=r"data.source: '.*missing.txt' does not exist"):
        _dm(tmp_path, str(tmp_path / "missing.txt"), tok_dir).prepare_data()


def test_invalid_settings_reported_together(tok_dir: str) -> None:
    with pytest.raises(ConfigError) as err:
        PretrainDataModule(tokenizer=tok_dir, stride=0, val_split=1.0, batch_size=0, source="https://x.org/a.txt")
    msg = str(err.value)
    for key in ("data.stride=0", "data.val_split=1.0", "data.batch_size=0", "data.sha256 is required"):
        assert key in msg


def test_dataloaders_yield_book_batches(tmp_path: Path, tok_dir: str) -> None:
    src = _write(tmp_path / "c.txt", _prose(600))
    dm = _dm(tmp_path, src, tok_dir, batch_size=4, seed=7)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == len(dm.train_dataset) // 4  # drop_last
    x, y = batches[0]
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    val = list(dm.val_dataloader())
    assert sum(len(b[0]) for b in val) == len(dm.val_dataset)  # validation keeps every window, in order
    assert torch.equal(val[0][0][0], dm.val_dataset[0][0])
    again = _dm(tmp_path, src, tok_dir, batch_size=4, seed=7)
    again.setup("fit")
    assert torch.equal(next(iter(again.train_dataloader()))[0], x)  # seeded shuffle
    tiny = _dm(tmp_path, src, tok_dir, batch_size=10_000)
    tiny.setup("fit")
    with pytest.raises(DataError, match="fewer than data.batch_size=10000"):
        tiny.train_dataloader()


def test_packing_is_cached_and_tokenizer_saved_to_run_dir(tmp_path: Path, tok_dir: str) -> None:
    src = _write(tmp_path / "c.txt", _prose(300))
    dm = _dm(tmp_path, src, tok_dir)
    dm.prepare_data()
    train_npy = dm._split_paths()["train"]
    stamp = train_npy.stat().st_mtime_ns
    leftovers = [p.name for p in train_npy.parent.iterdir() if "tmp" in p.name]
    assert leftovers == []
    again = _dm(tmp_path, src, tok_dir)
    again.trainer = SimpleNamespace(is_global_zero=True, default_root_dir=str(tmp_path / "run"))  # type: ignore
    again.setup("fit")
    assert again.train_dataset.path == train_npy and train_npy.stat().st_mtime_ns == stamp
    assert load_tokenizer(tmp_path / "run" / "tokenizer.json").fingerprint == dm.tokenizer.fingerprint
    # Different split settings must not reuse the arrays.
    assert _dm(tmp_path, src, tok_dir, val_split=0.2)._split_paths()["train"] != train_npy


def test_trained_tokenizer_on_builtin_corpus_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting(*args: object, **kwargs: object) -> Tokenizer:
        calls.append(1)
        return train_bpe(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tokenizing, "train_bpe", counting)
    kwargs = {"tokenizer": "train", "tokenizer_vocab_size": 512, "context_length": 32, "cache_dir": str(tmp_path)}
    dm = PretrainDataModule(source="builtin:pydoc", **kwargs)  # type: ignore[arg-type]
    assert dm.vocab_size == 512 and calls == [1]  # available before prepare_data, as LightningCLI needs
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 32) and int(x.max()) < 512
    second = PretrainDataModule(source="builtin:pydoc", **kwargs)  # type: ignore[arg-type]
    assert second.tokenizer.fingerprint == dm.tokenizer.fingerprint and calls == [1]
    assert len(list((tmp_path / "tokenizers").glob("bpe512-*.json"))) == 1


def test_state_dict_guards_the_tokenizer(tmp_path: Path, tok_dir: str) -> None:
    dm = _dm(tmp_path, "builtin:pydoc", tok_dir)
    state = dm.state_dict()
    assert Tokenizer.from_json(state["tokenizer_json"]).fingerprint == state["tokenizer_fingerprint"]
    _dm(tmp_path, "builtin:pydoc", tok_dir).load_state_dict(state)  # same tokenizer: fine
    other_dir = str(train_bpe([_prose(200, 9)] * 5, vocab_size=280).save(tmp_path / "other"))
    other = _dm(tmp_path, "builtin:pydoc", other_dir)
    with pytest.raises(DataError, match="tokenizer mismatch") as err:
        other.load_state_dict(state)
    msg = str(err.value)
    assert state["tokenizer_fingerprint"][:12] in msg and other.tokenizer.fingerprint[:12] in msg
    assert "tokenizer.json" in msg


@pytest.mark.skipif(not (SHARED / "gpt2" / "vocab.bpe").is_file(), reason="shared GPT-2 files absent")
def test_the_verdict_gives_the_books_loaders(tmp_path: Path) -> None:
    verdict = SHARED / "the-verdict.txt"
    if not verdict.is_file():
        pytest.skip("the-verdict.txt absent")
    dm = PretrainDataModule(
        source=str(verdict), tokenizer=str(SHARED / "gpt2"), context_length=256, batch_size=2, cache_dir=str(tmp_path)
    )
    dm.setup("fit")
    assert (dm.vocab_size, dm.eos_id) == (50257, 50256)
    assert len(dm.train_dataloader()) == 9 and len(dm.val_dataloader()) == 1  # as in the book's chapter 5
    assert dm.train_dataset.ids[:5].tolist() == [40, 367, 2885, 1464, 1807]


def test_named_tokenizer_does_not_read_the_corpus(tmp_path: Path, tok_dir: str) -> None:
    """The vocabulary size (linked into the model when the CLI instantiates) comes from the tokenizer alone; the
    corpus is read only when it is needed (prepare_data), so a missing file is reported there, not earlier."""
    dm = _dm(tmp_path, str(tmp_path / "missing.txt"), tok_dir)
    assert dm.vocab_size == 300
    with pytest.raises(DataError, match="missing.txt"):
        dm.prepare_data()
