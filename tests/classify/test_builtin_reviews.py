"""builtin:reviews: deterministic, balanced, and not decidable by any single keyword."""

from __future__ import annotations

import re
from collections import Counter

from lit_llm.data.builtin import load_builtin
from lit_llm.data.builtin.reviews import LABELS, generate_reviews


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def test_deterministic_balanced_and_varied() -> None:
    data = generate_reviews()
    assert data == generate_reviews()  # same seed, same reviews
    assert data != generate_reviews(seed=7)
    assert set(data) == {"text", "label"} and len(data["text"]) == 4000
    assert Counter(data["label"]) == {"negative": 2000, "positive": 2000}
    assert tuple(sorted(set(data["label"]))) == LABELS
    assert len(set(data["text"])) > 0.97 * len(data["text"])  # hardly any duplicates
    builtin = load_builtin("reviews")
    assert builtin.column_names == ["text", "label"] and builtin["text"][:5] == data["text"][:5]
    small = generate_reviews(n=10, seed=3)
    assert len(small["text"]) == 10 and small == generate_reviews(n=10, seed=3)


def test_no_single_keyword_decides_the_label() -> None:
    """The best rule "label A if word w occurs, else label B", over every word, is right for under 65 % of the
    reviews (measured: 53.9 %), while a small GPT reaches 76 % in three epochs and 88 % in eight (see
    test_classify_workflow.py and docs/classification.md)."""
    data = generate_reviews()
    words = [_words(t) for t in data["text"]]
    positive = [label == "positive" for label in data["label"]]
    n = len(words)
    best = 0.0
    for word in set().union(*words):
        hits = sum((word in w) == p for w, p in zip(words, positive)) / n
        best = max(best, hits, 1 - hits)  # either direction of the rule
    assert 0.5 <= best < 0.65


def test_negation_and_sentiment_words_occur_in_both_classes() -> None:
    data = generate_reviews()
    by_label = {label: Counter() for label in LABELS}
    for text, label in zip(data["text"], data["label"]):
        by_label[label].update(_words(text))
    for word in ("not", "great", "poor", "recommend", "but"):
        neg, pos = by_label["negative"][word], by_label["positive"][word]
        assert neg > 0 and pos > 0, word
        assert 0.25 < pos / (neg + pos) < 0.75, word  # no word is (nearly) one-sided
