"""lit_llm.data.tokenizer: GPT-2 parity with tiktoken, loading layouts, BPE training, fingerprints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch

from lit_llm.data.tokenizer import Tokenizer, load_tokenizer, train_bpe
from lit_llm.errors import ConfigError, DataError

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
GPT2 = SHARED / "gpt2"
VERDICT = SHARED / "the-verdict.txt"
needs_gpt2 = pytest.mark.skipif(
    not (GPT2 / "encoder.json").is_file() or not (GPT2 / "vocab.bpe").is_file(), reason="GPT-2 BPE files absent"
)

MIXED = "Héllo wörld ☃ 日本語 🙂<|endoftext|>  second   doc\n\twith spaces and 123.45"


def _corpus(n: int = 200) -> list[str]:
    words = ["alpha", "beta", "gamma", "delta", "ünïcode", "☃snow", "tokenizer", "lightning", "the", "a"]
    return [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) + f" {i}." for i in range(n)]


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return load_tokenizer(GPT2)


@needs_gpt2
def test_gpt2_matches_book_on_the_verdict(gpt2: Tokenizer) -> None:
    if not VERDICT.is_file():
        pytest.skip("the-verdict.txt absent")
    ids = gpt2.encode(VERDICT.read_text(encoding="utf-8"))
    assert len(ids) == 5145
    assert ids[:5] == [40, 367, 2885, 1464, 1807]
    assert gpt2.vocab_size == 50257 and gpt2.eos_id == 50256


@needs_gpt2
def test_gpt2_special_token_and_round_trip(gpt2: Tokenizer) -> None:
    assert gpt2.encode("<|endoftext|>") == [50256]
    # tiktoken's gpt2 ids for "Hello, world" and for the special token spelled out as plain text.
    assert gpt2.encode("Hello, world") == [15496, 11, 995]
    assert gpt2.encode("<|endoftext|>", allowed_special=False) == [27, 91, 437, 1659, 5239, 91, 29]
    ids = gpt2.encode(MIXED)
    assert 50256 in ids
    assert gpt2.decode(ids) == MIXED
    assert gpt2.decode(torch.tensor(ids)) == MIXED
    assert gpt2.encode_batch([MIXED, "abc"]) == [ids, gpt2.encode("abc")]


@needs_gpt2
def test_layouts_give_same_fingerprint(gpt2: Tokenizer, tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(GPT2 / "encoder.json", hf / "vocab.json")
    shutil.copy(GPT2 / "vocab.bpe", hf / "merges.txt")
    from_hf = load_tokenizer(str(hf))
    saved = gpt2.save(tmp_path / "run")
    assert saved == tmp_path / "run" / "tokenizer.json"
    for other in (
        from_hf,
        load_tokenizer(saved),
        load_tokenizer(tmp_path / "run"),
        Tokenizer.from_json(gpt2.to_json()),
    ):
        assert other.fingerprint == gpt2.fingerprint
        assert other.encode(MIXED) == gpt2.encode(MIXED)
        assert other.eos_id == 50256


def test_train_bpe_round_trip_and_save_reload(tmp_path: Path) -> None:
    tok = train_bpe(_corpus(), vocab_size=400)
    assert 257 < tok.vocab_size <= 400
    assert tok.encode("<|endoftext|>") == [tok.eos_id]
    ids = tok.encode(MIXED)
    assert tok.decode(ids) == MIXED  # byte-level: unseen characters still round-trip
    assert len(tok.encode("alpha beta gamma")) < len("alpha beta gamma")  # merges were learned

    reloaded = load_tokenizer(tok.save(tmp_path))
    assert reloaded.fingerprint == tok.fingerprint
    assert reloaded.encode(MIXED) == ids
    assert reloaded.vocab_size == tok.vocab_size and reloaded.eos_id == tok.eos_id


def test_encode_arrays_equals_encode_whatever_the_piece_size() -> None:
    tok = train_bpe(_corpus(), vocab_size=400)
    texts = ["\n".join(_corpus(40)) + "\n\n  indented\n" + MIXED, "", "x", "nospaceatall" * 30]
    for max_chars in (8, 64, 1 << 20):
        arrays = tok.encode_arrays(texts, max_chars=max_chars)
        assert [a.tolist() for a in arrays] == [tok.encode(t) for t in texts]
    assert tok.encode_arrays(["abc"], dtype=np.uint16)[0].dtype == np.uint16


@needs_gpt2
def test_gpt2_encode_arrays_on_the_verdict(gpt2: Tokenizer) -> None:
    if not VERDICT.is_file():
        pytest.skip("the-verdict.txt absent")
    text = VERDICT.read_text(encoding="utf-8")
    assert gpt2.encode_arrays([text], max_chars=100)[0].tolist() == gpt2.encode(text)


def test_train_bpe_is_deterministic_and_fingerprint_tracks_vocab() -> None:
    a, b = train_bpe(_corpus(), vocab_size=300), train_bpe(_corpus(), vocab_size=300)
    assert a.fingerprint == b.fingerprint
    assert train_bpe(_corpus(), vocab_size=350).fingerprint != a.fingerprint


def test_train_bpe_never_merges_inside_eos() -> None:
    tok = train_bpe(["<|endoftext|>".join(_corpus(50))] * 4, vocab_size=400)
    vocab = tok.backend.get_vocab()
    assert not any("endoftext" in t and t != "<|endoftext|>" for t in vocab)


def test_train_bpe_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="vocab_size=100"):
        train_bpe(_corpus(), vocab_size=100)
    with pytest.raises(DataError, match="empty corpus"):
        train_bpe([], vocab_size=300)


def test_missing_path_names_path_and_layouts(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(DataError) as err:
        load_tokenizer(missing)
    assert str(missing) in str(err.value) and "encoder.json + vocab.bpe" in str(err.value)


def test_directory_without_tokenizer_files(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no tokenizer files.*readme.txt"):
        load_tokenizer(tmp_path)


def test_tokenizer_without_eos_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(DataError, match="endoftext"):
        load_tokenizer(tmp_path)


def test_hub_name_offline_fails_fast_with_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable at import time; patch its constant too so this never waits on a network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # so the name cannot resolve to a local directory
    with pytest.raises(DataError) as err:
        load_tokenizer("lit-llm-tests/no-such-tokenizer")  # never in any Hub cache
    msg = str(err.value)
    assert "could not download" in msg and "offline" in msg and "encoder.json + vocab.bpe" in msg
