"""Chat messages -> the prompt text a checkpoint continues: the one place where a conversation becomes a prompt.

A checkpoint trained on conversations carries its chat template (:mod:`lit_llm.data.chat_template`):
:func:`render_chat` renders the messages with it, ending with the assistant's header for the model to continue, and
:func:`chat_stops` names its end-of-turn marker, where a reply ends. Older finetuned checkpoints record an
instruction template (``prompt_template``, see :mod:`lit_llm.data.prompts`), made for single-turn use as in the
book's chapter 7: system messages come first as plain text, then each user message formatted as an instruction (up
to its response header) followed by the assistant's reply, ending with the last user message's response header.
Without any template the message contents are joined by blank lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lit_llm.data.chat_template import ChatTemplate
from lit_llm.data.prompts import PromptTemplate, format_prompt
from lit_llm.data.tokenizer import Tokenizer

#: Roles a message may have (``developer`` is OpenAI's newer name for ``system``).
ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation."""

    role: str
    content: str


def render_chat(messages: Sequence[ChatMessage], template: ChatTemplate | str | PromptTemplate | None,
                eos_token: str = "<|endoftext|>") -> str:
    """The prompt for the model's next (assistant) reply to ``messages``.

    Args:
        messages: The conversation, oldest first; the last message should be the user's.
        template: The checkpoint's :class:`~lit_llm.data.chat_template.ChatTemplate`; or an instruction template
            name, string or :class:`~lit_llm.data.prompts.PromptTemplate` (a ``prompt_template``); or None for plain
            text: the contents joined by blank lines.
        eos_token: The tokenizer's end-of-text token, which chat templates may write.

    Raises:
        ValueError: No messages, or a role outside :data:`ROLES`.
    """
    if not messages:
        raise ValueError("messages must hold at least one message")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise ValueError(f"messages[{i}].role {m.role!r} is not one of {', '.join(ROLES)}")
    if isinstance(template, ChatTemplate):
        # OpenAI's `developer` is the system role of the templates.
        turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in messages]
        return template.render(turns, add_generation_prompt=True, eos_token=eos_token)[0]
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


def chat_stops(template: ChatTemplate | str | PromptTemplate | None, tokenizer: Tokenizer) -> list[str]:
    """Strings that end a chat reply besides end-of-text: a chat template's end-of-turn marker (none otherwise)."""
    if not isinstance(template, ChatTemplate):
        return []
    stop = template.stop_text(tokenizer)
    return [] if stop == tokenizer.eos_token else [stop]
