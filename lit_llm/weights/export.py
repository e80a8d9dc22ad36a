"""Weights out: a converted weights directory (:func:`save_weights`: ``model.safetensors`` in lit_llm's layout,
``model_config.json``, ``tokenizer.json``) and the Hugging Face GPT-2 format (:func:`export_hf`), which
``transformers.AutoModelForCausalLM`` and ``AutoTokenizer`` load."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lit_llm.data.chat_template import ChatTemplate, checkpoint_chat_template
from lit_llm.data.tokenizer import Tokenizer
from lit_llm.errors import CheckpointError
from lit_llm.model.config import GPTConfig
from lit_llm.model.gpt import GPTModel
from lit_llm.weights.files import write_safetensors
from lit_llm.weights.readers import _HF_BLOCK, load_model_for_inference


def save_weights(
    config: GPTConfig, state: dict[str, Tensor], out_dir: str | Path, tokenizer: Tokenizer | None = None
) -> Path:
    """Write converted weights that every lit_llm command reads: ``model.safetensors`` (lit_llm layout),
    ``model_config.json`` and, when given, ``tokenizer.json``.

    Args:
        config: The model config.
        state: The state dict in lit_llm's layout (a tied head is written once, as ``tok_emb.weight``).
        out_dir: The directory to write (created if missing).
        tokenizer: The tokenizer to store beside the weights.

    Returns:
        The directory.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v for k, v in state.items() if not (config.tie_weights and k == "out_head.weight")}
    write_safetensors(out / "model.safetensors", [(k, v.shape, v.dtype, _const(v)) for k, v in tensors.items()])
    (out / "model_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def export_hf(
    model_or_source: GPTModel | str | Path, out_dir: str | Path, tokenizer: Tokenizer | None = None,
    chat_template: ChatTemplate | None = None,
) -> Path:
    """Write a Hugging Face GPT-2 directory that ``transformers`` loads with ``AutoModelForCausalLM`` and
    ``AutoTokenizer``: ``config.json``, ``generation_config.json``, ``model.safetensors`` and the tokenizer files.

    Vocabulary padding is dropped; an untied head is written as ``lm_head.weight`` (``tie_word_embeddings:
    false``). GPT-2 has every bias, so a model built with ``bias: false`` or ``qkv_bias: false`` gets zero biases,
    which computes exactly the same function.

    Args:
        model_or_source: A ``GPTModel``, or anything :func:`load_model_for_inference` reads.
        out_dir: The directory to write (created if missing).
        tokenizer: The tokenizer to export; default: the one stored with ``model_or_source``. Without one only the
            model files are written (with a warning), and ``AutoTokenizer`` cannot load the directory.
        chat_template: The model's chat template; default: the one stored with ``model_or_source``. Written as the
            tokenizer's ``chat_template`` (``chat_template.jinja`` and in ``tokenizer_config.json``), its special
            tokens added to the tokenizer, and its end-of-turn marker made an end of generation.

    Returns:
        The directory.
    """
    if isinstance(model_or_source, nn.Module):
        model = model_or_source
    else:
        model, stored, meta = load_model_for_inference(str(model_or_source))
        tokenizer = tokenizer or stored
        chat_template = chat_template or checkpoint_chat_template(meta)
    if chat_template is not None and tokenizer is not None:
        tokenizer = chat_template.prepare_tokenizer(tokenizer)
    cfg: GPTConfig = model.config
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{cfg.vocab_size}; export with the tokenizer the model was trained with")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", _hf_entries(model))
    eos_id = tokenizer.eos_id if tokenizer is not None else (50256 if cfg.vocab_size == 50257 else None)
    dtype = str(model.tok_emb.weight.dtype).removeprefix("torch.")
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,
        "activation_function": "gelu_new",  # the tanh approximation, as nn.GELU(approximate="tanh")
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_weights,
        "use_cache": True,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
    }
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    generation: dict[str, Any] = {"bos_token_id": eos_id, "eos_token_id": eos_id}
    if chat_template is not None and tokenizer is not None:
        stop = chat_template.stop_id(tokenizer)
        if stop != eos_id:  # transformers' generate() then ends a reply at the end-of-turn marker too
            generation["eos_token_id"] = [eos_id, stop]
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is None:
        warnings.warn(f"no tokenizer is known for this model, so {out} holds no tokenizer files and AutoTokenizer "
                      "cannot load it; pass tokenizer= (or --tokenizer to lit_llm.convert)", stacklevel=2)
        return out
    tokenizer.save(out)
    special = {"bos_token": tokenizer.eos_token, "eos_token": tokenizer.eos_token, "unk_token": tokenizer.eos_token}
    # PreTrainedTokenizerFast reads tokenizer.json as it is (GPT2Tokenizer would rebuild it from vocab/merges).
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": cfg.context_length,
                  "add_prefix_space": False, "clean_up_tokenization_spaces": False}
    if chat_template is not None:
        # Both places transformers reads a chat template from (the .jinja file wins in recent versions).
        tok_config["chat_template"] = chat_template.source
        (out / "chat_template.jinja").write_text(chat_template.source, encoding="utf-8")
    else:
        (out / "chat_template.jinja").unlink(missing_ok=True)  # left by an earlier export into this directory
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out


def _hf_entries(model: GPTModel) -> list[tuple[str, tuple[int, ...], torch.dtype, Callable[[], Tensor]]]:
    """The HF tensors of ``model`` as (name, shape, dtype, producer); producers transpose lazily, one at a time."""
    cfg = model.config
    sd = model.state_dict()
    entries = []

    def add(name: str, t: Tensor | None, transpose: bool = False, like: Tensor | None = None) -> None:
        if t is None:  # a bias the model was built without: zero is exact
            entries.append((name, (like.shape[0],), like.dtype, lambda: torch.zeros(like.shape[0], dtype=like.dtype)))
        elif transpose:
            entries.append((name, tuple(t.shape[::-1]), t.dtype, lambda: t.detach().t().contiguous().cpu()))
        else:
            entries.append((name, tuple(t.shape), t.dtype, lambda: t.detach().contiguous().cpu()))

    add("transformer.wte.weight", sd["tok_emb.weight"][: cfg.vocab_size])
    add("transformer.wpe.weight", sd["pos_emb.weight"])
    for i in range(cfg.n_layers):
        for ours, (hf, transpose) in _HF_BLOCK.items():
            weight = sd[f"trf_blocks.{i}.{ours.rsplit('.', 1)[0]}.weight"]
            add(f"transformer.h.{i}.{hf}", sd.get(f"trf_blocks.{i}.{ours}"), transpose, like=weight)
    add("transformer.ln_f.weight", sd["final_norm.weight"])
    add("transformer.ln_f.bias", sd.get("final_norm.bias"), like=sd["final_norm.weight"])
    if not cfg.tie_weights:
        add("lm_head.weight", sd["out_head.weight"][: cfg.vocab_size])
    return entries


def _const(t: Tensor) -> Callable[[], Tensor]:
    return lambda: t.detach().contiguous().cpu()
