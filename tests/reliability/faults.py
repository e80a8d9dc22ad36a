"""Test-only fault injection and recording for the reliability tests (importable by the training subprocesses, which
get this folder on ``PYTHONPATH``).

Nothing here is part of lit_llm: the callbacks and the checkpoint IO are handed to ``python -m lit_llm.train`` through
``--trainer.callbacks`` / ``--trainer.plugins`` like any user class.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from lit_llm.callbacks.checkpoint import AtomicCheckpointIO
from lit_llm.train import cli, main

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "pretrain" / "quickstart.yaml"


# ---- recording ----------------------------------------------------------------------------------------------------
class LossLog(pl.Callback):
    """Append every training batch's loss (and the first window of the batch) to ``<folder>/losses.rank<r>.jsonl``;
    write this process's pid to ``<folder>/pid.rank<r>``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"pid.rank{trainer.global_rank}").write_text(str(os.getpid()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        row = {"step": trainer.global_step, "batch_idx": batch_idx, "epoch": trainer.current_epoch,
               "loss": float(loss.item()).hex(), "window": batch[0][0].tolist()}
        with open(self.folder / f"losses.rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def read_losses(folder: Path, rank: int = 0) -> list[dict[str, Any]]:
    """The rows :class:`LossLog` wrote, in order (one per training batch)."""
    path = folder / f"losses.rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def losses_by_batch(rows: list[dict[str, Any]]) -> dict[tuple[int, int], tuple[str, list[int]]]:
    """``(epoch, batch_idx) -> (loss, window)``: a micro-batch's identity, independent of where a run resumed."""
    return {(r["epoch"], r["batch_idx"]): (r["loss"], r["window"]) for r in rows}


class SaveLog(pl.Callback):
    """Record, for every checkpoint written, the optimizer step and whether the batch before it ended a step."""

    def __init__(self) -> None:
        self.saves: list[tuple[int, bool]] = []
        self._step_at_start = -1
        self._stepped = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._stepped = trainer.global_step != self._step_at_start

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saves.append((trainer.global_step, self._stepped))


# ---- faults -------------------------------------------------------------------------------------------------------
class SigtermAt(pl.Callback):
    """Send SIGTERM to this process at the end of a training batch after optimizer step ``step``; with ``mid_step``,
    at the first batch after it that is accumulated without a step (between the micro-batches of step ``step + 1``).
    With ``rank``, only that rank sends it (to itself)."""

    def __init__(self, step: int, mid_step: bool = False, rank: int | None = None) -> None:
        self.step, self.mid_step, self.rank, self.sent = step, mid_step, rank, False
        self._step_at_start = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stepped = trainer.global_step != self._step_at_start
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if not self.sent and trainer.global_step == self.step and stepped != self.mid_step:
            self.sent = True
            print(f"SIGTERM sent at step {trainer.global_step} batch {batch_idx}", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)


class NanLossAt(pl.Callback):
    """Make the loss of the first micro-batch of optimizer step ``step`` NaN on rank ``rank`` (in place, before its
    backward, so the gradients are NaN too)."""

    def __init__(self, step: int, rank: int = 0) -> None:
        self.step, self.rank, self.done = step, rank, False

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if not self.done and trainer.global_step == self.step and trainer.global_rank == self.rank:
            self.done = True
            print(f"NaN loss on rank {self.rank} at step {self.step}", flush=True)
            with torch.no_grad():
                loss.mul_(float("nan"))


class InfGradAt(pl.Callback):
    """Make one gradient entry of the first trainable parameter infinite during optimizer step ``step``'s backward, on
    every rank, with a tensor hook (so it also reaches gradients that an engine such as DeepSpeed's holds); the loss
    stays finite."""

    def __init__(self, step: int) -> None:
        self.step, self._handle = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self._handle is None:
            param = next(p for p in pl_module.parameters() if p.requires_grad)

            def poison(grad: torch.Tensor) -> torch.Tensor:
                grad = grad.clone()
                grad.view(-1)[0] = float("inf")
                return grad

            self._handle = param.register_hook(poison)
            print(f"inf gradient at step {self.step}", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._handle is not None and trainer.global_step > self.step:
            self._handle.remove()


class DieAt(pl.Callback):
    """Rank ``rank`` fails at the end of optimizer step ``step``: dies with ``os._exit(1)`` (``how="exit"``) or
    SIGKILL (``"sigkill"``), without any cleanup, or hangs with SIGSTOP (``"hang"``), alive but unresponsive."""

    def __init__(self, step: int, rank: int = 1, how: str = "exit") -> None:
        self.step, self.rank, self.how = step, rank, how

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            print(f"RANK {self.rank} DIES ({self.how}) at step {self.step}", flush=True)
            if self.how == "hang":
                os.kill(os.getpid(), signal.SIGSTOP)
            if self.how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(1)


class StallingIO(AtomicCheckpointIO):
    """``AtomicCheckpointIO`` whose save of the checkpoint of ``stall_at_step`` writes half of its bytes to the
    temporary file, prints ``STALLED <path>`` and hangs: a save that the test then kills with SIGKILL."""

    def __init__(self, stall_at_step: int) -> None:
        super().__init__()
        self.stall_at_step = stall_at_step

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if checkpoint.get("global_step") != self.stall_at_step:
            return super().save_checkpoint(checkpoint, path, storage_options)
        real_save = torch.save

        def half_then_hang(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            buffer = io.BytesIO()
            real_save(obj, buffer)
            f.write(buffer.getvalue()[: buffer.tell() // 2])
            f.flush()
            print(f"STALLED {path}", flush=True)
            time.sleep(600)

        torch.save = half_then_hang  # the real save path of AtomicCheckpointIO, up to the write
        try:
            super().save_checkpoint(checkpoint, path, storage_options)
        finally:
            torch.save = real_save


class FewSamples(pl.LightningDataModule):
    """A DataModule with too few training samples for one batch (``drop_last``): not lit_llm's own, whose loader
    checks this itself on one process, to reach the trainer-level check."""

    def __init__(self, samples: int = 3, batch_size: int = 4, context_length: int = 16) -> None:
        super().__init__()
        self.samples, self.batch_size, self.context_length = samples, batch_size, context_length

    @property
    def vocab_size(self) -> int:
        return 64

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        ids = torch.randint(0, self.vocab_size, (self.samples, self.context_length + 1))
        dataset = torch.utils.data.TensorDataset(ids[:, :-1], ids[:, 1:])
        return torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, drop_last=True)


# ---- running ------------------------------------------------------------------------------------------------------
TINY = [
    "--model.init_args.model.n_layers=2", "--model.init_args.model.emb_dim=32", "--model.init_args.model.n_heads=2",
    "--model.init_args.model.context_length=16", "--model.init_args.model.drop_rate=0.2",
    "--model.init_args.speed.compile=false", "--model.init_args.optim.warmup_steps=2",
    "--model.init_args.optim.schedule_steps=20",
]


def fit_args(root: Path, corpus: Path, max_steps: int, callbacks: list[dict[str, Any]], *extra: str,
             checkpoint: dict[str, Any] | None = None, batch_size: int = 6) -> list[str]:
    """``fit`` of the quickstart shrunk to a 2-layer GPT with dropout, shuffled, a ``Checkpoint`` every 5 steps (or
    with the ``checkpoint`` init args), plus the given callbacks (class paths of this module are importable in the
    subprocesses). Later ``extra`` arguments override earlier ones."""
    checkpoint = {"class_path": "lit_llm.callbacks.Checkpoint", "init_args": checkpoint or {
        "filename": "step={step:06d}", "auto_insert_metric_name": False, "every_n_train_steps": 5, "save_top_k": -1}}
    cbs = [{"class_path": "lit_llm.callbacks.RNGState"}, checkpoint, *callbacks]
    return [
        "fit", "--config", str(QUICKSTART), *TINY,
        f"--trainer.default_root_dir={root}", f"--trainer.max_steps={max_steps}", "--trainer.deterministic=true",
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0", "--trainer.callbacks=" + json.dumps(cbs),
        f"--data.init_args.source={corpus}", "--data.init_args.tokenizer_vocab_size=300",
        f"--data.init_args.batch_size={batch_size}", "--data.init_args.stride=24", "--data.init_args.num_workers=0",
        *extra,
    ]


def subprocess_env() -> dict[str, str]:
    """The environment of a training subprocess: this folder and the repository importable, no inherited ranks."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "PL_GLOBAL_SEED")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    return env


def train(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m lit_llm.train <args>`` in a subprocess, from the repository root."""
    return subprocess.run([sys.executable, "-m", "lit_llm.train", *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def start(args: list[str]) -> subprocess.Popen:
    """Start ``python -m lit_llm.train <args>`` with its stdout and stderr merged into one line-buffered pipe."""
    return subprocess.Popen([sys.executable, "-u", "-m", "lit_llm.train", *args], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)


def same_tree(a: Any, b: Any) -> bool:
    """Nested dicts / lists / tensors equal, tensors with ``torch.equal``."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
    return a == b


def training_state(ckpt_path: Path) -> dict[str, Any]:
    """The parts of a checkpoint that an exact resume must reproduce: weights, optimizer, schedule, step."""
    ckpt = torch.load(ckpt_path, weights_only=True)
    return {"state_dict": ckpt["state_dict"], "optimizer_states": ckpt["optimizer_states"],
            "lr_schedulers": ckpt["lr_schedulers"], "global_step": ckpt["global_step"]}


QUICK = "configs/pretrain/quickstart.yaml"


GUARD = "lit_llm.callbacks.guard.NonFiniteGuard"


def build(corpus: Path, root: Path, *extra: str) -> object:
    """The quickstart run shrunk to a 2-layer, 32-wide GPT on CPU; built but not run."""
    return cli([
        "--config", QUICK,
        "--model.init_args.model.n_layers=2", "--model.init_args.model.emb_dim=32",
        "--model.init_args.model.n_heads=2", "--model.init_args.model.context_length=32",
        "--model.init_args.model.drop_rate=0.0", "--model.init_args.speed.compile=false",
        "--model.init_args.optim.warmup_steps=2",
        f"--trainer.default_root_dir={root}", "--trainer.accelerator=cpu", "--trainer.devices=1",
        "--trainer.precision=32-true", "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
        "--trainer.logger=false",
        f"--data.init_args.source={corpus}", "--data.init_args.sha256=null", "--data.init_args.num_workers=0",
        "--data.init_args.tokenizer_vocab_size=300", "--data.init_args.batch_size=4",
        # The quickstart's checkpoint callback alone; each test adds the guard it needs.
        '--trainer.callbacks=[{"class_path": "lit_llm.callbacks.Checkpoint", "init_args": {'
        '"filename": "step={step:06d}", "auto_insert_metric_name": false, "every_n_train_steps": 300, '
        '"save_top_k": -1, "save_last": true}}]',
        *extra,
    ], run=False)


def fit(c: object, *callbacks: pl.Callback) -> None:
    # Test callbacks go first, so that they act before the guard in on_before_optimizer_step.
    c.trainer.checkpoint_callback._every_n_train_steps = 2  # the quickstart's Checkpoint, saving more often
    c.trainer.callbacks[:0] = list(callbacks)
    c.trainer.fit(c.model, datamodule=c.datamodule)


def write_pydoc_corpus(folder: Path, chars: int) -> Path:
    """The first ``chars`` characters of CPython's documentation (``builtin:pydoc``) as ``folder/corpus.txt``."""
    from lit_llm.data.builtin import load_builtin

    path = folder / "corpus.txt"
    path.write_text("\n\n".join(load_builtin("pydoc")["text"])[:chars], encoding="utf-8")
    return path


def one_line_error(capsys, args: list[str]) -> str:
    """Run ``main(args)``, expect exit status 1 and one ``error:`` line as the end of stderr; return that line."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 1
    err = capsys.readouterr().err  # (progress bars of `datasets` may come first)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1 and err.endswith(errors[0] + "\n"), err
    return errors[0]
