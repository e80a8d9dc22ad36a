"""``python -m lit_llm.convert``: bring GPT-2 and the book's weights into lit_llm, and take lit_llm models to
Hugging Face.

    python -m lit_llm.convert from-hf openai-community/gpt2 checkpoints/gpt2-124m
    python -m lit_llm.convert from-book gpt2-small-124M.pth checkpoints/book-124m --tokenizer gpt2_dir/
    python -m lit_llm.convert to-hf checkpoints/quickstart/last.ckpt exports/quickstart-hf
    python -m lit_llm.convert merge-lora checkpoints/lora-run/last.ckpt checkpoints/lora-merged
    python -m lit_llm.convert extract-lora checkpoints/lora-run/last.ckpt adapters.safetensors
    python -m lit_llm.convert consolidate checkpoints/fsdp-run/last.ckpt checkpoints/fsdp-run/last.consolidated.ckpt

``from-hf``, ``from-book`` and ``merge-lora`` write a converted weights directory (``model.safetensors`` in lit_llm's
layout, ``model_config.json``, ``tokenizer.json``) that ``model.init_weights``, ``python -m lit_llm.generate`` and
``to-hf`` read. ``to-hf`` writes a directory that ``transformers.AutoModelForCausalLM`` and ``AutoTokenizer`` load.
``extract-lora`` writes a checkpoint's LoRA adapters alone, for :func:`lit_llm.model.lora.load_lora`.
``consolidate`` makes one ``.ckpt`` file of the checkpoint directory an FSDP or DeepSpeed run writes
(:mod:`lit_llm.weights.consolidate`).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from lit_llm.cli import DTYPE_NAMES, CommandParser, dtype_from_name, entry_point, run_command
from lit_llm.data.chat_template import checkpoint_chat_template
from lit_llm.data.tokenizer import Tokenizer, load_tokenizer
from lit_llm.errors import CheckpointError, ConfigError, LitLLMError
from lit_llm.model.config import PRESETS, GPTConfig
from lit_llm.model.lora import read_lora, write_lora_file
from lit_llm.weights.consolidate import _consolidate
from lit_llm.weights.export import export_hf, save_weights
from lit_llm.weights.readers import load_book_state_dict, load_model_for_inference


def _from_hf(args: argparse.Namespace) -> str:
    path = Path(args.source).expanduser()
    if path.exists() and not (path / "config.json").is_file() and not (path.parent / "config.json").is_file():
        raise CheckpointError(f"{args.source} is not a Hugging Face GPT-2 directory (config.json + model.safetensors); "
                              "for the book's .pth/.safetensors files use from-book, and lit_llm checkpoints need no "
                              "import")
    # Building the model costs no extra memory (meta device + assign) and gives the source's tokenizer too.
    model, tokenizer, _ = load_model_for_inference(args.source, dtype=dtype_from_name(args.dtype))
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    state = model.state_dict()
    out = save_weights(model.config, state, args.out, tokenizer)
    return _summary(out, model.config, state, tokenizer is not None)


def _from_book(args: argparse.Namespace) -> str:
    n_heads = args.n_heads
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise ConfigError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
        n_heads = n_heads or PRESETS[args.preset]["n_heads"]
    config, state = load_book_state_dict(args.path, n_heads=n_heads, dtype=dtype_from_name(args.dtype))
    assert config is not None  # load_book_state_dict raises when it cannot build one from a file
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else _tokenizer_beside(Path(args.path))
    out = save_weights(config, state, args.out, tokenizer)
    return _summary(out, config, state, tokenizer is not None)


def _to_hf(args: argparse.Namespace) -> str:
    model, tokenizer, meta = load_model_for_inference(args.checkpoint, dtype=dtype_from_name(args.dtype))
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no tokenizer is known")  # the summary line says it
        out = export_hf(model, args.out_dir, tokenizer, checkpoint_chat_template(meta))
    config: GPTConfig = model.config
    note = "" if tokenizer is not None else " (no tokenizer: pass --tokenizer to include one)"
    if tokenizer is not None and (out / "chat_template.jinja").is_file():
        note += "; with its chat template"
    return (f"wrote {out}: Hugging Face GPT-2 ({config.n_layers} layers, {config.emb_dim} wide, {config.vocab_size} "
            f"tokens) from {meta['format']} weights{note}")


def _merge_lora(args: argparse.Namespace) -> str:
    # The readers merge LoRA adapters into their weights; this refuses a checkpoint with nothing to merge.
    model, tokenizer, meta = load_model_for_inference(args.checkpoint, dtype=dtype_from_name(args.dtype))
    merged = meta.get("lora_merged") or []
    if not merged:
        raise CheckpointError(f"{args.checkpoint} holds no LoRA adapters (no lora_A/lora_B entries), so there is "
                              "nothing to merge; it can be used as it is")
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    state = model.state_dict()
    out = save_weights(model.config, state, args.out_dir, tokenizer)
    return f"{_summary(out, model.config, state, tokenizer is not None)}; merged {len(merged)} LoRA adapters"


def _extract_lora(args: argparse.Namespace) -> str:
    state, config, metadata = read_lora(args.checkpoint)
    model_config = json.loads(metadata["model_config"]) if "model_config" in metadata else None
    out = write_lora_file(Path(args.out), state, config, model_config, {"source": str(args.checkpoint)})
    n = sum(t.numel() for k, t in state.items() if not k.endswith("lora_scaling"))
    return (f"wrote {out}: {len(state) // 3} LoRA adapters, {n:,} parameters (rank {config.rank}, alpha "
            f"{config.alpha:g}, targets {', '.join(config.targets)})")


def _consolidate_dir(args: argparse.Namespace) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _consolidate(args.checkpoint, args.out, keep_optimizer=args.keep_optimizer)
    for warning in caught:  # what was left out, as one line each rather than Python's file:line format
        print(f"warning: {warning.message}", file=sys.stderr)
    return result.describe()


def _tokenizer_beside(path: Path) -> Tokenizer | None:
    try:
        return load_tokenizer(path.parent)
    except LitLLMError:
        return None


def _summary(out: Path, config: GPTConfig, state: dict, has_tokenizer: bool) -> str:
    n = sum(t.numel() for k, t in state.items() if not (config.tie_weights and k == "out_head.weight"))
    tokenizer = "with tokenizer.json" if has_tokenizer else "no tokenizer (pass --tokenizer to include one)"
    return (f"wrote {out}: {n:,} parameters, {config.n_layers} layers, {config.emb_dim} wide, {config.n_heads} heads, "
            f"{config.vocab_size} tokens, context {config.context_length}; {tokenizer}")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m lit_llm.convert`` argument parser."""
    parser = CommandParser(
        prog="python -m lit_llm.convert",
        description="Convert GPT weights between lit_llm, the Hugging Face GPT-2 layout and the book's state dicts.",
        epilog="Bad input ends with one 'error: ...' line and exit status 1; LIT_LLM_DEBUG=1 shows the traceback.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dtype = dict(choices=DTYPE_NAMES[1:], default=None, help="cast the weights to this dtype (default: as stored)")
    tok_help = "tokenizer to store with the weights: a directory or tokenizer.json, or a Hub id such as gpt2"

    p = sub.add_parser(
        "from-hf", help="Hugging Face GPT-2 (directory or Hub id) -> lit_llm weights directory",
        description="Import OpenAI GPT-2 in the Hugging Face layout (config.json + model.safetensors or "
                    "pytorch_model.bin) into a lit_llm weights directory: model.safetensors, model_config.json and "
                    "the source's tokenizer.json.",
    )
    p.add_argument("source", metavar="SOURCE", help="HF directory, or a Hub id such as openai-community/gpt2")
    p.add_argument("out", metavar="OUT", type=Path, help="output directory (created)")
    p.add_argument("--tokenizer", help=tok_help + " (default: the source's)")
    p.add_argument("--dtype", **dtype)
    p.set_defaults(run=_from_hf)

    p = sub.add_parser(
        "from-book", help="the book's GPTModel / GPTModelFast state dict (.pth/.safetensors) -> lit_llm weights",
        description="Import a state dict of the book's GPTModel (chapters 4-5) or GPTModelFast (ch05 bonus), e.g. "
                    "gpt2-small-124M.pth. The shape is read from the tensors; n_heads is not in them, so it comes "
                    "from --n-heads, --preset, or the GPT-2 preset of the same width and depth.",
    )
    p.add_argument("path", metavar="PATH", help=".pth or .safetensors file")
    p.add_argument("out", metavar="OUT", type=Path, help="output directory (created)")
    p.add_argument("--n-heads", type=int, help="attention heads per layer")
    p.add_argument("--preset", help=f"take n_heads from this preset ({', '.join(PRESETS)})")
    p.add_argument("--tokenizer", help=tok_help)
    p.add_argument("--dtype", **dtype)
    p.set_defaults(run=_from_book)

    p = sub.add_parser(
        "to-hf", help="lit_llm checkpoint or weights directory -> Hugging Face GPT-2 directory",
        description="Export to a directory that transformers' AutoModelForCausalLM and AutoTokenizer load "
                    "(config.json, model.safetensors, generation_config.json, tokenizer files). Any weights this "
                    "tool reads are accepted: a lit_llm .ckpt or run directory, a converted directory, a book file.",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="lit_llm .ckpt, run directory or weights directory")
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="output directory (created)")
    p.add_argument("--tokenizer", help=tok_help + " (default: the one stored with the checkpoint)")
    p.add_argument("--dtype", **dtype)
    p.set_defaults(run=_to_hf)

    p = sub.add_parser(
        "merge-lora", help="lit_llm checkpoint trained with LoRA -> weights directory with the adapters merged",
        description="Fold the LoRA adapters of a checkpoint (W + (A @ B)^T * alpha / rank) into its weights and write "
                    "a converted weights directory without lora entries, which generate, to-hf and "
                    "model.init_weights read. A tied head with an adapter becomes a head of its own.",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="lit_llm .ckpt or run directory trained with model.lora")
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="output directory (created)")
    p.add_argument("--tokenizer", help=tok_help + " (default: the one stored with the checkpoint)")
    p.add_argument("--dtype", **dtype)
    p.set_defaults(run=_merge_lora)

    p = sub.add_parser(
        "extract-lora", help="lit_llm checkpoint trained with LoRA -> adapters-only .safetensors",
        description="Write only the LoRA adapters (lora_A, lora_B, lora_scaling) of a checkpoint to a safetensors "
                    "file, with the LoRA and model configs in its metadata; lit_llm.model.lora.load_lora adds them "
                    "to the "
                    "base model.",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="lit_llm .ckpt or run directory trained with model.lora")
    p.add_argument("out", metavar="OUT", type=Path, help="the .safetensors file to write")
    p.set_defaults(run=_extract_lora)

    p = sub.add_parser(
        "consolidate", help="FSDP / DeepSpeed checkpoint directory -> one lit_llm .ckpt file",
        description="Merge the per-GPU parts of a checkpoint that FSDP (state_dict_type: sharded) or DeepSpeed wrote "
                    "as a directory (e.g. checkpoints/<run>/last.ckpt/) into one .ckpt in the format of a "
                    "single-device run, which generate, to-hf, model.init_weights and lit_llm.weights.readers "
                    "read. The "
                    "weights keep the strategy's stored dtype (DeepSpeed: its float32 master weights); "
                    "hyperparameters, model config, tokenizer and the other saved states come along. A run directory "
                    "stands for its last.ckpt (else its newest *.ckpt). No GPU is needed; DeepSpeed checkpoints need "
                    "DeepSpeed installed (pip install 'lit_llm[deepspeed]').",
    )
    p.add_argument("checkpoint", metavar="CKPT_DIR",
                   help="the checkpoint directory, or a run directory whose last.ckpt is one")
    p.add_argument("out", metavar="OUT", type=Path,
                   help="the .ckpt file to write, e.g. checkpoints/<run>/last.consolidated.ckpt (replaced if present)")
    p.add_argument("--keep-optimizer", action="store_true",
                   help="keep the optimizer and LR-scheduler states, so that fit --ckpt_path OUT resumes the run "
                        "without a sharded strategy (FSDP checkpoints only; DeepSpeed's ZeRO partitions of it do "
                        "not convert). Default: weights only, like save_weights_only")
    p.set_defaults(run=_consolidate_dir)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one conversion and return the exit status; user mistakes end with one ``error:`` line on stderr."""
    def action() -> None:
        args = build_parser().parse_args(argv)
        print(args.run(args))

    return run_command(action)


if __name__ == "__main__":
    entry_point(main)
