"""Tensor and pipeline parallelism measured through ``python -m lit_llm.train fit``, in one invocation:

    python bench/parallel.py --source corpus.txt --tokenizer gpt2_dir/ --json bench/results/parallel-<date>.json

on a machine with N >= 2 GPUs (4 or 8 for every cell; cells needing more GPUs than there are are left out). Sections
(``--only-section`` picks some):

- ``parity``: bf16-mixed losses of 20 optimizer steps of GPT-2 124M (dropout off, eager) under ``lit_tp`` x2,
  ``lit_pipeline`` x2 (1F1B) and x4, and ``lit_tp_fsdp`` x4 against one GPU at the same global batch: the largest
  per-step difference of the global loss.
- ``speed``: GPT-2 XL (1558M), seq 1024, the same tokens per GPU and step (8 x 1024), compiled and eager, on N GPUs:
  tokens/s per GPU and MFU under DDP, FSDP, ``lit_tp``, ``lit_pipeline`` (GPipe and 1F1B) and ``lit_tp_fsdp``.
- ``bubble``: ``lit_pipeline`` on N GPUs at 1, 2 and 4 micro-batches per stage, GPipe and 1F1B, against one GPU
  running the same micro-batches by accumulation: the measured idle share ``1 - (tokens/s per GPU) / (one GPU's)``
  beside the theory ``(p - 1) / (m + p - 1)`` (the measured share includes the activations' transfers).
- ``largest``: GPT-3-shaped models (6.7B, 13B, 20B; seq 2048, activation checkpointing) for 20 steps on N GPUs under
  FSDP alone, pipeline + FSDP (``data_parallel: shard``, 2 stages) and TP + FSDP (pairs): which train and which run
  out of memory.

Each cell is one training run (``bench/strategies.py``'s cells: the Throughput callback's summary after a warm-up
window). ``--cpu-smoke`` runs the parity section on a tiny model over gloo CPU processes, to check the plumbing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.strategies import Cell, GPUPool, add_scaling, run_cell  # noqa: E402
from lit_llm.distributed.pipeline import bubble_share  # noqa: E402

PIPELINE = "lit_llm.distributed.pipeline.GPTPipelineStrategy"
TENSOR = "lit_llm.distributed.tensor.GPTTensorParallelStrategy"
FSDP = "lit_llm.distributed.fsdp.GPTFSDPStrategy"
PARITY_STEPS = 20


class LossLog(pl.Callback):
    """Write every training batch's loss (rank 0, the value the task returns: the global loss of its model replica)
    to ``<folder>/losses.rank<r>.json`` at the end of training."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach().float()))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"losses.rank{trainer.global_rank}.json").write_text(json.dumps(self.losses))


def _loss_log(folder: Path) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": "bench.parallel.LossLog",
                                                 "init_args": {"folder": str(folder)}})


def parity_cells(n: int, out: Path, tiny: bool = False) -> list[Cell]:
    """One GPU (batch 16) against TP x2, pipeline x2 / x4 (batch 16 per replica) and 2-D x4 (batch 8 per pair)."""
    model, batch = ("tiny", 8) if tiny else ("gpt2-124m", 16)
    # The plain head everywhere (gpt2-124m.yaml's fused loss is turned off under the split strategies).
    common = ["--model.init_args.model.drop_rate=0.0", "--model.init_args.speed.fused_loss=false",
              "--model.init_args.optim.warmup_steps=2",
              f"--model.init_args.optim.schedule_steps={PARITY_STEPS}", "--trainer.deterministic=true"]

    def c(name: str, devices: int, strategy: str | None, per_replica: int, *extra: str) -> Cell:
        folder = out / "parity" / name.replace(" ", "_")
        return Cell(f"parity {name}", model, devices, strategy, batch=per_replica, window=5,
                    windows=PARITY_STEPS // 5 - 1, extra=[*common, *extra, _loss_log(folder)])

    cells = [c("1 GPU", 1, None, batch), c("TP x2", 2, "lit_tp", batch), c("pipeline x2", 2, "lit_pipeline", batch)]
    if n >= 4:
        cells += [c("pipeline x4", 4, "lit_pipeline", batch), c("TP+FSDP x4", 4, "lit_tp_fsdp", batch // 2)]
    return cells


def speed_cells(n: int) -> list[Cell]:
    """GPT-2 XL at 8 x 1024 tokens per GPU and step on ``n`` GPUs: a replica of ``k`` GPUs takes a batch of ``8 k``."""
    def c(name: str, strategy: str | None, per_replica: int, *extra: str, compile: bool = True) -> Cell:
        label = f"XL {name} x{n}" + ("" if compile else " eager")
        return Cell(label, "gpt2-1558m", n, strategy, batch=per_replica, window=10, windows=3, compile=compile,
                    extra=list(extra))

    pipe = [f"--trainer.strategy.microbatches={2 * n}"]
    cells = []
    for compiled in (True, False):
        cells += [
            c("DDP", "lit_ddp", 8, compile=compiled),
            c("FSDP", "lit_fsdp", 8, compile=compiled),
            c("TP", "lit_tp", 8 * n, compile=compiled),
            c("pipeline 1F1B", PIPELINE, 8 * n, *pipe, "--trainer.strategy.schedule=1f1b", compile=compiled),
            c("pipeline GPipe", PIPELINE, 8 * n, *pipe, "--trainer.strategy.schedule=gpipe", compile=compiled),
            c("TP+FSDP", "lit_tp_fsdp", 16, compile=compiled),
        ]
    return cells


def bubble_cells(n: int) -> list[Cell]:
    """Pipelines of ``n`` stages at ``m = n, 2n, 4n`` micro-batches of 4 windows, and one GPU accumulating ``m``
    micro-batches of 4 (the same matmuls, no bubble)."""
    cells = []
    for per_stage in (1, 2, 4):
        m = per_stage * n
        cells.append(Cell(f"bubble 1 GPU m={m}", "gpt2-1558m", 1, None, batch=4, window=5, windows=3,
                          accumulate=m))
        for schedule in ("gpipe", "1f1b"):
            cells.append(Cell(f"bubble {schedule} x{n} m={m}", "gpt2-1558m", n, PIPELINE, batch=4 * m, window=5,
                              windows=3, extra=[f"--trainer.strategy.microbatches={m}",
                                                f"--trainer.strategy.schedule={schedule}"]))
    return cells


def largest_cells(n: int) -> list[Cell]:
    """20 optimizer steps of each GPT-3-shaped model under FSDP, pipeline (2 stages) + FSDP and TP (pairs) + FSDP."""
    cells = []
    for model in ("gpt-6.7b", "gpt-13b", "gpt-20b"):
        for label, strategy, batch, extra in (
                ("FSDP", "lit_fsdp", 2, []),
                ("pipeline+FSDP", PIPELINE, 4, ["--trainer.strategy.pipeline_parallel_size=2",
                                                "--trainer.strategy.data_parallel=shard",
                                                "--trainer.strategy.microbatches=4"]),
                ("TP+FSDP", "lit_tp_fsdp", 4, [])):
            cells.append(Cell(f"largest {model} {label} x{n}", model, n, strategy, batch=batch, window=5, windows=3,
                              activation_checkpointing=True, extra=extra))
    return cells


def _folder(cell: Cell) -> Path | None:
    """Where the cell's ``LossLog`` writes, or None."""
    for a in cell.extra:
        if "LossLog" in a:
            return Path(json.loads(a.split("=", 1)[1])["init_args"]["folder"])
    return None


def _losses(cell: Cell, rank: int = 0) -> list[float] | None:
    folder = _folder(cell)
    path = folder / f"losses.rank{rank}.json" if folder else None
    return json.loads(path.read_text()) if path and path.is_file() else None


def add_parity(results: list[dict[str, Any]], cells: list[Cell]) -> None:
    """The largest per-step difference of each parity cell's loss from the one-GPU cell's."""
    by_name = {c.name: c for c in cells}
    reference = _losses(by_name["parity 1 GPU"]) if "parity 1 GPU" in by_name else None
    for r in results:
        cell = by_name.get(r["cell"]["name"])
        if cell is None or not cell.name.startswith("parity"):
            continue
        losses = _losses(cell)
        r["losses"] = losses
        if losses and reference and cell.name != "parity 1 GPU":
            if cell.strategy == "lit_tp_fsdp":
                # Ranks 0 and 2 hold the two pairs, each with half of the batch: the global loss is their mean.
                other = _losses(cell, 2)
                losses = [(a + b) / 2 for a, b in zip(losses, other)] if other else None
            if losses:
                steps = min(len(losses), len(reference))
                r["max_loss_diff_vs_1gpu"] = max(abs(a - b) for a, b in zip(losses[:steps], reference[:steps]))


def add_bubble(results: list[dict[str, Any]], n: int) -> None:
    base = {r["cell"]["accumulate"]: r for r in results
            if r["cell"]["name"].startswith("bubble 1 GPU") and "tokens_per_sec_per_device" in r}
    for r in results:
        name = r["cell"]["name"]
        if not name.startswith("bubble") or "1 GPU" in name or "tokens_per_sec_per_device" not in r:
            continue
        m = int(name.rsplit("m=", 1)[1])
        r["bubble_theory"] = bubble_share(n, m)
        if m in base:
            r["bubble_measured"] = 1 - r["tokens_per_sec_per_device"] / base[m]["tokens_per_sec_per_device"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="corpus file (plain text)")
    parser.add_argument("--tokenizer", default="gpt2", help="tokenizer directory or Hub name")
    parser.add_argument("--root", default="/tmp/lit_llm_bench_parallel")
    parser.add_argument("--only-section", action="append", choices=["parity", "speed", "bubble", "largest"])
    parser.add_argument("--cell-timeout", type=int, default=600)
    parser.add_argument("--json", help="write the results (a JSON object) to this file")
    parser.add_argument("--cpu-smoke", type=int, metavar="N", default=0,
                        help="run the parity section on a tiny model over N CPU processes (gloo): a plumbing check")
    args = parser.parse_args(argv)
    args.mode = "parallel"
    out = Path(args.root) / time.strftime("%Y%m%d-%H%M%S")
    n = args.cpu_smoke or torch.cuda.device_count()
    if n < 2:
        parser.error("needs at least 2 CUDA GPUs (or --cpu-smoke 2)")
    sections = args.only_section or ["parity", "speed", "bubble", "largest"]
    if args.cpu_smoke:
        sections = ["parity"]
    cells: list[Cell] = []
    if "parity" in sections:
        cells += parity_cells(n, out, tiny=bool(args.cpu_smoke))
    if "speed" in sections:
        cells += speed_cells(n)
    if "bubble" in sections:
        cells += bubble_cells(n)
    if "largest" in sections:
        cells += largest_cells(n)
    if args.cpu_smoke:
        cpu = ["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--data.init_args.num_workers=0",
               "--model.init_args.model.context_length=32", "--data.init_args.tokenizer=train",
               "--data.init_args.tokenizer_vocab_size=300", "--data.init_args.val_split=0"]
        cells = [Cell(c.name, c.model, c.devices, c.strategy, batch=c.batch, window=2, windows=PARITY_STEPS // 2 - 1,
                      extra=[*c.extra, *cpu]) for c in cells]
    cells = [c for c in cells if c.devices <= n]
    meta = {"date": time.strftime("%Y-%m-%d"), "gpus": torch.cuda.device_count(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "cpu_smoke": bool(args.cpu_smoke)}
    pool = GPUPool(n)
    results = []
    with ThreadPoolExecutor(max_workers=n) as ex:
        futures = [ex.submit(run_cell, cell, args, pool, pool.ticket()) for cell in cells]
        for future in futures:
            results.append(future.result())
            if args.json:
                Path(args.json).write_text(json.dumps({**meta, "results": results, "partial": True}, indent=2) + "\n")
    add_scaling(results)
    add_parity(results, cells)
    add_bubble(results, n)
    if args.json:
        Path(args.json).write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    for r in results:
        extra = []
        if "max_loss_diff_vs_1gpu" in r:
            extra.append(f"max loss diff {r['max_loss_diff_vs_1gpu']:.2e}")
        if "bubble_measured" in r:
            extra.append(f"idle {100 * r['bubble_measured']:.1f}% (theory {100 * r['bubble_theory']:.1f}%)")
        if "scaling_efficiency" in r:
            extra.append(f"scaling {100 * r['scaling_efficiency']:.1f}%")
        print(f"{r['cell']['name']:34s} {'ERROR ' + r['error'] if 'error' in r else ''} {'  '.join(extra)}")


if __name__ == "__main__":
    main()
