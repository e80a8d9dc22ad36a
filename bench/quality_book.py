"""Near-duplicates of the book's instruction data: lit_llm's stage beside the method of the book's chapter 7 bonus.

    python bench/quality_book.py ../shared/data/instruction-data.json

The book's bonus utility (``ch07/02_dataset-utilities/find-near-duplicates.py``) compares one field of every pair of
records by the cosine similarity of their TF-IDF vectors and reports the pairs above a threshold (0.8 in its
function's default; 0.9 is also common). This script re-implements that method (scikit-learn's ``TfidfVectorizer``
with its defaults, all pairs, similarity strictly above the threshold) for the ``instruction`` field at 0.8 and 0.9,
and runs lit_llm's stage on the same file, on the ``instruction`` field alone (what the book compares) and on whole
records (what ``data.quality`` compares for instruction data).
It prints the pairs each finds and writes them to ``bench/results/quality-book-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from lit_llm.data.quality import QualityConfig, clean_records

ROOT = Path(__file__).resolve().parents[1]


def tfidf_pairs(texts: list[str], threshold: float = 0.8) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, cosine)`` with ``i < j`` whose TF-IDF cosine similarity is above ``threshold``."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectors = TfidfVectorizer().fit_transform(texts)  # rows are L2-normalised: the dot product is the cosine
    similarity = (vectors @ vectors.T).toarray()
    i, j = np.nonzero(np.triu(similarity, k=1) > threshold)
    return [(int(a), int(b), float(similarity[a, b])) for a, b in zip(i, j)]


def lit_llm_pairs(records: list[dict], fields: list[str], shingle_size: int = 5) -> list[tuple[int, int, float, str]]:
    """The records the stage removes as exact or near-duplicates: ``(kept, removed, jaccard, rule)``."""
    config = QualityConfig.from_dict({"filters": {"enabled": False}, "leakage": {"enabled": False},
                                      "near": {"shingle_size": shingle_size}, "examples": len(records)})
    _, report = clean_records(records, config, fields)
    pairs = []
    for rule in ("exact_duplicate", "near_duplicate"):
        for example in report.examples.get(rule, []):
            pairs.append((example["duplicate_of"], example["index"], example.get("jaccard", 1.0), rule))
    return sorted(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="the book's instruction-data.json")
    args = parser.parse_args()
    records = json.loads(Path(args.path).read_text(encoding="utf-8"))
    instructions = [r["instruction"] for r in records]
    book = tfidf_pairs(instructions, 0.8)
    book_09 = tfidf_pairs(instructions, 0.9)
    ours_instruction = lit_llm_pairs(records, ["instruction"])
    ours_short = lit_llm_pairs(records, ["instruction"], shingle_size=2)
    ours_record = lit_llm_pairs(records, ["instruction", "input", "output"])

    def show(title: str, pairs: list) -> None:
        print(f"\n{title}: {len(pairs)} pairs")
        for pair in pairs:
            a, b, score = pair[0], pair[1], pair[2]
            first, second = records[a]["instruction"][:70], records[b]["instruction"][:70]
            print(f"  {a:4d} ~ {b:4d}  {score:.3f}  {first!r} | {second!r}")

    show("book's method (TF-IDF cosine > 0.8, instruction field)", book)
    show("book's method (TF-IDF cosine > 0.9, instruction field)", book_09)
    show("lit_llm (exact + MinHash/Jaccard >= 0.8 of 5-word shingles, instruction field)", ours_instruction)
    show("lit_llm (2-word shingles, instruction field)", ours_short)
    show("lit_llm (whole records: instruction, input, output)", ours_record)

    # Records that have an earlier near-duplicate (what a deduplication removes): comparable between the methods,
    # where pair counts are not (a group of n copies is n * (n - 1) / 2 pairs but n - 1 removals).
    def later(pairs: list) -> set[int]:
        return {int(p[1]) for p in pairs}

    book_removed, ours_removed, short_removed = later(book), later(ours_instruction), later(ours_short)
    summary = {
        "pairs": {"book_0.8": len(book), "book_0.9": len(book_09)},
        "records_removed": {"book_0.8": len(book_removed), "book_0.9": len(later(book_09)),
                            "lit_llm_instruction": len(ours_removed),
                            "lit_llm_instruction_shingle2": len(short_removed),
                            "lit_llm_record": len(later(ours_record))},
        "book_0.8_only": sorted(book_removed - ours_removed), "lit_llm_only": sorted(ours_removed - book_removed),
        "shingle2_vs_book_0.8": {"both": len(book_removed & short_removed),
                                 "book_only": sorted(book_removed - short_removed),
                                 "lit_llm_only": sorted(short_removed - book_removed)},
    }
    print("\n" + json.dumps(summary))
    out = ROOT / "bench" / "results" / f"quality-book-{datetime.now(timezone.utc):%Y%m%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "book": book, "lit_llm_instruction": ours_instruction,
                               "lit_llm_instruction_shingle2": ours_short, "lit_llm_record": ours_record}, indent=1),
                   encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
