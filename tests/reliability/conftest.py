"""Fixtures of the reliability tests: a small corpus from the built-in documentation."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from lit_llm.data.builtin import load_builtin

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(load_builtin("pydoc")["text"])[:30_000], encoding="utf-8")
    return path
