"""``lit-llm serve``'s command line and the chat prompt."""

from __future__ import annotations

import pytest

from lit_llm.__main__ import main as lit_llm_main
from lit_llm.data.prompts import format_prompt
from lit_llm.serve.__main__ import is_loopback, model_name
from lit_llm.serve.chat import ChatMessage, render_chat

pytest.importorskip("fastapi", reason="the server's tests need the serve extra: pip install -e '.[dev]'")
pytest.importorskip("uvicorn", reason="the server's tests need the serve extra: pip install -e '.[dev]'")


def test_another_address_needs_an_api_key(capsys, monkeypatch):
    monkeypatch.delenv("LIT_LLM_API_KEY", raising=False)
    assert lit_llm_main(["serve", "--checkpoint", "missing.ckpt", "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert "--host 0.0.0.0" in err and "--api-key" in err and "127.0.0.1" in err


def test_limits_are_checked_before_loading(capsys):
    assert lit_llm_main(["serve", "--checkpoint", "missing.ckpt", "--max-concurrency", "0", "--max-tokens", "0"]) == 1
    err = capsys.readouterr().err
    assert "--max-concurrency 0 must be >= 1" in err and "--max-tokens 0 must be >= 1" in err


def test_a_missing_checkpoint_is_one_error_line(capsys, tmp_path):
    assert lit_llm_main(["serve", "--checkpoint", str(tmp_path / "none.ckpt")]) == 1
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize(("host", "expected"), [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                                ("localhost", True), ("0.0.0.0", False), ("192.168.1.4", False),
                                                ("example.org", False)])
def test_loopback_addresses(host, expected):
    assert is_loopback(host) is expected


def test_model_name_from_the_checkpoint():
    assert model_name("checkpoints/instruct/last.ckpt") == "instruct"
    assert model_name("runs/step=100.ckpt") == "step=100"
    assert model_name("exports/gpt2-hf") == "gpt2-hf"
    assert model_name("openai-community/gpt2") == "gpt2"


def test_render_chat_with_an_instruction_template():
    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "Add 2 and 3."),
                ChatMessage("assistant", "5"), ChatMessage("user", "And 4 and 4?")]
    prompt = render_chat(messages, "alpaca")
    assert prompt == ("Be brief.\n\n" + format_prompt("alpaca", "Add 2 and 3.") + "5\n\n"
                      + format_prompt("alpaca", "And 4 and 4?"))
    assert prompt.endswith("### Response:\n")


def test_render_chat_without_a_template_joins_the_messages():
    messages = [ChatMessage("user", "Hello"), ChatMessage("assistant", "Hi"), ChatMessage("user", "Go on")]
    assert render_chat(messages, None) == "Hello\n\nHi\n\nGo on\n\n"
    with pytest.raises(ValueError, match="role 'tool'"):
        render_chat([ChatMessage("tool", "x")], None)
    with pytest.raises(ValueError, match="at least one"):
        render_chat([], None)
