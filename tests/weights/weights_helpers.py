"""What the weights tests share: randomised models, their logits, LoRA models and a LoRA training checkpoint."""

from __future__ import annotations

from pathlib import Path

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
