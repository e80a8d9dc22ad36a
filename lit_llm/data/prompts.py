"""Instruction prompt templates: the book's Alpaca style (chapter 7), Phi-3 style (exercise 7.1), and your own.

A template turns an instruction and an optional input into the text a model continues with its response. The
same text is used when finetuning (prompt + response + end-of-text) and when generating (prompt only), so a
finetuned model should always be prompted with the template it was trained on.

A template is named by a key of :data:`TEMPLATES` (``"alpaca"``, ``"phi3"``) or given as a string with an
``{instruction}`` placeholder and optionally ``{input}``, e.g. ``"Q: {instruction}\\n{input}\\nA:"``. Only those
two placeholders are replaced, so other braces in the string stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lit_llm.errors import ConfigError

EOS_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class PromptTemplate:
    """A named instruction template in three parts.

    Attributes:
        instruction: Text with ``{instruction}``; always present.
        input: Text with ``{input}``; appended only when the input is non-empty (as the book's ``format_input``).
        response: The response header the model continues after.
    """

    instruction: str
    input: str
    response: str

    def format_input(self, instruction: str, input: str = "") -> str:
        """The instruction and input sections without the response header (the book's ``format_input``)."""
        text = self.instruction.replace("{instruction}", instruction)
        if input:
            text += self.input.replace("{input}", input)
        return text

    def format(self, instruction: str, input: str = "") -> str:
        """The prompt up to and including the response header."""
        return self.format_input(instruction, input) + self.response


TEMPLATES: dict[str, PromptTemplate] = {
    # The book's chapter 7 `format_input`, followed by the response header its InstructionDataset appends.
    "alpaca": PromptTemplate(
        instruction=(
            "Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{instruction}"
        ),
        input="\n\n### Input:\n{input}",
        response="\n\n### Response:\n",
    ),
    # Exercise 7.1's `format_input` and response prefix, colon after <|assistant|> included, as the book's code has it.
    "phi3": PromptTemplate(
        instruction="<|user|>\n{instruction}",
        input="\n{input}",
        response="\n<|assistant|>:\n",
    ),
}


def get_template(template: str | PromptTemplate) -> PromptTemplate | str:
    """Resolve a template name, or check a user template string; a :class:`PromptTemplate` passes through.

    Raises:
        ConfigError: A string that is neither a known name nor contains ``{instruction}``.
    """
    if isinstance(template, PromptTemplate):
        return template
    if template in TEMPLATES:
        return TEMPLATES[template]
    if not isinstance(template, str) or "{instruction}" not in template:
        raise ConfigError(
            f"Unknown prompt template {template!r}: use one of {', '.join(sorted(TEMPLATES))}, or a template "
            "string with an {instruction} placeholder (and optionally {input})"
        )
    return template


def format_prompt(template: str | PromptTemplate, instruction: str, input: str = "") -> str:
    """Format ``instruction`` (and ``input``) with a template, up to and including its response header.

    Args:
        template: A name in :data:`TEMPLATES`, a :class:`PromptTemplate`, or a string with ``{instruction}`` and
            optionally ``{input}`` placeholders.
        instruction: The task.
        input: Optional context for the task; named templates leave their input section out when it is empty.

    Returns:
        The text the model continues with its response.

    Raises:
        ConfigError: An unknown template name.
    """
    resolved = get_template(template)
    if isinstance(resolved, PromptTemplate):
        return resolved.format(instruction, input)
    return resolved.replace("{instruction}", instruction).replace("{input}", input)


def response_marker(template: str | PromptTemplate) -> str:
    """The text that comes right before a response: the named template's response header, or whatever a user
    template has after its last placeholder; without surrounding whitespace (tokenizers may split it off)."""
    resolved = get_template(template)
    if isinstance(resolved, PromptTemplate):
        return resolved.response.strip()
    cut = max(resolved.rfind("{instruction}") + len("{instruction}"), resolved.rfind("{input}") + len("{input}"))
    return resolved[cut:].strip()


def extract_response(template: str | PromptTemplate, generated_text: str, prompt: str | None = None) -> str:
    """The response in text a model generated from a prompt made with ``template``.

    Drops the prompt, stops at the first ``<|endoftext|>`` and strips surrounding whitespace, like the book's
    ``generated_text[len(input_text):].replace("### Response:", "").strip()``. With ``prompt``, a leading copy of it
    is removed (and ``generated_text`` may be the continuation alone); without it, everything up to the first
    response header is, so a continuation passed alone should not contain the header.

    Args:
        template: The template the prompt was made with (see :func:`format_prompt`).
        generated_text: The decoded prompt + continuation, or the continuation alone.
        prompt: The prompt text, when known.
    """
    text = generated_text
    if prompt is not None and text.startswith(prompt):
        text = text[len(prompt) :]
    else:
        marker = response_marker(template)
        at = text.find(marker) if marker else -1
        if at >= 0:
            text = text[at + len(marker) :]
    return text.split(EOS_TOKEN, 1)[0].strip()


def checkpoint_template(meta: dict[str, Any]) -> str | None:
    """The ``prompt_template`` a finetuned checkpoint recorded, if any."""
    for holder in (meta, meta.get("hyper_parameters") or {}):
        if isinstance(holder, dict) and isinstance(holder.get("prompt_template"), str):
            return holder["prompt_template"]
    return None
