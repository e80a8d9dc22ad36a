"""InstructDataModule: sources, templates, the book's split, tokenization, policies and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import SHARED_DATA

from lit_llm.data import InstructDataModule
from lit_llm.data.builtin.instruct import KINDS, generate_tasks
from lit_llm.data.prompts import format_prompt
from lit_llm.data.tokenizer import Tokenizer, load_tokenizer, train_bpe
from lit_llm.errors import ConfigError, DataError

WORDS = ["river", "stone", "light", "cloud", "amber", "quiet", "north", "ember"]


def make_records(n: int, with_input_every: int = 3) -> list[dict[str, str]]:
    """``n`` small records; every ``with_input_every``-th has an input."""
    return [
        {"instruction": f"Repeat the word {WORDS[i % len(WORDS)]}.",
         "input": WORDS[(i + 1) % len(WORDS)] if i % with_input_every == 0 else "",
         "output": f"{WORDS[i % len(WORDS)]} {i}"}
        for i in range(n)
    ]


def write_json(path: Path, records: list[dict]) -> str:
    path.write_text(json.dumps(records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> str:
    """A small byte-level BPE (390 tokens) trained on text like the records': examples are at most 45 tokens."""
    texts = [format_prompt("alpaca", r["instruction"], r["input"]) + r["output"] for r in make_records(200)]
    return str(train_bpe(texts, vocab_size=400).save(tmp_path_factory.mktemp("tok")))


def dm(tmp_path: Path, source, tok_path: str, **kwargs) -> InstructDataModule:
    kwargs = {"context_length": 64, "batch_size": 4, "cache_dir": str(tmp_path / "cache"), **kwargs}
    return InstructDataModule(source=source, tokenizer=tok_path, **kwargs)


# ---- prompts and splits -------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", [
    {"instruction": "Identify the correct spelling of the following word.", "input": "Ocassion", "output": "x"},
    {"instruction": "What is an antonym of 'complicated'?", "input": "", "output": "x"},
])
def test_alpaca_prompt_is_the_books_format_input(entry):
    ch07 = pytest.importorskip("llms_from_scratch.ch07")
    assert format_prompt("alpaca", entry["instruction"], entry["input"]) == (
        ch07.format_input(entry) + "\n\n### Response:\n"
    )


def test_book_split_sizes_on_1100_records(tmp_path, tok_path):
    records = make_records(1100)
    d = dm(tmp_path, write_json(tmp_path / "data.json", records), tok_path)
    d.setup()
    parts = d.records()
    assert [len(parts[s]) for s in ("train", "test", "val")] == [935, 110, 55]
    # In file order: the first 935 train, the next 110 test, the last 55 validation.
    assert parts["train"] == records[:935] and parts["test"] == records[935:1045] and parts["val"] == records[1045:]
    assert [len(d.datasets[s]) for s in ("train", "test", "val")] == [935, 110, 55]
    assert d.test_records == records[935:1045]
    assert d.test_prompts[0] == format_prompt("alpaca", records[935]["instruction"], records[935]["input"])


def test_shuffled_split_is_seeded(tmp_path, tok_path):
    path = write_json(tmp_path / "data.json", make_records(200))
    a = dm(tmp_path, path, tok_path, split="shuffle", seed=1).records()
    b = dm(tmp_path, path, tok_path, split="shuffle", seed=1).records()
    c = dm(tmp_path, path, tok_path, split="shuffle", seed=2).records()
    assert a == b and a["test"] != c["test"]
    assert [len(a[s]) for s in ("train", "test", "val")] == [170, 20, 10]
    assert a["train"] != make_records(200)[:170]
    keys = [r["output"] for part in a.values() for r in part]
    assert sorted(keys) == sorted(r["output"] for r in make_records(200))  # a partition


def test_explicit_val_and_test_files(tmp_path, tok_path):
    train = write_json(tmp_path / "train.json", make_records(40))
    val = write_json(tmp_path / "val.json", make_records(7))
    test = tmp_path / "test.jsonl"
    test.write_text("\n".join(json.dumps(r) for r in make_records(5)), encoding="utf-8")
    parts = dm(tmp_path, train, tok_path, val_source=val, test_source=str(test)).records()
    assert [len(parts[s]) for s in ("train", "test", "val")] == [40, 5, 7]
    # Only a test file: the source keeps the book's train : val proportion (0.85 : 0.05) for its two parts.
    parts = dm(tmp_path, train, tok_path, test_source=str(test)).records()
    assert [len(parts[s]) for s in ("train", "test", "val")] == [37, 5, 3]


def test_parquet_source_and_dolly_field_names(tmp_path, tok_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"instruction": f"Name {w}.", "context": "some context" if i % 2 else "", "response": w}
            for i, w in enumerate(WORDS * 5)]
    path = tmp_path / "dolly.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    d = dm(tmp_path, str(path), tok_path, input_field="context", output_field="response")
    d.setup()
    assert d.test_records[0]["response"] == rows[34]["response"]
    first = d.datasets["train"][1]  # record 1 has a context
    text = d.tokenizer.decode(first["ids"])
    assert text == format_prompt("alpaca", "Name stone.", "some context") + "stone"
    # No input field at all in the records is fine when the input field is off ...
    d = dm(tmp_path, str(path), tok_path, input_field=None, output_field="response")
    d.setup()
    assert "### Input" not in d.tokenizer.decode(d.datasets["train"][1]["ids"])


def test_missing_input_field_warns_and_means_empty(tmp_path, tok_path):
    path = write_json(tmp_path / "no_input.json", [{"instruction": f"Say {w}.", "output": w} for w in WORDS * 3])
    with pytest.warns(UserWarning, match="data.input_field='input' is not a field"):
        d = dm(tmp_path, path, tok_path)
        d.setup()
    assert "### Input" not in d.test_prompts[0]


@pytest.mark.parametrize("template", ["alpaca", "phi3", "Q: {instruction} {input}\nA:"])
def test_examples_are_prompt_then_output(tmp_path, tok_path, template):
    records = make_records(30)
    d = dm(tmp_path, write_json(tmp_path / "d.json", records), tok_path, prompt_template=template)
    d.setup()
    tok = d.tokenizer
    for i in (0, 1):
        item = d.datasets["train"][i]
        prompt = format_prompt(template, records[i]["instruction"], records[i]["input"])
        assert tok.decode(item["ids"]) == prompt + records[i]["output"]
        assert item["ids"][: item["prompt_len"]] == tok.encode(prompt)


def test_batches_are_the_books_collate(tmp_path, tok_path):
    d = dm(tmp_path, write_json(tmp_path / "d.json", make_records(40)), tok_path, shuffle=False)
    d.setup()
    inputs, targets = next(iter(d.train_dataloader()))
    items = [d.datasets["train"][i]["ids"] for i in range(4)]
    width = max(len(x) for x in items)
    assert inputs.shape == targets.shape == (4, width)
    for row, ids in enumerate(items):
        assert inputs[row, : len(ids)].tolist() == ids
        assert targets[row, len(ids) - 1] == d.eos_id  # the end-of-text is a target ...
        assert targets[row, len(ids) :].eq(-100).all()  # ... the padding after it is not


def test_tokenization_equals_the_books_on_its_data(tmp_path):
    """With GPT-2's BPE, prompt and output tokenized apart give the book's ids for prompt + output as one text."""
    data, gpt2 = SHARED_DATA / "instruction-data.json", SHARED_DATA / "gpt2"
    if not data.is_file() or not gpt2.is_dir():
        pytest.skip("the book's data is not in ../shared/data")
    d = InstructDataModule(source=str(data), tokenizer=str(gpt2), context_length=1024,
                              cache_dir=str(tmp_path / "cache"))
    d.setup()
    ch07 = pytest.importorskip("llms_from_scratch.ch07")
    tok = load_tokenizer(gpt2)
    train = d.records()["train"]
    assert len(train) == 935 and len(d.test_records) == 110 and len(d.records()["val"]) == 55
    book = ch07.InstructionDataset(train, tok)
    assert all(d.datasets["train"][i]["ids"] == book[i] for i in range(len(train)))
    assert d.eos_id == 50256 and d.vocab_size == 50257


# ---- tokenizer and checkpoints -------------------------------------------------------------------------------


def test_trained_tokenizer_sees_only_the_training_split(tmp_path):
    records = make_records(100)
    records[-1]["output"] = "zyzzyva " * 20  # in the validation part only
    d = InstructDataModule(source=write_json(tmp_path / "d.json", records), tokenizer="train",
                              tokenizer_vocab_size=300, context_length=64, cache_dir=str(tmp_path / "cache"))
    assert isinstance(d.tokenizer, Tokenizer) and d.vocab_size == d.tokenizer.vocab_size
    assert len(d.tokenizer.encode("zyzzyva")) > 3  # never merged: not in the training text
    again = InstructDataModule(source=str(tmp_path / "d.json"), tokenizer="train", tokenizer_vocab_size=300,
                                  context_length=64, cache_dir=str(tmp_path / "cache"))
    assert again.tokenizer.fingerprint == d.tokenizer.fingerprint  # cached


def test_state_dict_holds_the_tokenizer_and_checks_it(tmp_path, tok_path):
    d = dm(tmp_path, write_json(tmp_path / "d.json", make_records(20)), tok_path)
    state = d.state_dict()
    assert Tokenizer.from_json(state["tokenizer_json"]).fingerprint == state["tokenizer_fingerprint"]
    d.load_state_dict(state)  # same tokenizer: fine
    with pytest.raises(DataError, match="tokenizer mismatch"):
        d.load_state_dict({**state, "tokenizer_fingerprint": "0" * 64})


# ---- bad input ------------------------------------------------------------------------------------------------


def test_record_missing_a_required_field_is_named(tmp_path, tok_path):
    records = make_records(20)
    del records[13]["output"]
    d = dm(tmp_path, write_json(tmp_path / "d.json", records), tok_path)
    with pytest.raises(DataError, match=r"data.source: record 13 has no 'output' field .*data.output_field"):
        d.setup()
    d = dm(tmp_path, str(tmp_path / "d.json"), tok_path, instruction_field="prompt")
    with pytest.raises(DataError, match=r"record 0 has no 'prompt' field \(its fields: \['input', 'instruction'"):
        d.setup()


def test_empty_output_is_an_error_or_dropped(tmp_path, tok_path):
    records = make_records(40)
    records[7]["output"] = "  "
    records[38]["output"] = ""  # in the validation part
    path = write_json(tmp_path / "d.json", records)
    with pytest.raises(DataError, match=r"record 7 has an empty 'output' .*data.empty_output=drop"):
        dm(tmp_path, path, tok_path).setup()
    d = dm(tmp_path, path, tok_path, empty_output="drop")
    with pytest.warns(UserWarning, match="dropped 1 train records with an empty output"):
        d.setup()
    assert [len(d.datasets[s]) for s in ("train", "test", "val")] == [33, 4, 1]
    assert all(r["output"].strip() for part in d.records().values() for r in part)


def test_overlong_examples_are_truncated_or_dropped_and_counted(tmp_path, tok_path):
    records = make_records(40)
    records[2]["output"] = " ".join(WORDS * 10)  # far over 48 tokens
    records[5]["output"] = " ".join(WORDS * 6)
    path = write_json(tmp_path / "d.json", records)
    d = dm(tmp_path, path, tok_path, context_length=48)
    with pytest.warns(UserWarning, match=r"2 of 34 train examples are longer than allowed_max_length=48 tokens "
                                         r"\(longest \d+\): truncated"):
        d.setup()
    assert len(d.datasets["train"]) == 34
    for inputs, targets in d.train_dataloader():
        assert inputs.shape[1] <= 48 and targets.shape[1] <= 48
    d = dm(tmp_path, path, tok_path, context_length=64, allowed_max_length=48, overlong="drop")
    with pytest.warns(UserWarning, match="2 of 34 train examples .* dropped"):
        d.setup()
    assert len(d.datasets["train"]) == 32
    assert all(len(x) <= 48 for x in d.datasets["train"].ids)


def test_bad_settings_are_collected_in_one_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        InstructDataModule(source="https://example.com/d.json", context_length=64, allowed_max_length=128,
                              split_fractions=(0.5, 0.1, 0.1), prompt_template="vicuna", batch_size=0)
    message = str(err.value)
    for part in ("data.sha256 is required", "data.allowed_max_length=128", "data.split_fractions=[0.5, 0.1, 0.1]",
                 "Unknown prompt template 'vicuna'", "data.batch_size=0"):
        assert part in message


def test_too_few_training_examples_for_a_batch(tmp_path, tok_path):
    d = dm(tmp_path, write_json(tmp_path / "d.json", make_records(4)), tok_path, batch_size=8)
    with pytest.raises(DataError, match="fewer than data.batch_size=8"):
        d.train_dataloader()


# ---- the built-in set ------------------------------------------------------------------------------------------


def test_builtin_tasks_are_deterministic_and_checkable():
    a, b = generate_tasks(), generate_tasks()
    assert a == b and set(a) == {"instruction", "input", "output", "task"}
    n = len(a["instruction"])
    assert n == 250 * len(KINDS) >= 2000
    empty = sum(1 for x in a["input"] if not x)
    assert 0.3 * n < empty < 0.7 * n  # both phrasings: the ### Input section is left out for many
    assert all(o.strip() and len(o) <= 40 for o in a["output"])
    rows = list(zip(a["instruction"], a["input"], a["output"], a["task"]))
    for instruction, input_, output, task in rows[:300]:  # spot-check the answers
        text = input_ or instruction
        if task == "add":
            x, y = (int(t) for t in text.removeprefix("What is ").rstrip("?").split(" + "))
            assert output == str(x + y)
        elif task == "upper":
            assert output == output.upper() and output.lower() in text
        elif task == "reverse" and input_:
            assert output.split() == input_.split()[::-1]
        elif task == "sort" and input_:
            assert output.split() == sorted(input_.split())
        elif task == "count_words" and input_:
            assert output == str(len(input_.split()))
    # Shuffled, so the book's ordered split sees every kind in the test part.
    assert set(a["task"][2550:2850]) == set(KINDS)


def test_builtin_source_through_the_data_module(tmp_path):
    d = InstructDataModule(source="builtin:instruct", tokenizer="train", tokenizer_vocab_size=400,
                              context_length=128, cache_dir=str(tmp_path / "cache"))
    d.setup()
    assert [len(d.datasets[s]) for s in ("train", "test", "val")] == [2550, 300, 150]
    assert {"instruction", "input", "output", "task"} <= set(d.test_records[0])
    assert torch.is_tensor(next(iter(d.val_dataloader()))[0])


def test_group_by_length_pads_less(tmp_path, tok_path):
    records = make_records(200)
    for i, r in enumerate(records):
        r["output"] = " ".join(WORDS[: 1 + i % 8] * (1 + i % 3))  # lengths from 1 to 24 words
    path = write_json(tmp_path / "d.json", records)

    def padding(**kwargs) -> int:
        d = dm(tmp_path, path, tok_path, batch_size=8, **kwargs)
        d.setup()
        return sum(int(targets.eq(-100).sum()) for _, targets in d.train_dataloader())

    grouped, plain = padding(group_by_length=True), padding()
    assert grouped < plain / 3


@pytest.mark.parametrize("group_by_length", [False, True])
def test_training_order_resumes_mid_epoch(tmp_path, tok_path, group_by_length):
    path = write_json(tmp_path / "d.json", make_records(100))
    first = dm(tmp_path, path, tok_path, group_by_length=group_by_length)
    loader = first.train_dataloader()
    epoch = [batch for batch in loader]
    for _ in range(5):
        loader.consumed()  # what on_before_batch_transfer records for each batch training used
    state = loader.state_dict()
    resumed = dm(tmp_path, path, tok_path, group_by_length=group_by_length).train_dataloader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(epoch) - 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, epoch[5:]))
