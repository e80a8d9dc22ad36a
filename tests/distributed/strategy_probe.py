"""A callback the multi-GPU tests add with ``--trainer.callbacks+=``: it records what the tests compare.

Rank 0 writes ``probe.json`` into ``folder``: the global training loss of every optimizer step (the mean over ranks
and over the step's accumulated micro-batches, each micro-batch's loss being the mean over its tokens), the
last ``train/grad_norm`` the task logged at each step (``None`` before any), and the text
the live model writes greedily from a fixed prompt at the end of training (all ranks take part in the generation, as
sharded weights are gathered collectively).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from lit_llm.callbacks.samples import call_inside_root
from lit_llm.distributed import params_are_sharded
from lit_llm.generate import complete


class StrategyProbe(pl.Callback):
    def __init__(self, folder: str, prompt: str = "The function returns", new_tokens: int = 16) -> None:
        self.folder = Path(folder)
        self.prompt = prompt
        self.new_tokens = new_tokens
        self.losses: dict[int, float] = {}
        self.grad_norms: dict[int, float | None] = {}
        self._pending: list[float] = []
        self._step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step = trainer.global_step  # 0, or the step a resumed run starts from
        # The sum of each parameter at the start (all ranks hold the same full values once gathered), so that runs
        # can be checked to start from the same weights. Not under ZeRO-3 (gathering there is per module).
        self.start_sums: dict[str, float] = {}
        if getattr(trainer.strategy, "zero_stage_3", False):
            return
        from pytorch_lightning.strategies import FSDPStrategy

        context: Any = contextlib.nullcontext()
        if isinstance(trainer.strategy, FSDPStrategy):
            from torch.distributed.fsdp import FullyShardedDataParallel

            context = FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False)
        with context, torch.no_grad():
            # FSDP2's parameters are DTensors: full_tensor() gathers one (every rank calls it in the same order).
            self.start_sums = {n.replace("_fsdp_wrapped_module.", ""): float(
                (p.full_tensor() if hasattr(p, "full_tensor") else p).double().sum())
                for n, p in pl_module.model.named_parameters()}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not hasattr(self, "first_batch_sum"):  # the global first batch's token-id sum, over all ranks
            local = torch.tensor(float(sum(int(t.sum()) for t in batch)), device=pl_module.device)
            self.first_batch_sum = float(trainer.strategy.reduce(local, reduce_op="sum"))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Lightning hands over each micro-batch's loss divided by accumulate_grad_batches: their sum over an
        # optimizer step is the step's mean loss.
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._pending.append(float(trainer.strategy.reduce(loss.detach().float(), reduce_op="mean")))
        if trainer.global_step != self._step:  # the optimizer stepped after this micro-batch
            self.losses[trainer.global_step] = sum(self._pending)
            # Logged on_step: the value seen here is the last one logged (this step's, when the task logs one for
            # every step; a value repeated step after step would show one that stopped being logged).
            norm = trainer.callback_metrics.get("train/grad_norm")
            self.grad_norms[trainer.global_step] = None if norm is None else float(norm)
            self._pending, self._step = [], trainer.global_step

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
        completion = call_inside_root(trainer, pl_module, run) if params_are_sharded(trainer.strategy) else run()
        if trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
            record = {"losses": self.losses, "grad_norms": self.grad_norms, "generated": completion,
                      "dtype": str(dtype).replace("torch.", ""),
                      "world_size": trainer.world_size, "strategy": type(trainer.strategy).__name__,
                      "start_sums": self.start_sums, "first_batch_sum": getattr(self, "first_batch_sum", None)}
            (self.folder / "probe.json").write_text(json.dumps(record), encoding="utf-8")
