"""Chat templates: how a conversation becomes the text (and token ids) a model reads, and which tokens it learns.

Every chat template is a Jinja chat template string in the form Hugging Face ``transformers`` uses: it renders
``messages`` (a list of ``{"role", "content"}`` dicts), ``add_generation_prompt`` and the tokenizer's
``eos_token``/``bos_token``, and it wraps what the assistant says (its content and its end-of-turn marker) in
``{% generation %}...{% endgeneration %}``. lit_llm renders it itself, in the same sandbox ``transformers`` uses
(``jinja2.sandbox.ImmutableSandboxedEnvironment`` with ``trim_blocks`` and ``lstrip_blocks``), and derives the
assistant mask from the generation spans the same way (every token overlapping a span). So the ids and the mask a
model is trained on are the ids and the mask ``AutoTokenizer.apply_chat_template(..., return_assistant_tokens_mask=
True)`` gives for the exported model, by construction.

Built-in templates (:data:`BUILTIN_TEMPLATES`):

- ``chatml`` (the default for new models): ``<|im_start|>role\\n...<|im_end|>\\n``, with ``<|im_start|>`` and
  ``<|im_end|>`` added to the tokenizer as special tokens; the model stops at ``<|im_end|>``.
- ``alpaca``: the book's chapter 7 prompt (``### Instruction:`` / ``### Input:`` / ``### Response:``), each answer
  ended by ``<|endoftext|>``; one instruction and its answer render exactly as the book's training example.
- ``phi3``: the book's exercise 7.1 style (``<|user|>`` ... ``<|assistant|>:``), plain text as in the book.

Any other value is a Jinja template of your own (inline, or a ``.jinja`` file); name its special tokens with
``data.special_tokens``. Nothing in a template can run code: the sandbox allows no attribute access to Python
internals, and only the helpers ``transformers`` offers (``raise_exception``, ``tojson``, ``strftime_now``) exist.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lit_llm.data.tokenizer import EOS_TOKEN, Tokenizer
from lit_llm.errors import ConfigError, DataError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# trim_blocks removes the newline after a block tag, so each statement sits on its own line; text the model reads
# is written as string expressions, so no stray whitespace of the layout reaches it.
_CHATML = r"""{% for message in messages %}
{% if message['role'] == 'assistant' %}
{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' -}}
{% else %}
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] -}}
{% if message['input'] %}
{{ '\n\n' + message['input'] -}}
{% endif %}
{{ '<|im_end|>\n' -}}
{% endif %}
{% endfor %}
{% if add_generation_prompt %}
{{ '<|im_start|>assistant\n' -}}
{% endif %}
"""

_ALPACA = r"""{% for message in messages %}
{% if message['role'] == 'system' %}
{{ message['content'] + '\n\n' -}}
{% elif message['role'] == 'user' %}
{{ 'Below is an instruction that describes a task. ' -}}
{{ 'Write a response that appropriately completes the request.\n\n### Instruction:\n' + message['content'] -}}
{% if message['input'] %}
{{ '\n\n### Input:\n' + message['input'] -}}
{% endif %}
{% elif message['role'] == 'assistant' %}
{{ '\n\n### Response:\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}
{% endif %}
{% endfor %}
{% if add_generation_prompt %}
{{ '\n\n### Response:\n' -}}
{% endif %}
"""

_PHI3 = r"""{% for message in messages %}
{% if message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + '\n' -}}
{% elif message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] -}}
{% if message['input'] %}
{{ '\n' + message['input'] -}}
{% endif %}
{% elif message['role'] == 'assistant' %}
{{ '\n<|assistant|>:\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}
{% endif %}
{% endfor %}
{% if add_generation_prompt %}
{{ '\n<|assistant|>:\n' -}}
{% endif %}
"""


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template with what lit_llm needs besides: its special tokens and its end-of-turn marker.

    Attributes:
        name: ``chatml``, ``alpaca``, ``phi3``, or where a template of your own came from (``custom``, a file name).
        source: The Jinja text (what ``convert to-hf`` exports as the tokenizer's ``chat_template``).
        special_tokens: Tokens the template writes that the tokenizer must hold as single special tokens.
        stop: The end-of-turn marker the model emits after an answer (generation stops there); ``None``: the last
            token of the template's ``{% generation %}`` block, found by rendering a probe conversation.
    """

    name: str
    source: str
    special_tokens: tuple[str, ...] = ()
    stop: str | None = None
    _compiled: Any = field(default=None, compare=False, repr=False)

    # ---- rendering ---------------------------------------------------------------------------------------------
    def render(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
        eos_token: str = EOS_TOKEN, bos_token: str | None = None,
    ) -> tuple[str, list[tuple[int, int]]]:
        """The text of ``messages`` and the character spans of its ``{% generation %}`` blocks.

        Raises:
            DataError: The template failed on these messages (e.g. its ``raise_exception``).
        """
        template = _compile(self.source)
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        env = template.environment
        context = {"messages": [dict(m) for m in messages], "add_generation_prompt": add_generation_prompt,
                   "eos_token": eos_token, "bos_token": bos_token if bos_token is not None else eos_token,
                   "tools": None, "documents": None}
        token = env.lit_llm_spans.set((blocks, spans))
        try:
            for block in template.generate(**context):
                blocks.append(block)
        except jinja2.TemplateError as err:
            raise DataError(f"chat template {self.name!r} failed: {err}") from err
        finally:
            env.lit_llm_spans.reset(token)
        return "".join(blocks), spans

    def encode(
        self, tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Token ids of the rendered ``messages`` and their assistant mask (1 for every token overlapping a
        ``{% generation %}`` span, as ``transformers``' ``return_assistant_tokens_mask``)."""
        text, spans = self.render(messages, add_generation_prompt=add_generation_prompt,
                                  eos_token=tokenizer.eos_token)
        encoding = tokenizer.backend.encode(text, add_special_tokens=False)
        mask = [0] * len(encoding.ids)
        at = 0
        for i, (start, end) in enumerate(encoding.offsets):
            while at < len(spans) and start >= spans[at][1]:
                at += 1
            if at == len(spans):
                break
            if end > spans[at][0]:
                mask[i] = 1
        return list(encoding.ids), mask

    def prompt_ids(self, tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Ids of ``messages`` followed by the header of the assistant's next reply (what the model continues)."""
        return self.encode(tokenizer, messages, add_generation_prompt=True)[0]

    # ---- tokens ------------------------------------------------------------------------------------------------
    def prepare_tokenizer(self, tokenizer: Tokenizer) -> Tokenizer:
        """``tokenizer`` with this template's special tokens added (a new tokenizer; the same one when it has them).

        New tokens get the next free ids, so a model's vocabulary grows by as many rows (GPT-2's 50,257 become
        50,259 with ChatML: still within its 50,304 padded rows).
        """
        missing = [t for t in self.special_tokens if tokenizer.backend.token_to_id(t) is None]
        if not missing:
            return tokenizer
        backend = tokenizers.Tokenizer.from_str(tokenizer.to_json())
        backend.add_special_tokens(missing)
        return Tokenizer(backend, eos_token=tokenizer.eos_token)

    def stop_id(self, tokenizer: Tokenizer) -> int:
        """Id of the end-of-turn marker: generation stops when the model emits it.

        Raises:
            ConfigError: The marker is not one token of ``tokenizer`` (add it to ``data.special_tokens``).
        """
        stop = self.stop_text(tokenizer)
        ids = tokenizer.encode(stop)
        if len(ids) != 1:
            raise ConfigError(
                f"chat template {self.name!r}: its end-of-turn marker {stop!r} is {len(ids)} tokens of this tokenizer, "
                "not one; list it in data.special_tokens so that it is added as a special token"
            )
        return ids[0]

    def stop_text(self, tokenizer: Tokenizer) -> str:
        """The end-of-turn marker as text (``stop``, ``eos_token`` resolved, or found from the probe)."""
        if self.stop is not None:
            return tokenizer.eos_token if self.stop == "eos_token" else self.stop
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
        ids, mask = self.encode(tokenizer, probe)
        trained = [i for i, m in zip(ids, mask) if m]
        if not trained:
            raise ConfigError(
                f"chat template {self.name!r} marks no assistant text: wrap each assistant message's content and its "
                "end-of-turn marker in {% generation %}...{% endgeneration %} so lit_llm knows what to train"
            )
        last = tokenizer.decode([trained[-1]])
        added = {t.content for t in tokenizer.backend.get_added_tokens_decoder().values()}
        if last not in added:
            raise ConfigError(
                f"chat template {self.name!r}: its {{% generation %}} block must end with an end-of-turn special token "
                f"(such as <|im_end|> or {{{{ eos_token }}}}), but it ends with {last!r}; put the marker inside the "
                "block and list it in data.special_tokens, so the model learns to stop"
            )
        return last

    # ---- storage -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data for checkpoints (weights-only loading reads it back)."""
        return {"name": self.name, "source": self.source, "special_tokens": list(self.special_tokens),
                "stop": self.stop}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChatTemplate:
        """The template :meth:`to_dict` stored."""
        return cls(name=str(data.get("name") or "custom"), source=str(data["source"]),
                   special_tokens=tuple(data.get("special_tokens") or ()), stop=data.get("stop"))

    def describe(self) -> str:
        """One line for logs and banners."""
        return self.name if self.name in BUILTIN_TEMPLATES else f"{self.name} (a Jinja template)"


BUILTIN_TEMPLATES: dict[str, ChatTemplate] = {
    "chatml": ChatTemplate("chatml", _CHATML, (IM_START, IM_END), IM_END),
    "alpaca": ChatTemplate("alpaca", _ALPACA, (), "eos_token"),
    "phi3": ChatTemplate("phi3", _PHI3, (), "eos_token"),
}

#: The template of new chat models.
DEFAULT_TEMPLATE = "chatml"


def get_chat_template(spec: str | ChatTemplate, special_tokens: Sequence[str] | None = None) -> ChatTemplate:
    """Resolve ``data.chat_template``: a built-in name, a path to a ``.jinja`` file, or an inline Jinja template.

    Args:
        spec: The setting.
        special_tokens: Extra special tokens (added to a built-in's own).

    Raises:
        ConfigError: Neither a known name, an existing file, nor Jinja text; or Jinja that does not compile.
    """
    extra = tuple(special_tokens or ())
    if isinstance(spec, ChatTemplate):
        template = spec
    elif spec in BUILTIN_TEMPLATES:
        template = BUILTIN_TEMPLATES[spec]
    elif isinstance(spec, str) and ("{%" in spec or "{{" in spec):
        template = ChatTemplate("custom", spec)
    elif isinstance(spec, str) and spec.endswith((".jinja", ".j2", ".txt")):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"data.chat_template file {spec!r} does not exist (cwd: {Path.cwd()})")
        template = ChatTemplate(path.name, path.read_text(encoding="utf-8"))
    else:
        raise ConfigError(
            f"unknown chat template {spec!r}: use one of {', '.join(BUILTIN_TEMPLATES)}, a .jinja file, or a Jinja "
            "chat template string (with {% generation %} around each assistant answer and its end marker)"
        )
    if extra:
        template = ChatTemplate(template.name, template.source,
                                tuple(dict.fromkeys(template.special_tokens + extra)), template.stop)
    try:
        _compile(template.source)
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(f"chat template {template.name!r} is not valid Jinja: {err} (line {err.lineno})") from err
    return template


def checkpoint_chat_template(meta: Mapping[str, Any]) -> ChatTemplate | None:
    """The chat template a checkpoint (or an exported directory) carries, if any: the successor of
    :func:`lit_llm.data.prompts.checkpoint_template` for conversations."""
    stored = meta.get("chat_template")
    if isinstance(stored, Mapping) and isinstance(stored.get("source"), str):
        return ChatTemplate.from_dict(stored)
    if isinstance(stored, str) and stored:
        return ChatTemplate("exported", stored)
    return None


# ---- the sandbox -------------------------------------------------------------------------------------------------


class _GenerationSpans(Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body and records where in the output it went."""

    tags = {"generation"}

    def __init__(self, environment: jinja2.Environment) -> None:
        super().__init__(environment)
        from contextvars import ContextVar

        environment.extend(lit_llm_spans=ContextVar("lit_llm_spans", default=None))

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_record", []), [], [], body).set_lineno(lineno)

    def _record(self, caller: Any) -> str:
        text = caller()
        tracking = self.environment.lit_llm_spans.get()
        if tracking is not None:
            blocks, spans = tracking
            start = sum(len(b) for b in blocks)
            spans.append((start, start + len(text)))
        return text


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationSpans, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)
