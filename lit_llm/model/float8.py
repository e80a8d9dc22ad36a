"""FP8 matmuls for training (``model.speed.float8``), through torchao's ``Float8Linear``.

Each chosen ``nn.Linear`` of the GPT is swapped for torchao's ``Float8Linear``: its input, weight and (in the
backward) output gradient are scaled and cast to float8 on the fly, and the three matmuls of the layer run on the
GPU's FP8 tensor cores; the weights, their gradients and AdamW's state keep their own dtype, and so do the
checkpoints, whose keys do not change (a checkpoint of an FP8 run loads into a plain model, and the other way round).

- Which layers: every Linear of the transformer blocks (qkv, attention output, both feed-forward layers) whose two
  dimensions are multiples of 16 (what FP8 matmuls need). The output head stays in bf16 unless ``float8_head`` is set:
  the logits feed the loss directly and the head is tied to the token embedding.
- Recipes (torchao's names): ``tensorwise`` (one scale per tensor: the fastest) and ``rowwise`` (a scale per row:
  more accurate). torchao's ``rowwise_with_gw_hp`` is not offered: under autocast its backward multiplies a bf16
  gradient by a float32 input and fails (torchao 0.18).
- It needs ``torch.compile`` to pay (the casts and scale reductions are fused into the neighbouring kernels) and a GPU
  with FP8 tensor cores (compute capability 8.9 or higher: H100, H200, L4, L40, RTX 4090, B200). Machines without one
  can emulate the FP8 matmuls for testing with ``LIT_LLM_FLOAT8_EMULATE=1`` (slow; the numerics of FP8, the speed of
  neither).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

import torch
from torch import nn

from lit_llm.errors import ConfigError

Float8Recipe = Literal["tensorwise", "rowwise"]
RECIPES: tuple[str, ...] = ("tensorwise", "rowwise")
FLOAT8_INSTALL = "pip install 'lit_llm[float8]'"
EMULATE_ENV = "LIT_LLM_FLOAT8_EMULATE"


def recipe_problem(recipe: object) -> str | None:
    """What is wrong with ``model.speed.float8=recipe`` (``None`` when it names a recipe)."""
    if recipe in RECIPES:
        return None
    return f"model.speed.float8={recipe!r} must be one of {', '.join(RECIPES)}, or null for bf16 matmuls"


def emulating() -> bool:
    """Whether ``LIT_LLM_FLOAT8_EMULATE`` asks for emulated FP8 matmuls (machines without FP8 tensor cores)."""
    return os.environ.get(EMULATE_ENV, "").strip().lower() in ("1", "true", "yes")


def check_float8_device(device: torch.device) -> None:
    """One error when ``device`` has no FP8 tensor cores (and emulation was not asked for)."""
    if emulating():
        return
    if device.type != "cuda":
        raise ConfigError(
            f"model.speed.float8 needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9+: H100, H200, L4, "
            f"L40, RTX 4090), but this run is on {device.type.upper()}. Remove model.speed.float8, or set "
            f"{EMULATE_ENV}=1 to "
            "emulate the FP8 matmuls for a test (slow)."
        )
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ConfigError(
            f"model.speed.float8 needs FP8 tensor cores (compute capability 8.9+), but "
            f"{torch.cuda.get_device_name(device)} "
            f"has {major}.{minor}. Remove model.speed.float8 (bf16-mixed is the fastest choice on this GPU)."
        )


def convert_to_float8(model: nn.Module, recipe: str = "tensorwise", head: bool = False,
                      emulate: bool | None = None) -> list[str]:
    """Swap ``model``'s eligible ``nn.Linear`` layers for torchao's ``Float8Linear`` in place.

    Args:
        model: A :class:`lit_llm.model.gpt.GPTModel` (or any module; ``out_head`` names its output head).
        recipe: torchao's recipe name: ``tensorwise`` or ``rowwise``.
        head: Convert the output head ``out_head`` too.
        emulate: Emulate the FP8 matmuls (no FP8 hardware needed); default: ``LIT_LLM_FLOAT8_EMULATE``.

    Returns:
        The names of the converted layers.
    """
    problem = recipe_problem(recipe)
    if problem:
        raise ConfigError(problem)
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise ConfigError(f"model.speed.float8 needs torchao, which is not installed ({e}): {FLOAT8_INSTALL}") from None
    config = Float8LinearConfig.from_recipe_name(recipe)
    if emulate if emulate is not None else emulating():
        config = dataclasses.replace(config, emulate=True)
    converted: list[str] = []

    def eligible(module: nn.Module, name: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if name.split(".")[-1] == "out_head" and not head:
            return False
        if module.in_features % 16 or module.out_features % 16:
            return False
        converted.append(name)
        return True

    head_module, embedding = getattr(model, "out_head", None), getattr(model, "tok_emb", None)
    tied = head_module is not None and embedding is not None and head_module.weight is embedding.weight
    convert_to_float8_training(model, config=config, module_filter_fn=eligible)
    if tied and model.out_head.weight is not embedding.weight:
        model.out_head.weight = embedding.weight  # the swap made the head a parameter of its own: tie it again
    return converted
