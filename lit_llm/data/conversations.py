"""Conversation records in the formats people have, checked, and cut to a context without cutting an answer.

Three record formats become one list of messages ``[{"role": "system" | "user" | "assistant", "content": str}]``:

- ``messages``: ``{"messages": [{"role": ..., "content": ...}, ...]}``, optionally with a top-level ``"system"``
  string (put first as a system message);
- ``sharegpt``: ``{"conversations": [{"from": "human" | "gpt" | "system", "value": ...}, ...]}`` (``user`` and
  ``assistant`` are accepted as ``from`` values too), optionally with a top-level ``"system"``;
- ``alpaca``: the book's ``{"instruction", "input", "output"}`` records: one user message (the instruction, with the
  input kept as the message's ``input`` for the templates that lay it out, such as Alpaca's ``### Input:``) and one
  assistant message.

A conversation is well formed when it has an optional system message first, then user and assistant messages
taking turns, starting with the user and ending with the assistant, every content non-empty text.
:func:`conversation_problem` says what is wrong with one that is not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

Format = Literal["auto", "messages", "sharegpt", "alpaca"]
FORMATS: tuple[str, ...] = ("auto", "messages", "sharegpt", "alpaca")
Message = dict[str, str]

#: ShareGPT's speaker names and the roles they mean.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class BadConversation(ValueError):
    """A record that is not a well-formed conversation; the message says why (without naming the record)."""


def record_format(record: Mapping[str, Any], fmt: Format = "auto") -> str:
    """The format of ``record``: ``fmt`` itself, or for ``auto`` the one whose field the record has."""
    if fmt != "auto":
        return fmt
    # Records read through `datasets` have every column of the file, None where a record lacks it.
    for field, form in (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca")):
        if record.get(field) is not None:
            return form
    fields = sorted(k for k, v in record.items() if v is not None)
    raise BadConversation(
        f"has none of the fields 'messages', 'conversations' or 'instruction' (its fields: {fields}); set "
        "data.format or fix the record"
    )


def to_messages(record: Mapping[str, Any], fmt: Format = "auto") -> list[Message]:
    """The messages of a record in any of the formats (not yet checked: see :func:`conversation_problem`).

    Raises:
        BadConversation: The record lacks its format's field, or holds something else than messages there.
    """
    form = record_format(record, fmt)
    if form == "alpaca":
        return _alpaca(record)
    field, role_key, text_key = ("messages", "role", "content") if form == "messages" else (
        "conversations", "from", "value")
    turns = record.get(field)
    if not isinstance(turns, list):
        raise BadConversation(f"field {field!r} must be a list of messages, got {type(turns).__name__}")
    messages: list[Message] = []
    system = record.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    for j, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise BadConversation(f"message {j} is a {type(turn).__name__}, not an object with {role_key!r} and "
                                  f"{text_key!r}")
        role = turn.get(role_key)
        if form == "sharegpt":
            if role not in SHAREGPT_ROLES:
                raise BadConversation(f"message {j} has an unknown 'from' {role!r} (expected one of "
                                      f"{', '.join(SHAREGPT_ROLES)})")
            role = SHAREGPT_ROLES[role]
        content = turn.get(text_key)
        if content is not None and not isinstance(content, str):
            raise BadConversation(f"message {j} has a {type(content).__name__} as {text_key!r}, not text")
        messages.append({"role": str(role), "content": content if content is not None else ""})
    return messages


def _alpaca(record: Mapping[str, Any]) -> list[Message]:
    values = {}
    for key in ("instruction", "input", "output"):
        value = record.get(key)
        if isinstance(value, (list, dict)):
            raise BadConversation(f"field {key!r} holds a {type(value).__name__}, not text")
        values[key] = "" if value is None else str(value)
    user: Message = {"role": "user", "content": values["instruction"]}
    if values["input"]:
        user["input"] = values["input"]
    return [user, {"role": "assistant", "content": values["output"]}]


def conversation_problem(messages: Sequence[Mapping[str, str]]) -> str | None:
    """What makes ``messages`` no well-formed conversation, or ``None``."""
    if not messages:
        return "has no messages"
    previous = None
    for j, m in enumerate(messages):
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            return f"message {j} has an unknown role {role!r} (expected system, user or assistant)"
        if not str(m.get("content") or "").strip():
            return f"message {j} ({role}) has empty content"
        if role == "system" and j != 0:
            return f"message {j} is a system message; only the first message may be one"
        if role == previous:
            return f"has two {role} messages in a row (messages {j - 1} and {j})"
        if role == "assistant" and previous != "user":
            return f"message {j} is an assistant message with no user message before it"
        previous = role
    if previous != "assistant":
        return "ends with a user message (nothing to answer it with); end each conversation with the assistant"
    return None


def exchanges(messages: Sequence[Message]) -> tuple[list[Message], list[list[Message]]]:
    """A well-formed conversation as its system messages and its ``[user, assistant]`` exchanges."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = list(messages[len(system):])
    return system, [rest[i : i + 2] for i in range(0, len(rest), 2)]


def fit_conversation(
    messages: Sequence[Message], length: Callable[[list[Message]], int], limit: int
) -> tuple[list[Message] | None, int]:
    """The conversation with as few of its oldest exchanges dropped as make it fit ``limit`` tokens.

    The system message stays; whole ``[user, assistant]`` exchanges go, oldest first, so no answer is ever cut.

    Args:
        messages: A well-formed conversation.
        length: Tokens of a list of messages (as the template renders them).
        limit: Most tokens.

    Returns:
        The messages kept (``None`` when even the newest exchange alone does not fit) and how many exchanges went.
    """
    system, turns = exchanges(messages)
    for dropped in range(len(turns)):
        kept = system + [m for pair in turns[dropped:] for m in pair]
        if length(kept) <= limit:
            return kept, dropped
    return None, len(turns)
