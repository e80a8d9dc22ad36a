"""``python -m lit_llm.convert``: from-hf, from-book, to-hf, and one clear line for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from support import ROOT
from weights_helpers import logits, lora_models, randomize, save_lora_checkpoint

from lit_llm.convert import main
from lit_llm.errors import CheckpointError
from lit_llm.weights.readers import load_model_for_inference


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
    assert (logits(exported, ids) - logits(original, ids)).abs().max().item() <= 1e-4
    text = "by those who never understood it <|endoftext|> The donkey"
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")(text)["input_ids"] == tokenizer.encode(text)


def test_from_book(tmp_path, capsys):
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    cfg = {"vocab_size": 300, "context_length": 32, "emb_dim": 64, "n_heads": 4, "n_layers": 2, "drop_rate": 0.0,
           "qkv_bias": True}
    book = ch04.GPTModel(cfg)
    randomize(book)
    torch.save(book.state_dict(), tmp_path / "book.pth")
    main(["from-book", str(tmp_path / "book.pth"), str(tmp_path / "out"), "--n-heads", "4"])
    assert "4 heads" in capsys.readouterr().out
    model, tok, meta = load_model_for_inference(str(tmp_path / "out"))
    assert meta["format"] == "lit" and tok is None and not model.config.tie_weights
    ids = torch.randint(0, 300, (2, 32))
    assert (logits(model, ids) - logits(book, ids)).abs().max().item() <= 1e-5


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
    code = main(args)
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and expected in err


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


# ---- LoRA ------------------------------------------------------------------------------------------------------


def test_merge_lora_then_generate_and_to_hf(tokenizer, tmp_path, capsys):  # noqa: F811
    transformers = pytest.importorskip("transformers")
    _, adapted = lora_models(tie=True)
    ckpt = save_lora_checkpoint(adapted, tmp_path / "lora.ckpt", tokenizer)
    ids = torch.randint(0, 300, (2, 16))
    expected = logits(adapted, ids)[..., :300]

    main(["merge-lora", str(ckpt), str(tmp_path / "merged")])
    out = capsys.readouterr().out
    assert "merged 9 LoRA adapters" in out and "with tokenizer.json" in out
    saved = json.loads((tmp_path / "merged" / "model_config.json").read_text())
    assert saved["tie_weights"] is False  # the head's adapter gave it a weight of its own
    model, tok, meta = load_model_for_inference(str(tmp_path / "merged"))
    assert tok is not None and "lora_merged" not in meta and not any("lora" in k for k in model.state_dict())
    assert (logits(model, ids)[..., :300] - expected).abs().max().item() <= 1e-5

    from lit_llm.generate import main as generate

    assert generate(["--checkpoint", str(tmp_path / "merged"), "--prompt", "The sketch", "--max-new-tokens", "4",
                     "--no-stream"]) == 0
    assert capsys.readouterr().out.startswith("The sketch")

    main(["to-hf", str(tmp_path / "merged"), str(tmp_path / "hf")])
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert (logits(exported, ids) - expected).abs().max().item() <= 1e-4


def test_extract_lora_then_load_onto_the_base(tmp_path, capsys):
    from lit_llm.model.lora import load_lora

    base, adapted = lora_models(tie=False)
    ckpt = save_lora_checkpoint(adapted, tmp_path / "lora.ckpt")
    main(["extract-lora", str(ckpt), str(tmp_path / "adapters.safetensors")])
    assert "9 LoRA adapters, 5,504 parameters (rank 4, alpha 8" in capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapters.safetensors"), framework="pt") as f:
        assert all("lora_" in k for k in f.keys()) and len(list(f.keys())) == 27
        meta = f.metadata()
    assert json.loads(meta["lora_config"])["rank"] == 4 and json.loads(meta["model_config"])["emb_dim"] == 32
    assert meta["source"] == str(ckpt)
    load_lora(base, tmp_path / "adapters.safetensors")
    ids = torch.randint(0, 300, (2, 16))
    assert torch.equal(logits(base, ids), logits(adapted, ids))


def test_lora_subcommands_refuse_a_checkpoint_without_adapters(tmp_path, capsys):
    base, _ = lora_models(tie=False)
    ckpt = save_lora_checkpoint(base, tmp_path / "plain.ckpt")
    for command, expected in (("merge-lora", "holds no LoRA adapters"), ("extract-lora", "holds no LoRA adapters")):
        code = main([command, str(ckpt), str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("error: CheckpointError:") and expected in err
        assert str(ckpt) in err
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "merge-lora" in out and "extract-lora" in out
