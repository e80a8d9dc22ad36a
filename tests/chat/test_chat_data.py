"""ChatDataModule: the three record formats, malformed records (error or skip), truncation that never leaves half an
answer, the padded collate of shifted items, and the book's Alpaca records giving the book's chapter 7 batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lit_llm.data import ChatDataModule, InstructDataModule
from lit_llm.data.builtin.chat import generate_conversations
from lit_llm.data.chat_template import BUILTIN_TEMPLATES
from lit_llm.data.collate import InstructionCollate, TargetCollate, collate_targets
from lit_llm.data.conversations import conversation_problem, to_messages
from lit_llm.data.tokenizer import train_bpe
from lit_llm.errors import ConfigError, DataError

GOOD = {"messages": [{"role": "user", "content": "My favourite colour is teal."},
                     {"role": "assistant", "content": "Noted, teal."},
                     {"role": "user", "content": "What is my favourite colour?"},
                     {"role": "assistant", "content": "teal"}]}


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    """A BPE trained once on the built-in conversations and instructions, shared by every data module here."""
    from lit_llm.data.builtin.instruct import generate_tasks

    texts = [m["content"] for c in generate_conversations(600)["messages"] for m in c]
    tasks = generate_tasks(per_kind=50)
    texts += tasks["instruction"] + tasks["input"] + tasks["output"]
    texts.append("Below is an instruction that describes a task.")
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(texts, 600).save(path.parent)
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def module(source, tokenizer_file, **kwargs) -> ChatDataModule:
    settings = dict(tokenizer=str(tokenizer_file), context_length=128, split_fractions=(1.0, 0.0, 0.0),
                    batch_size=2, drop_last=False)
    return ChatDataModule(source=str(source), **{**settings, **kwargs})


def spans(item: dict) -> list[tuple[int, int]]:
    """The runs of learnt targets of an item, as [start, end) positions."""
    out, start = [], None
    for i, t in enumerate(item["targets"] + [-100]):
        if t != -100 and start is None:
            start = i
        elif t == -100 and start is not None:
            out.append((start, i))
            start = None
    return out


# ---- formats ----------------------------------------------------------------------------------------------------


def test_each_format_parses_to_the_same_messages():
    messages = GOOD["messages"]
    assert to_messages(GOOD) == messages
    sharegpt = {"conversations": [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]}
                                  for m in messages]}
    assert to_messages(sharegpt) == messages
    assert to_messages({**sharegpt, "system": "Be brief."}) == [{"role": "system", "content": "Be brief."}, *messages]
    with_system_turn = {"conversations": [{"from": "system", "value": "Be brief."}, *sharegpt["conversations"]]}
    assert to_messages(with_system_turn)[0] == {"role": "system", "content": "Be brief."}
    assert to_messages({**GOOD, "system": "Be brief."})[0] == {"role": "system", "content": "Be brief."}
    assert to_messages({"instruction": "Add.", "input": "1 + 2", "output": "3"}) == [
        {"role": "user", "content": "Add.", "input": "1 + 2"}, {"role": "assistant", "content": "3"}]
    assert to_messages({"instruction": "Say hi.", "input": "", "output": "hi"})[0] == {"role": "user",
                                                                                        "content": "Say hi."}
    for record in (GOOD, sharegpt):
        assert conversation_problem(to_messages(record)) is None


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca"])
def test_each_format_trains_from_a_local_file(tmp_path, tokenizer_file, fmt):
    if fmt == "messages":
        records = [GOOD] * 3
    elif fmt == "sharegpt":
        records = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}] * 3
    else:
        records = [{"instruction": "Repeat the word stone.", "input": "", "output": "stone"}] * 3
    dm = module(write_jsonl(tmp_path / "data.jsonl", records), tokenizer_file, format=fmt)
    dm.setup()
    items = dm.datasets["train"].items
    assert len(items) == 3
    for item in items:
        assert len(item["ids"]) == len(item["targets"])
        for i, t in enumerate(item["targets"][:-1]):
            assert t in (-100, item["ids"][i + 1])  # already shifted: a target is the next input or ignored
    last = items[0]["targets"][-1]
    assert last == dm.stop_id  # every item ends by learning the end-of-turn marker
    inputs, targets = next(iter(dm.train_dataloader()))
    assert inputs.shape == targets.shape


# ---- malformed records: one clear error, or a counted skip ---------------------------------------------------------

BAD = {
    "unknown role": ({"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "Beep"}]},
                     "unknown role 'robot'"),
    "two assistants": ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                     {"role": "assistant", "content": "Again"}]}, "two assistant messages in a row"),
    "empty content": ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
                      "empty content"),
    "unknown from": ({"conversations": [{"from": "bot", "value": "Hi"}]}, "unknown 'from' 'bot'"),
    "ends with the user": ({"messages": [{"role": "user", "content": "Hi"}]}, "ends with a user message"),
    "no messages field": ({"text": "Hi"}, "none of the fields"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_malformed_record_stops_the_run_naming_it(tmp_path, tokenizer_file, case):
    record, problem = BAD[case]
    source = write_jsonl(tmp_path / "data.jsonl", [GOOD, GOOD, record, GOOD])
    dm = module(source, tokenizer_file)
    with pytest.raises(DataError, match=f"record 2 is no well-formed conversation: it .*{problem}.*malformed=skip"):
        dm.setup()


def test_malformed_records_are_skipped_and_counted_on_request(tmp_path, tokenizer_file):
    records = [GOOD, *(r for r, _ in BAD.values()), GOOD]
    dm = module(write_jsonl(tmp_path / "data.jsonl", records), tokenizer_file, malformed="skip")
    with pytest.warns(UserWarning, match=f"skipped {len(BAD)} of {len(records)} train records .*record 1: message 1"):
        dm.setup()
    assert len(dm.datasets["train"]) == 2


def test_bad_settings_are_named_together(tokenizer_file):
    with pytest.raises(ConfigError) as err:
        ChatDataModule(chat_template="nope", overlong="truncate", malformed="ignore", format="csv",
                       tokenizer=str(tokenizer_file))
    for key in ("data.chat_template", "data.overlong", "data.malformed", "data.format"):
        assert key in str(err.value)


# ---- truncation -----------------------------------------------------------------------------------------------------


def long_conversation(n: int) -> dict:
    messages = [{"role": "system", "content": "You remember numbers."}]
    for i in range(n):
        messages += [{"role": "user", "content": f"Remember the number {i}. What is {i} + {i}?"},
                     {"role": "assistant", "content": f"OK, {i}. It is {2 * i}."}]
    return {"messages": messages}


def test_overlong_drops_oldest_exchanges_and_never_half_an_answer(tmp_path, tokenizer_file):
    records = [long_conversation(6), long_conversation(1), GOOD]
    source = write_jsonl(tmp_path / "data.jsonl", records)
    full = module(source, tokenizer_file, context_length=512)
    full.setup()
    whole = full.datasets["train"].items[0]
    assert len(spans(whole)) == 6
    limit = len(whole["ids"]) - 5  # too short for all six exchanges
    dm = module(source, tokenizer_file, context_length=512, max_length=limit)
    with pytest.warns(UserWarning, match="1 of 3 conversations are longer .* 1 lost their 1 oldest exchanges"):
        dm.setup()
    item = dm.datasets["train"].items[0]
    tok, stop = dm.tokenizer, dm.stop_id
    assert len(item["ids"]) <= limit
    text = tok.decode(item["ids"])
    assert text.startswith("<|im_start|>system\nYou remember numbers.<|im_end|>")  # the system message stays
    assert "number 0." not in text and "number 1." in text  # the oldest exchange went whole
    learnt = spans(item)
    assert len(learnt) == 5  # five whole answers, each ending with its end-of-turn marker
    for start, end in learnt:
        answer = tok.decode(item["targets"][start:end])
        assert answer.startswith("OK, ") and answer.endswith("<|im_end|>") and item["targets"][end - 1] == stop


def test_a_conversation_that_fits_no_window_is_dropped_or_stops_the_run(tmp_path, tokenizer_file):
    huge = long_conversation(2)
    huge["messages"][0]["content"] = "You remember numbers. " * 20  # the system message alone fills the window
    source = write_jsonl(tmp_path / "data.jsonl", [GOOD, huge, GOOD])
    probe = module(write_jsonl(tmp_path / "good.jsonl", [GOOD]), tokenizer_file)
    probe.setup()
    limit = len(probe.datasets["train"].items[0]["ids"])  # GOOD fits exactly
    dm = module(source, tokenizer_file, max_length=limit)
    with pytest.warns(UserWarning, match="1 of 3 conversations .* 0 lost their 0 oldest exchanges in all, 1 were "
                      "dropped whole"):
        dm.setup()
    assert len(dm.datasets["train"]) == 2
    dropped = module(source, tokenizer_file, max_length=limit, overlong="drop")
    with pytest.warns(UserWarning, match="1 were dropped whole .*overlong=drop"):
        dropped.setup()
    with pytest.raises(DataError, match=rf"data.source: record 1 is \d+ tokens, longer than max_length={limit}"):
        module(source, tokenizer_file, max_length=limit, overlong="error").setup()


# ---- collate ------------------------------------------------------------------------------------------------------


def test_collate_targets_pads_inputs_with_eos_and_targets_with_ignore():
    items = [{"ids": [5, 6, 7], "targets": [-100, 7, 8]}, {"ids": [9], "targets": [4]}]
    inputs, targets = collate_targets(items, pad_token_id=0)
    assert inputs.tolist() == [[5, 6, 7], [9, 0, 0]]
    assert targets.tolist() == [[-100, 7, 8], [4, -100, -100]]
    assert inputs.dtype == targets.dtype == torch.long
    assert TargetCollate(0)(items)[1].tolist() == targets.tolist()
    with pytest.raises(ValueError, match="1 ids but 2 targets"):
        collate_targets([{"ids": [1], "targets": [1, 2]}], 0)


def test_the_books_alpaca_records_give_the_books_masked_batches(tmp_path, tokenizer_file):
    """Alpaca records through the Alpaca chat template give exactly InstructDataModule's batches with the book's
    collate and prompt masking (exercise 7.2)."""
    from lit_llm.data.builtin.instruct import generate_tasks

    columns = generate_tasks(per_kind=3)
    records = [dict(zip(columns, row)) for row in zip(*columns.values())]
    source = tmp_path / "instructions.json"
    source.write_text(json.dumps(records), encoding="utf-8")
    common = dict(source=str(source), tokenizer=str(tokenizer_file), context_length=128,
                  split_fractions=(1.0, 0.0, 0.0), batch_size=36, drop_last=False, shuffle=False)
    book = InstructDataModule(**common, prompt_template="alpaca", mask_prompt=True)
    chat = ChatDataModule(**common, chat_template="alpaca", format="alpaca")
    book.setup()
    chat.setup()
    book_items = [book.datasets["train"][i] for i in range(len(book.datasets["train"]))]
    chat_items = chat.datasets["train"].items
    assert len(book_items) == len(chat_items) == len(records)
    expected = InstructionCollate(book.eos_id, mask_prompt=True)(book_items)
    got = TargetCollate(chat.eos_id)(chat_items)
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    assert chat.stop_id == chat.eos_id == book.eos_id
    assert BUILTIN_TEMPLATES["alpaca"].special_tokens == ()  # the book's vocabulary, unchanged


# ---- the built-in conversations ---------------------------------------------------------------------------------


def test_builtin_conversations_are_deterministic_and_need_their_earlier_turns():
    a, b = generate_conversations(60, seed=3), generate_conversations(60, seed=3)
    assert a == b and a != generate_conversations(60, seed=4)
    for messages, kind in zip(a["messages"], a["kind"]):
        assert conversation_problem(messages) is None
        opening = messages[0]["content"]
        later = [m["content"] for m in messages[3:] if m["role"] == "assistant"]
        questions = [m["content"] for m in messages[2:] if m["role"] == "user"]
        assert later and questions
        if kind == "colour" and questions[-1] == "What is my favourite colour?":
            assert opening == f"My favourite colour is {later[-1]}."
        if kind == "number" and questions[-1].startswith("Add "):
            n, m = int(opening.split()[-1].rstrip(".")), int(questions[-1].split()[1])
            assert later[-1] == str(n + m)


# ---- packing: conversations packed into rows train exactly as the padded batch ------------------------------------


def test_packed_conversations_hold_every_item_once_and_train_as_the_padded_batch(tmp_path, tokenizer_file):
    from lit_llm.tasks import ChatTask

    conversations = generate_conversations(12)["messages"]
    source = write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in conversations])
    dm = module(source, tokenizer_file, packing=True, batch_size=64)
    dm.setup()
    items = dm.datasets["train"].items
    inputs, targets, documents = next(iter(dm.train_dataloader()))
    assert len(dm.packed_train) < len(items)  # several conversations share a row
    # Every conversation appears once, whole, as one document of a row, with its own targets.
    found = []
    for row in range(inputs.shape[0]):
        for doc in documents[row].unique().tolist():
            if doc < 0:
                continue
            where = (documents[row] == doc).nonzero().flatten()
            assert where.tolist() == list(range(int(where[0]), int(where[-1]) + 1))  # contiguous
            found.append((inputs[row, where].tolist(), targets[row, where].tolist()))
    assert sorted(found) == sorted((item["ids"], item["targets"]) for item in items)
    # The loss of the packed rows equals the loss of the same conversations padded, gradients included.
    torch.manual_seed(0)
    task = ChatTask(model=dict(context_length=128, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0),
                    vocab_size=dm.vocab_size, generate_after_fit=False)
    task.configure_model()
    padded = collate_targets([{"ids": ids, "targets": t} for ids, t in found], dm.eos_id)
    loss_packed, n_packed = task._loss((inputs, targets, documents))
    loss_padded, n_padded = task._loss(padded)
    assert n_packed == n_padded > 0
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="packing and data.group_by_length"):
        module(source, tokenizer_file, packing=True, group_by_length=True)
