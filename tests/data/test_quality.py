"""The data-quality stage: precision and recall of each rule on a planted corpus, leakage, redaction, determinism,
the ``clean`` command, the DataModules' ``quality`` setting, and bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from lit_llm.clean import main as clean_main
from lit_llm.data.quality import (
    Cleaner,
    QualityConfig,
    clean_records,
    gram_hashes,
    normalize,
    redact_text,
    word_hashes,
)
from lit_llm.errors import ConfigError, DataError

THRESHOLD = QualityConfig().near.threshold
EDIT_RATES = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.3)  # share of words deleted, replaced or followed by a new word
JUNK = ("empty", "control_chars", "low_alpha", "repeated_lines", "repeated_ngrams")


def _vocabulary(rng: random.Random, n: int = 20_000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(n)]


def _prose(rng: random.Random, vocab: list[str], words: int) -> str:
    text = " ".join(rng.choice(vocab) for _ in range(words))
    return text[0].upper() + text[1:] + "."


def _edit(rng: random.Random, vocab: list[str], text: str, rate: float) -> str:
    out: list[str] = []
    for word in text.split():
        r = rng.random()
        if r < rate / 3:
            continue  # deleted
        if r < 2 * rate / 3:
            out.append(rng.choice(vocab))  # replaced
        elif r < rate:
            out += [word, rng.choice(vocab)]  # a word inserted after it
        else:
            out.append(word)
    return " ".join(out)


def _renormalised(rng: random.Random, text: str) -> str:
    """The same text after normalisation: case, whitespace and Unicode-form changes only."""
    words = text.split()
    out = []
    for word in words:
        word = word.upper() if rng.random() < 0.2 else word
        sep = rng.choice([" ", "  ", "\n", "\t", "\u00a0"])  # NFKC makes the no-break space a space
        out.append(word + sep)
    return "".join(out).replace("fi", "\ufb01")  # the "fi" ligature is "fi" again after NFKC


def _junk(rng: random.Random, vocab: list[str], kind: str) -> str:
    if kind == "empty":
        return rng.choice(["", "   ", "\n\n\t"])
    if kind == "control_chars":
        return "".join(chr(rng.choice([*range(1, 9), *range(14, 32)])) if rng.random() < 0.3 else rng.choice("abc ")
                       for _ in range(400))
    if kind == "low_alpha":
        return " ".join(str(rng.randint(0, 10**6)) + rng.choice(["", "%", "$", "#", "..."]) for _ in range(120))
    if kind == "repeated_lines":
        line = _prose(rng, vocab, 8)
        return "\n".join([line] * 10 + [_prose(rng, vocab, 8) for _ in range(3)])
    phrase = " ".join(rng.choice(vocab) for _ in range(6))
    return " ".join([phrase] * 20)


def _jaccard(a: str, b: str, k: int = 5) -> float:
    sa = set(gram_hashes(word_hashes(normalize(a)), k).tolist())
    sb = set(gram_hashes(word_hashes(normalize(b)), k).tolist())
    return len(sa & sb) / len(sa | sb)


@pytest.fixture(scope="module")
def planted() -> dict:
    """Distinct documents, exact duplicates, near-duplicates at known edit rates and junk, shuffled (sources first
    within each cluster), with what each record is."""
    rng = random.Random(1234)
    vocab = _vocabulary(rng)
    base = [_prose(rng, vocab, rng.randint(60, 400)) for _ in range(1500)]
    items: list[tuple[str, dict]] = [(text, {"kind": "base", "cluster": i}) for i, text in enumerate(base)]
    for _ in range(300):
        i = rng.randrange(len(base))
        items.append((_renormalised(rng, base[i]), {"kind": "exact", "cluster": i}))
    for rate in EDIT_RATES:
        for _ in range(150):
            i = rng.randrange(len(base))
            edited = _edit(rng, vocab, base[i], rate)
            kind = "exact" if normalize(edited) == normalize(base[i]) else "near"
            items.append((edited, {"kind": kind, "cluster": i, "rate": rate, "jaccard": _jaccard(base[i], edited)}))
    for kind in JUNK:
        items.extend((_junk(rng, vocab, kind), {"kind": kind, "cluster": -1}) for _ in range(40))
    # Every copy comes after its source, so "the first of each group is kept" keeps the sources.
    head, tail = items[:1500], items[1500:]
    rng.shuffle(tail)
    records = [{"text": text, "id": n} for n, (text, _) in enumerate(head + tail)]
    return {"records": records, "truth": [info for _, info in head + tail]}


@pytest.fixture(scope="module")
def cleaned(planted: dict) -> dict:
    removed: dict[int, str] = {}
    cleaner = Cleaner(QualityConfig(num_proc=2, batch_size=200, examples=3), ["text"])
    kept = list(cleaner.run(planted["records"], on_removed=lambda i, r, rule: removed.__setitem__(i, rule)))
    return {"kept": kept, "removed": removed, "report": cleaner.report}


def _precision_recall(flagged: set[int], positives: set[int]) -> tuple[float, float]:
    precision = len(flagged & positives) / len(flagged) if flagged else 1.0
    recall = len(flagged & positives) / len(positives) if positives else 1.0
    return precision, recall


def test_exact_duplicates_after_normalisation(planted: dict, cleaned: dict) -> None:
    truth = planted["truth"]
    exact = {i for i, t in enumerate(truth) if t["kind"] == "exact"}
    flagged = {i for i, rule in cleaned["removed"].items() if rule == "exact_duplicate"}
    precision, recall = _precision_recall(flagged, exact)
    assert len(exact) > 250
    assert precision == 1.0 and recall == 1.0


def test_near_duplicates_recall_and_precision_at_the_default_threshold(planted: dict, cleaned: dict) -> None:
    truth, removed = planted["truth"], cleaned["removed"]
    near = [i for i, t in enumerate(truth) if t["kind"] == "near"]
    above = {i for i in near if truth[i]["jaccard"] >= THRESHOLD}
    flagged = {i for i, rule in removed.items() if rule == "near_duplicate"}
    recall = len(flagged & above) / len(above)
    # Precision for pairs above the threshold: a removal is right when the record's true Jaccard similarity with its
    # planted source is at or above the threshold.
    precision = len(flagged & above) / len(flagged)
    by_index = {e["index"]: e for e in cleaned["report"].examples.get("near_duplicate", [])}
    assert len(above) > 300 and recall >= 0.95, (len(above), recall)
    assert precision >= 0.99, precision
    for i, example in by_index.items():
        assert truth[example["duplicate_of"]]["cluster"] == truth[i]["cluster"] and example["jaccard"] >= THRESHOLD
    # Far below the threshold nothing is removed: a 30 % edit is a different document.
    far = {i for i in near if truth[i]["jaccard"] < THRESHOLD - 0.15}
    assert far and not flagged & far
    # No distinct document is lost.
    assert not any(truth[i]["kind"] == "base" for i in removed)


@pytest.mark.parametrize("kind", JUNK)
def test_each_filter_finds_its_junk_and_nothing_else(planted: dict, cleaned: dict, kind: str) -> None:
    truth, removed = planted["truth"], cleaned["removed"]
    junk = {i for i, t in enumerate(truth) if t["kind"] == kind}
    flagged = {i for i, rule in removed.items() if rule == kind}
    precision, recall = _precision_recall(flagged, junk)
    assert precision == 1.0 and recall == 1.0, (kind, precision, recall)


def test_report_counts_examples_and_settings(planted: dict, cleaned: dict) -> None:
    report = cleaned["report"]
    assert report.records_in == len(planted["records"])
    assert report.records_out == len(cleaned["kept"]) == report.records_in - sum(report.removed.values())
    assert report.removed == {rule: list(cleaned["removed"].values()).count(rule) for rule in report.removed}
    assert all(1 <= len(report.examples[rule]) <= 3 for rule in report.removed)
    assert report.settings["near"]["threshold"] == THRESHOLD and report.settings["near"]["seed"] == 1
    summary = report.summary()
    assert "near_duplicate" in summary and f"{report.records_in:,} records in" in summary


def test_deterministic_and_independent_of_processes(planted: dict, cleaned: dict) -> None:
    records = planted["records"][:900] + planted["records"][1500:2000]
    one = [i for i, _ in Cleaner(QualityConfig(num_proc=1, batch_size=64), ["text"]).run(records)]
    again = [i for i, _ in Cleaner(QualityConfig(num_proc=2, batch_size=100), ["text"]).run(records)]
    assert one == again
    # The first of every group is kept: the sources come first, so none of them is removed.
    assert set(range(900)) <= set(one)


def test_leakage_names_the_validation_document(planted: dict) -> None:
    records = planted["records"][:200]
    val = [{"text": planted["records"][1000]["text"]}, {"text": "An unrelated validation text."}]
    train = records + [{"text": "Copied: " + val[0]["text"] + " (end)"}]
    kept, report = clean_records(train, QualityConfig(), ["text"], against={"val": val}, name="train")
    assert report.flagged == {"leakage": 1} and len(kept) == len(train)
    example = report.examples["leakage"][0]
    assert example["index"] == len(train) - 1 and example["overlaps"] == ["val[0]"]
    config = QualityConfig.from_dict({"leakage": {"action": "remove"}})
    kept, report = clean_records(train, config, ["text"], against={"val": val})
    assert report.removed == {"leakage": 1} and [i for i, _ in kept] == list(range(len(records)))


def test_short_records_leak_as_a_whole() -> None:
    train = [{"instruction": "Name a primary colour.", "output": "Red."}, {"instruction": "Say hi.", "output": "Hi"}]
    val = [{"instruction": "name a  PRIMARY colour.", "output": "Red."}]
    _, report = clean_records(train, QualityConfig(), ["instruction", "output"], against={"val": val})
    assert report.flagged == {"leakage": 1} and report.examples["leakage"][0]["index"] == 0


def test_redaction() -> None:
    text = ("Mail jane.doe@example.com or call +1 415-555-0132 / (020) 7946 0958; the server is 192.168.0.17 "
            "and 2001:0db8:85a3:0000:0000:8a2e:0370:7334. Version 3.11.7 on 2024-05-01 costs 12.50.")
    redacted, counts = redact_text(text, QualityConfig(redact={"enabled": True}).redact)
    assert counts == {"email": 1, "phone": 2, "ip": 2}
    assert "<EMAIL>" in redacted and redacted.count("<PHONE>") == 2 and redacted.count("<IP>") == 2
    assert "3.11.7" in redacted and "2024-05-01" in redacted and "12.50" in redacted
    records = [{"text": text, "label": 1}, {"text": "Nothing personal here at all.", "label": 0}]
    kept, report = clean_records(records, QualityConfig.from_dict({"redact": {"enabled": True}}), ["text"])
    assert kept[0][1]["text"] == redacted and kept[0][1]["label"] == 1 and kept[1][1] == records[1]
    assert report.redacted == counts


def test_conversations_and_preference_pairs_are_read_by_their_strings() -> None:
    chat = {"messages": [{"role": "user", "content": "What is two plus two?"},
                         {"role": "assistant", "content": "Four."}]}
    copy = {"messages": [{"role": "user", "content": "what is two plus  two?"},
                         {"role": "assistant", "content": "Four."}]}
    kept, report = clean_records([chat, copy], QualityConfig(), ["messages"])
    assert [i for i, _ in kept] == [0] and report.removed == {"exact_duplicate": 1}
    pair = {"prompt": "Write a haiku.", "chosen": "Leaves fall quietly.", "rejected": "No."}
    kept, _ = clean_records([pair, dict(pair)], QualityConfig(), ["prompt", "chosen", "rejected"])
    assert len(kept) == 1


def test_bad_settings_are_one_clear_error() -> None:
    with pytest.raises(ConfigError) as err:
        QualityConfig.from_dict({"near": {"threshold": 1.5, "shingle_size": 0}, "num_proc": 0})
    message = str(err.value)
    assert "near.threshold=1.5" in message and "near.shingle_size=0" in message and "num_proc=0" in message
    with pytest.raises(ConfigError, match="unknown setting.*'treshold'"):
        QualityConfig.from_dict({"near": {"treshold": 0.9}})


# ---- the command ----------------------------------------------------------------------------------------------


def _jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_clean_command_end_to_end(tmp_path: Path, planted: dict, capsys: pytest.CaptureFixture) -> None:
    records = planted["records"][:300] + planted["records"][1500:1700]
    source = _jsonl(tmp_path / "data.jsonl", records)
    val = _jsonl(tmp_path / "val.jsonl", [{"text": records[5]["text"]}])
    out = tmp_path / "out"
    status = clean_main([source, str(out), "--against", val, "--leakage-action", "remove", "--removed",
                         "--num-proc", "2"])
    assert status == 0
    report = json.loads((out / "report.json").read_text())
    kept = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    removed = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    expected_kept, expected = clean_records(records, QualityConfig.from_dict({"leakage": {"action": "remove"}}),
                                            ["text"], against={val: [{"text": records[5]["text"]}]})
    assert kept == [r for _, r in expected_kept] and report["removed"] == expected.removed
    assert report["removed"]["leakage"] == 1 and 5 in {r["_index"] for r in removed if r["_rule"] == "leakage"}
    assert len(kept) + len(removed) == len(records)
    assert "records in" in capsys.readouterr().out


def test_clean_command_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    assert clean_main([str(empty), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "empty" in err and len(err.strip().splitlines()) == 1
    source = _jsonl(tmp_path / "d.jsonl", [{"text": "hello there"}])
    assert clean_main([source, str(tmp_path / "o"), "--threshold", "2"]) == 1
    assert "near.threshold=2.0" in capsys.readouterr().err
    assert clean_main([source, str(tmp_path / "o"), "--fields", "body"]) == 1
    assert "--fields ['body']" in capsys.readouterr().err


# ---- DataModules ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    from lit_llm.data.tokenizer import train_bpe

    rng = random.Random(0)
    vocab = _vocabulary(rng, 200)
    texts = [_prose(rng, vocab, 80) for _ in range(30)] + ["Below is an instruction. ### Response: Input: 0123456789"]
    return str(train_bpe(texts, vocab_size=300).save(tmp_path_factory.mktemp("tok")))


def test_instruction_datamodule_with_quality(tmp_path: Path, tokenizer_file: str) -> None:
    from lit_llm.data import InstructDataModule

    rng = random.Random(3)
    vocab = _vocabulary(rng, 300)
    records = [{"instruction": _prose(rng, vocab, 8), "input": "", "output": _prose(rng, vocab, 6)} for _ in range(40)]
    records[10] = dict(records[3], instruction=records[3]["instruction"].upper())  # an exact duplicate
    # The last record goes to validation (the book's split); a training record quotes it and goes on (a leak, yet
    # no duplicate: an exact copy would already be gone, as deduplication runs before the split).
    last = records[-1]
    records[20] = {"instruction": f"{last['instruction']} {last['output']}", "input": "",
                   "output": _prose(rng, vocab, 25)}
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    common = {"source": str(path), "tokenizer": tokenizer_file, "context_length": 512, "batch_size": 2,
              "cache_dir": str(tmp_path / "cache"), "split_fractions": (0.8, 0.1, 0.1)}
    plain = InstructDataModule(**common).records()
    dm = InstructDataModule(**common, quality=QualityConfig.from_dict({"leakage": {"action": "remove"}}))
    parts = dm.records()
    assert records[10] in plain["train"] and records[10] not in parts["train"]
    source, train = dm.quality.reports["source"], dm.quality.reports["train"]
    assert source.removed == {"exact_duplicate": 1}
    assert train.removed == {"leakage": 1} and train.examples["leakage"][0]["overlaps"][0].startswith("val[")
    dm.setup()
    written = dm.quality.save(tmp_path / "run")
    assert written is not None and [r["name"] for r in json.loads(written.read_text())] == ["source", "train"]


def test_classification_datamodule_with_quality(tmp_path: Path, tokenizer_file: str) -> None:
    from lit_llm.data import ClassifyDataModule

    rng = random.Random(4)
    vocab = _vocabulary(rng, 300)
    rows = [{"text": _prose(rng, vocab, 12), "label": i % 2} for i in range(60)]
    rows += [dict(rows[0]), {"text": "\x01\x02\x03\x04 \x05\x06", "label": 1}]
    path = tmp_path / "rows.jsonl"
    _jsonl(path, rows)
    dm = ClassifyDataModule(source=str(path), tokenizer=tokenizer_file, context_length=256,
                                  cache_dir=str(tmp_path / "cache"), quality=QualityConfig())
    dm.setup()
    assert dm.quality.reports["source"].removed == {"exact_duplicate": 1, "control_chars": 1}
    assert sum(len(dm.examples(s)) for s in ("train", "val", "test")) == 60


def test_pretrain_datamodule_with_quality_and_its_cache(tmp_path: Path, tokenizer_file: str) -> None:
    from lit_llm.data import PretrainDataModule

    rng = random.Random(5)
    vocab = _vocabulary(rng, 200)
    docs = [_prose(rng, vocab, 120) for _ in range(12)]
    docs += [docs[2].lower(), "#### 1234 5678 $$$ 90 %%% 12 34", docs[4] + " " + docs[5]]
    path = tmp_path / "docs.jsonl"
    _jsonl(path, [{"text": d} for d in docs])
    val = tmp_path / "val.jsonl"
    _jsonl(val, [{"text": docs[7]}])
    common = {"source": str(path), "val_source": str(val), "tokenizer": tokenizer_file, "context_length": 16,
              "batch_size": 2, "cache_dir": str(tmp_path / "cache")}
    plain = PretrainDataModule(**common)
    plain.setup()
    dm = PretrainDataModule(**common, quality=QualityConfig())
    dm.setup()
    report = dm.quality.reports["source"]
    assert report.removed == {"exact_duplicate": 1, "low_alpha": 1} and report.flagged == {"leakage": 1}
    assert report.examples["leakage"][0]["index"] == 7
    assert dm.train_dataset.n_tokens < plain.train_dataset.n_tokens
    # The cleaned corpus is cached by content and settings: a second module reuses it.
    again = PretrainDataModule(**common, quality=QualityConfig())
    assert again._documents("source")._fingerprint == dm._documents("source")._fingerprint
    assert len(list((tmp_path / "cache" / "quality").iterdir())) == 1
    other = PretrainDataModule(**common, quality=QualityConfig.from_dict({"exact": False}))
    other.setup()
    assert len(list((tmp_path / "cache" / "quality").iterdir())) == 2


def test_quality_parses_from_a_config(tmp_path: Path) -> None:
    from jsonargparse import ArgumentParser

    from lit_llm.data import PretrainDataModule

    parser = ArgumentParser()
    parser.add_class_arguments(PretrainDataModule, "data")
    cfg = parser.parse_object({"data": {"quality": {"near": {"threshold": 0.9}, "leakage": {"n": 8}}}})
    init = parser.instantiate_classes(cfg)
    quality = init.data.quality.config
    assert isinstance(quality, QualityConfig)
    assert quality.near.threshold == 0.9 and quality.leakage.n == 8 and quality.exact is True


def test_empty_corpus_after_cleaning_is_a_data_error(tmp_path: Path, tokenizer_file: str) -> None:
    from lit_llm.data import PretrainDataModule

    path = tmp_path / "junk.jsonl"
    _jsonl(path, [{"text": "12345 67890 !!!"}, {"text": "%%%% 0000"}])
    dm = PretrainDataModule(source=str(path), tokenizer=tokenizer_file, context_length=16,
                            cache_dir=str(tmp_path / "cache"), val_split=0, quality=QualityConfig())
    with pytest.raises(DataError, match="removed every document"):
        dm.setup()


def test_word_hashes_are_those_of_the_words() -> None:
    a = word_hashes("the cat sat on the mat")
    assert len(a) == 6 and a[0] == a[4] and len(set(a.tolist())) == 5
    assert np.array_equal(word_hashes("cat"), a[1:2])


def test_streaming_pretrain_corpus_is_cleaned_once(tmp_path: Path, tokenizer_file: str) -> None:
    from lit_llm.data import PretrainDataModule

    rng = random.Random(6)
    vocab = _vocabulary(rng, 200)
    docs = [_prose(rng, vocab, 150) for _ in range(8)]
    path = tmp_path / "docs.jsonl"
    _jsonl(path, [{"text": d} for d in docs + [docs[1], docs[3].upper()]])
    common = {"source": str(path), "tokenizer": tokenizer_file, "context_length": 16, "batch_size": 2,
              "cache_dir": str(tmp_path / "cache"), "streaming": True, "split_by": "tokens"}
    streamed = PretrainDataModule(**common, quality=QualityConfig())
    streamed.setup()
    assert streamed.quality.reports["source"].removed == {"exact_duplicate": 2}
    mapped = PretrainDataModule(**{**common, "streaming": False}, quality=QualityConfig())
    mapped.setup()
    assert streamed.train_dataset.n_tokens == mapped.train_dataset.n_tokens


def test_console_script_runs_clean(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lit_llm.__main__ import main

    source = _jsonl(tmp_path / "d.jsonl", [{"text": "one two three"}, {"text": "One  two three"}])
    assert main(["clean", source, str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["removed"] == {"exact_duplicate": 1}
    assert main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err


def test_hyperparameters_stay_plain_data(tmp_path: Path, tokenizer_file: str) -> None:
    import io

    import torch

    from lit_llm.data import ClassifyDataModule, InstructDataModule, PretrainDataModule

    for kind in (PretrainDataModule, ClassifyDataModule, InstructDataModule):
        dm = kind(tokenizer=tokenizer_file, cache_dir=str(tmp_path), quality=QualityConfig.from_dict({"num_proc": 2}))
        buffer = io.BytesIO()
        torch.save(dict(dm.hparams), buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=True)
        assert loaded["quality"]["num_proc"] == 2 and loaded["quality"]["near"]["threshold"] == THRESHOLD
