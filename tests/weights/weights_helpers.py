"""What the weights tests share: randomised models, their logits, LoRA models and a LoRA training checkpoint."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch

from lit_llm.data.tokenizer import Tokenizer
from lit_llm.model.config import GPTConfig
from lit_llm.model.gpt import GPTModel


def randomize(model: torch.nn.Module, std: float = 0.1) -> None:
    """Non-trivial values everywhere (biases, LayerNorms), so a swapped or untransposed tensor shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(ids)
    return getattr(out, "logits", out)


def lora_models(tie: bool) -> tuple[GPTModel, GPTModel]:
    """A tiny GPT (300 tokens padded to 320 rows) and a copy with random LoRA adapters on all five targets."""
    from lit_llm.model.lora import LoRAConfig, LoRALinear, apply_lora

    torch.manual_seed(0)
    base = GPTModel(GPTConfig(vocab_size=300, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0,
                              qkv_bias=True, tie_weights=tie)).eval()
    adapted = GPTModel(base.config).eval()
    adapted.load_state_dict(base.state_dict())
    apply_lora(adapted, LoRAConfig(rank=4, alpha=8, targets=["all"]))
    with torch.no_grad():
        for m in adapted.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0.0, 0.05)
    return base, adapted


def save_lora_checkpoint(model: GPTModel, path: Path, tokenizer: Tokenizer | None = None) -> Path:
    """What lit_llm.train writes for a LoRA run, reduced to the entries the readers use."""
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "model_config": model.config.to_dict(),
            "hyper_parameters": {"model": model.config.to_dict(),
                                 "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["all"]}}}
    if tokenizer is not None:
        ckpt["PretrainDataModule"] = {"tokenizer_json": tokenizer.to_json()}
    torch.save(ckpt, path)
    return path


TEXT = (
    "It had always been his fate to have his judgement questioned, and his work admired by those who never "
    "understood it. The sketch of the donkey was the last thing he painted before he gave it up. "
)


@contextlib.contextmanager
def deepspeed_objects() -> Iterator[SimpleNamespace]:
    """Classes under the names DeepSpeed pickles into its checkpoint files (a loss scaler, the ZeRO stage enum, a
    parameter fragment address), importable while the block runs, so that ``torch.save`` writes references to them
    as DeepSpeed's own files do, without DeepSpeed installed."""

    class LossScaler:
        def __init__(self, scale: float = 1.0) -> None:
            self.cur_scale, self.dynamic = scale, False

    class ZeroStageEnum(enum.IntEnum):
        optimizer_states = 1
        gradients = 2
        weights = 3

    @dataclasses.dataclass
    class fragment_address:  # noqa: N801 - DeepSpeed's name
        numel: int
        start: int

    modules = {"deepspeed.runtime.fp16.loss_scaler": LossScaler, "deepspeed.runtime.zero.config": ZeroStageEnum,
               "deepspeed.utils.tensor_fragment": fragment_address}
    names = ["deepspeed", "deepspeed.runtime", "deepspeed.runtime.fp16", "deepspeed.runtime.zero", "deepspeed.utils",
             *modules]
    saved = {name: sys.modules.get(name) for name in names}
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    for name, cls in modules.items():
        cls.__module__, cls.__qualname__ = name, cls.__name__
        setattr(sys.modules[name], cls.__name__, cls)
    try:
        yield SimpleNamespace(LossScaler=LossScaler, ZeroStageEnum=ZeroStageEnum, fragment_address=fragment_address)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def deepspeed_optimizer_state(ds: SimpleNamespace, stage: int, rank: int) -> dict:
    """What a ZeRO optimizer's ``state_dict`` holds, in the shape DeepSpeed saves it into ``*_optim_states.pt``."""
    partition = torch.full((8,), float(rank))
    return {
        "optimizer_state_dict": {
            "loss_scaler": ds.LossScaler(1.0), "dynamic_loss_scale": False, "overflow": False, "clip_grad": 1.0,
            "base_optimizer_state": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": partition.clone()}},
                                     "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0]}]},
            "single_partition_of_fp32_groups": [partition], "zero_stage": ds.ZeroStageEnum(stage),
            "group_paddings": [0], "partition_count": [2], "ds_version": "0.0.0",
            "param_slice_mappings": [collections.OrderedDict(w=ds.fragment_address(numel=8, start=0))],
        },
        "ds_config": {"zero_optimization": {"stage": stage}}, "ds_version": "0.0.0",
    }
