"""The conversation workflow end to end on a tiny model: the quickstart config (shrunk) trains and prints its
multi-turn score, the checkpoint carries its chat template, ``convert to-hf`` exports it so that transformers gives
the same ids and masks, and ``generate --chat`` holds a conversation on piped stdin."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from support import ROOT, TINY_MODEL

from lit_llm import generate as gen_cli
from lit_llm.convert import main as convert_main
from lit_llm.data.chat_template import BUILTIN_TEMPLATES, checkpoint_chat_template
from lit_llm.errors import CheckpointError
from lit_llm.generate import complete
from lit_llm.generate import main as generate_main
from lit_llm.model.config import GPTConfig
from lit_llm.model.gpt import GPTModel
from lit_llm.model.sampling import generate
from lit_llm.train import cli
from lit_llm.weights.export import save_weights
from lit_llm.weights.readers import load_into, load_model_for_inference

QUICKSTART = ROOT / "configs" / "chat" / "quickstart.yaml"
CONVERSATION = [{"role": "system", "content": "You remember things."},
                {"role": "user", "content": "My favourite colour is teal."},
                {"role": "assistant", "content": "Noted, teal."},
                {"role": "user", "content": "What is my favourite colour?"},
                {"role": "assistant", "content": "teal"}]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, str]:
    """The chat quickstart shrunk to seconds: a 2-layer, 32-wide GPT trained 4 steps; its stdout."""
    root = tmp_path_factory.mktemp("chat-run")
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.chdir(ROOT)
        cli(["fit", "--config", str(QUICKSTART), *TINY_MODEL, f"--trainer.default_root_dir={root}",
             "--trainer.max_steps=4", "--trainer.val_check_interval=4", "--trainer.enable_progress_bar=false",
             "--data.init_args.tokenizer_vocab_size=400", "--data.init_args.split_fractions=[0.96,0.02,0.02]",
             "--model.init_args.max_new_tokens=4"])
    return root, out.getvalue()


def test_quickstart_trains_and_prints_the_multi_turn_score(run):
    root, stdout = run
    assert (root / "last.ckpt").is_file()
    lines = [line for line in stdout.splitlines() if line.startswith("chat exact match: ")]
    assert len(lines) == 1, stdout[-2000:]
    scores = json.loads((root / "test_scores.json").read_text())
    responses = json.loads((root / "test_responses.json").read_text())
    right = sum(r["model_response"] == r["reference"] for r in responses)
    assert lines[0].startswith(f"chat exact match: {right}/{len(responses)} (first answers ")
    assert scores["n_records"] == len(responses) > 60  # ~60 held-out conversations, every assistant turn
    assert {r["turn"] for r in responses} >= {1, 2, 3}
    later = [r for r in responses if r["turn"] > 1]
    assert later and all(len(r["messages"]) >= 3 for r in later)  # answered given their true earlier turns


def test_the_checkpoint_carries_its_chat_template_and_tokens(run):
    root, _ = run
    model, tokenizer, meta = load_model_for_inference(str(root / "last.ckpt"))
    template = checkpoint_chat_template(meta)
    assert template == BUILTIN_TEMPLATES["chatml"]
    assert tokenizer.encode("<|im_start|><|im_end|>") == [tokenizer.vocab_size - 2, tokenizer.vocab_size - 1]
    assert model.config.vocab_size == tokenizer.vocab_size  # the model's rows cover the special tokens


def test_to_hf_export_gives_transformers_the_same_ids_and_masks(run, tmp_path):
    transformers = pytest.importorskip("transformers")
    root, _ = run
    out = tmp_path / "hf"
    assert convert_main(["to-hf", str(root / "last.ckpt"), str(out)]) == 0
    assert (out / "chat_template.jinja").read_text() == BUILTIN_TEMPLATES["chatml"].source
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == BUILTIN_TEMPLATES[
        "chatml"].source
    _, tokenizer, meta = load_model_for_inference(str(root / "last.ckpt"))
    template = checkpoint_chat_template(meta)
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    got = hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = template.encode(tokenizer, CONVERSATION)
    assert got["input_ids"] == ids and got["assistant_masks"] == mask and sum(mask) > 0
    prompt = hf.apply_chat_template(CONVERSATION[:4], tokenize=True, add_generation_prompt=True, return_dict=True)
    assert prompt["input_ids"] == template.prompt_ids(tokenizer, CONVERSATION[:4])
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.eos_id, template.stop_id(tokenizer)]
    # lit_llm reads the export back with its template
    _, _, hf_meta = load_model_for_inference(str(out))
    assert checkpoint_chat_template(hf_meta).source == template.source


# ---- generate --chat ------------------------------------------------------------------------------------------------


def chat(ckpt: Path, stdin: str, *args: str, capsys) -> tuple[int, str, str]:
    out = io.StringIO()
    rc = generate_main(["--checkpoint", str(ckpt), "--chat", "--max-new-tokens", "3", *args], stdin=io.StringIO(stdin),
                       stdout=out)
    return rc, out.getvalue(), capsys.readouterr().err


def test_generate_chat_keeps_the_history_and_obeys_its_commands(run, monkeypatch, capsys):
    root, _ = run
    prompts: list[str] = []

    def fake_complete(model, tokenizer, texts, *, on_text=None, stop_ids=(), **gen):
        prompts.append(texts[0])
        reply = f"reply {len(prompts)}"
        if on_text is not None:
            on_text(reply)
        return [reply]

    monkeypatch.setattr(gen_cli, "complete", fake_complete)
    stdin = "Hi there\n/system Be brief.\nSecond\n/reset\nThird\n/bogus\n/exit\nnever read\n"
    rc, out, err = chat(root / "last.ckpt", stdin, capsys=capsys)
    assert rc == 0
    assert out == "reply 1\nreply 2\nreply 3\n"
    assert "template chatml (from the checkpoint)" in err and "/system TEXT" in err and "/reset" in err
    assert "(system message set)" in err and "(conversation forgotten)" in err and "unknown command /bogus" in err
    im = "<|im_start|>"
    assert prompts[0] == f"{im}user\nHi there<|im_end|>\n{im}assistant\n"
    assert prompts[1] == (f"{im}system\nBe brief.<|im_end|>\n{im}user\nHi there<|im_end|>\n{im}assistant\nreply 1"
                          f"<|im_end|>\n{im}user\nSecond<|im_end|>\n{im}assistant\n")
    assert prompts[2] == f"{im}system\nBe brief.<|im_end|>\n{im}user\nThird<|im_end|>\n{im}assistant\n"


def test_generate_chat_drops_the_oldest_turns_when_the_context_is_full(run, monkeypatch, capsys):
    root, _ = run
    prompts: list[str] = []

    def fake_complete(model, tokenizer, texts, *, on_text=None, stop_ids=(), **gen):
        prompts.append(texts[0])
        return ["ok"]

    monkeypatch.setattr(gen_cli, "complete", fake_complete)
    line = "Remember the number seven and the colour teal please.\n"
    rc, out, err = chat(root / "last.ckpt", line * 5, "--no-stream", capsys=capsys)
    assert rc == 0 and out == "ok\n" * 5
    assert "(dropped the 1 oldest exchange to fit the context of 96 tokens)" in err
    assert max(p.count("Remember") for p in prompts) < 5  # the history never outgrew the context


def test_generate_chat_with_the_real_model_stops_at_the_end_of_turn(run, capsys):
    root, _ = run
    rc, out, err = chat(root / "last.ckpt", "My favourite colour is teal.\nWhat is my favourite colour?\n",
                        "--max-new-tokens", "40", capsys=capsys)
    assert rc == 0 and len(out.splitlines()) == 2
    assert "<|im_end|>" not in out and "<|im_start|>" not in out


def test_complete_stops_at_extra_stop_ids(run):
    root, _ = run
    model, tokenizer, _ = load_model_for_inference(str(root / "last.ckpt"))
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(prompt)
    greedy = generate(model, torch.tensor([ids]), 8)[0, len(ids):].tolist()
    if tokenizer.eos_id in greedy:
        greedy = greedy[: greedy.index(tokenizer.eos_id)]
    # The latest token that is new where it appears: stopping there keeps exactly what came before it.
    j = max(j for j in range(len(greedy)) if greedy[j] not in greedy[:j]) if greedy else None
    if j is None:
        pytest.fail("the tiny model's first greedy token is end-of-text; pick another prompt")
    (text,) = complete(model, tokenizer, [prompt], max_new_tokens=8, stop_ids=[greedy[j]])
    assert text == tokenizer.decode(greedy[:j])
    (whole,) = complete(model, tokenizer, [prompt], max_new_tokens=8)
    assert whole == tokenizer.decode(greedy)


def test_generate_chat_warns_without_a_chat_template(run, tmp_path, capsys):
    root, _ = run
    model, tokenizer, _ = load_model_for_inference(str(root / "last.ckpt"))
    plain = save_weights(model.config, model.state_dict(), tmp_path / "plain", tokenizer)  # weights, no template
    rc, out, err = chat(plain, "Hello\n", "--no-stream", capsys=capsys)
    assert rc == 0 and len(out.splitlines()) == 1
    assert "carries no chat template" in err and "instruction template 'alpaca'" in err
    rc, out, err = chat(plain, "Hello\n", "--no-stream", "--chat-template", "chatml", capsys=capsys)
    assert rc == 0 and "template chatml (--chat-template)" in err and "carries no chat template" not in err


# ---- new token rows for initial weights --------------------------------------------------------------------------


def test_initial_weights_without_the_special_tokens_get_mean_rows():
    cfg = GPTConfig(vocab_size=300, context_length=16, emb_dim=32, n_heads=2, n_layers=1)
    small = GPTModel(GPTConfig(**{**cfg.to_dict(), "vocab_size": 298}))
    state = {k: v[:298] if k == "tok_emb.weight" else v for k, v in small.state_dict().items()}
    model = GPTModel(cfg)
    with pytest.raises(CheckpointError, match="tok_emb.weight"):
        load_into(model, state)
    load_into(model, state, new_rows=2)
    emb = model.tok_emb.weight.detach()
    assert torch.equal(emb[:298], state["tok_emb.weight"])
    assert torch.allclose(emb[298], state["tok_emb.weight"].mean(0), atol=1e-6)
    assert torch.equal(emb[298], emb[299]) and not emb[300:].any()  # then the zero padding rows
