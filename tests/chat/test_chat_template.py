"""Chat templates: literal ids and assistant-only labels of a worked conversation, the book's styles, user Jinja
templates in the sandbox, and agreement with transformers' ``apply_chat_template`` on the same template."""

from __future__ import annotations

import pytest
import tokenizers
from tokenizers import Regex, models, pre_tokenizers

from lit_llm.data.chat import conversation_item
from lit_llm.data.chat_template import (
    BUILTIN_TEMPLATES,
    checkpoint_chat_template,
    get_chat_template,
)
from lit_llm.data.tokenizer import Tokenizer, train_bpe
from lit_llm.errors import ConfigError, DataError
from lit_llm.serve.chat import ChatMessage, chat_stops, render_chat

# A hand-built tokenizer: every word, punctuation mark and whitespace character is one token, so ids are readable.
WORDS = ["<|endoftext|>", "\n", " ", "system", "user", "assistant", "Be", "brief", "Hi", "Hello", "Bye", "Ciao"]

CONVERSATION = [
    {"role": "system", "content": "Be brief"},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao"},
]


@pytest.fixture(scope="module")
def words() -> Tokenizer:
    backend = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\s"), behavior="isolated")
    backend.add_special_tokens(["<|endoftext|>"])
    return Tokenizer(backend)


def test_chatml_ids_and_labels_of_a_worked_conversation(words):
    template = BUILTIN_TEMPLATES["chatml"]
    tok = template.prepare_tokenizer(words)
    assert (tok.encode("<|im_start|>"), tok.encode("<|im_end|>")) == ([12], [13])  # the next free ids
    ids, mask = template.encode(tok, CONVERSATION)
    assert ids == [
        12, 3, 1, 6, 2, 7, 13, 1,  # <|im_start|>system\nBe brief<|im_end|>\n
        12, 4, 1, 8, 13, 1,        # <|im_start|>user\nHi<|im_end|>\n
        12, 5, 1, 9, 13, 1,        # <|im_start|>assistant\nHello<|im_end|>\n
        12, 4, 1, 10, 13, 1,       # <|im_start|>user\nBye<|im_end|>\n
        12, 5, 1, 11, 13, 1,       # <|im_start|>assistant\nCiao<|im_end|>\n
    ]
    # Every assistant answer and its end-of-turn marker, nothing else (the header and the newline after stay out).
    assert [i for i, m in enumerate(mask) if m] == [17, 18, 29, 30]
    item = conversation_item(template, tok, CONVERSATION)
    assert item["ids"] == ids[:30]  # after the last learnt target nothing is left to learn
    assert item["targets"] == [-100] * 16 + [9, 13] + [-100] * 10 + [11, 13]
    assert tok.eos_id == 0 and template.stop_id(tok) == 13


def test_prompt_is_a_prefix_of_the_conversation_it_starts(words):
    template = BUILTIN_TEMPLATES["chatml"]
    tok = template.prepare_tokenizer(words)
    full, _ = template.encode(tok, CONVERSATION)
    prompt = template.prompt_ids(tok, CONVERSATION[:4])
    assert full[: len(prompt)] == prompt and full[len(prompt)] == 11  # the model continues with the answer


def test_alpaca_template_renders_the_books_example():
    template = BUILTIN_TEMPLATES["alpaca"]
    messages = [{"role": "user", "content": "Rewrite it.", "input": "The sky is blue."},
                {"role": "assistant", "content": "Blue is the sky."}]
    text, spans = template.render(messages)
    book = ("Below is an instruction that describes a task. Write a response that appropriately completes the request."
            "\n\n### Instruction:\nRewrite it.\n\n### Input:\nThe sky is blue.\n\n### Response:\nBlue is the sky.")
    assert text == book + "<|endoftext|>"
    assert [text[a:b] for a, b in spans] == ["Blue is the sky.<|endoftext|>"]
    prompt, _ = template.render(messages[:1], add_generation_prompt=True)
    assert prompt == book[: book.index("Blue")]


def test_phi3_template_renders_the_books_exercise():
    text, spans = BUILTIN_TEMPLATES["phi3"].render([{"role": "user", "content": "Name a colour."},
                                                    {"role": "assistant", "content": "teal"}])
    assert text == "<|user|>\nName a colour.\n<|assistant|>:\nteal<|endoftext|>"
    assert [text[a:b] for a, b in spans] == ["teal<|endoftext|>"]


def test_user_template_inline_and_from_a_file(tmp_path, words):
    source = ("{% for m in messages %}{{ m['role'] + ': ' }}{% if m['role'] == 'assistant' %}{% generation %}"
              "{{ m['content'] + '<|end|>' }}{% endgeneration %}{% else %}{{ m['content'] + '<|end|>' }}{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    inline = get_chat_template(source, ["<|end|>"])
    path = tmp_path / "mine.jinja"
    path.write_text(source, encoding="utf-8")
    from_file = get_chat_template(str(path), ["<|end|>"])
    assert from_file.name == "mine.jinja" and from_file.source == inline.source
    tok = inline.prepare_tokenizer(words)
    assert inline.stop_text(tok) == "<|end|>"  # found from the generation block of a probe conversation
    text, spans = inline.render(CONVERSATION[1:3])
    assert text == "user: Hi<|end|>assistant: Hello<|end|>"
    assert [text[a:b] for a, b in spans] == ["Hello<|end|>"]


def test_a_template_without_an_end_marker_in_its_generation_block_is_refused():
    words = train_bpe(["hi there, ok then"] * 5, 300)
    source = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
              "{% endgeneration %}{{ eos_token }}{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    with pytest.raises(ConfigError, match="must end with an end-of-turn special token"):
        get_chat_template(source).stop_text(words)
    plain = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ConfigError, match="marks no assistant text"):
        get_chat_template(plain).stop_text(words)


def test_bad_template_settings_say_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="unknown chat template 'chatgpt'"):
        get_chat_template("chatgpt")
    with pytest.raises(ConfigError, match="does not exist"):
        get_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ConfigError, match="not valid Jinja"):
        get_chat_template("{% for m in messages %}")


def test_the_sandbox_runs_no_code():
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        get_chat_template(escape).render(CONVERSATION)
    mutate = "{% set x = messages.append(1) %}{{ messages | length }}"
    with pytest.raises(Exception, match="unsafe|not safely|immutable|access"):
        get_chat_template(mutate).render(CONVERSATION)
    with pytest.raises(DataError, match="no system messages here"):
        get_chat_template("{{ raise_exception('no system messages here') }}").render(CONVERSATION)


def test_template_round_trips_through_checkpoint_metadata():
    template = get_chat_template("chatml", ["<|tool|>"])
    stored = {"chat_template": template.to_dict()}
    back = checkpoint_chat_template(stored)
    assert back == template and back.special_tokens == ("<|im_start|>", "<|im_end|>", "<|tool|>")
    assert checkpoint_chat_template({"chat_template": template.source}).source == template.source  # an HF export
    assert checkpoint_chat_template({}) is None


def test_the_server_renders_with_the_chat_template_and_stops_at_its_marker(words):
    template = BUILTIN_TEMPLATES["chatml"]
    tok = template.prepare_tokenizer(words)
    messages = [ChatMessage("developer", "Be brief"), ChatMessage("user", "Hi")]
    expected, _ = template.render([{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}],
                                  add_generation_prompt=True)
    assert render_chat(messages, template) == expected
    assert chat_stops(template, tok) == ["<|im_end|>"]
    assert chat_stops(BUILTIN_TEMPLATES["alpaca"], tok) == []  # end-of-text stops every reply already
    assert chat_stops("alpaca", tok) == []


# ---- the same ids and masks as transformers -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chatml", "alpaca", "phi3", "custom"])
def test_ids_and_masks_equal_transformers_apply_chat_template(name):
    transformers = pytest.importorskip("transformers")
    custom = ("{% for m in messages %}{{ '[' + m['role'] + '] ' }}{% if m['role'] == 'assistant' %}"
              "{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}{% else %}{{ m['content'] + '\n' }}"
              "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")
    template = get_chat_template(custom if name == "custom" else name)
    texts = ["Hello there, how are you?", "Fine thanks, and you?", "Remember the number 7. Add 5 to it. 12"] * 20
    tok = template.prepare_tokenizer(train_bpe(texts, 300))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token=tok.eos_token,
                                              bos_token=tok.eos_token)
    hf.chat_template = template.source
    conversation = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"},
                    {"role": "assistant", "content": "Fine thanks"}, {"role": "user", "content": "Add 5 to 7."},
                    {"role": "assistant", "content": " 12, and you?"}]
    out = hf.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = template.encode(tok, conversation)
    assert out["input_ids"] == ids
    assert out["assistant_masks"] == mask
    assert sum(mask) > 4
    prompt = hf.apply_chat_template(conversation[:4], tokenize=True, add_generation_prompt=True, return_dict=True)
    assert prompt["input_ids"] == template.prompt_ids(tok, conversation[:4])


def test_the_serving_engine_ends_a_chat_reply_at_the_end_of_turn_marker():
    """A model rigged to answer <|im_end|> at every step: with the template's stop the reply ends there, empty and
    finished by "stop"; without it the markers run on to max_tokens."""
    import threading

    import torch

    from lit_llm.model.config import GPTConfig
    from lit_llm.model.gpt import GPTModel
    from lit_llm.serve.engine import Engine, GenerationRequest

    template = BUILTIN_TEMPLATES["chatml"]
    tok = template.prepare_tokenizer(train_bpe(["Hi there. Hello!"] * 5, 270))
    end = template.stop_id(tok)
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=32, emb_dim=16, n_heads=2, n_layers=1,
                               drop_rate=0.0, tie_weights=False))
    with torch.no_grad():  # a constant final hidden state that the head maps onto <|im_end|>
        model.final_norm.weight.zero_()
        model.final_norm.bias.zero_()
        model.final_norm.bias[0] = 1.0
        model.out_head.weight.zero_()
        model.out_head.weight[end, 0] = 10.0

    def run(stop: list[str]) -> tuple[str, list]:
        events, done = [], threading.Event()

        def emit(event):
            events.append(event)
            if event.kind != "text":
                done.set()

        engine = Engine(model, tok, slots=1, mode="eager").start()
        try:
            engine.submit(GenerationRequest(prompt_ids=tok.encode("<|im_start|>user\nHi"), max_tokens=4, emit=emit,
                                            stop=stop))
            assert done.wait(60)
        finally:
            engine.close()
        return "".join(e.text for e in events if e.kind == "text"), events

    text, events = run(chat_stops(template, tok))
    assert text == "" and events[-1].finish_reason == "stop"
    text, events = run([])
    assert text == "<|im_end|>" * 4 and events[-1].finish_reason == "length"
