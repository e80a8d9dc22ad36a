"""The book's chapter 5 loop (``train_model_simple``) in plain PyTorch, over lit_llm's GPTModel and data.

It runs the same model, data and optimizer as ``configs/pretrain/verdict.yaml`` without Lightning, so the two
can be compared seed for seed (docs/benchmarks.md):

    python bench/verdict_book_loop.py --source the-verdict.txt --tokenizer DIR_WITH_encoder.json --seed 123
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lit_llm.data import PretrainDataModule
from lit_llm.model.config import GPTConfig
from lit_llm.model.gpt import GPTModel


@torch.no_grad()
def loader_loss(model: GPTModel, loader: DataLoader, device: str) -> float:
    model.eval()
    total, n = 0.0, 0
    for x, y in loader:
        logits = model(x.to(device))
        total += F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
        n += y.numel()
    model.train()
    return total / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True)
    p.add_argument("--tokenizer", default="gpt2")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()

    dm = PretrainDataModule(a.source, tokenizer=a.tokenizer, context_length=256, stride=256, batch_size=2,
                            val_split=0.1, split_by="characters")
    dm.setup("fit")
    torch.manual_seed(a.seed)  # as the book: seed, then build the model, then the shuffling loader
    cfg = GPTConfig(vocab_size=dm.vocab_size, context_length=256, emb_dim=768, n_heads=12, n_layers=12,
                    drop_rate=0.1, qkv_bias=False, pad_vocab_multiple=1, init="pytorch")
    model = GPTModel(cfg).to(a.device)
    train = DataLoader(dm.train_dataset, batch_size=2, shuffle=True, drop_last=True)
    train_eval = DataLoader(dm.train_dataset, batch_size=2)
    val = DataLoader(dm.val_dataset, batch_size=2)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    print(f"seed {a.seed}: untrained train {loader_loss(model, train_eval, a.device):.3f} "
          f"val {loader_loss(model, val, a.device):.3f}")
    print("| epoch | tokens seen | train loss (eval mode) | val loss |")
    print("|---|---|---|---|")
    seen, start = 0, time.perf_counter()
    for epoch in range(a.epochs):
        for x, y in train:
            x, y = x.to(a.device), y.to(a.device)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += x.numel()
        print(f"| {epoch + 1} | {seen:,} | {loader_loss(model, train_eval, a.device):.3f} | "
              f"{loader_loss(model, val, a.device):.3f} |")
    print(f"{time.perf_counter() - start:.1f} s on {a.device}")


if __name__ == "__main__":
    main()
