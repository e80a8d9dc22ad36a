"""A callback that ``test_consolidate_gpu.py`` adds to multi-GPU runs: it records what the live model does.

At the end of training every rank takes part (sharded weights are gathered collectively, inside the strategy's
outermost wrapper, as Lightning runs a training step) while the model reads a fixed prompt; rank 0 saves the prompt's
ids, the logits of its last position and the greedy continuation, so that a test can hold a consolidated checkpoint
to the model that was actually trained.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch

from lit_llm.callbacks.samples import call_inside_root
from lit_llm.model.sampling import generate


class LiveGreedy(pl.Callback):
    def __init__(self, out: str, prompt: str = "The import statement", new_tokens: int = 12) -> None:
        """Save ``{"prompt_ids", "ids", "logits", "dtype", "world_size"}`` to ``out`` (a ``.pt`` file) at train end.

        Args:
            out: Where rank 0 writes the record.
            prompt: The text to continue.
            new_tokens: Tokens generated greedily.
        """
        self.out = Path(out)
        self.prompt = prompt
        self.new_tokens = new_tokens

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = pl_module.model
        prompt = torch.tensor([trainer.datamodule.tokenizer.encode(self.prompt)], device=pl_module.device)

        def run() -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    dtype = model.tok_emb.weight.dtype  # gathered here: the dtype the model computes in
                    logits = model(prompt)[0, -1].float()
                    return logits, generate(model, prompt, self.new_tokens), dtype
            finally:
                model.train(was_training)

        logits, ids, dtype = call_inside_root(trainer, pl_module, run)
        if trainer.is_global_zero:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"prompt_ids": prompt.cpu(), "ids": ids.cpu(), "logits": logits.cpu(),
                        "dtype": str(dtype).removeprefix("torch."), "world_size": trainer.world_size}, self.out)
