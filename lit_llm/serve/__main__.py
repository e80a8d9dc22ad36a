"""``lit-llm serve`` (``python -m lit_llm.serve``): chat with a checkpoint in the browser, or call it as OpenAI's API.

    lit-llm serve --checkpoint checkpoints/instruct/last.ckpt          # then open http://127.0.0.1:8000/
    lit-llm serve --checkpoint CKPT --host 0.0.0.0 --api-key "$KEY"    # reachable from other machines

Binds 127.0.0.1 unless told otherwise, and refuses any other address without an API key (``--api-key`` or the
``LIT_LLM_API_KEY`` environment variable). Details: ``docs/serve.md``.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lit_llm.cli import DTYPE_NAMES, CommandParser, dtype_from_name, entry_point, resolve_device, run_command
from lit_llm.data.chat_template import ChatTemplate, checkpoint_chat_template
from lit_llm.data.prompts import TEMPLATES, checkpoint_template, get_template
from lit_llm.errors import ConfigError, LitLLMError

log = logging.getLogger("lit_llm.serve")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``lit-llm serve``."""
    p = CommandParser(prog="lit-llm serve",
                      description="Serve a lit_llm GPT: OpenAI-compatible API under /v1 and a chat page at /.")
    p.add_argument("--checkpoint", required=True, metavar="SOURCE",
                   help="lit_llm .ckpt or run directory, exported/Hugging Face GPT-2 directory, or Hub id")
    p.add_argument("--tokenizer", default=None, metavar="PATH", help="default: the checkpoint's")
    p.add_argument("--template", default=None,
                   help=f"instruction template for chat requests: {', '.join(TEMPLATES)} or a string with "
                   "{{instruction}}; default: the checkpoint's chat template, else its prompt_template, else the "
                   "messages as plain text")
    p.add_argument("--model-name", default=None, help="the model id clients name (default: from --checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $LIT_LLM_API_KEY); needed off loopback")
    p.add_argument("--max-tokens", type=int, default=256, metavar="N",
                   help="largest max_tokens a request may ask for, and the default (default: %(default)s)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N",
                   help="longest prompt in tokens (default: the model's context length - 1)")
    p.add_argument("--max-concurrency", type=int, default=16, metavar="N",
                   help="requests decoded together (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting for a free slot; more are answered 429 (default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N",
                   help="largest request body (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="auto", help="weights' dtype; auto keeps the checkpoint's")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (slow start, fastest steps); default: CUDA graphs "
                   "on GPUs, eager on CPU")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_args(args: argparse.Namespace) -> None:
    """Refuse unsafe or impossible settings before loading anything (one error listing every problem)."""
    problems = []
    if not is_loopback(args.host) and not args.api_key:
        problems.append(f"--host {args.host} makes the server reachable from other machines: set an API key "
                        "(--api-key KEY or LIT_LLM_API_KEY), or keep --host 127.0.0.1")
    for name in ("max_tokens", "max_concurrency", "max_body_bytes"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.max_queue < 0:
        problems.append(f"--max-queue {args.max_queue} must be >= 0")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        problems.append(f"--max-prompt-tokens {args.max_prompt_tokens} must be >= 1")
    if not 0 <= args.port < 65536:
        problems.append(f"--port {args.port} must be in 0..65535")
    if problems:
        raise ConfigError("Cannot serve:\n  - " + "\n  - ".join(problems))


def model_name(source: str) -> str:
    """A readable id for the checkpoint: its run directory's name for ``.../run/last.ckpt``, else its name."""
    path = Path(source)
    if path.suffix == ".ckpt" and path.stem in ("last", "best") and path.parent.name:
        return path.parent.name
    return path.stem if path.suffix else (path.name or source)


def build_server(args: argparse.Namespace) -> Any:
    """Load the model, start the engine and return the ASGI application."""
    from lit_llm.serve.app import Limits, create_app
    from lit_llm.serve.engine import Engine
    from lit_llm.weights.readers import load_for_generation

    if args.template is not None:
        get_template(args.template)
    device = resolve_device(args.device)
    model, tokenizer, meta = load_for_generation(args.checkpoint, device=str(device),
                                                 dtype=dtype_from_name(args.dtype), tokenizer=args.tokenizer)
    template = args.template or checkpoint_chat_template(meta or {}) or checkpoint_template(meta or {})
    if isinstance(template, ChatTemplate):
        template.stop_id(tokenizer)  # its end-of-turn marker must be one token: say so now, not at the first request
        log.info("chat requests use the checkpoint's chat template %s", template.describe())
    if template is None:
        log.warning("the checkpoint records no prompt template: chat messages are joined as plain text (pass "
                    "--template alpaca or another one for an instruction-finetuned model)")
    ctx = model.config.context_length
    limits = Limits(max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens or ctx - 1,
                    max_body_bytes=args.max_body_bytes)
    mode = "compile" if args.compile else "auto"
    log.info("preparing %d decoding slots on %s (%s)", args.max_concurrency, device, mode)
    engine = Engine(model, tokenizer, slots=args.max_concurrency, max_queue=args.max_queue, mode=mode).start()
    name = args.model_name or model_name(args.checkpoint)
    return create_app(engine, tokenizer, model_name=name, template=template, limits=limits, api_key=args.api_key)


def run(args: argparse.Namespace) -> None:
    """Carry out parsed command-line arguments: serve until interrupted."""
    import uvicorn

    args.api_key = args.api_key or os.environ.get("LIT_LLM_API_KEY") or None
    check_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    app = build_server(args)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    log.info("chat page: http://%s:%d/   OpenAI API: http://%s:%d/v1", shown, args.port, shown, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)


def main(argv: Iterable[str] | None = None) -> int:
    """Run ``lit-llm serve`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    def action() -> None:
        try:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as err:
            raise ConfigError(f"lit-llm serve needs the serve extra ({err.name} is missing): "
                              "pip install 'lit_llm[serve]'") from err
        run(build_parser().parse_args(None if argv is None else list(argv)))

    return run_command(action, (LitLLMError, ValueError, OSError))


if __name__ == "__main__":
    entry_point(main)
