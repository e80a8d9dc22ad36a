"""A callback the multi-GPU tests add with ``--trainer.callbacks+=``: it records what the tests compare.

Rank 0 writes ``probe.json`` into ``folder``: the global training loss of every optimizer step (the mean over ranks,
each rank's loss being the mean over its micro-batch), and the text the live model writes greedily from a fixed
prompt at the end of training (all ranks take part in the generation, as sharded weights are gathered collectively).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from lit_llm.callbacks.samples import _call_inside_root
from lit_llm.generate import complete
from lit_llm.strategies import params_are_sharded


class StrategyProbe(pl.Callback):
    def __init__(self, folder: str, prompt: str = "The function returns", new_tokens: int = 16) -> None:
        self.folder = Path(folder)
        self.prompt = prompt
        self.new_tokens = new_tokens
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        mean = trainer.strategy.reduce(loss.detach().float(), reduce_op="mean")
        self.losses[trainer.global_step] = float(mean)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = pl_module.model
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())

        tokenizer = trainer.datamodule.tokenizer

        def run() -> str:
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    return complete(model, tokenizer, [self.prompt], max_new_tokens=self.new_tokens)[0]
            finally:
                model.train(was_training)

        # Sharded weights are gathered inside the outer wrapper's forward; DDP's wrapper would want inputs.
        completion = _call_inside_root(trainer, pl_module, run) if params_are_sharded(trainer.strategy) else run()
        if trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
            record = {"losses": self.losses, "generated": completion, "dtype": str(dtype).replace("torch.", ""),
                      "world_size": trainer.world_size, "strategy": type(trainer.strategy).__name__}
            (self.folder / "probe.json").write_text(json.dumps(record), encoding="utf-8")
