"""Data that needs no download, so defaults, quickstarts and tests work offline.

A builtin source is named ``builtin:<name>`` wherever a data source is accepted: ``pydoc`` is a corpus that ships
with Python itself; ``reviews`` (classification), ``instruct`` (instruction following), ``chat`` (multi-turn
conversations) and ``preference`` (pairs of a right and a wrong answer to ``instruct``'s tasks, for DPO) are
generated deterministically by lit_llm (``reviews.py``, ``instruct.py``, ``chat.py``, ``preference.py`` here).
"""

from __future__ import annotations

from collections.abc import Callable

import datasets

from lit_llm.errors import DataError


def _pydoc_topics() -> dict[str, list[str]]:
    # pydoc_data is part of CPython's stdlib; its text differs slightly between Python versions,
    # which the dataset fingerprint (hashed from the content) picks up.
    from pydoc_data.topics import topics

    titles = sorted(topics)  # dict order is an implementation detail; sort for determinism
    return {"title": titles, "text": [topics[t] for t in titles]}


def _reviews() -> dict[str, list]:
    from lit_llm.data.builtin.reviews import generate_reviews

    return generate_reviews()


def _instruct() -> dict[str, list]:
    from lit_llm.data.builtin.instruct import generate_tasks

    return generate_tasks()


def _chat() -> dict[str, list]:
    from lit_llm.data.builtin.chat import generate_conversations

    return generate_conversations()


def _preference() -> dict[str, list]:
    from lit_llm.data.builtin.preference import generate_preferences

    return generate_preferences()


_BUILTINS: dict[str, tuple[Callable[[], dict[str, list]], str]] = {
    "pydoc": (
        _pydoc_topics,
        "CPython's pydoc help topics (pydoc_data.topics): 79 documents, about 465k characters of English",
    ),
    "reviews": (_reviews, "generated product reviews labelled by sentiment, for classification (columns text, label)"),
    "instruct": (
        _instruct,
        "generated instruction-following tasks with exactly checkable answers (columns instruction, input, output)",
    ),
    "chat": (
        _chat,
        "generated multi-turn conversations whose later answers need the earlier turns, checkable exactly (column "
        "messages)",
    ),
    "preference": (
        _preference,
        "builtin:instruct's tasks with a right (chosen) and a plausible wrong (rejected) answer, for DPO",
    ),
}


def available_builtins() -> dict[str, str]:
    """Names of the builtin corpora mapped to one-line descriptions."""
    return {name: desc for name, (_, desc) in _BUILTINS.items()}


def load_builtin(name: str, *, key: str = "data.source") -> datasets.Dataset:
    """Load a builtin dataset (``pydoc`` and ``reviews`` have a ``text`` column; ``instruct`` has none).

    Args:
        name: The name after ``builtin:``, e.g. ``"pydoc"``.
        key: The config key named in error messages.

    Returns:
        One row per document, in a deterministic order.

    Raises:
        DataError: ``name`` is not a builtin corpus.
    """
    if name not in _BUILTINS:
        choices = ", ".join(f"builtin:{n} ({d})" for n, d in available_builtins().items())
        raise DataError(f"{key}: unknown builtin corpus 'builtin:{name}'. Available: {choices}.")
    columns = _BUILTINS[name][0]()
    return datasets.Dataset.from_dict(columns)
