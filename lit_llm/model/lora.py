"""LoRA, the low-rank adaptation of the book's appendix E, for the GPT's Linear layers.

A LoRA layer keeps its pretrained weight ``W`` frozen and learns two small matrices ``A`` ``(in, rank)`` and ``B``
``(rank, out)``; its output is ``x W^T + b + (x A B) * alpha / rank``. ``B`` starts at zero, so a freshly adapted
model computes exactly what the base model does, and only ``rank * (in + out)`` numbers per layer train.

:class:`LoRALinear` keeps the base layer's parameter names (``weight``, ``bias``) and adds ``lora_A``, ``lora_B``
and the buffer ``lora_scaling``, so a base checkpoint loads into an adapted model unchanged and an adapted state
dict carries everything needed to merge it (:func:`merge_lora_state`) without the config. :func:`apply_lora`
adapts the layers a :class:`LoRAConfig` names; :func:`merge_lora` folds the adapters back into plain layers;
:func:`save_lora` / :func:`load_lora` move the adapters alone.

One difference from the book: lit_llm's attention projects queries, keys and values with one fused ``qkv`` Linear,
so the ``qkv`` target is one adapter of rank ``r`` on the ``(C -> 3C)`` projection (``4 C r`` parameters) where the
book's model has three (``6 C r``). The scaling is ``alpha / rank`` (as in the LoRA paper and PEFT); the book's
``LoRALayer`` multiplies by ``alpha`` alone, so the book's ``alpha=a`` is ``alpha=a * rank`` here.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_llm.errors import CheckpointError, ConfigError
from lit_llm.model.gpt import GPTModel, Linear

__all__ = [
    "LORA_SUFFIXES",
    "TARGET_GROUPS",
    "TARGET_NAMES",
    "LoRAConfig",
    "LoRALinear",
    "UntiedHeadWarning",
    "apply_lora",
    "adapters_disabled",
    "count_trainable",
    "is_lora_key",
    "load_lora",
    "lora_config_of",
    "lora_state_dict",
    "merge_lora",
    "merge_lora_state",
    "read_lora",
    "save_lora",
    "write_lora_file",
]

# Target name -> the module's path inside each transformer block (``None``: the output head, outside the blocks).
TARGET_NAMES: dict[str, str | None] = {
    "qkv": "att.qkv",
    "out_proj": "att.out_proj",
    "ff_in": "ff.layers.0",
    "ff_out": "ff.layers.2",
    "head": None,
}
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("qkv", "out_proj"),
    "ff": ("ff_in", "ff_out"),
    "all": tuple(TARGET_NAMES),
}
LORA_SUFFIXES = ("lora_A", "lora_B", "lora_scaling")
_BLOCK_PATH = re.compile(r"(?:.*\.)?trf_blocks\.\d+\.(.+)")
# Safetensors metadata keys of an adapter file.
_META_LORA = "lora_config"
_META_MODEL = "model_config"


def _default_targets() -> list[str]:
    return ["attention", "ff"]


@dataclass
class LoRAConfig:
    """Which Linear layers get LoRA adapters, and their size.

    Args:
        rank: Inner dimension ``r`` of the adapters (> 0); each adapted ``(in -> out)`` layer trains ``r * (in + out)``
            parameters.
        alpha: Scale of the adapters' output: it is multiplied by ``alpha / rank`` (``alpha == rank`` gives 1).
        dropout: Dropout on the adapters' input only (the frozen path sees the input unchanged); in ``[0, 1)``.
        targets: Layers to adapt, in every transformer block: ``qkv`` (``att.qkv``), ``out_proj`` (``att.out_proj``),
            ``ff_in`` (``ff.layers.0``), ``ff_out`` (``ff.layers.2``), and ``head`` (``out_head``); or the groups
            ``attention`` (qkv + out_proj), ``ff`` (ff_in + ff_out) and ``all`` (all five).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=_default_targets)

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):  # `targets: all` in Python or YAML means the one-item list
            self.targets = [self.targets]
        self.targets = list(self.targets)
        problems = []
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            problems.append(f"model.lora.rank={self.rank!r} must be a positive integer (e.g. 8 or 16)")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            problems.append(f"model.lora.alpha={self.alpha!r} must be a number > 0 (the adapters are scaled by "
                            "alpha / rank)")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            problems.append(f"model.lora.dropout={self.dropout!r} must be in [0, 1)")
        valid = [*TARGET_NAMES, *TARGET_GROUPS]
        unknown = [t for t in self.targets if t not in valid]
        if unknown:
            problems.append(f"model.lora.targets has unknown name(s) {unknown}; valid names are {', '.join(valid)}")
        elif not self.targets:
            problems.append(f"model.lora.targets is empty; name at least one of {', '.join(valid)}")
        if problems:
            raise ConfigError("Invalid LoRA config:\n  - " + "\n  - ".join(problems))
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)

    @property
    def scaling(self) -> float:
        """``alpha / rank``, the factor on the adapters' output."""
        return self.alpha / self.rank

    def layer_names(self) -> list[str]:
        """The targets with groups expanded, in model order (``qkv, out_proj, ff_in, ff_out, head``)."""
        wanted = set()
        for target in self.targets:
            wanted.update(TARGET_GROUPS.get(target, (target,)))
        return [name for name in TARGET_NAMES if name in wanted]

    def to_dict(self) -> dict[str, Any]:
        """Plain values (for hyperparameters, YAML and safetensors metadata)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoRAConfig:
        """Build from a mapping, refusing keys that are not fields (with the list of valid ones)."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"Unknown model.lora key(s) {unknown}; valid keys are {known}")
        return cls(**values)

    @classmethod
    def coerce(cls, value: LoRAConfig | dict[str, Any] | None) -> LoRAConfig | None:
        """``None``, a :class:`LoRAConfig` or a mapping of its fields (as stored in hyperparameters) -> config."""
        if value is None or isinstance(value, LoRAConfig):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        if hasattr(value, "__dataclass_fields__"):  # the same dataclass through another import path
            return cls.from_dict(asdict(value))
        raise ConfigError(f"model.lora must be a mapping such as {{rank: 8, alpha: 16}} or null, got "
                          f"{type(value).__name__}")


class UntiedHeadWarning(UserWarning):
    """A LoRA adapter on a tied output head was merged: the head now has its own weight (``tie_weights: false``)."""


class LoRALinear(Linear):
    """A Linear layer with a LoRA adapter: ``F.linear(x, W, b) + (dropout(x) @ lora_A @ lora_B) * lora_scaling``.

    ``weight`` and ``bias`` keep their names, so base checkpoints load unchanged. ``lora_A`` ``(in, rank)`` starts
    from Kaiming-uniform (``a = sqrt(5)``, as the book's ``LoRALayer``), ``lora_B`` ``(rank, out)`` from zeros, and the
    0-dim buffer ``lora_scaling`` holds ``alpha / rank`` so that a state dict describes itself.

    Build one around an existing layer with :meth:`from_linear` (what :func:`apply_lora` does): the new module adopts
    the layer's ``weight`` and ``bias`` Parameter objects, so a weight shared with another module (the tied head and
    token embedding) stays shared.

    Args:
        in_features: Input width.
        out_features: Output width.
        bias: Whether the base layer has a bias.
        std: As :class:`lit_llm.model.gpt.Linear`: the base weight's ``normal(0, std)`` init (``None``: PyTorch's).
        rank: Adapter rank (> 0).
        alpha: The adapter output is scaled by ``alpha / rank``.
        dropout: Dropout probability on the adapter's input.
        device: Where the parameters are created.
        dtype: Their dtype (``lora_scaling`` is float32).

    Attributes:
        merged: The adapter is folded into ``weight`` (:meth:`merge`); forward then runs the plain layer.
        shares_weight: ``weight`` is also used by another module (set by :func:`apply_lora`); such a layer cannot
            :meth:`merge` in place, since that would change the other module too.
        adapter_enabled: ``False`` makes forward run the base layer alone (see :func:`adapters_disabled`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        std: float | None = None,
        *,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, std=std, device=device, dtype=dtype)
        if rank < 1:
            raise ConfigError(f"LoRA rank={rank} must be a positive integer")
        self.merged = False
        self.shares_weight = False
        self.adapter_enabled = True
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(in_features, rank, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(rank, out_features, device=device, dtype=dtype))
        self.register_buffer("lora_scaling", torch.tensor(alpha / rank, dtype=torch.float32, device=device))
        self.reset_adapters()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, shares_weight: bool = False
    ) -> LoRALinear:
        """A LoRA layer around ``linear``'s own ``weight`` and ``bias`` Parameters (not copies).

        The adapters are created on the weight's device and in its dtype.
        """
        weight = linear.weight
        # Built on the meta device, so no throwaway base weight is allocated or initialised.
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     std=getattr(linear, "std", None), rank=rank, alpha=alpha, dropout=dropout, device="meta")
        module.weight = weight
        module.bias = linear.bias
        module.lora_A = nn.Parameter(torch.empty(linear.in_features, rank, device=weight.device, dtype=weight.dtype))
        module.lora_B = nn.Parameter(torch.empty(rank, linear.out_features, device=weight.device, dtype=weight.dtype))
        module.lora_scaling = torch.tensor(alpha / rank, dtype=torch.float32, device=weight.device)
        module.reset_adapters()
        module.shares_weight = shares_weight
        module.train(linear.training)
        return module

    @property
    def rank(self) -> int:
        return self.lora_A.shape[1]

    def reset_parameters(self) -> None:
        """Re-initialise the base layer (as :class:`lit_llm.model.gpt.Linear`) and the adapters."""
        super().reset_parameters()
        if "lora_A" in self._parameters:  # nn.Linear.__init__ calls this before the adapters exist
            self.reset_adapters()

    def reset_adapters(self) -> None:
        """``lora_A`` Kaiming-uniform (``a = sqrt(5)``, the book's choice), ``lora_B`` zeros: the adapter adds 0."""
        if self.lora_A.is_meta:
            return
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> Tensor:
        """The adapter as a weight update ``(A @ B)^T * scaling``, shape ``(out, in)``, computed in float32."""
        return (self.lora_A.float() @ self.lora_B.float()).T * self.lora_scaling.float()

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged or not self.adapter_enabled:
            return out
        return out + (self.lora_dropout(x) @ self.lora_A @ self.lora_B) * self.lora_scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``weight`` in place (for inference: forward then costs one matmul).

        Raises:
            ConfigError: ``weight`` is shared with another module (a tied head): use :func:`merge_lora`, which gives
                the head its own merged weight.
        """
        if self.merged:
            return
        if self.shares_weight:
            raise ConfigError("this LoRA layer's weight is shared with another module (a head tied to the token "
                              "embedding); merging in place would change both. Use "
                              "lit_llm.model.lora.merge_lora(model), "
                              "which unties the head, or keep the adapter unmerged")
        self.weight += self.delta_weight().to(self.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter out of ``weight`` again (exact up to rounding in the weight's dtype)."""
        if not self.merged:
            return
        self.weight -= self.delta_weight().to(self.weight.dtype)
        self.merged = False

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            # A state dict always holds the base weight beside the adapters, so merging it later cannot add the
            # adapter twice.
            with torch.no_grad():
                destination[prefix + "weight"] = (self.weight.float() - self.delta_weight()).to(self.weight.dtype)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        merged = self.merged
        self.unmerge()  # the state holds the base weight (see _save_to_state_dict)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if merged:
            self.merge()

    def extra_repr(self) -> str:
        scaling = self.lora_scaling.item() if not self.lora_scaling.is_meta else float("nan")
        return f"{super().extra_repr()}, rank={self.rank}, scaling={scaling:g}, merged={self.merged}"


# ---- applying and merging ---------------------------------------------------------------------------------------


def apply_lora(model: GPTModel, config: LoRAConfig) -> list[str]:
    """Put LoRA adapters on the layers ``config.targets`` names, in place, and freeze everything else.

    Each target ``nn.Linear`` is replaced by a :class:`LoRALinear` that adopts the very same ``weight`` and ``bias``
    Parameters (a tied head stays tied). Every parameter of the model except ``lora_A`` / ``lora_B`` then has
    ``requires_grad=False``; a task may un-freeze more afterwards (e.g. a new classification head).

    Args:
        model: A :class:`~lit_llm.model.gpt.GPTModel` (or a module with its ``trf_blocks`` and ``out_head``).
        config: What to adapt and how.

    Returns:
        The adapted modules' names, e.g. ``["trf_blocks.0.att.qkv", ..., "out_head"]``.

    Raises:
        ConfigError: The model already has adapters, or a target is not a Linear layer.
    """
    config = LoRAConfig.coerce(config)
    existing = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if existing:
        raise ConfigError(f"the model already has LoRA adapters ({len(existing)} layers, e.g. {existing[0]}); "
                          "apply_lora adds them once per model: build a fresh model, or use load_lora to load other "
                          "adapters into these")
    names = []
    layers = config.layer_names()
    for i in range(len(model.trf_blocks)):
        names += [f"trf_blocks.{i}.{TARGET_NAMES[t]}" for t in layers if TARGET_NAMES[t] is not None]
    if "head" in layers:
        names.append("out_head")
    # Parameters used by two modules (the tied head and token embedding) cannot be merged in place later.
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"model.lora.targets: {name} is a {type(linear).__name__}, not a Linear layer, so it "
                              "cannot take a LoRA adapter; remove its target name")
        adapted = LoRALinear.from_linear(linear, config.rank, config.alpha, config.dropout,
                                         shares_weight=uses[id(linear.weight)] > 1)
        _set_submodule(model, name, adapted)
    adapters = {id(p) for name in names for p in (model.get_submodule(name).lora_A, model.get_submodule(name).lora_B)}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapters)
    return names


def merge_lora(model: GPTModel) -> GPTModel:
    """Fold every adapter into its layer's weight and swap the :class:`LoRALinear` back to a plain Linear, in place.

    Afterwards the model holds no ``lora_*`` parameters or buffers and its state dict is a base model's. A tied head
    with an adapter gets its own merged weight (the token embedding is left as it was) and ``model.config`` becomes
    ``tie_weights=False``, with an :class:`UntiedHeadWarning`. ``requires_grad`` of the kept parameters is unchanged.

    Returns:
        The same model, for chaining.
    """
    untied = []
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        plain = Linear(module.in_features, module.out_features, bias=module.bias is not None, std=module.std,
                       device="meta")
        if module.shares_weight and not module.merged:
            with torch.no_grad():
                merged = (module.weight.float() + module.delta_weight()).to(module.weight.dtype)
            plain.weight = nn.Parameter(merged, requires_grad=module.weight.requires_grad)
            untied.append(name)
        else:
            module.merge()
            plain.weight = module.weight
        plain.bias = module.bias
        plain.train(module.training)
        _set_submodule(model, name, plain)
    if untied:
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "tie_weights", False):
            model.config = config.replace(tie_weights=False)
        warnings.warn(f"merged the LoRA adapter of {', '.join(untied)} into a weight of its own: its weight was shared "
                      "with the token embedding, so the merged model has tie_weights: false", UntiedHeadWarning,
                      stacklevel=2)
    return model


def merge_lora_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict with every adapter merged into its weight and the ``lora_*`` entries removed.

    For each ``<m>.lora_A``, ``<m>.lora_B``, ``<m>.lora_scaling`` the weight ``<m>.weight`` becomes
    ``W + (A @ B)^T * scaling``, computed in float32 and cast back to ``W``'s dtype. The input is not modified.

    A tied head has no ``out_head.weight`` of its own (or one that is the token embedding's storage): its adapter is
    merged into a new ``out_head.weight`` computed from ``tok_emb.weight``, which stays unchanged. The result then
    holds a separate head, so load it into a model with ``tie_weights: false``; an :class:`UntiedHeadWarning` says
    so. (``lit_llm.weights.readers`` does this by itself when it reads a LoRA checkpoint.)

    Raises:
        CheckpointError: An adapter lacks one of its three entries, has no weight to merge into, or its shapes do
            not fit the weight.
    """
    prefixes = sorted({k.rsplit(".", 1)[0] for k in state if is_lora_key(k)})
    out = {k: v for k, v in state.items() if not is_lora_key(k)}
    untied = []
    for m in prefixes:
        parts = {s: state.get(f"{m}.{s}") for s in LORA_SUFFIXES}
        absent = [f"{m}.{s}" for s, t in parts.items() if t is None]
        if absent:
            raise CheckpointError(f"the LoRA adapter of {m} is incomplete: {', '.join(absent)} missing; the adapter "
                                  "entries lora_A, lora_B and lora_scaling come together (save the whole state dict)")
        a, b, scaling = parts["lora_A"], parts["lora_B"], parts["lora_scaling"]
        base = state.get(f"{m}.weight")
        embedding = state.get(m.removesuffix("out_head") + "tok_emb.weight") if m.rsplit(".", 1)[-1] == "out_head" \
            else None
        if base is None and embedding is not None:
            base = embedding
        if base is None:
            raise CheckpointError(f"the state dict has a LoRA adapter for {m} but no {m}.weight to merge it into")
        if embedding is not None and base.data_ptr() == embedding.data_ptr():
            untied.append(m)
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or (b.shape[1], a.shape[0]) != tuple(base.shape):
            raise CheckpointError(f"the LoRA adapter of {m} does not fit its weight: lora_A {tuple(a.shape)} @ lora_B "
                                  f"{tuple(b.shape)} should give the transpose of weight {tuple(base.shape)}")
        delta = (a.float() @ b.float()).T * scaling.float()
        out[f"{m}.weight"] = (base.float() + delta).to(base.dtype)
    if untied:
        warnings.warn(f"merged the LoRA adapter of {', '.join(untied)} into a head of its own: the state had it tied "
                      "to tok_emb.weight, so load the result into a model with tie_weights: false", UntiedHeadWarning,
                      stacklevel=2)
    return out


# ---- inspection ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model inside the block: every :class:`LoRALinear` skips its adapter.

    The adapters' parameters are untouched; on exit each layer is as it was. DPO uses this to get the reference
    model's outputs from the policy itself (no second copy of the weights).

    Raises:
        ConfigError: ``model`` has no LoRA layer, or one is merged (its adapter is inside ``weight``).
    """
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ConfigError("the model has no LoRA adapters to switch off; set model.lora (e.g. {rank: 8, alpha: 16})")
    if any(m.merged for m in layers):
        raise ConfigError("a LoRA layer is merged into its weight, so its adapter cannot be switched off; unmerge it "
                          "(LoRALinear.unmerge) first")
    previous = [m.adapter_enabled for m in layers]
    for m in layers:
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m, enabled in zip(layers, previous):
            m.adapter_enabled = enabled


def is_lora_key(name: str) -> bool:
    """Whether a state-dict key is a LoRA entry (``...lora_A``, ``...lora_B``, ``...lora_scaling``)."""
    return name.rsplit(".", 1)[-1] in LORA_SUFFIXES


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The ``lora_A``, ``lora_B`` and ``lora_scaling`` entries of ``model.state_dict()`` (same key prefixes)."""
    return {k: v for k, v in model.state_dict().items() if is_lora_key(k)}


def lora_config_of(model: nn.Module) -> LoRAConfig | None:
    """The :class:`LoRAConfig` that gives ``model``'s adapters (read from the layers), or ``None`` without any."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        return None
    _, first = layers[0]
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    return LoRAConfig(rank=first.rank, alpha=float(first.lora_scaling.float().item()) * first.rank, dropout=dropout,
                      targets=_targets_of(name for name, _ in layers))


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; a parameter shared by two modules is counted once."""
    params = list(model.parameters())  # .parameters() already de-duplicates shared ones
    # DeepSpeed ZeRO-3 empties partitioned parameters and keeps their size in ds_numel.
    sizes = [(int(getattr(p, "ds_numel", p.numel())), p.requires_grad) for p in params]
    return sum(n for n, trains in sizes if trains), sum(n for n, _ in sizes)


# ---- adapter files ---------------------------------------------------------------------------------------------


def save_lora(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write only the adapters (``lora_A``, ``lora_B``, ``lora_scaling``) to a safetensors file.

    The file's metadata holds the LoRA config (``lora_config``, JSON) and the model config (``model_config``), so
    :func:`load_lora` can adapt a fresh base model. Keys are relative to the GPT (``trf_blocks.0.att.qkv.lora_A``).

    Args:
        model: An adapted :class:`~lit_llm.model.gpt.GPTModel`, or a lit_llm task holding one as ``.model``.
        path: The ``.safetensors`` file to write (its directory is created).
        metadata: Extra string metadata (other values are stored as JSON).

    Returns:
        The path written.

    Raises:
        ConfigError: The model has no LoRA adapters.
    """
    gpt = _gpt(model)
    config = lora_config_of(gpt)
    if config is None:
        raise ConfigError("the model has no LoRA adapters to save; apply_lora (or model.lora in the config) adds them")
    model_config = getattr(gpt, "config", None)
    return write_lora_file(Path(path), lora_state_dict(gpt), config,
                            model_config.to_dict() if hasattr(model_config, "to_dict") else None, metadata)


def read_lora(source: str | Path) -> tuple[dict[str, Tensor], LoRAConfig, dict[str, str]]:
    """The adapters of an adapter file (:func:`save_lora`) or of a lit_llm checkpoint trained with LoRA.

    Args:
        source: A ``.safetensors`` adapter file, a Lightning ``.ckpt`` written by ``lit_llm.train``, or a run
            directory holding ``last.ckpt``.

    Returns:
        The adapter tensors (keys relative to the GPT), their :class:`LoRAConfig` and metadata (for a checkpoint:
        ``model_config`` as JSON).

    Raises:
        CheckpointError: The file is missing, unreadable, or holds no adapters.
    """
    from lit_llm.weights.files import torch_load

    path = Path(source).expanduser()
    if path.is_dir() and (path / "last.ckpt").is_file():
        path = path / "last.ckpt"
    if not path.is_file():
        raise CheckpointError(f"LoRA source {source} does not exist (cwd: {Path.cwd()}); pass an adapter .safetensors "
                              "file (save_lora / lit_llm.convert extract-lora) or a lit_llm .ckpt trained with LoRA")
    if path.suffix == ".safetensors":
        state, metadata = _read_safetensors(path)
        stored = metadata.get(_META_LORA)
        hparams = None
        if stored is not None:
            try:
                hparams = json.loads(stored)
            except json.JSONDecodeError as err:
                raise CheckpointError(f"{path}: its lora_config metadata is not JSON ({err})") from err
    else:
        ckpt = torch_load(path)
        raw = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path} is not a lit_llm checkpoint (no state_dict); pass a .ckpt written by "
                                  "lit_llm.train or an adapter .safetensors file")
        state = {k.replace("_orig_mod.", "").removeprefix("model."): v for k, v in raw.items()}
        hparams = (ckpt.get("hyper_parameters") or {}).get("lora")
        model_config = ckpt.get("model_config") or (ckpt.get("hyper_parameters") or {}).get("model")
        metadata = {_META_MODEL: json.dumps(model_config)} if isinstance(model_config, dict) else {}
    state = {k: v for k, v in state.items() if is_lora_key(k)}
    if not state:
        raise CheckpointError(f"{path} holds no LoRA adapters (no lora_A/lora_B entries); it was not trained with "
                              "model.lora")
    derived = _config_from_state(state, path)
    if isinstance(hparams, dict):
        try:
            stored_config = LoRAConfig.from_dict(hparams)
        except ConfigError as err:
            raise CheckpointError(f"{path}: its stored LoRA config is not valid: {err}") from err
        # The tensors are the truth for rank, scale and layers; the stored config adds what they cannot say (dropout).
        derived.dropout = stored_config.dropout
    return state, derived, metadata


def load_lora(model: nn.Module, path: str | Path) -> None:
    """Load adapters from :func:`save_lora`'s file (or a LoRA checkpoint) into ``model``, adapting it if needed.

    A model without adapters gets them first (:func:`apply_lora` with the file's config, which also freezes the base
    weights); a model with adapters must have the same ones.

    Args:
        model: A :class:`~lit_llm.model.gpt.GPTModel` (or a lit_llm task holding one as ``.model``) with the base
            weights
            the adapters were trained on.
        path: An adapter file, a ``.ckpt`` trained with LoRA, or a run directory.

    Raises:
        CheckpointError: The file is unreadable, or its adapters do not fit the model (one message listing missing
            and unexpected adapters and shape mismatches).
    """
    gpt = _gpt(model)
    state, config, metadata = read_lora(path)
    _check_model_config(gpt, metadata.get(_META_MODEL), path)
    if lora_config_of(gpt) is None:
        apply_lora(gpt, config)
    expected = {k: tuple(v.shape) for k, v in lora_state_dict(gpt).items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: model={expected[k]} file={tuple(state[k].shape)}"
                  for k in sorted(expected) if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or mismatched:
        lines = [f"the LoRA adapters in {path} do not fit the model's adapters:"]
        for title, items in (("missing (in the model, not in the file)", missing),
                             ("unexpected (in the file, not in the model)", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                lines.append(f"  {title}: " + ", ".join(items[:10]) + (" ..." if len(items) > 10 else ""))
        lines.append(f"The file's adapters are rank {config.rank} on {', '.join(config.targets)}; load them into a "
                     "model without adapters (they are then added to match) or with the same LoRA config.")
        raise CheckpointError("\n".join(lines))
    gpt.load_state_dict(state, strict=False)


# ---- helpers ---------------------------------------------------------------------------------------------------


def _gpt(model: nn.Module) -> nn.Module:
    """The GPT itself: ``model``, or the ``.model`` a lit_llm task holds."""
    inner = getattr(model, "model", None)
    if not isinstance(model, GPTModel) and isinstance(inner, nn.Module):
        return inner
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _targets_of(module_names: Any) -> list[str]:
    """Target names (in model order) of adapted modules' paths such as ``trf_blocks.3.ff.layers.0``."""
    by_path = {path: name for name, path in TARGET_NAMES.items() if path is not None}
    found = set()
    for path in module_names:
        m = _BLOCK_PATH.fullmatch(path)
        if m and m[1] in by_path:
            found.add(by_path[m[1]])
        elif path.rsplit(".", 1)[-1] == "out_head":
            found.add("head")
    return [name for name in TARGET_NAMES if name in found]


def _config_from_state(state: dict[str, Tensor], where: Path) -> LoRAConfig:
    prefixes = sorted({k.rsplit(".", 1)[0] for k in state})
    a = state.get(f"{prefixes[0]}.lora_A")
    scaling = state.get(f"{prefixes[0]}.lora_scaling")
    targets = _targets_of(prefixes)
    if a is None or scaling is None or not targets:
        raise CheckpointError(f"{where}: the LoRA entries ({', '.join(prefixes[:3])}, ...) are not those of lit_llm's "
                              "GPT adapters (lora_A, lora_B and lora_scaling of trf_blocks.N.att.qkv, ..., out_head)")
    rank = a.shape[1]
    return LoRAConfig(rank=rank, alpha=float(scaling.float().item()) * rank, targets=targets)


def _check_model_config(model: nn.Module, stored_json: str | None, where: str | Path) -> None:
    """Refuse adapters trained on another architecture when the file says which (shapes alone miss n_heads)."""
    config = getattr(model, "config", None)
    if not stored_json or not hasattr(config, "to_dict"):
        return
    try:
        stored = json.loads(stored_json)
    except json.JSONDecodeError:
        return
    current = config.to_dict()
    fields = ("emb_dim", "n_layers", "n_heads", "context_length")
    diffs = [f"{k}: adapters={stored.get(k)!r} model={current.get(k)!r}" for k in fields
             if k in stored and stored.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(f"the LoRA adapters in {where} were trained on another model architecture:\n  - "
                              + "\n  - ".join(diffs) + "\nLoad them into the base model they were trained on.")


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError, OSError, ValueError
        raise CheckpointError(f"{path} is not a valid safetensors file ({err}); it may be truncated or corrupt: "
                              "save or extract the adapters again") from err
    return state, metadata


def write_lora_file(
    path: str | Path,
    state: dict[str, Tensor],
    config: LoRAConfig,
    model_config: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write adapter tensors to a safetensors file with ``lora_config`` / ``model_config`` JSON metadata.

    The format :func:`save_lora` writes and :func:`read_lora` reads; ``metadata`` values that are not strings are
    stored as JSON.
    """
    from safetensors.torch import save_file

    path = Path(path)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta.update({"format": "pt", _META_LORA: json.dumps(config.to_dict())})
    if model_config is not None:
        meta[_META_MODEL] = json.dumps(model_config)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The adapters are small, so safetensors' own writer (which holds one extra copy) is fine here.
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path), metadata=meta)
    return path
