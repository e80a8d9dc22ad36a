"""ClassifyDataModule: the book's balancing, split and padding; labels; batches; and the errors users see."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from classify_helpers import sms_rows, write_sms_collection

from lit_llm.data import ClassifyDataModule
from lit_llm.data.classify import PadCollate
from lit_llm.errors import ConfigError, DataError

SMS_OPTIONS = dict(file_format="tsv", column_names=["label", "text"])


def _module(tmp_path: Path, source: str | Path, **kwargs: object) -> ClassifyDataModule:
    values: dict = dict(source=str(source), tokenizer="train", tokenizer_vocab_size=300, context_length=64,
                        cache_dir=str(tmp_path / "cache"), batch_size=4)
    values.update(kwargs)
    return ClassifyDataModule(**values)


@pytest.fixture
def sms(tmp_path: Path) -> Path:
    """60 ham and 20 spam messages as a headerless TSV without extension, like SMSSpamCollection."""
    return write_sms_collection(tmp_path / "SMSSpamCollection", sms_rows(60, 20))


def test_balance_and_split_are_the_books_row_for_row(sms: Path, tmp_path: Path, ch06) -> None:
    """Same rows, same order as ch06.create_balanced_dataset + random_split(0.7, 0.1) (pandas, random_state 123)."""
    rows = sms_rows(60, 20)
    df = pd.DataFrame({"Label": [r[0] for r in rows], "Text": [r[1] for r in rows]})
    book = ch06.random_split(ch06.create_balanced_dataset(df), 0.7, 0.1)
    dm = _module(tmp_path, sms, balance=True, seed=123, labels=["ham", "spam"], **SMS_OPTIONS)
    for split, frame in zip(("train", "val", "test"), book):
        assert dm.examples(split) == list(zip(frame["Text"], frame["Label"])), split
    assert [len(dm.examples(s)) for s in ("train", "val", "test")] == [28, 4, 8]
    assert dm.label_names == ["ham", "spam"] and dm.num_classes == 2


def test_book_split_sizes_1494(tmp_path: Path) -> None:
    """747 spam + 747 sampled ham -> 1,045 / 149 / 300, the book's counts."""
    path = write_sms_collection(tmp_path / "sms.tsv", sms_rows(900, 747, seed=1))
    dm = _module(tmp_path, path, balance=True, column_names=["label", "text"])
    sizes = [len(dm.examples(s)) for s in ("train", "val", "test")]
    assert sizes == [1045, 149, 300]
    labels = [label for s in ("train", "val", "test") for _, label in dm.examples(s)]
    assert labels.count("spam") == labels.count("ham") == 747


def test_padding_matches_the_books_spam_dataset(sms: Path, tmp_path: Path, ch06) -> None:
    """pad_to=longest_train: every text padded with <|endoftext|> to the longest training text, val/test cut to it,
    exactly as ch06.SpamDataset does with max_length=train_dataset.max_length."""
    dm = _module(tmp_path, sms, balance=True, labels=["ham", "spam"], **SMS_OPTIONS)
    dm.setup("fit")
    tok = dm.tokenizer
    for split in ("train", "val", "test"):
        frame = pd.DataFrame({"Text": [t for t, _ in dm.examples(split)],
                              "Label": [int(lab == "spam") for _, lab in dm.examples(split)]})
        frame.to_csv(tmp_path / f"{split}.csv", index=None)
    book_train = ch06.SpamDataset(tmp_path / "train.csv", tok, pad_token_id=tok.eos_id)
    assert dm.pad_length == book_train.max_length
    for split in ("train", "val", "test"):
        book = book_train if split == "train" else ch06.SpamDataset(tmp_path / f"{split}.csv", tok,
                                                               max_length=book_train.max_length,
                                                               pad_token_id=tok.eos_id)
        batch = next(iter(torch.utils.data.DataLoader(dm.datasets[split], batch_size=len(book),
                                                      collate_fn=dm._collate())))
        assert torch.equal(batch["input_ids"], torch.tensor(book.encoded_texts)), split
        assert torch.equal(batch["labels"], torch.tensor(book.data["Label"].tolist())), split


def test_batches_are_dicts_with_lengths(sms: Path, tmp_path: Path) -> None:
    dm = _module(tmp_path, sms, pad_to="batch", **SMS_OPTIONS)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "labels", "lengths"}
    ids, lengths = batch["input_ids"], batch["lengths"]
    assert ids.dtype == torch.long and batch["labels"].shape == lengths.shape == (ids.shape[0],)
    assert ids.shape[1] == int(lengths.max())  # padded to the batch's longest row
    for row, n in zip(ids, lengths.tolist()):
        assert (row[n:] == dm.pad_id).all() and row[n - 1] != dm.pad_id or n == ids.shape[1]
    val_texts = [t for t, _ in dm.examples("val")][: len(lengths)]
    assert lengths.tolist() == [len(dm.tokenizer.encode(t)) for t in val_texts]
    train = next(iter(dm.train_dataloader()))
    assert len(train["labels"]) == 4


def test_pad_collate_rows() -> None:
    items = [{"input_ids": [5, 6, 7], "label": 1}, {"input_ids": [8], "label": 0}]
    batch = PadCollate(pad_id=99)(items)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 99, 99]]
    assert batch["lengths"].tolist() == [3, 1] and batch["labels"].tolist() == [1, 0]
    assert PadCollate(pad_id=0, length=5)(items)["input_ids"].shape == (2, 5)


def test_label_order_default_explicit_and_numeric(tmp_path: Path) -> None:
    rows = [{"text": f"text number {i}", "label": lab} for i, lab in enumerate(["b", "a", "c"] * 8)]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert _module(tmp_path, tmp_path / "r.jsonl").label_names == ["a", "b", "c"]
    assert _module(tmp_path, tmp_path / "r.jsonl", labels=["c", "a", "b"]).label_names == ["c", "a", "b"]
    # Numbers sort as numbers (2 before 10), and map whether given as ints or strings.
    nums = [{"body": f"text {i}", "y": y} for i, y in enumerate([10, 2, 1] * 8)]
    (tmp_path / "n.csv").write_text("body,y\n" + "".join(f"{r['body']},{r['y']}\n" for r in nums))
    dm = _module(tmp_path, tmp_path / "n.csv", text_column="body", label_column="y")
    assert dm.label_names == ["1", "2", "10"]
    dm.setup()
    train = dm.examples("train")
    assert dm.datasets["train"].labels == [["1", "2", "10"].index(lab) for _, lab in train]
    assert _module(tmp_path, tmp_path / "n.csv", text_column="body", label_column="y",
                   labels=[10, "2", 1]).label_names == ["10", "2", "1"]


def test_split_files_and_fractions(sms: Path, tmp_path: Path) -> None:
    val = write_sms_collection(tmp_path / "val.tsv", sms_rows(3, 3, seed=5))
    dm = _module(tmp_path, sms, val_source=str(val), **SMS_OPTIONS)
    sizes = [len(dm.examples(s)) for s in ("train", "val", "test")]
    # The validation file takes no share of the source: 80 rows split 0.7 : 0.2 -> 62 / 18.
    assert sizes == [62, 6, 18]
    assert dm.examples("val") == [(t, lab) for lab, t in sms_rows(3, 3, seed=5)]
    no_test = _module(tmp_path, sms, split=(0.8, 0.2, 0.0), **SMS_OPTIONS)
    assert [len(no_test.examples(s)) for s in ("train", "val", "test")] == [64, 16, 0]
    with pytest.raises(DataError, match="there is no test split"):
        no_test.test_dataloader()


def test_config_mistakes_are_one_message(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        ClassifyDataModule(split=(0.5, 0.1, 0.1), max_length=2000, context_length=1024, batch_size=0,
                                 labels=["a"], source="https://example.com/x.zip")
    msg = str(err.value)
    for needle in ("data.split=[0.5, 0.1, 0.1]", "data.max_length=2000", "data.batch_size=0", "data.labels=['a']",
                   "data.sha256 is required"):
        assert needle in msg


# ---- bad data -------------------------------------------------------------------------------------------------------


def test_label_in_val_unseen_in_train(sms: Path, tmp_path: Path) -> None:
    val = write_sms_collection(tmp_path / "val.tsv", [("ham", "fine"), ("maybe", "who knows"), ("maybe", "eh")])
    dm = _module(tmp_path, sms, val_source=str(val), **SMS_OPTIONS)
    with pytest.raises(DataError) as err:
        dm.num_classes
    msg = str(err.value)
    assert "validation split (data.val_source)" in msg and "['maybe']" in msg and "['ham', 'spam']" in msg
    assert "2 row(s), first row 1" in msg


def test_missing_column_lists_the_columns(tmp_path: Path) -> None:
    (tmp_path / "r.csv").write_text("message,category\nhello there,a\nbye now,b\n")
    with pytest.raises(DataError) as err:
        _module(tmp_path, tmp_path / "r.csv").num_classes
    msg = str(err.value)
    assert "data.text_column='text'" in msg and "['message', 'category']" in msg
    with pytest.raises(DataError, match=r"data.label_column='label'.*\['message', 'category'\]"):
        _module(tmp_path, tmp_path / "r.csv", text_column="message").num_classes


def test_empty_class_in_labels(sms: Path, tmp_path: Path) -> None:
    dm = _module(tmp_path, sms, labels=["ham", "spam", "eggs"], **SMS_OPTIONS)
    with pytest.raises(DataError, match=r"class\(es\) \['eggs'\] of data.labels.*no training example"):
        dm.label_names
    for balance in (False, True):  # balancing keeps the unlisted class, so it is reported rather than dropped
        with pytest.raises(DataError, match=r"label\(s\) \['spam'\] that data.labels=\['ham', 'eggs'\] does not list"):
            _module(tmp_path, sms, labels=["ham", "eggs"], balance=balance, **SMS_OPTIONS).label_names


def test_empty_text_names_the_row(tmp_path: Path) -> None:
    (tmp_path / "r.jsonl").write_text('{"text": "ok", "label": "a"}\n{"text": " ", "label": "b"}\n')
    with pytest.raises(DataError, match="row 1 has an empty text"):
        _module(tmp_path, tmp_path / "r.jsonl").label_names


def test_long_texts_are_cut_and_counted(sms: Path, tmp_path: Path) -> None:
    rows = sms_rows(30, 10) + [("spam", "WIN a prize " * 40), ("ham", "see you later " * 30)]
    path = write_sms_collection(tmp_path / "long.tsv", rows)
    dm = _module(tmp_path, path, pad_to="batch", max_length=60, split=(1.0, 0.0, 0.0), **SMS_OPTIONS)
    lengths = [len(dm.tokenizer.encode(text)) for text, _ in dm.examples("train")]
    cuts = [n - 60 for n in lengths if n > 60]
    assert len(cuts) >= 2  # the two long messages at least
    with pytest.warns(UserWarning, match=rf"{len(cuts)} of 42 training texts are longer than data.max_length=60 "
                                         rf"tokens and were cut \(by 1 to {max(cuts)} tokens"):
        dm.setup("fit")
    report = dm.truncation["train"]
    assert (report.cut, report.total, report.max_cut) == (len(cuts), 42, max(cuts))
    assert report.mean_cut == pytest.approx(sum(cuts) / len(cuts))
    assert max(len(x) for x in dm.datasets["train"].ids) == 60


def test_longest_train_cuts_val_to_train_length_with_a_warning(sms: Path, tmp_path: Path) -> None:
    val = write_sms_collection(tmp_path / "val.tsv", [("ham", "a very long message " * 20), ("spam", "WIN")])
    dm = _module(tmp_path, sms, val_source=str(val), **SMS_OPTIONS)
    with pytest.warns(UserWarning, match=r"1 of 2 validation texts are longer than the longest training text"):
        dm.setup("fit")
    assert dm.truncation["val"].limit == dm.pad_length
    assert "train" not in dm.truncation


# ---- checkpoint state and prediction ----------------------------------------------------------------------------


def test_state_dict_round_trip_and_mismatch(sms: Path, tmp_path: Path) -> None:
    dm = _module(tmp_path, sms, **SMS_OPTIONS)
    dm.setup()
    state = dm.state_dict()
    assert state["label_names"] == ["ham", "spam"] and state["pad_length"] == dm.pad_length
    assert json.loads(state["tokenizer_json"])  # the tokenizer itself travels in the checkpoint
    dm.load_state_dict(state)  # same data: accepted
    other = _module(tmp_path, sms, labels=["spam", "ham"], **SMS_OPTIONS)
    with pytest.raises(DataError, match=r"classes \['ham', 'spam'\] differ from this data's \['spam', 'ham'\]"):
        other.load_state_dict(state)


def test_predict_source_txt_and_unlabelled_csv(sms: Path, tmp_path: Path) -> None:
    (tmp_path / "new.txt").write_text("WIN a free holiday now\n\nsee you at 5\n")
    dm = _module(tmp_path, sms, predict_source=str(tmp_path / "new.txt"), **SMS_OPTIONS)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["text"] == ["WIN a free holiday now", "see you at 5"] and batch["labels"].tolist() == [-1, -1]
    assert batch["input_ids"].shape == (2, dm.pad_length)
    default = _module(tmp_path, sms, **SMS_OPTIONS)  # no predict_source: the test split, with its labels
    default.setup("predict")
    rows = [r for b in default.predict_dataloader() for r in b["labels"].tolist()]
    assert rows == [default.label_names.index(lab) for _, lab in default.examples("test")]


def test_builtin_reviews_default_source(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the built-in data fits: nothing is cut
        dm = ClassifyDataModule(tokenizer="train", tokenizer_vocab_size=400, context_length=128,
                                      cache_dir=str(tmp_path))
        dm.setup()
    assert dm.label_names == ["negative", "positive"]
    assert [len(dm.examples(s)) for s in ("train", "val", "test")] == [2800, 400, 800]
    assert dm.vocab_size == 400 and dm.pad_length <= 128
