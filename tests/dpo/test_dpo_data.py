"""DPODataModule: the book's collate on a literal example, the three record forms, bad records, the built-in pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lit_llm.data import DPODataModule
from lit_llm.data.builtin import load_builtin
from lit_llm.data.builtin.instruct import generate_tasks
from lit_llm.data.dpo import collate_preferences
from lit_llm.data.prompts import format_prompt
from lit_llm.data.tokenizer import train_bpe
from lit_llm.errors import ConfigError, DataError

WORDS = ["river", "stone", "light", "cloud", "amber", "quiet", "north", "ember"]


def book_records(n: int) -> list[dict[str, str]]:
    """The book's preference layout (with its chapter-7 ``output``); a third have an input."""
    return [
        {"instruction": f"Repeat the word {WORDS[i % 8]}.", "input": WORDS[(i + 3) % 8] if i % 3 == 0 else "",
         "output": WORDS[i % 8], "chosen": WORDS[i % 8], "rejected": f"{WORDS[(i + 1) % 8]} {WORDS[i % 8]}"}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    texts = [format_prompt("alpaca", r["instruction"], r["input"]) + r["chosen"] + r["rejected"]
             for r in book_records(40)]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(train_bpe(texts, 300).to_json(), encoding="utf-8")
    return path


def write(tmp_path: Path, records: list[dict], name: str = "pairs.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def module(source: Path | str, tokenizer_file: Path, **kw) -> DPODataModule:
    dm = DPODataModule(source=str(source), tokenizer=str(tokenizer_file), context_length=128, batch_size=4, **kw)
    dm.setup("fit")
    return dm


# ---- the collate ------------------------------------------------------------------------------------------------


def test_collate_masks_prompt_and_padding_on_a_literal_example():
    batch = [
        {"index": 0, "prompt": [10, 11, 12], "chosen": [20, 21, 99], "rejected": [30, 99]},
        {"index": 1, "prompt": [13], "chosen": [22, 99], "rejected": [31, 32, 33, 34, 99]},
    ]
    out = collate_preferences(batch, pad_token_id=99)
    # Rows: prompt + response padded with 99 to the longest of all four (1 + 5 = 6 tokens); inputs drop the last.
    assert out["index"].tolist() == [0, 1]
    assert out["chosen_inputs"].tolist() == [[10, 11, 12, 20, 21], [13, 22, 99, 99, 99]]
    assert out["rejected_inputs"].tolist() == [[10, 11, 12, 30, 99], [13, 31, 32, 33, 34]]
    # Targets: the next token where it is part of the response (its end-of-text included), -100 elsewhere.
    assert out["chosen_targets"].tolist() == [[-100, -100, 20, 21, 99], [22, 99, -100, -100, -100]]
    assert out["rejected_targets"].tolist() == [[-100, -100, 30, 99, -100], [31, 32, 33, 34, 99]]
    # Without prompt masking the prompt's own next tokens count too; padding never does.
    unmasked = collate_preferences(batch, pad_token_id=99, mask_prompt=False)
    assert unmasked["chosen_targets"].tolist() == [[11, 12, 20, 21, 99], [22, 99, -100, -100, -100]]
    # allowed_max_length cuts both tensors, as the book's collate does.
    cut = collate_preferences(batch, pad_token_id=99, allowed_max_length=3)
    assert cut["rejected_targets"].tolist() == [[-100, -100, 30], [31, 32, 33]]
    assert all(v.dtype == torch.long for v in out.values())


# ---- forms and splits -------------------------------------------------------------------------------------------


def test_book_records_split_and_tokenize_like_the_book(tmp_path, tokenizer_file):
    records = book_records(40)
    dm = module(write(tmp_path, records), tokenizer_file)
    # The book's cut of 40: 34 train, 4 test, 2 validation, in file order.
    assert [len(dm.datasets[s]) for s in ("train", "test", "val")] == [34, 4, 2]
    assert dm.test_records == records[34:38]
    tok = dm.tokenizer
    item = dm.datasets["train"][3]
    r = records[3]
    assert item["prompt"] == tok.encode(format_prompt("alpaca", r["instruction"], r["input"]))
    assert item["chosen"] == tok.encode(r["chosen"]) + [tok.eos_id]
    assert item["rejected"] == tok.encode(r["rejected"]) + [tok.eos_id]
    assert dm.test_prompt_ids[0] == tok.encode(format_prompt("alpaca", records[34]["instruction"],
                                                             records[34]["input"]))
    assert dm.reference_field == "chosen"
    batch = next(iter(dm.train_dataloader()))
    assert batch["chosen_inputs"].shape == batch["rejected_inputs"].shape and batch["index"].shape == (4,)


def test_prompt_and_conversation_forms_give_the_same_pairs(tmp_path, tokenizer_file):
    records = book_records(40)
    for r in records:
        r["input"] = ""  # the prompt and conversation forms have no separate input
    book = module(write(tmp_path, records, "book.json"), tokenizer_file)
    prompt = [{"prompt": r["instruction"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in records]
    explicit = [{"prompt": [{"role": "user", "content": r["instruction"]}],
                 "chosen": [{"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in records]
    implicit = [{key: [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r[key]}]
                 for key in ("chosen", "rejected")} for r in records]
    for name, form in (("prompt", prompt), ("explicit", explicit), ("implicit", implicit)):
        other = module(write(tmp_path, form, f"{name}.jsonl" if name == "prompt" else f"{name}.json"), tokenizer_file)
        for split in ("train", "val", "test"):
            a, b = book.datasets[split], other.datasets[split]
            assert (a.prompts, a.chosen, a.rejected) == (b.prompts, b.chosen, b.rejected), (name, split)
        assert [r["chosen"] for r in other.test_records] == [r["chosen"] for r in book.test_records]
        assert other.test_records[0]["instruction"] == records[34]["instruction"]


# ---- bad records ------------------------------------------------------------------------------------------------


def bad_set() -> list[dict]:
    records = book_records(40)
    records[2]["rejected"] = records[2]["chosen"]  # identical
    records[5]["rejected"] = records[5]["chosen"] + "  "  # identical once stripped
    records[7]["chosen"] = " "  # empty response
    records[36]["rejected"] = "word " * 80  # too long (test split)
    return records


def test_bad_records_stop_with_one_message_counting_each_kind(tmp_path, tokenizer_file):
    with pytest.raises(DataError) as err:
        module(write(tmp_path, bad_set()), tokenizer_file)
    message = str(err.value)
    assert "2 with chosen and rejected are the same text (first: data.source record 2)" in message
    assert "1 with an empty chosen or rejected response (first: data.source record 7)" in message
    assert "1 with prompt + response longer than allowed_max_length tokens (first: data.source record 36)" in message
    assert "data.bad_records=skip" in message


def test_bad_records_skip_counts_and_drops(tmp_path, tokenizer_file):
    with pytest.warns(UserWarning, match="data.bad_records=skip dropped 2 with chosen and rejected"):
        dm = module(write(tmp_path, bad_set()), tokenizer_file, bad_records="skip")
    assert dict(dm.skipped) == {"identical": 2, "empty_response": 1, "too_long": 1}
    assert [len(dm.datasets[s]) for s in ("train", "test", "val")] == [31, 3, 2]
    assert all(r["rejected"] != "word " * 80 for r in dm.test_records)
    # truncate cuts the long pair instead (its prompt leaves room for a response).
    with pytest.warns(UserWarning, match="dropped 2 with"):
        cut = module(write(tmp_path, bad_set()), tokenizer_file, bad_records="skip", truncate=True)
    assert len(cut.datasets["test"]) == 4


def test_multi_turn_conversations_are_bad_records(tmp_path, tokenizer_file):
    records = [{"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                           {"role": "user", "content": "Repeat river."}, {"role": "assistant", "content": "river"}],
                "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                             {"role": "user", "content": "Repeat river."}, {"role": "assistant", "content": "stone"}]}]
    with pytest.raises(DataError, match="10 with a conversation of more than one user turn"):
        module(write(tmp_path, records * 10), tokenizer_file)


def test_missing_fields_and_bad_settings_are_named(tmp_path, tokenizer_file):
    records = [{"instruction": "a", "input": "", "chosen": "b"}] * 10
    with pytest.raises(DataError, match="record 0 has no 'rejected' field .* data.rejected_field"):
        module(write(tmp_path, records), tokenizer_file)
    with pytest.raises(DataError, match="cannot tell the preference format"):
        module(write(tmp_path, [{"question": "a", "chosen": "b", "rejected": "c"}] * 10), tokenizer_file)
    with pytest.raises(ConfigError, match="data.bad_records='ignore' must be one of error, skip"):
        DPODataModule(bad_records="ignore")
    with pytest.raises(ConfigError, match="data.sha256 is required for a URL"):
        DPODataModule(source="https://example.com/pairs.json")


# ---- the built-in pairs -----------------------------------------------------------------------------------------


def test_builtin_preference_pairs_a_right_and_a_wrong_answer_to_the_instruct_tasks():
    pairs = load_builtin("preference")
    tasks = generate_tasks()
    assert pairs["instruction"] == tasks["instruction"] and pairs["input"] == tasks["input"]  # same order, same split
    assert pairs["chosen"] == tasks["output"]
    assert all(c != r and r.strip() for c, r in zip(pairs["chosen"], pairs["rejected"]))
    assert load_builtin("preference")["rejected"] == pairs["rejected"]  # deterministic
    by_kind = {}
    for row in pairs.select(range(200)):
        by_kind.setdefault(row["task"], row)
    assert len(by_kind) == 12
    add = by_kind["add"]
    assert abs(int(add["rejected"]) - int(add["chosen"])) in (1, 2)
    upper = by_kind["upper"]
    assert upper["rejected"] == upper["chosen"].lower()


def test_the_quality_stage_removes_duplicate_pairs_and_names_a_leaked_one(tmp_path, tokenizer_file):
    """``data.quality`` on preference pairs: a pair repeated with other case and spacing is removed before the split
    (compared on the prompt and both responses), and a training pair copied into the test file is reported by
    name."""
    from lit_llm.data.quality import QualityConfig

    # distinct pairs (book_records repeats its eight words), so the only duplicates are the planted ones
    records = [{**r, "instruction": f"{r['instruction']} (task {i})"} for i, r in enumerate(book_records(46))]
    copy = {k: v.upper() if isinstance(v, str) else v for k, v in records[5].items()}
    records.insert(6, {**copy, "instruction": "  " + copy["instruction"] + "  "})
    test = write(tmp_path, [records[3], *records[41:44]], "test.json")
    records = records[:41]
    dm = module(write(tmp_path, records), tokenizer_file, quality=QualityConfig(), test_source=str(test),
                cache_dir=str(tmp_path / "cache"))
    assert dm.quality.reports["source"].removed == {"exact_duplicate": 1}
    train = dm.quality.reports["train"]
    assert train.flagged == {"leakage": 1} and train.examples["leakage"][0]["overlaps"][0].startswith("test[")
    assert len(dm.datasets["test"]) == 4
