"""The options every task shares, in typed groups: ``model.init_args.optim`` (the optimizer, schedule and clipping)
and ``model.init_args.speed`` (how the same math runs faster or in less memory). Each field's docstring is its
``--help`` text; :func:`check_options` validates every group and their combinations in one place, so a new option is
one field here and the code that reads it.

.. code-block:: yaml

    model:
      class_path: lit_llm.tasks.PretrainTask
      init_args:
        model: {context_length: 1024, emb_dim: 768, n_heads: 12, n_layers: 12}
        optim: {learning_rate: 6.0e-4, warmup_steps: 700, schedule_steps: ${trainer.max_steps}}
        speed: {compile: true, fused_loss: true}
        init_weights: null   # what the model starts from (adaptation: with lora)
        lora: null
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lit_llm.errors import ConfigError
from lit_llm.model.float8 import Float8Recipe, recipe_problem
from lit_llm.model.lora import LoRAConfig
from lit_llm.tasks.optim import Schedule

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
SdpaBackend = Literal["auto", "flash", "cudnn", "efficient", "math"]


@dataclass
class Optimization:
    """AdamW, its learning-rate schedule and gradient clipping (``model.init_args.optim``)."""

    learning_rate: float = 4e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices and embeddings only unless ``decay_all``)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas. The book uses PyTorch's default (0.9, 0.999); GPT-2 style runs use (0.9, 0.95)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    decay_all: bool = False
    """Decay biases and LayerNorm weights too, exactly as the book's optimizer does."""
    lr_schedule: Schedule = "cosine"
    """``cosine`` or ``linear`` decay after warmup (the book's appendix D), or ``constant``."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup."""
    min_lr_ratio: float = 0.1
    """Floor of the decay as a fraction of ``learning_rate``."""
    schedule_steps: int | None = None
    """Optimizer steps the decay spans; default: the Trainer's estimated total steps."""
    gradient_clip: float | None = 1.0
    """Clip the global gradient norm to this value (``null`` disables clipping). The pre-clip norm is logged as
    ``train/grad_norm``. ``trainer.gradient_clip_val``, when set, takes precedence."""
    fused_adamw: bool | None = None
    """Fused CUDA AdamW; default: on when training on a CUDA device."""

    def problems(self) -> list[str]:
        found = []
        if self.learning_rate <= 0:
            found.append(f"model.optim.learning_rate={self.learning_rate} must be > 0")
        if self.warmup_steps < 0:
            found.append(f"model.optim.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            found.append(f"model.optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.gradient_clip is not None and self.gradient_clip <= 0:
            found.append(f"model.optim.gradient_clip={self.gradient_clip} must be > 0 or null to disable clipping")
        return found


@dataclass
class Speed:
    """How the same math runs faster or in less memory (``model.init_args.speed``). None of these changes what the
    model learns beyond floating-point rounding; docs/benchmarks.md measures what each buys."""

    compile: bool | CompileMode = False
    """``torch.compile`` the inner GPT together with its loss (never the LightningModule): ``true`` for the default
    mode, or a mode name (``max-autotune`` tunes the matmuls at a longer start-up, ``reduce-overhead`` adds CUDA
    graphs). The eager module stays in ``self.model`` for generation, so checkpoints hold plain parameter names."""
    compile_options: dict[str, Any] | None = None
    """Inductor options for ``torch.compile`` (with ``compile: true``, instead of a mode), e.g.
    ``{coordinate_descent_tuning: true}``: tunes each generated kernel's launch settings at start-up (about two and a
    half more minutes of compilation for GPT-2 124M, about 1.4 % faster steps on an H200)."""
    sdpa_backend: SdpaBackend = "auto"
    """Fused attention kernel on GPUs: ``auto`` (PyTorch's choice), ``flash``, ``cudnn``, ``efficient`` or ``math``
    (the memory-efficient and math kernels remain fallbacks)."""
    activation_checkpointing: bool = False
    """Keep only each transformer block's input in the forward pass and recompute the rest in the backward pass: most
    of the activation memory saved for about a third more compute. Works under every strategy; for models whose
    activations do not fit (large models, long contexts, big micro-batches)."""
    low_precision_residual: bool = False
    """Under ``bf16-mixed``, carry the residual stream (the embeddings and each block's output) in bf16 rather than
    float32, as DeepSpeed's and FSDP's bf16 modes and Megatron-LM do. The weights, their gradients and AdamW stay
    float32 and LayerNorm still computes in float32; the elementwise work between the matmuls moves half the bytes."""
    chunked_loss: int | None = None
    """Compute the output head and its cross-entropy together, this many tokens at a time (e.g. 8192), in training and
    validation: the (tokens x vocabulary) logits and their gradient are never held whole, for the same matmuls. For
    uncompiled runs, where the plain head keeps the batch's float32 log-probabilities (13 GB at GPT-2's vocabulary and
    64 x 1024 tokens); with ``compile`` on it measured slower and larger than the plain head. ``null``: the plain
    head. Not with a LoRA adapter on the head; under DeepSpeed ZeRO-3 the plain head is used."""
    fused_loss: bool = False
    """Compute the output head's cross-entropy with lit_llm's Triton kernel (``lit_llm.model.fused_loss``): each row's
    softmax, loss and gradient in one pass over the logits, the gradient written over them in place. Same loss and
    gradients as the plain head; CUDA GPUs only (Triton comes with PyTorch's CUDA builds). Not with ``chunked_loss``,
    ``float8_head`` or a LoRA adapter on the head; under DeepSpeed ZeRO-3 the plain head is used."""
    float8: Float8Recipe | None = None
    """Run the transformer blocks' Linear layers as FP8 matmuls (torchao's ``Float8Linear``, installed with
    ``pip install 'lit_llm[float8]'``) with this scaling recipe: ``tensorwise`` (fastest) or ``rowwise``. Weights,
    gradients, optimizer state and checkpoints keep their dtype. Needs a GPU with FP8 tensor cores (H100/H200, Ada)
    and pays only with ``compile``; one GPU or DDP. ``null``: bf16 matmuls."""
    float8_head: bool = False
    """With ``float8``, the output head's matmul in FP8 too (it stays bf16 by default: the logits feed the loss
    directly). Not with ``chunked_loss``."""

    def problems(self, lora: LoRAConfig | None) -> list[str]:
        found = []
        lora_on_head = lora is not None and "head" in lora.layer_names()
        if self.compile_options and self.compile not in (True, "default"):
            found.append("model.speed.compile_options needs model.speed.compile: true (torch.compile takes a mode or "
                         f"options, not both), got model.speed.compile={self.compile!r}")
        chunked = self.chunked_loss
        if chunked is not None and (isinstance(chunked, bool) or chunked < 1):
            found.append(f"model.speed.chunked_loss={chunked!r} must be a positive number of tokens (e.g. 8192) or "
                         "null for the plain head")
        elif chunked is not None and lora_on_head:
            found.append("model.speed.chunked_loss cannot be combined with a LoRA adapter on the head "
                         "(model.lora.targets includes head): drop one of the two")
        if self.fused_loss and chunked is not None:
            found.append("model.speed.fused_loss cannot be combined with model.speed.chunked_loss (two ways of "
                         "computing the head's loss): drop one of the two")
        elif self.fused_loss and lora_on_head:
            found.append("model.speed.fused_loss cannot be combined with a LoRA adapter on the head "
                         "(model.lora.targets includes head): drop one of the two")
        elif self.fused_loss and self.float8_head:
            found.append("model.speed.fused_loss cannot be combined with model.speed.float8_head (the fused loss runs "
                         "the head's matmul itself, in bf16): drop one of the two")
        if self.float8 is not None and recipe_problem(self.float8):
            found.append(recipe_problem(self.float8))
        elif self.float8 is not None and lora is not None:
            found.append("model.speed.float8 cannot be combined with model.lora (FP8 matmuls are for pretraining and "
                         "full finetuning): drop one of the two")
        if self.float8_head and self.float8 is None:
            found.append("model.speed.float8_head needs model.speed.float8 (a recipe such as tensorwise)")
        elif self.float8_head and chunked is not None:
            found.append("model.speed.float8_head cannot be combined with model.speed.chunked_loss (the chunked loss "
                         "uses the head's weight directly): drop one of the two")
        return found


def coerce(group: type, value: Any, key: str) -> Any:
    """``value`` as an instance of the option group ``group``: ``None`` gives the defaults, a mapping its fields (as
    a checkpoint's hyperparameters store them). An unknown field is one ConfigError naming it and the known ones."""
    if value is None:
        return group()
    if isinstance(value, group):
        return value
    if isinstance(value, dict):
        names = {f.name for f in dataclasses.fields(group)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ConfigError(f"{key} has no option {', '.join(unknown)}; its options are {', '.join(sorted(names))}")
        values = dict(value)
        if isinstance(values.get("betas"), list):
            values["betas"] = tuple(values["betas"])
        return group(**values)
    raise ConfigError(f"{key} must be a mapping of its options, got {type(value).__name__}")


def check_options(optim: Optimization, speed: Speed, lora: LoRAConfig | None, more: Sequence[str] = ()) -> None:
    """Every problem of the shared option groups (and ``more`` from the task itself), raised together as one
    ConfigError."""
    problems = [*optim.problems(), *speed.problems(lora), *more]
    if problems:
        raise ConfigError("Invalid task config:\n  - " + "\n  - ".join(problems))


def grouped(values: dict[str, Any]) -> dict[str, Any]:
    """Task arguments with the shared options given flat (``learning_rate=...``, ``compile=...``, as checkpoints
    written before the groups stored them) moved into their groups (``optim={...}``, ``speed={...}``); other keys and
    groups already given stay as they are."""
    out = dict(values)
    for name, group in (("optim", Optimization), ("speed", Speed)):
        fields = {f.name for f in dataclasses.fields(group)}
        moved = {key: out.pop(key) for key in list(out) if key in fields}
        if moved:
            given = out.get(name)
            given = dataclasses.asdict(given) if dataclasses.is_dataclass(given) else dict(given or {})
            out[name] = {**given, **moved}
    return out
