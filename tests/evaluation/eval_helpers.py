"""Shared pieces of the evaluation tests: words for small texts, and task files written in the harness's format over
local JSON Lines data."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the cat sat on a mat while dogs ran in parks and birds sang in trees near red houses by blue rivers "
         "under green hills where old men read long books about small ships").split()


def sentence(rng: random.Random, n: int) -> str:
    """``n`` words of ``WORDS`` drawn by ``rng``, separated by spaces."""
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """One JSON object per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_task(folder: Path, stem: str, rows: list[dict], yaml_lines: list[str]) -> Path:
    """``<stem>.jsonl`` holding ``rows`` and ``<stem>.yaml``, a harness task named ``stem`` over it (the header, then
    ``yaml_lines``)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(folder / f"{stem}.jsonl", rows)
    header = [f"task: {stem}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {data}",
              "test_split: test"]
    path = folder / f"{stem}.yaml"
    path.write_text("\n".join(header + yaml_lines) + "\n", encoding="utf-8")
    return path
