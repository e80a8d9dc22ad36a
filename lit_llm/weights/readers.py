"""Weights in and out: OpenAI GPT-2 in the Hugging Face layout, the book's state dicts, lit_llm's own checkpoints.

Every loader returns ``(GPTConfig, state_dict)`` in lit_llm's layout: the names of ``GPTModel.state_dict()``, token
embedding and head with exactly ``config.vocab_size`` rows (no padding), and no ``out_head.weight`` when the head
is tied. :func:`load_into` checks such a dict against a model (keys and shapes first, one error listing every
problem), pads the vocabulary rows with zeros and loads it. :func:`build_model` does all of it without a second
copy of the weights in memory: the model is built on the meta device, each tensor is read once straight into its
final buffer (or memory-mapped), and ``load_state_dict(assign=True)`` adopts the tensors instead of copying them.

Layouts read:

- **Hugging Face GPT-2** (``GPT2LMHeadModel.save_pretrained``, the Hub's ``openai-community/gpt2*``): ``wte``,
  ``wpe``, ``h.N.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc,mlp.c_proj}``, ``ln_f``, optionally prefixed
  ``transformer.``. Its ``Conv1D`` layers store weights as ``(in, out)``, so they are transposed; ``c_attn``'s
  output rows are ``[q; k; v]`` with heads contiguous, which is exactly the fused ``qkv`` layout.
- **The book** (chapter 4/5 ``GPTModel``: ``att.W_query/W_key/W_value``, ``norm1.scale/shift``, ...) and its
  faster variant ``GPTModelFast`` (fused ``att.qkv``, ``att.proj``, ``nn.LayerNorm``), as ``.pth`` (possibly
  ``{"model_state_dict": ...}``) or ``.safetensors``; compiled models' ``_orig_mod.`` prefixes are removed.
- **lit_llm**: Lightning ``.ckpt`` files, run directories (``last.ckpt``, else the newest ``*.ckpt``), and converted
  weights directories (``model.safetensors`` + ``model_config.json`` + ``tokenizer.json``, written by
  :func:`save_weights`). Weights trained with LoRA (``lora_A``/``lora_B``/``lora_scaling`` entries) are merged on
  reading (:func:`lit_llm.model.lora.merge_lora_state`), so every reader returns a plain model's state dict.
  The checkpoint
  directories of FSDP and DeepSpeed are refused with the command that makes one file of them
  (:mod:`lit_llm.weights.consolidate`).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lit_llm.data.tokenizer import Tokenizer, load_tokenizer
from lit_llm.errors import CheckpointError, ConfigError, LitLLMError
from lit_llm.model.config import PRESETS, GPTConfig
from lit_llm.model.gpt import GPTModel
from lit_llm.model.lora import is_lora_key
from lit_llm.weights.discovery import consolidate_command, newest_checkpoint, sharded_kind, suggested_output
from lit_llm.weights.files import Tensors, error_reason, own_memory, torch_load

__all__ = [
    "build_model",
    "is_hub_id",
    "load_book_state_dict",
    "load_hf_gpt2",
    "load_into",
    "load_lit_checkpoint",
    "load_for_generation",
    "load_model_for_inference",
    "load_weights",
]

Format = Literal["lit", "hf", "book"]

# A Hub id is `name` or `owner/name`; anything with path separators or a weights suffix is meant as a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_WEIGHT_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin", ".safetensors", ".json")
_HF_DOWNLOAD = ["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "model-*.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"]

# Inside `trf_blocks.N.` (ours) -> inside `h.N.` (Hugging Face), and whether the HF tensor is a Conv1D weight that
# is stored transposed, (in, out).
_HF_BLOCK = {
    "norm1.weight": ("ln_1.weight", False),
    "norm1.bias": ("ln_1.bias", False),
    "att.qkv.weight": ("attn.c_attn.weight", True),
    "att.qkv.bias": ("attn.c_attn.bias", False),
    "att.out_proj.weight": ("attn.c_proj.weight", True),
    "att.out_proj.bias": ("attn.c_proj.bias", False),
    "norm2.weight": ("ln_2.weight", False),
    "norm2.bias": ("ln_2.bias", False),
    "ff.layers.0.weight": ("mlp.c_fc.weight", True),
    "ff.layers.0.bias": ("mlp.c_fc.bias", False),
    "ff.layers.2.weight": ("mlp.c_proj.weight", True),
    "ff.layers.2.bias": ("mlp.c_proj.bias", False),
}
_HF_TOP = {"tok_emb.weight": "wte.weight", "pos_emb.weight": "wpe.weight",
           "final_norm.weight": "ln_f.weight", "final_norm.bias": "ln_f.bias"}
_FROM_HF_BLOCK = {hf: (ours, t) for ours, (hf, t) in _HF_BLOCK.items()}
_FROM_HF_TOP = {hf: ours for ours, hf in _HF_TOP.items()}
# Causal-mask buffers, not weights: HF's `attn.bias`/`attn.masked_bias`, the book's `att.mask`.
_HF_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_BOOK_QKV = re.compile(r"trf_blocks\.(\d+)\.att\.W_(query|key|value)\.(weight|bias)")
# HF GPT-2 activations that are the tanh approximation of GELU (the model's `nn.GELU(approximate="tanh")`).
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def is_hub_id(source: str | Path) -> bool:
    """Whether ``source`` reads as a Hugging Face Hub id (``gpt2``, ``openai-community/gpt2``) rather than a path."""
    return (isinstance(source, str) and bool(_HUB_ID.match(source))
            and not source.lower().endswith(_WEIGHT_SUFFIXES) and not Path(source).expanduser().exists())


# ---- public loaders --------------------------------------------------------------------------------------------


def load_hf_gpt2(
    source: str | Path, config: GPTConfig | None = None, *, dtype: torch.dtype | None = None
) -> tuple[GPTConfig, dict[str, Tensor]]:
    """Read OpenAI GPT-2 in the Hugging Face layout.

    Args:
        source: A directory with ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``), or a Hub id
            such as ``openai-community/gpt2`` (downloaded into the Hugging Face cache).
        config: The model config to return instead of the one built from ``config.json`` (e.g. to pad the
            vocabulary or untie the head); :func:`load_into` checks that the tensors fit it.
        dtype: Cast floating-point tensors to this dtype while reading.

    Returns:
        The config (from ``config.json``: ``drop_rate=0.0``, ``qkv_bias``, ``bias`` and ``tie_weights`` on,
        ``pad_vocab_multiple=1``) and the state dict in lit_llm's layout.

    Raises:
        CheckpointError: The directory lacks the files, they are corrupt or not GPT-2, or the download failed.
    """
    path = Path(source).expanduser()
    if path.is_file() and (path.parent / "config.json").is_file():
        path = path.parent
    if path.is_dir():
        loaded = _load_hf_dir(path, config, dtype, str(source))
    elif is_hub_id(source):
        loaded = _load_hf_dir(_download(str(source)), config, dtype, str(source))
    else:
        raise CheckpointError(f"{source} does not exist (cwd: {Path.cwd()}); pass a directory with config.json and "
                              "model.safetensors, or a Hub id such as openai-community/gpt2")
    return loaded.config, loaded.state


def load_book_state_dict(
    path_or_state: str | Path | dict[str, Tensor],
    config: GPTConfig | None = None,
    *,
    n_heads: int | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[GPTConfig | None, dict[str, Tensor]]:
    """Read a state dict of the book's ``GPTModel`` (chapters 4-5) or its ``GPTModelFast`` (ch05 bonus).

    The config is inferred from the tensor shapes (``emb_dim``, ``n_layers``, ``vocab_size``, ``context_length``,
    ``qkv_bias``; the book never ties the head). ``n_heads`` leaves no trace in the shapes: it comes from
    ``n_heads``, else from ``config``, else from the GPT-2 preset with the same ``emb_dim`` and ``n_layers``.

    Args:
        path_or_state: A ``.pth`` (``torch.save`` of ``model.state_dict()``, possibly wrapped as
            ``{"model_state_dict": ...}``), a ``.safetensors`` file, or the state dict itself.
        config: The model config to use instead of the inferred one.
        n_heads: Attention heads per layer, when no preset matches the shapes.
        dtype: Cast floating-point tensors to this dtype while reading.

    Returns:
        The config (``None`` only when the dict has no ``tok_emb.weight`` to infer it from) and the state dict in
        lit_llm's layout.

    Raises:
        CheckpointError: The file is missing or corrupt, is not in the book's layout, or ``n_heads`` is unknown.
    """
    where = "the state dict" if isinstance(path_or_state, dict) else str(path_or_state)
    if isinstance(path_or_state, dict):
        tensors = Tensors.from_dict(_unwrap(path_or_state, where), dtype)
    else:
        tensors = _open_state_file(_existing(path_or_state), dtype)
    layout = _layout(tensors.names)
    if layout not in ("book", "lit"):
        raise CheckpointError(f"{where} is not a state dict of the book's GPTModel or GPTModelFast "
                              f"(it looks like {layout or 'something else'}); use load_weights() for other formats")
    state = _map_book(tensors, where)
    if config is None and "tok_emb.weight" not in state:
        return None, state
    return config or _infer_config(state, where, n_heads), state


def load_lit_checkpoint(
    path: str | Path, config: GPTConfig | None = None, *, dtype: torch.dtype | None = None
) -> tuple[GPTConfig, dict[str, Tensor]]:
    """Read lit_llm's own weights: a Lightning ``.ckpt``, a run directory, or a converted weights directory/file.

    Args:
        path: A ``.ckpt`` written by ``lit_llm.train`` (the config comes from its ``model_config`` or
            ``hyper_parameters["model"]``), a run directory (its ``last.ckpt``, else its newest ``*.ckpt``), a
            directory written by :func:`save_weights`, or a ``.safetensors``/``.pth`` state dict in lit_llm's layout.
        config: The model config to use instead of the stored one.
        dtype: Cast floating-point tensors to this dtype while reading.

    Returns:
        The config and the state dict (``model.`` and ``_orig_mod.`` prefixes removed).

    Raises:
        CheckpointError: The file is missing, corrupt, or not a lit_llm checkpoint, or it is the checkpoint directory
            of FSDP or DeepSpeed (the message gives the ``python -m lit_llm.convert consolidate`` command).
    """
    loaded = _load(path, config, dtype)
    if loaded.format != "lit":
        raise CheckpointError(f"{path} holds {loaded.format} weights, not a lit_llm checkpoint; use load_weights()")
    return loaded.config, loaded.state


def load_weights(
    source: str | Path, config: GPTConfig | None = None, *, dtype: torch.dtype | None = None
) -> tuple[GPTConfig, dict[str, Tensor]]:
    """Read weights in any supported layout, deciding by what ``source`` is.

    A ``.ckpt`` or a run directory (its ``last.ckpt``, else its newest ``*.ckpt``) is a lit_llm checkpoint, and a
    sharded checkpoint directory (FSDP, DeepSpeed) is refused with the command that consolidates it into one file;
    a directory with ``model_config.json`` is converted
    lit_llm weights; a directory with ``config.json`` is Hugging Face GPT-2; a ``.pth``/``.safetensors`` file is
    recognised by its tensor names (lit_llm, the book's, or HF); anything else that reads as a Hub id is
    downloaded from the Hugging Face Hub.

    Args:
        source: A path or a Hub id.
        config: The model config to use instead of the stored or inferred one (needed for the book's files whose
            ``n_heads`` no GPT-2 preset gives).
        dtype: Cast floating-point tensors to this dtype while reading.

    Returns:
        The config and the state dict in lit_llm's layout.

    Raises:
        CheckpointError: Nothing readable at ``source``; the message says what was expected.
    """
    loaded = _load(source, config, dtype)
    return loaded.config, loaded.state


# ---- loading into a model --------------------------------------------------------------------------------------


def load_into(model: GPTModel, state: dict[str, Tensor], strict: bool = True, *, source: str | None = None,
              new_rows: int = 0) -> None:
    """Load a lit_llm-layout state dict into ``model``, after checking every key and shape.

    Vocabulary padding is not a mismatch: a table with ``vocab_size`` rows is padded with zero rows up to the
    model's ``padded_vocab_size``. A tied model takes its head from ``tok_emb.weight`` (a separate, different
    ``out_head.weight`` is an error); an untied model given no head starts it as a copy of the embedding, as the
    book does with GPT-2's weights. A model on the meta device (see :func:`build_model`) adopts the tensors
    (``assign=True``) instead of copying them. LoRA is no mismatch either: a state with adapters (``lora_A``,
    ``lora_B``, ``lora_scaling``) loads into a plain model merged
    (:func:`lit_llm.model.lora.merge_lora_state`), and base
    weights load into an adapted model, whose adapters keep their values.

    Args:
        model: The GPT to load into.
        state: Tensors by name, as the loaders of this module return them.
        strict: Refuse missing and unexpected keys. Shape mismatches are refused either way.
        source: Where the weights came from, for the error message.
        new_rows: Tokens added to the tokenizer after these weights were trained (a chat template's special tokens):
            the embedding and head may have up to this many rows fewer than ``vocab_size``; the missing rows start
            as the mean of the others.

    Raises:
        CheckpointError: One message listing missing keys, unexpected keys and each shape mismatch as
            ``name: model=(...) checkpoint=(...)``.
    """
    cfg = model.config
    where = source or "the checkpoint"
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assign = any(t.is_meta for t in model.state_dict().values())
    state = dict(state)
    adapters = [k for k in expected if is_lora_key(k)]
    if any(is_lora_key(k) for k in state) and not adapters:
        state, _, _ = _merge_adapters(state, None, Path(where))  # an adapted model's state into a plain model
    elif adapters and not assign and not any(is_lora_key(k) for k in state):
        for name in adapters:  # base weights into an adapted model: the adapters keep their values
            del expected[name]
    if cfg.tie_weights:
        expected.pop("out_head.weight", None)
        head = state.pop("out_head.weight", None)
        emb = state.get("tok_emb.weight")
        if head is not None and emb is not None and not _same_tensor(head, emb):
            raise CheckpointError(
                f"{where} has a separate output head (out_head.weight differs from tok_emb.weight) but the model "
                "ties them (tie_weights: true); set tie_weights: false to keep both"
            )
    elif "tok_emb.weight" in state:
        # A tied checkpoint: the untied head starts from the shared matrix, as its own tensor (two parameters
        # adopting one storage would both be updated by each optimizer step).
        emb, head = state["tok_emb.weight"], state.get("out_head.weight")
        if head is None or (assign and head.data_ptr() == emb.data_ptr()):
            state["out_head.weight"] = emb.clone() if assign else emb
    for name in ("tok_emb.weight", "out_head.weight"):
        t = state.get(name)
        if t is not None and name in expected and t.dim() == 2 and tuple(t.shape[1:]) == expected[name][1:]:
            rows = expected[name][0]
            if cfg.vocab_size - new_rows <= t.shape[0] < rows:
                if t.shape[0] < cfg.vocab_size:
                    mean = t.float().mean(0, keepdim=True).to(t.dtype)
                    t = torch.cat([t, mean.expand(cfg.vocab_size - t.shape[0], -1)])
                state[name] = torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])])
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: model={_shape(expected[k])} checkpoint={_shape(state[k].shape)}"
                  for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    # A meta model cannot keep a parameter the checkpoint lacks: it has no values at all.
    if mismatched or (strict and (missing or unexpected)) or (assign and missing):
        raise CheckpointError(_mismatch_message(where, cfg, missing, unexpected, mismatched))
    if assign:
        # The meta model's dtypes are what the caller asked for (e.g. bf16 under an init_module context).
        params = model.state_dict()
        state = {k: (v.to(params[k].dtype) if v.is_floating_point() else v) for k, v in state.items() if k in params}
    model.load_state_dict(state, strict=False, assign=assign)
    if cfg.tie_weights:
        model.out_head.weight = model.tok_emb.weight


def build_model(
    source: str | Path, config: GPTConfig | None = None, device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[GPTModel, GPTConfig]:
    """Build a GPT holding the weights at ``source`` with one copy of them in memory.

    The model is constructed on the meta device (no memory), the tensors are read one at a time into their final
    buffers (safetensors) or memory-mapped (``torch.load(mmap=True)``), and the model adopts them with
    ``load_state_dict(assign=True)``; the tied head is re-tied afterwards.

    Args:
        source: Anything :func:`load_weights` reads.
        config: The model config to use instead of the stored or inferred one.
        device: Where the model ends up.
        dtype: Parameter dtype; ``None`` keeps the stored one (float32 for GPT-2 and for lit_llm checkpoints
            unless trained with ``bf16-true``).

    Returns:
        The model (in training mode, as ``nn.Module`` builds it) and its config.
    """
    return _build_with_config(_load(source, config, dtype), device)


def load_model_for_inference(
    source: str, device: str = "cpu", dtype: torch.dtype | None = None
) -> tuple[GPTModel, Tokenizer | None, dict[str, Any]]:
    """The model, its tokenizer and where they came from, ready for ``python -m lit_llm.generate``.

    Args:
        source: A lit_llm checkpoint or run directory, a converted weights directory, a Hugging Face GPT-2
            directory, a book state dict, or a Hub id such as ``openai-community/gpt2``.
        device: Where the model goes.
        dtype: Parameter dtype; ``None`` keeps the stored one.

    Returns:
        The model in eval mode; the tokenizer when one is known (stored in a lit_llm checkpoint, ``tokenizer.json``
        beside it or in its directory, the HF directory's or the Hub repository's tokenizer files), else ``None``;
        and metadata: ``source``, ``format`` (``"lit"``, ``"hf"`` or ``"book"``), ``path`` (the local file or
        directory read), ``config`` (the model config as a dict), for lit_llm checkpoints ``hyper_parameters``,
        ``global_step`` and ``epoch``, and ``chat_template`` when the model carries one (a dict from a lit_llm
        checkpoint, the Jinja text from a Hugging Face directory; see
        :func:`lit_llm.data.chat_template.checkpoint_chat_template`).
    """
    loaded = _load(source, None, dtype)
    model, config = _build_with_config(loaded, device)
    metadata = {"source": str(source), "format": loaded.format, "path": str(loaded.path),
                "config": config.to_dict(), **loaded.extra}
    return model.eval(), loaded.tokenizer(), metadata


# ---- writing ---------------------------------------------------------------------------------------------------








# ---- dispatch --------------------------------------------------------------------------------------------------



def load_for_generation(
    source: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None, tokenizer: str | None = None
) -> tuple[GPTModel, Tokenizer, dict[str, Any]]:
    """:func:`load_model_for_inference` for the commands that generate text (``generate``, ``serve``): the
    eval-mode model, a tokenizer that is sure to exist and to fit it (``tokenizer`` wins over the checkpoint's), and
    the metadata as a dict.

    Raises:
        ConfigError: No tokenizer is known for ``source`` and none is given, or it has more ids than the model.
    """
    model, stored, meta = load_model_for_inference(source, device=device, dtype=dtype)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else stored
    if tok is None:
        raise ConfigError(
            f"no tokenizer is known for --checkpoint {str(source)!r}; pass --tokenizer PATH (a tokenizer.json, a "
            "directory with encoder.json + vocab.bpe or vocab.json + merges.txt, or a Hub name such as gpt2)"
        )
    if tok.vocab_size > model.config.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}; pass the tokenizer the model was trained with (--tokenizer PATH)"
        )
    return model.eval(), tok, dict(meta or {})

@dataclass
class _Loaded:
    config: GPTConfig
    state: dict[str, Tensor]
    format: Format
    path: Path
    tokenizer: Callable[[], Tokenizer | None] = lambda: None
    extra: dict[str, Any] = field(default_factory=dict)


def _build_with_config(loaded: _Loaded, device: str | torch.device) -> tuple[GPTModel, GPTConfig]:
    with torch.device("meta"):
        model = GPTModel(loaded.config)
    emb = loaded.state.get("tok_emb.weight")
    if emb is not None and emb.is_floating_point():
        model.to(emb.dtype)  # free on the meta device; load_into then keeps the loaded (or requested) dtype
    own_memory(loaded.state)
    load_into(model, loaded.state, source=str(loaded.path))
    loaded.state = {}  # the model is now the only owner of the tensors, so moving it frees them
    return model.to(device), loaded.config


def _load(source: str | Path, config: GPTConfig | None, dtype: torch.dtype | None) -> _Loaded:
    path = Path(source).expanduser()
    if path.is_dir():
        kind = sharded_kind(path)
        if kind is not None:
            strategy = {"fsdp": "FSDP", "deepspeed": "DeepSpeed"}[kind]
            raise CheckpointError(
                f"{path} is a sharded {strategy} checkpoint directory (each GPU saved its own part), which lit_llm "
                f"reads only as one file; make one with `{consolidate_command(path)}` and pass "
                f"{suggested_output(path)} instead"
            )
        if (path / "model_config.json").is_file():
            return _load_converted(path, config, dtype)
        if (path / "config.json").is_file():
            return _load_hf_dir(path, config, dtype, str(source))
        checkpoint = newest_checkpoint(path)
        if checkpoint is not None:
            return _load(checkpoint, config, dtype)
        found = sorted(p.name for p in path.iterdir())[:20]
        raise CheckpointError(
            f"{path} holds no weights lit_llm reads (found {found}); expected a lit_llm run directory with "
            "last.ckpt, a converted directory with model_config.json, or a Hugging Face directory with config.json"
        )
    if path.is_file():
        return _load_file(path, config, dtype)
    if is_hub_id(source):
        return _load_hf_dir(_download(str(source)), config, dtype, str(source))
    raise CheckpointError(
        f"weights file {source} does not exist (cwd: {Path.cwd()}); pass a lit_llm .ckpt or run directory, a "
        "converted weights directory, a Hugging Face GPT-2 directory, a book .pth/.safetensors file, or a Hub id "
        "such as openai-community/gpt2"
    )


def _load_file(path: Path, config: GPTConfig | None, dtype: torch.dtype | None) -> _Loaded:
    if path.suffix == ".safetensors":
        tensors = Tensors.from_safetensors(path, dtype)
        raw: Any = None
    else:
        raw = torch_load(path)
        if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict) and not _is_tensor_dict(raw):
            return _from_lightning(raw, path, config, dtype)
        tensors = Tensors.from_dict(_unwrap(raw, str(path)), dtype)
    layout = _layout(tensors.names)
    if layout == "hf":
        if not (path.parent / "config.json").is_file():
            raise CheckpointError(f"{path} holds Hugging Face GPT-2 weights but no config.json lies beside it; pass "
                                  "the directory that holds both")
        return _load_hf_dir(path.parent, config, dtype, str(path))
    if layout == "book":
        cfg, state = load_book_state_dict(raw if raw is not None else path, config, dtype=dtype)
        return _Loaded(cfg, state, "book", path, tokenizer=lambda: _tokenizer_beside(path))
    if layout == "lit":
        state = {k.replace("_orig_mod.", ""): tensors.get(k) for k in tensors.names}
        stored = _read_model_config(path.parent / "model_config.json")
        state, stored, extra = _merge_adapters(state, stored, path)
        if stored is None and config is None:
            stored = _infer_config(state, str(path), None)
        return _Loaded(config or stored, _stored_layout(state, stored), "lit", path,
                       tokenizer=lambda: _tokenizer_beside(path), extra=extra)
    if tensors.names and all(is_lora_key(n) for n in tensors.names):
        raise CheckpointError(f"{path} holds LoRA adapters only, not a model; load the base model and add them "
                              "with lit_llm.model.lora.load_lora(model, path), or pass the checkpoint they were "
                              "trained in")
    raise CheckpointError(
        f"{path} is not a weights file lit_llm knows: its tensors ({', '.join(tensors.names[:5])}, ...) are neither "
        "lit_llm's (tok_emb, trf_blocks.N.att.qkv), the book's (trf_blocks.N.att.W_query) nor Hugging Face GPT-2's "
        "(wte, h.N.attn.c_attn)"
    )


def _load_converted(directory: Path, config: GPTConfig | None, dtype: torch.dtype | None) -> _Loaded:
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{directory} has model_config.json but no model.safetensors; re-run "
                              "`python -m lit_llm.convert` to write it")
    tensors = Tensors.from_safetensors(weights, dtype)
    stored = _read_model_config(directory / "model_config.json")
    state = {k: tensors.get(k) for k in tensors.names}
    state, stored, extra = _merge_adapters(state, stored, weights)
    return _Loaded(config or stored, _stored_layout(state, stored), "lit", directory,
                   tokenizer=lambda: _tokenizer_beside(weights), extra=extra)


def _from_lightning(ckpt: dict, path: Path, config: GPTConfig | None, dtype: torch.dtype | None) -> _Loaded:
    """A Lightning checkpoint of a lit_llm task: the GPT's tensors are ``model.*`` entries of ``state_dict``."""
    state = {}
    for key, value in ckpt["state_dict"].items():
        key = key.replace("_orig_mod.", "")
        if key.startswith("model.") and isinstance(value, Tensor):
            state[key.removeprefix("model.")] = value.to(dtype) if dtype and value.is_floating_point() else value
    if not state:
        raise CheckpointError(f"{path} is a Lightning checkpoint without lit_llm model weights (no 'model.*' "
                              "entries in its state_dict); pass a checkpoint written by lit_llm.train")
    hparams = ckpt.get("hyper_parameters") or {}
    values = ckpt.get("model_config") or hparams.get("model")
    stored = _config_from_dict(values, path) if isinstance(values, dict) else None
    state, stored, lora = _merge_adapters(state, stored, path)
    if stored is None and config is None:
        stored = _infer_config(state, str(path), None)
    tokenizer_json = next((v["tokenizer_json"] for v in ckpt.values() if isinstance(v, dict) and "tokenizer_json" in v),
                          None)

    def tokenizer() -> Tokenizer | None:
        if tokenizer_json is not None:
            return Tokenizer.from_json(tokenizer_json)
        return _tokenizer_beside(path)

    # A conversation model's chat template travels with its tokenizer, in the data module's state.
    chat_template = next((v["chat_template"] for v in ckpt.values() if isinstance(v, dict) and "tokenizer_json" in v
                          and isinstance(v.get("chat_template"), dict)), None)
    extra = {"hyper_parameters": hparams, "global_step": ckpt.get("global_step"), "epoch": ckpt.get("epoch"), **lora}
    if chat_template is not None:
        extra["chat_template"] = chat_template
    return _Loaded(config or stored, _stored_layout(state, stored), "lit", path, tokenizer, extra)


def _load_hf_dir(directory: Path, config: GPTConfig | None, dtype: torch.dtype | None, label: str) -> _Loaded:
    try:
        hf = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"could not read {directory / 'config.json'}: {err}") from err
    cfg = _config_from_hf(hf, directory / "config.json")
    tied = hf.get("tie_word_embeddings", True)
    sources = _hf_weight_files(directory)
    state: dict[str, Tensor] = {}
    head: Tensor | None = None
    for file in sources:
        tensors = (Tensors.from_safetensors(file, dtype) if file.suffix == ".safetensors"
                   else Tensors.from_dict(_unwrap(torch_load(file), str(file)), dtype))
        for name in tensors.names:
            key = name.removeprefix("transformer.")
            if _HF_BUFFER.fullmatch(key):
                continue
            if key == "lm_head.weight":
                if not tied:
                    head = tensors.get(name)
                continue
            ours, transpose = _our_name(key)
            if ours is None:
                state[name] = tensors.get(name)  # reported as unexpected by load_into
                continue
            state[ours] = tensors.get(name, transpose=transpose)
    if head is not None:
        state["out_head.weight"] = head
    extra = {"hf_config": hf, "hub_id": label if is_hub_id(label) else None}
    chat_template = _hf_chat_template(directory)
    if chat_template is not None:
        extra["chat_template"] = chat_template
    return _Loaded(config or cfg, state, "hf", directory, lambda: _tokenizer_beside(directory), extra)


def _hf_chat_template(directory: Path) -> str | None:
    """The chat template of a Hugging Face directory (``chat_template.jinja``, else ``tokenizer_config.json``'s)."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    return template if isinstance(template, str) and template else None


def _hf_weight_files(directory: Path) -> list[Path]:
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"could not read the shard index {index}: {err}") from err
        return [_existing(directory / n) for n in names]
    if (directory / "pytorch_model.bin").is_file():
        return [directory / "pytorch_model.bin"]
    found = sorted(p.name for p in directory.iterdir())[:20]
    raise CheckpointError(f"{directory} has config.json but no model.safetensors or pytorch_model.bin (found "
                          f"{found}); download the weights file into it")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id, allow_patterns=_HF_DOWNLOAD))
        if not any(path.glob("*.safetensors")):  # older repositories have only the pickle
            path = Path(snapshot_download(repo_id, allow_patterns=[*_HF_DOWNLOAD, "pytorch_model.bin"]))
    except Exception as err:  # offline, unknown repository, no permission: all mean the same to the user
        raise CheckpointError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({type(err).__name__}: {error_reason(err)}). "
            "The "
            "machine may be offline (or HF_HUB_OFFLINE=1 is set and it is not cached) or the id may be wrong; pass a "
            "local directory with config.json and model.safetensors instead"
        ) from err
    return path


# ---- layouts ---------------------------------------------------------------------------------------------------


def _layout(names: Iterable[str]) -> Literal["lit", "book", "hf"] | None:
    names = [n.replace("_orig_mod.", "") for n in names]
    if any(".att.W_query." in n or n.endswith("norm1.scale") or ".att.proj." in n for n in names):
        return "book"
    if any(n.removeprefix("transformer.") in ("wte.weight", "h.0.attn.c_attn.weight") for n in names):
        return "hf"
    if "tok_emb.weight" in names and any(".att.qkv." in n for n in names):
        return "lit"
    return None


def _our_name(hf_key: str) -> tuple[str | None, bool]:
    if hf_key in _FROM_HF_TOP:
        return _FROM_HF_TOP[hf_key], False
    m = re.fullmatch(r"h\.(\d+)\.(.+)", hf_key)
    if m and m[2] in _FROM_HF_BLOCK:
        ours, transpose = _FROM_HF_BLOCK[m[2]]
        return f"trf_blocks.{m[1]}.{ours}", transpose
    return None, False


def _map_book(tensors: Tensors, where: str) -> dict[str, Tensor]:
    """The book's names to ours: fused q/k/v, LayerNorm ``scale/shift`` -> ``weight/bias``, ``proj`` -> ``out_proj``."""
    state: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, str]] = {}
    for name in tensors.names:
        key = name.replace("_orig_mod.", "")
        if key.endswith(".att.mask"):
            continue
        m = _BOOK_QKV.fullmatch(key)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = name
            continue
        key = re.sub(r"(norm1|norm2|final_norm)\.scale$", r"\1.weight", key)
        key = re.sub(r"(norm1|norm2|final_norm)\.shift$", r"\1.bias", key)
        key = key.replace(".att.proj.", ".att.out_proj.")
        state[key] = tensors.get(name)
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"query", "key", "value"}:
            raise CheckpointError(f"{where}: layer {layer} has W_{'/W_'.join(sorted(parts))}.{kind} but not all of "
                                  "W_query, W_key and W_value; the file is incomplete")
        state[f"trf_blocks.{layer}.att.qkv.{kind}"] = torch.cat([tensors.get(parts[p]) for p in ("query", "key",
                                                                                                   "value")])
    return state


def _infer_config(state: dict[str, Tensor], where: str, n_heads: int | None) -> GPTConfig:
    """A config from tensor shapes; ``n_heads`` from the argument or the GPT-2 preset of the same width and depth."""
    if "tok_emb.weight" not in state or "pos_emb.weight" not in state:
        raise CheckpointError(f"{where} has no tok_emb.weight/pos_emb.weight, so it is not a GPT state dict")
    vocab, emb_dim = state["tok_emb.weight"].shape
    layers = {int(m[1]) for k in state if (m := re.match(r"trf_blocks\.(\d+)\.", k))}
    n_layers = max(layers) + 1 if layers else 0
    if n_heads is None:
        matches = {p["n_heads"] for name, p in PRESETS.items() if name.startswith("gpt2-")
                   and (p["emb_dim"], p["n_layers"]) == (emb_dim, n_layers)}
        if len(matches) != 1:
            raise CheckpointError(
                f"{where}: n_heads cannot be read from the tensor shapes (emb_dim={emb_dim}, n_layers={n_layers}) and "
                "no GPT-2 preset has that shape; pass it: `--n-heads N` to `python -m lit_llm.convert from-book`, "
                "or n_heads=/config=GPTConfig(...) in Python"
            )
        n_heads = matches.pop()
    try:
        return GPTConfig(
            vocab_size=vocab, context_length=state["pos_emb.weight"].shape[0], emb_dim=emb_dim, n_heads=n_heads,
            n_layers=n_layers, drop_rate=0.0, qkv_bias="trf_blocks.0.att.qkv.bias" in state,
            bias="trf_blocks.0.att.out_proj.bias" in state, pad_vocab_multiple=1,
            # torch.save keeps a tied head as the same storage as the embedding.
            tie_weights="out_head.weight" not in state
            or state["out_head.weight"].data_ptr() == state["tok_emb.weight"].data_ptr(),
        )
    except LitLLMError as err:
        raise CheckpointError(f"{where}: the tensor shapes give an invalid model config: {err}") from err


def _config_from_hf(hf: dict[str, Any], where: Path) -> GPTConfig:
    problems = []
    if hf.get("model_type", "gpt2") != "gpt2":
        problems.append(f"model_type={hf.get('model_type')!r}: lit_llm imports GPT-2 only")
    if hf.get("activation_function", "gelu_new") not in _TANH_GELUS:
        problems.append(f"activation_function={hf.get('activation_function')!r}: the model uses the tanh GELU "
                        f"({', '.join(_TANH_GELUS)})")
    n_embd = hf.get("n_embd", 768)
    if hf.get("n_inner") not in (None, 4 * n_embd):
        problems.append(f"n_inner={hf['n_inner']}: the model's feed-forward width is 4 * n_embd = {4 * n_embd}")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("attention scaling other than 1/sqrt(head_dim) (scale_attn_weights / "
                        "scale_attn_by_inverse_layer_idx)")
    if problems:
        raise CheckpointError(f"{where} describes a model lit_llm's GPT cannot reproduce:\n  - "
                              + "\n  - ".join(problems))
    if abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        warnings.warn(f"{where}: layer_norm_epsilon={hf['layer_norm_epsilon']} but the model uses 1e-5; outputs "
                      "will differ slightly", stacklevel=3)
    try:
        return GPTConfig(
            vocab_size=hf.get("vocab_size", 50257), context_length=hf.get("n_positions", hf.get("n_ctx", 1024)),
            emb_dim=n_embd, n_heads=hf.get("n_head", 12), n_layers=hf.get("n_layer", 12),
            # Dropout is a training choice, not part of the weights: 0 for inference; finetuning configs set their own.
            drop_rate=0.0, qkv_bias=True, bias=True, tie_weights=hf.get("tie_word_embeddings", True),
            pad_vocab_multiple=1,
        )
    except LitLLMError as err:
        raise CheckpointError(f"{where}: {err}") from err


def _merge_adapters(
    state: dict[str, Tensor], stored: GPTConfig | None, where: Path
) -> tuple[dict[str, Tensor], GPTConfig | None, dict[str, Any]]:
    """Merge LoRA adapters into their weights; a merged adapter on a tied head unties it in the stored config.

    Returns the state, the config describing it, and metadata for :func:`load_model_for_inference`
    (``lora_merged``: the adapted modules; empty when there were no adapters).
    """
    modules = sorted({k.rsplit(".", 1)[0] for k in state if is_lora_key(k)})
    if not modules:
        return state, stored, {}
    from lit_llm.model.lora import UntiedHeadWarning, merge_lora_state

    with warnings.catch_warnings():
        # The stored config is untied below, so the merged head loads as what it is.
        warnings.simplefilter("ignore", UntiedHeadWarning)
        try:
            merged = merge_lora_state(state)
        except CheckpointError as err:
            raise CheckpointError(f"{where}: {err}") from err
    if "out_head" in modules and stored is not None and stored.tie_weights:
        stored = stored.replace(tie_weights=False)
    return merged, stored, {"lora_merged": modules}


def _stored_layout(state: dict[str, Tensor], stored: GPTConfig | None) -> dict[str, Tensor]:
    """Undo what the checkpoint's own config did: drop its vocabulary padding rows (a view, no copy) and, when it
    ties the head, the head's duplicate entry. A caller's config says nothing about the file, so it is not used."""
    if stored is None:
        return state
    out = dict(state)
    for name in ("tok_emb.weight", "out_head.weight"):
        t = out.get(name)
        if t is not None and t.dim() == 2 and t.shape[0] > stored.vocab_size:
            out[name] = t[: stored.vocab_size]
    if stored.tie_weights:
        out.pop("out_head.weight", None)
    return out


def _unwrap(obj: Any, where: str) -> dict[str, Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not _is_tensor_dict(obj):
        raise CheckpointError(f"{where} does not hold a state dict (a mapping of names to tensors); save "
                              "model.state_dict() with torch.save or safetensors")
    return obj


def _is_tensor_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    return bool(torch.equal(a, b))


def _shape(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _mismatch_message(where: str, cfg: GPTConfig, missing: list[str], unexpected: list[str],
                      mismatched: list[str]) -> str:
    def listing(items: list[str], limit: int = 20) -> str:
        more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
        return "".join(f"\n    {item}" for item in items[:limit]) + more

    lines = [f"the weights in {where} do not fit the model (emb_dim={cfg.emb_dim}, n_layers={cfg.n_layers}, "
             f"n_heads={cfg.n_heads}, vocab_size={cfg.vocab_size}, context_length={cfg.context_length}, "
             f"qkv_bias={cfg.qkv_bias}, bias={cfg.bias}, tie_weights={cfg.tie_weights}):"]
    if missing:
        lines.append(f"  missing keys (in the model, not in the checkpoint):{listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys (in the checkpoint, not in the model):{listing(unexpected)}")
    if mismatched:
        lines.append(f"  shape mismatches:{listing(mismatched)}")
    lines.append("Build the model with the settings the weights were made with (for a lit_llm checkpoint see "
                 "config.yaml in its run directory; for GPT-2 use the gpt2-* preset with qkv_bias: true and "
                 "tie_weights: true).")
    return "\n".join(lines)


# ---- files -----------------------------------------------------------------------------------------------------




def _existing(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"weights file {path} does not exist (cwd: {Path.cwd()})")
    return p


def _open_state_file(path: Path, dtype: torch.dtype | None) -> Tensors:
    if path.suffix == ".safetensors":
        return Tensors.from_safetensors(path, dtype)
    return Tensors.from_dict(_unwrap(torch_load(path), str(path)), dtype)




def _config_from_dict(values: dict[str, Any], where: Path) -> GPTConfig:
    try:
        return GPTConfig.from_dict(values)
    except LitLLMError as err:
        raise CheckpointError(f"{where}: its stored model config is not valid for this lit_llm version: {err}") from err


def _read_model_config(path: Path) -> GPTConfig | None:
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"could not read {path}: {err}") from err
    return _config_from_dict(values, path)


def _tokenizer_beside(path: Path) -> Tokenizer | None:
    """``tokenizer.json`` (or GPT-2's BPE files) in the weights' directory, e.g. a run directory."""
    try:
        return load_tokenizer(path if path.is_dir() else path.parent)
    except LitLLMError:
        return None
