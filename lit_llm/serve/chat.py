"""Chat messages -> the prompt text a checkpoint continues: the one place where a conversation becomes a prompt.

lit_llm's finetuned checkpoints record an instruction template (``prompt_template``, see
:mod:`lit_llm.data.prompts`), made for single-turn use as in the book's chapter 7. :func:`render_chat` lays a
conversation out with it: system messages first as plain text, then each user message formatted as an instruction
(up to its response header) followed by the assistant's reply, ending with the last user message's response header
for the model to continue. Without a template the message contents are joined by blank lines. Chat templates that
travel with a checkpoint will replace this function's body; its signature is what the server relies on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lit_llm.data.prompts import PromptTemplate, format_prompt

#: Roles a message may have (``developer`` is OpenAI's newer name for ``system``).
ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation."""

    role: str
    content: str


def render_chat(messages: Sequence[ChatMessage], template: str | PromptTemplate | None) -> str:
    """The prompt for the model's next (assistant) reply to ``messages``.

    Args:
        messages: The conversation, oldest first; the last message should be the user's.
        template: A template name, string or :class:`~lit_llm.data.prompts.PromptTemplate` (the checkpoint's
            ``prompt_template``), or None for plain text: the contents joined by blank lines.

    Raises:
        ValueError: No messages, or a role outside :data:`ROLES`.
    """
    if not messages:
        raise ValueError("messages must hold at least one message")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise ValueError(f"messages[{i}].role {m.role!r} is not one of {', '.join(ROLES)}")
    if template is None:
        return "\n\n".join(m.content for m in messages) + "\n\n"
    system = [m.content for m in messages if m.role in ("system", "developer")]
    parts = ["\n\n".join(system) + "\n\n"] if system else []
    for m in messages:
        if m.role == "user":
            parts.append(format_prompt(template, m.content))
        elif m.role == "assistant":
            parts.append(m.content + "\n\n")
    return "".join(parts)
