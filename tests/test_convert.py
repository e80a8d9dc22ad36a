"""``python -m lit_llm.convert``: from-hf, from-book, to-hf, and one clear line for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_weights import _logits, _randomize, hf_dir, tokenizer  # noqa: F401 - fixtures shared with test_weights

from lit_llm.convert import main
from lit_llm.errors import CheckpointError
from lit_llm.weights import load_model_for_inference


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lit_llm.convert", *args], capture_output=True, text=True, cwd=ROOT)


def test_from_hf_then_to_hf(hf_dir, tokenizer, tmp_path, capsys):  # noqa: F811
    transformers = pytest.importorskip("transformers")
    proc = _convert("from-hf", str(hf_dir), str(tmp_path / "lit"))
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "with tokenizer.json" in proc.stdout
    written = {p.name for p in (tmp_path / "lit").iterdir()}
    assert {"model.safetensors", "model_config.json", "tokenizer.json"} <= written
    saved = json.loads((tmp_path / "lit" / "model_config.json").read_text())
    assert saved["tie_weights"] is True and saved["qkv_bias"] is True and saved["n_heads"] == 4

    main(["to-hf", str(tmp_path / "lit"), str(tmp_path / "hf")])
    assert "Hugging Face GPT-2" in capsys.readouterr().out
    original = transformers.GPT2LMHeadModel.from_pretrained(hf_dir)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, tokenizer.vocab_size, (2, 30))
    assert (_logits(exported, ids) - _logits(original, ids)).abs().max().item() <= 1e-4
    text = "by those who never understood it <|endoftext|> The donkey"
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")(text)["input_ids"] == tokenizer.encode(text)


def test_from_book(tmp_path, capsys):
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    cfg = {"vocab_size": 300, "context_length": 32, "emb_dim": 64, "n_heads": 4, "n_layers": 2, "drop_rate": 0.0,
           "qkv_bias": True}
    book = ch04.GPTModel(cfg)
    _randomize(book)
    torch.save(book.state_dict(), tmp_path / "book.pth")
    main(["from-book", str(tmp_path / "book.pth"), str(tmp_path / "out"), "--n-heads", "4"])
    assert "4 heads" in capsys.readouterr().out
    model, tok, meta = load_model_for_inference(str(tmp_path / "out"))
    assert meta["format"] == "lit" and tok is None and not model.config.tie_weights
    ids = torch.randint(0, 300, (2, 32))
    assert (_logits(model, ids) - _logits(book, ids)).abs().max().item() <= 1e-5


def test_bad_input_is_one_error_line():
    """In a real process: exit status 1 and one `error:` line naming the file, no traceback."""
    proc = _convert("to-hf", "no/such/last.ckpt", "out")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: CheckpointError:") and "no/such/last.ckpt" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("case", ["garbage", "no_heads", "preset", "hf_on_book"])
def test_bad_input_messages(case, tmp_path, capsys):
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    book = ch04.GPTModel({"vocab_size": 100, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
                          "drop_rate": 0.0, "qkv_bias": False})
    torch.save(book.state_dict(), tmp_path / "book.pth")
    (tmp_path / "garbage.ckpt").write_bytes(b"PK\x03\x04 not really a zip" * 20)
    args, expected = {
        "garbage": (["to-hf", str(tmp_path / "garbage.ckpt"), str(tmp_path / "o")], "garbage.ckpt"),
        "no_heads": (["from-book", str(tmp_path / "book.pth"), str(tmp_path / "o")], "--n-heads"),
        "preset": (["from-book", str(tmp_path / "book.pth"), str(tmp_path / "o"), "--preset", "gpt9"],
                   "unknown preset 'gpt9'"),
        "hf_on_book": (["from-hf", str(tmp_path / "book.pth"), str(tmp_path / "o")], "use from-book"),
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("error: ") and expected in err


def test_debug_env_reraises(monkeypatch, tmp_path):
    monkeypatch.setenv("LIT_LLM_DEBUG", "1")
    with pytest.raises(CheckpointError, match="does not exist"):
        main(["to-hf", str(tmp_path / "missing.ckpt"), str(tmp_path / "out")])


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert all(name in out for name in ("from-hf", "from-book", "to-hf"))
