"""``python -m lit_llm.generate``: continue prompts, or chat with an instruction-finetuned model.

    python -m lit_llm.generate --checkpoint checkpoints/quickstart/last.ckpt --prompt "The import statement"
    python -m lit_llm.generate --checkpoint openai-community/gpt2 --prompt "Every effort moves you" \\
        --temperature 0.8 --top-k 50 --max-new-tokens 60
    python -m lit_llm.generate --checkpoint checkpoints/instruct/last.ckpt --chat

``--checkpoint`` is a lit_llm ``.ckpt``, an exported / Hugging Face GPT-2 directory, or a Hub id. Prompts come
from ``--prompt`` (repeatable) or ``--prompt-file``: a ``.jsonl`` file holds one JSON object per line with a
``"prompt"`` string (so prompts may span lines); any other file holds one prompt per line (blank lines skipped).
A single prompt streams token by token; several print when done, each as prompt + continuation (``--format
jsonl`` prints ``{"prompt": ..., "completion": ...}`` lines instead). Generation stops at ``<|endoftext|>`` for each
prompt separately. Prompts of equal token length are batched together: the GPT has no padding mask, so prompts of
different lengths run in separate batches and each gets exactly the tokens it would get alone.

``--chat`` is a conversation on stdin. With a checkpoint that carries a chat template (one trained on
conversations, or ``--chat-template``), each line is a user message: the whole conversation so far is rendered with
the template, the reply is generated until the template's end-of-turn marker and printed, and both join the history
(when it no longer fits the context, the oldest exchanges are dropped with a one-line notice). ``/system TEXT`` sets
the system message, ``/reset`` forgets the conversation, ``/exit`` or end of input (Ctrl-D) quits; on a terminal,
lines can be edited and recalled (``readline``). A checkpoint without a chat template gets a warning and the old
single-turn loop: each line is wrapped in the instruction template (``--template``; default the checkpoint's
``prompt_template`` hyperparameter, else ``alpaca``) and answered alone.

Mistakes print one ``error: ...`` line and exit with status 1 (2 for a usage mistake); ``LIT_LLM_DEBUG=1`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TextIO

import torch

from lit_llm.cli import (
    DTYPE_NAMES,
    CommandParser,
    dtype_from_name,
    entry_point,
    read_text_file,
    resolve_device,
    run_command,
    warn,
)
from lit_llm.data.chat_template import BUILTIN_TEMPLATES, ChatTemplate, checkpoint_chat_template, get_chat_template
from lit_llm.data.prompts import TEMPLATES, checkpoint_template, extract_response, format_prompt, get_template
from lit_llm.data.tokenizer import Tokenizer
from lit_llm.errors import ConfigError, LitLLMError
from lit_llm.model.decoding import DecodeMode, generate_tokens_static
from lit_llm.model.gpt import GPTModel
from lit_llm.model.sampling import check_sampling_args, generate_tokens
from lit_llm.weights.readers import load_for_generation


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m lit_llm.generate``."""
    p = CommandParser(
        prog="python -m lit_llm.generate",
        description="Generate text with a lit_llm GPT (a .ckpt, an exported/HF GPT-2 directory, or a Hub id).",
    )
    p.add_argument("--checkpoint", required=True, metavar="SOURCE",
                   help="lit_llm .ckpt, exported/Hugging Face GPT-2 directory, or Hub id (openai-community/gpt2)")
    p.add_argument("--tokenizer", metavar="PATH", default=None,
                   help="tokenizer.json, a directory with GPT-2 BPE files, or a Hub name; default: the checkpoint's")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT", help="text to continue (repeatable)")
    p.add_argument("--prompt-file", metavar="FILE", default=None,
                   help="one prompt per line, or a .jsonl file of {\"prompt\": ...} objects")
    p.add_argument("--max-new-tokens", type=int, default=100, metavar="N",
                   help="most tokens to generate per prompt (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 decodes greedily (the default); higher samples more freely")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="nucleus sampling: keep the most likely tokens up to this probability mass, (0, 1]")
    p.add_argument("--seed", type=int, default=123, help="seed of the sampling generator (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="auto",
                   help="weights' dtype; auto keeps the checkpoint's choice")
    p.add_argument("--no-cache", action="store_true", help="re-run the whole sequence every step (the book's loop)")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help="static KV cache and a decode step replayed as a CUDA graph (lit_llm.model.decoding); same "
                   "tokens in fp32 greedy decoding (default: on for CUDA devices)")
    p.add_argument("--compile", action="store_true",
                   help="with --fast, compile the decode step with torch.compile (slow start, fastest steps)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print tokens as they come (default: on for one prompt and for --chat)")
    p.add_argument("--format", choices=["text", "jsonl"], default="text", help="output of non-chat generation")
    p.add_argument("--chat", action="store_true", help="chat on stdin (multi-turn with the checkpoint's chat template)")
    p.add_argument("--chat-template", default=None, metavar="NAME|FILE",
                   help=f"chat template for --chat: {', '.join(BUILTIN_TEMPLATES)} or a .jinja file; default: the "
                   "checkpoint's")
    p.add_argument("--template", default=None,
                   help=f"instruction template for --chat without a chat template: {', '.join(TEMPLATES)} or a string "
                   "with {instruction}; default: the checkpoint's prompt_template, else alpaca")
    return p


# --- loading -------------------------------------------------------------------------------------------------------


def read_prompts(prompts: Sequence[str] | None, prompt_file: str | None) -> list[str]:
    """``--prompt`` values followed by the prompts of ``--prompt-file``."""
    out = list(prompts or [])
    if prompt_file is not None:
        out += read_text_file(prompt_file, field="prompt", option="--prompt-file", noun="prompts")
    return out


# --- generation ----------------------------------------------------------------------------------------------------


class _TextStream:
    """Turns generated ids into text deltas, holding back a trailing partial UTF-8 character.

    Byte-level BPE can split one character over several tokens; decoding them one by one would print replacement
    characters, so the whole continuation is decoded each time and only complete new text is emitted.
    """

    def __init__(self, tokenizer: Tokenizer, write: Callable[[str], Any]) -> None:
        self.tokenizer = tokenizer
        self.write = write
        self.ids: list[int] = []
        self.sent = 0

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids)
        self._emit(text)
        return text

    def _emit(self, text: str) -> None:
        if len(text) > self.sent:
            self.write(text[self.sent :])
            self.sent = len(text)


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    # An empty prompt starts a new document, GPT-2 style.
    return list(tokenizer.encode(text)) or [tokenizer.eos_id]


def complete(
    model: GPTModel,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = 123,
    use_cache: bool = True,
    on_text: Callable[[str], Any] | None = None,
    fast: DecodeMode | None = None,
    stop_ids: Sequence[int] = (),
) -> list[str]:
    """Continue each prompt; returns the continuations (end-of-text and what follows it left out).

    Prompts of equal token length share a batch; each row stops at the tokenizer's end-of-text id (or one of
    ``stop_ids``).

    Args:
        model: An eval-mode GPT.
        tokenizer: The model's tokenizer.
        prompts: Texts to continue.
        max_new_tokens: Most tokens per prompt.
        temperature: 0 is greedy; see :func:`lit_llm.model.sampling.sample_next` for this, ``top_k`` and ``top_p``.
        top_k: Sample among the k most likely tokens.
        top_p: Nucleus sampling threshold.
        seed: Seed of the sampling generator (one generator for the whole call); None draws a random seed.
        use_cache: Use the KV cache.
        on_text: Called with each new piece of text as it is generated; only for a single prompt.
        fast: Decode with :func:`lit_llm.model.decoding.generate_tokens_static` in this mode (``"auto"``,
            ``"eager"``, ``"cuda-graph"``, ``"compile"``) instead of the model's growing cache; None: the model's.
        stop_ids: More ids that end a row, left out like end-of-text (a chat template's end-of-turn marker).
    """
    if on_text is not None and len(prompts) != 1:
        raise ConfigError(f"streaming needs exactly one prompt, got {len(prompts)}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # a fresh generator always starts from the same default seed
    else:
        generator.manual_seed(seed)
    encoded = [_encode(tokenizer, p) for p in prompts]
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    results: list[str] = [""] * len(prompts)
    for rows in groups.values():
        idx = torch.tensor([encoded[i] for i in rows], dtype=torch.long, device=device)
        streams = [_TextStream(tokenizer, on_text if on_text is not None else _discard) for _ in rows]
        done = [False] * len(rows)
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos_id=tokenizer.eos_id, generator=generator)
        if fast is not None:
            steps = generate_tokens_static(model, idx, max_new_tokens, mode=fast, **sampling)
        else:
            steps = generate_tokens(model, idx, max_new_tokens, use_cache=use_cache, **sampling)
        stops = {tokenizer.eos_id, *stop_ids}
        for nxt in steps:
            for r, token in enumerate(nxt[:, 0].tolist()):
                if done[r]:
                    continue
                if token in stops:
                    done[r] = True
                else:
                    streams[r].add(token)
            if all(done):
                break
        steps.close()  # stopped early: let the decoder restore the model's mode now
        for r, i in enumerate(rows):
            results[i] = streams[r].finish()
    return results


def _discard(text: str) -> None:
    return None


def chat(
    model: GPTModel,
    tokenizer: Tokenizer,
    template: str,
    *,
    stdin: TextIO,
    stdout: TextIO,
    stream: bool = True,
    **gen: Any,
) -> None:
    """Read instructions line by line until ``/exit`` or end of input; print each response.

    Args:
        model: An eval-mode GPT (instruction-finetuned, ideally).
        tokenizer: Its tokenizer.
        template: Instruction template name or string (see :mod:`lit_llm.data.prompts`).
        stdin: Where instructions come from.
        stdout: Where responses go, one block per turn ending in a newline.
        stream: Print the response as it is generated.
        **gen: Keyword arguments of :func:`complete` (``max_new_tokens``, ``temperature``, ...).
    """
    lines = _Lines(stdin)
    while True:
        line = lines.read()
        if line is None:
            break  # end of input
        instruction = line.strip()
        if instruction == "/exit":
            break
        if not instruction:
            continue
        prompt = format_prompt(template, instruction)
        if stream:
            pending = _LeadingSpaceTrim(lambda s: (stdout.write(s), stdout.flush()))
            complete(model, tokenizer, [prompt], on_text=pending, **gen)
            stdout.write("\n")
        else:
            (text,) = complete(model, tokenizer, [prompt], **gen)
            stdout.write(extract_response(template, prompt + text, prompt=prompt) + "\n")
        stdout.flush()


class _Lines:
    """Lines typed by the user: through ``input()`` with ``readline`` line editing and history when stdin is the
    terminal, else read as they come (piped input)."""

    def __init__(self, stdin: TextIO) -> None:
        self.stdin = stdin
        self.terminal = stdin is sys.stdin and stdin.isatty()
        self.interactive = stdin.isatty()
        if self.terminal:
            try:
                import readline  # noqa: F401 - importing it gives input() line editing and history
            except ImportError:  # not on every platform (Windows)
                pass

    def read(self) -> str | None:
        """The next line without its newline; ``None`` at end of input (or Ctrl-C at the prompt)."""
        if self.terminal:
            try:
                return input("> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return None
        if self.interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = self.stdin.readline()
        return line.rstrip("\n") if line else None


COMMANDS_HELP = "/system TEXT (set the system message), /reset (forget the conversation), /exit or Ctrl-D (quit)"


def converse(
    model: GPTModel,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    *,
    stdin: TextIO,
    stdout: TextIO,
    stderr: TextIO | None = None,
    stream: bool = True,
    origin: str = "",
    **gen: Any,
) -> None:
    """A multi-turn conversation: read user messages line by line, print each reply, keep the history.

    The conversation so far (system message, earlier exchanges, the new message) is rendered with ``template`` and
    the reply generated until its end-of-turn marker. When the rendering no longer leaves room for a reply of
    ``max_new_tokens`` (at most an eighth of the context), the oldest exchanges are dropped, with a notice on
    ``stderr``.
    Commands: ``/system TEXT``, ``/reset``, ``/exit``; end of input quits too.

    Args:
        model: An eval-mode GPT finetuned on conversations with ``template``.
        tokenizer: Its tokenizer (with the template's special tokens).
        template: The chat template.
        stdin: Where the user's lines come from.
        stdout: Where the replies go, one per turn, each ending in a newline.
        stderr: Banner and notices (default: ``sys.stderr``).
        stream: Print the reply as it is generated.
        origin: Where the template came from, for the banner (e.g. ``"from the checkpoint"``).
        **gen: Keyword arguments of :func:`complete` (``max_new_tokens``, ``temperature``, ...).
    """
    err = stderr or sys.stderr
    stop = template.stop_id(tokenizer)
    ctx = model.config.context_length
    # Room kept for the reply: --max-new-tokens, but at most an eighth of the context, so that a long default does
    # not push out history the model needs (a longer reply still runs on until the context is full).
    reply_room = min(gen.get("max_new_tokens", 100), max(ctx // 8, 1))
    system: str | None = None
    history: list[dict[str, str]] = []
    lines = _Lines(stdin)

    def notice(text: str) -> None:
        print(text, file=err, flush=True)

    where = f" ({origin})" if origin else ""
    notice(f"Chat with template {template.describe()}{where}, context {ctx} tokens. Commands: {COMMANDS_HELP}.")
    while True:
        line = lines.read()
        if line is None:
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, argument = text.partition(" ")
            if command == "/exit":
                break
            if command == "/reset":
                history = []
                notice("(conversation forgotten)")
            elif command == "/system":
                system = argument.strip() or None
                notice(f"(system message {'set' if system else 'cleared'})")
            else:
                notice(f"(unknown command {command}; commands: {COMMANDS_HELP})")
            continue
        user = {"role": "user", "content": text}
        head = [{"role": "system", "content": system}] if system else []

        def prompt_of(past: list[dict[str, str]]) -> tuple[str, int]:
            rendered = template.render(head + past + [user], add_generation_prompt=True,
                                       eos_token=tokenizer.eos_token)[0]
            return rendered, len(tokenizer.encode(rendered))

        prompt, n = prompt_of(history)
        dropped = 0
        while n > ctx - reply_room and history:
            history = history[2:]
            dropped += 1
            prompt, n = prompt_of(history)
        if dropped:
            notice(f"(dropped the {dropped} oldest exchange{'s' if dropped > 1 else ''} to fit the context of {ctx} "
                   "tokens)")
        if n >= ctx:
            notice(f"(this message is {n} tokens with the template, more than the context of {ctx}; shorten it)")
            continue
        settings = {**gen, "max_new_tokens": min(gen.get("max_new_tokens", 100), ctx - n)}
        try:
            if stream:
                pending = _LeadingSpaceTrim(lambda s: (stdout.write(s), stdout.flush()))
                (reply,) = complete(model, tokenizer, [prompt], on_text=pending, stop_ids=[stop], **settings)
            else:
                (reply,) = complete(model, tokenizer, [prompt], stop_ids=[stop], **settings)
                stdout.write(reply.strip())
        except KeyboardInterrupt:
            stdout.write("\n")
            notice("(interrupted; the reply is not kept)")
            continue
        stdout.write("\n")
        stdout.flush()
        history += [user, {"role": "assistant", "content": reply.strip()}]


class _LeadingSpaceTrim:
    """Forward text, dropping the whitespace before the first visible character (as ``extract_response`` does)."""

    def __init__(self, write: Callable[[str], Any]) -> None:
        self.write = write
        self.started = False

    def __call__(self, text: str) -> None:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        if text:
            self.write(text)


# --- entry point ---------------------------------------------------------------------------------------------------


def chat_template_of(args: argparse.Namespace, meta: dict[str, Any]) -> tuple[ChatTemplate | None, str]:
    """The chat template ``--chat`` uses (``--chat-template``, else the checkpoint's) and where it came from."""
    if args.chat_template is not None:
        return get_chat_template(args.chat_template), "--chat-template"
    stored = checkpoint_chat_template(meta)
    return stored, "from the checkpoint"


def run(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> None:
    """Carry out parsed command-line arguments."""
    check_sampling_args(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, max_new_tokens=args.max_new_tokens
    )
    if args.chat and (args.prompt or args.prompt_file):
        raise ConfigError("--chat reads instructions from stdin; leave out --prompt and --prompt-file")
    if not args.chat and not (args.prompt or args.prompt_file):
        raise ConfigError("nothing to do: pass --prompt TEXT (repeatable), --prompt-file FILE, or --chat")
    if args.template is not None:
        get_template(args.template)  # refuse an unknown name before loading weights
    if args.chat_template is not None:
        get_chat_template(args.chat_template)
    prompts = [] if args.chat else read_prompts(args.prompt, args.prompt_file)
    device = resolve_device(args.device)
    model, tokenizer, meta = load_for_generation(args.checkpoint, device=str(device),
                                                 dtype=dtype_from_name(args.dtype), tokenizer=args.tokenizer)
    fast = args.fast if args.fast is not None else (device.type == "cuda" and not args.no_cache)
    if args.fast and args.no_cache:
        raise ConfigError("--fast decodes with a KV cache; leave out --no-cache (or pass --no-fast)")
    if args.compile and not fast:
        warn("--compile applies to --fast decoding, which is off; decoding without it")
    gen = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, use_cache=not args.no_cache, fast=("compile" if args.compile else "auto") if fast else None,
    )
    if args.chat:
        if args.format != "text":
            warn(f"--format {args.format} applies to --prompt / --prompt-file; --chat prints the responses")
        chat_template, origin = chat_template_of(args, meta)
        stream = args.stream is not False
        if chat_template is not None:
            if args.template is not None:
                warn("--template is the instruction template of models without a chat template; this one has one")
            tokenizer = chat_template.prepare_tokenizer(tokenizer)
            if tokenizer.vocab_size > model.config.vocab_size:
                raise ConfigError(f"chat template {chat_template.name!r} needs special tokens this model was not "
                                  "trained with; leave out --chat-template to use the checkpoint's")
            converse(model, tokenizer, chat_template, stdin=stdin, stdout=stdout, stream=stream, origin=origin, **gen)
            return
        template = args.template or checkpoint_template(meta) or "alpaca"
        get_template(template)
        warn(f"{args.checkpoint} carries no chat template (it was not trained on conversations): each line is answered "
             f"alone with the instruction template {template!r}, without history. Pass --chat-template NAME|FILE to "
             "chat with a template the model knows.")
        chat(model, tokenizer, template, stdin=stdin, stdout=stdout, stream=stream, **gen)
        return
    for flag, value in (("--template", args.template), ("--chat-template", args.chat_template)):
        if value is not None:
            warn(f"{flag} applies to --chat; --prompt text is continued as written (format it yourself)")
    stream = len(prompts) == 1 and args.format == "text"
    if args.stream and not stream:
        why = f"{len(prompts)} prompts" if len(prompts) > 1 else "--format jsonl"
        warn(f"--stream needs a single prompt and --format text; with {why} the output prints when done")
    stream = stream and args.stream is not False
    if stream:
        stdout.write(prompts[0])
        stdout.flush()
        complete(model, tokenizer, prompts, on_text=lambda s: (stdout.write(s), stdout.flush()), **gen)
        stdout.write("\n")
        return
    for prompt, completion in zip(prompts, complete(model, tokenizer, prompts, **gen)):
        if args.format == "jsonl":
            stdout.write(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False) + "\n")
        else:
            stdout.write(prompt + completion + "\n")
    stdout.flush()


def main(argv: Iterable[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Run ``python -m lit_llm.generate`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    User mistakes print ``error: <message>`` on stderr and return 1 (``LIT_LLM_DEBUG=1`` re-raises them).
    """
    def action() -> None:
        run(build_parser().parse_args(None if argv is None else list(argv)), stdin or sys.stdin, stdout or sys.stdout)

    return run_command(action, (LitLLMError, ValueError, OSError))


if __name__ == "__main__":
    entry_point(main)
