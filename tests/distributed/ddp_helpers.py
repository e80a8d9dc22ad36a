"""Recording and launching for the data-parallel parity tests (importable by the training subprocesses, which get this
folder on ``PYTHONPATH``).

Nothing here is part of lit_llm: :class:`StepRecorder` reaches ``python -m lit_llm.train`` through
``--trainer.callbacks+=`` like any user callback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "pretrain" / "quickstart.yaml"

# Environment variables of a launched rank: a test process that inherited them would join the wrong job.
_RANK_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                   "MASTER_PORT", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


class StepRecorder(pl.Callback):
    """Write what each rank trained on and what came out of it into ``folder``.

    ``batches.rank<r>.jsonl``: one row per training (micro-)batch with the optimizer step it belongs to, the loss that
    Lightning reports (the mean over the rank's rows, divided by ``accumulate_grad_batches``) and the batch's input
    ids. ``run.rank<r>.json``: the world size, the rank and the process-group backend. ``weights.rank<r>.pt``: the
    GPT's weights at the end of training.

    Args:
        folder: Where the files go (created).
    """

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self._step_at_start = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
        info = {"world_size": trainer.world_size, "rank": trainer.global_rank, "backend": backend,
                "strategy": type(trainer.strategy).__name__, "pid": os.getpid()}
        (self.folder / f"run.rank{trainer.global_rank}.json").write_text(json.dumps(info), encoding="utf-8")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        row = {"step": self._step_at_start, "batch_idx": batch_idx, "loss": float(loss.detach().float()),
               "accumulate": trainer.accumulate_grad_batches, "inputs": batch[0].tolist()}
        with open(self.folder / f"batches.rank{trainer.global_rank}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}
        torch.save(weights, self.folder / f"weights.rank{trainer.global_rank}.pt")


def recorder(folder: Path) -> str:
    """The ``--trainer.callbacks+=`` value that adds a :class:`StepRecorder` writing into ``folder``."""
    return json.dumps({"class_path": "ddp_helpers.StepRecorder", "init_args": {"folder": str(folder)}})


def read_batches(folder: Path, rank: int = 0) -> list[dict[str, Any]]:
    """The rows :class:`StepRecorder` wrote on ``rank``, in training order."""
    path = folder / f"batches.rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def step_losses(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Optimizer step -> the rank's loss of that step: the mean over its micro-batches (Lightning reports each
    micro-batch's loss divided by ``accumulate_grad_batches``, so the mean is their sum)."""
    losses: dict[int, float] = {}
    for row in rows:
        losses[row["step"]] = losses.get(row["step"], 0.0) + row["loss"]
    return losses


def step_windows(rows: list[dict[str, Any]]) -> dict[int, list[tuple[int, ...]]]:
    """Optimizer step -> the input windows the rank trained on in that step, sorted (a multiset of rows)."""
    windows: dict[int, list[tuple[int, ...]]] = {}
    for row in rows:
        windows.setdefault(row["step"], []).extend(tuple(w) for w in row["inputs"])
    return {step: sorted(ws) for step, ws in windows.items()}


def subprocess_env() -> dict[str, str]:
    """The environment of a training subprocess: this folder and the repository importable, no inherited ranks."""
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(Path(__file__).parent), env.get("PYTHONPATH")) if p)
    return env


def start_training(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``python -m lit_llm.train <args>`` from the repository root, stdout and stderr into the file ``log``.

    It leads a new session, so ``os.killpg(proc.pid, ...)`` reaches the rank processes it launches too. ``env`` adds
    to (or replaces) variables of :func:`subprocess_env`.
    """
    with open(log, "w", encoding="utf-8") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "lit_llm.train", *args], cwd=ROOT,
                                env={**subprocess_env(), **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
