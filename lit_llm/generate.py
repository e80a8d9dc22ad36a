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

``--chat`` reads one line at a time from stdin, wraps it in the instruction template (``--template``; default
the checkpoint's ``prompt_template`` hyperparameter, else ``alpaca``), generates until ``<|endoftext|>`` and prints
the response only. Each turn is independent (the book's models are single-turn). ``/exit`` or end of input quits.

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
    p.add_argument("--chat", action="store_true", help="interactive instruction loop on stdin")
    p.add_argument("--template", default=None,
                   help=f"instruction template for --chat: {', '.join(TEMPLATES)} or a string with {{instruction}}; "
                   "default: the checkpoint's prompt_template, else alpaca")
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
) -> list[str]:
    """Continue each prompt; returns the continuations (end-of-text and what follows it left out).

    Prompts of equal token length share a batch; each row stops at the tokenizer's end-of-text id.

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
        for nxt in steps:
            for r, token in enumerate(nxt[:, 0].tolist()):
                if done[r]:
                    continue
                if token == tokenizer.eos_id:
                    done[r] = True
                else:
                    streams[r].add(token)
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
    interactive = stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
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
        template = args.template or checkpoint_template(meta) or "alpaca"
        get_template(template)
        chat(model, tokenizer, template, stdin=stdin, stdout=stdout, stream=args.stream is not False, **gen)
        return
    if args.template is not None:
        warn("--template applies to --chat; --prompt text is continued as written (format it yourself)")
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
