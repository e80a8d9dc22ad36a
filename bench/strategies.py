"""Multi-GPU strategies measured through ``python -m lit_llm.train fit``: speed and scaling, memory, largest model.

Each cell is one real training run (its own processes), with the Throughput callback's summary (tokens/s per GPU
after a warm-up window, MFU, peak memory of rank 0) read back from ``throughput.json``. Cells that need fewer GPUs
than the machine has run side by side on disjoint GPUs, so one invocation measures a whole matrix.

    python bench/strategies.py speed   --source corpus.txt --tokenizer gpt2_dir/ --json speed.json
    python bench/strategies.py tune    --source corpus.txt --tokenizer gpt2_dir/ --json tune.json
    python bench/strategies.py memory  --source corpus.txt --tokenizer gpt2_dir/ --json memory.json
    python bench/strategies.py largest --source corpus.txt --tokenizer gpt2_dir/ --json largest.json

- ``speed``: gpt2-124m, seq 1024, batch 32 per GPU, bf16-mixed, compiled (not under ZeRO-3): one GPU, DDP on 2 and 4,
  ZeRO-1/2 and FSDP on 4. Scaling efficiency = tokens/s per GPU / tokens/s of the one-GPU run.
- ``tune``: the speed cell under DDP's options (the compiled graph split at the gradient buckets, PyTorch's default;
  that with a static graph and 100 MB buckets; bf16 gradient all-reduce), FSDP's
  (forward prefetch; sharding only gradients and optimizer state) and FSDP2, each 4-GPU cell alone, after a one-GPU
  reference; then one GPU, DDP, ZeRO-2 and FSDP on 4 at the shipped config's micro-batch 64 x 8 accumulated
  (14 cells of about a minute each: split them over invocations with ``--only``).
- ``memory``: gpt2-1558m, seq 1024, batch 8 per GPU, eager: peak memory per GPU under each strategy on 2 GPUs.
- ``largest``: GPT-3-shaped presets (``gpt-6.7b``, ``gpt-13b``, ``gpt-20b``; seq 2048, batch 2 per GPU, activation
  checkpointing) under FSDP and ZeRO-3 on 2 and 4 GPUs, 20 optimizer steps each; a cell that runs out of memory is
  recorded as such.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_llm.config import PRESETS  # noqa: E402


@dataclass
class Cell:
    name: str
    model: str
    devices: int
    strategy: str | None  # None: one device, no strategy
    batch: int
    window: int
    windows: int = 2
    compile: bool = False
    activation_checkpointing: bool = False
    accumulate: int = 1
    extra: list[str] = field(default_factory=list)


def speed_cells() -> list[Cell]:
    def c(name: str, devices: int, strategy: str | None, compile_: bool = True) -> Cell:
        return Cell(name, "gpt2-124m", devices, strategy, batch=32, window=20, windows=3, compile=compile_)

    return [c("1 GPU", 1, None), c("DDP x2", 2, "lit_ddp"), c("DDP x4", 4, "lit_ddp"),
            c("ZeRO-2 x4", 4, "lit_deepspeed_zero2"), c("FSDP x4", 4, "lit_fsdp"),
            c("ZeRO-1 x4", 4, "lit_deepspeed_zero1"), c("ZeRO-3 x4", 4, "lit_deepspeed_zero3", compile_=False)]


def tune_cells() -> list[Cell]:
    """The speed cell's settings under DDP's and FSDP's tuning options beside the presets, with a one-GPU reference,
    then the presets at the shipped config's accumulation. Each cell takes about a minute on an otherwise idle 4-GPU
    machine; to stay within a 10-minute window, run them in two invocations with ``--only``."""
    ddp = "lit_llm.strategies.GPTDDPStrategy"  # lit_ddp's class, so that its options can be set
    fsdp = "lit_llm.strategies.GPTFSDPStrategy"

    def c(name: str, devices: int, strategy: str | None, *extra: str) -> Cell:
        return Cell(name, "gpt2-124m", devices, strategy, batch=32, window=20, windows=3, compile=True,
                    extra=list(extra))

    def shipped(name: str, devices: int, strategy: str | None) -> Cell:
        # configs/pretrain/gpt2-124m.yaml as shipped: micro-batch 64, 8 micro-batches per optimizer step, so DDP
        # reduces gradients once per 8 forward/backward passes
        return Cell(name, "gpt2-124m", devices, strategy, batch=64, window=5, windows=3, compile=True, accumulate=8)

    return [
        c("1 GPU", 1, None),
        c("DDP x4", 4, "lit_ddp"),
        c("ZeRO-2 x4", 4, "lit_deepspeed_zero2"),
        c("FSDP x4", 4, "lit_fsdp"),
        c("DDP x4 compiled graph split at buckets", 4, ddp, "--trainer.strategy.split_compiled_graph=true"),
        c("DDP x4 static graph, 100 MB buckets", 4, ddp, "--trainer.strategy.split_compiled_graph=true",
          "--trainer.strategy.static_graph=true", "--trainer.strategy.bucket_cap_mb=100"),
        c("DDP x4 bf16 gradient all-reduce", 4, ddp,
          "--trainer.strategy.ddp_comm_hook=torch.distributed.algorithms.ddp_comm_hooks.default_hooks.bf16_compress_hook"),
        c("FSDP x4 forward prefetch", 4, fsdp, "--trainer.strategy.forward_prefetch=true"),
        c("FSDP x4 shard grads and optimizer only", 4, fsdp, "--trainer.strategy.sharding_strategy=SHARD_GRAD_OP"),
        c("FSDP2 x4", 4, "lit_fsdp2"),
        shipped("1 GPU 64x8", 1, None),
        shipped("DDP x4 64x8", 4, "lit_ddp"),
        shipped("ZeRO-2 x4 64x8", 4, "lit_deepspeed_zero2"),
        shipped("FSDP x4 64x8", 4, "lit_fsdp"),
    ]


def memory_cells() -> list[Cell]:
    def c(name: str, devices: int, strategy: str | None) -> Cell:
        return Cell(name, "gpt2-1558m", devices, strategy, batch=8, window=3, windows=1)

    return [c("1 GPU", 1, None), c("DDP x2", 2, "lit_ddp"), c("ZeRO-1 x2", 2, "lit_deepspeed_zero1"),
            c("ZeRO-2 x2", 2, "lit_deepspeed_zero2"), c("ZeRO-3 x2", 2, "lit_deepspeed_zero3"),
            c("FSDP x2", 2, "lit_fsdp")]


def largest_cells() -> list[Cell]:
    def c(model: str, devices: int, strategy: str) -> Cell:
        label = "FSDP" if "fsdp" in strategy else "ZeRO-3"
        return Cell(f"{model} {label} x{devices}", model, devices, strategy, batch=2, window=5, windows=3,
                    activation_checkpointing=True)

    return [c("gpt-6.7b", 2, "lit_fsdp"), c("gpt-6.7b", 2, "lit_deepspeed_zero3"),
            c("gpt-13b", 2, "lit_fsdp"), c("gpt-13b", 2, "lit_deepspeed_zero3"),
            c("gpt-13b", 4, "lit_fsdp"), c("gpt-13b", 4, "lit_deepspeed_zero3"),
            c("gpt-20b", 4, "lit_fsdp"), c("gpt-20b", 4, "lit_deepspeed_zero3")]


def command(cell: Cell, args: argparse.Namespace, root: Path) -> list[str]:
    shape = PRESETS[cell.model]
    callbacks = root / "callbacks.yaml"
    root.mkdir(parents=True, exist_ok=True)
    callbacks.write_text("trainer:\n  callbacks:\n    - class_path: lit_llm.callbacks.Throughput\n"
                         f"      init_args:\n        window: {cell.window}\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "lit_llm.train", "fit", "--config", str(ROOT / "configs/pretrain/gpt2-124m.yaml"),
           "--config", str(callbacks),
           *(f"--model.init_args.model.{key}={shape[key]}" for key in ("emb_dim", "n_layers", "n_heads")),
           f"--model.init_args.model.context_length={shape['context_length']}",
           f"--model.init_args.compile={str(cell.compile).lower()}",
           f"--model.init_args.activation_checkpointing={str(cell.activation_checkpointing).lower()}",
           "--model.init_args.warmup_steps=5",
           f"--data.init_args.source={args.source}", "--data.init_args.sha256=null",
           f"--data.init_args.tokenizer={args.tokenizer}", "--data.init_args.split_by=tokens",
           "--data.init_args.val_split=0.001", f"--data.init_args.batch_size={cell.batch}",
           "--trainer.accelerator=gpu", f"--trainer.devices={cell.devices}", "--trainer.precision=bf16-mixed",
           f"--trainer.accumulate_grad_batches={cell.accumulate}",
           f"--trainer.max_steps={(1 + cell.windows) * cell.window}",
           "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.enable_checkpointing=false",
           "--trainer.enable_progress_bar=false", "--trainer.logger=false", f"--trainer.default_root_dir={root}"]
    if cell.model.startswith("gpt-"):
        cmd.append("--model.init_args.model.tie_weights=false")  # the GPT-3-shaped presets are untied
    if cell.strategy is not None:
        cmd.append(f"--trainer.strategy={cell.strategy}")
    return cmd + cell.extra


class GPUPool:
    """Hands out disjoint sets of GPU indices; a cell waits until enough are free."""

    def __init__(self, n: int) -> None:
        self.free = list(range(n))
        self.cond = threading.Condition()

    def take(self, k: int) -> list[int]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.free) >= k)
            taken, self.free = self.free[:k], self.free[k:]
            return taken

    def give(self, gpus: list[int]) -> None:
        with self.cond:
            self.free = sorted(self.free + gpus)
            self.cond.notify_all()


def run_cell(cell: Cell, args: argparse.Namespace, pool: GPUPool) -> dict[str, Any]:
    gpus = pool.take(cell.devices)
    root = Path(args.root) / f"{args.mode}-{cell.name.replace(' ', '_')}-{int(time.time())}"
    cmd = command(cell, args, root)
    env = {**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.cell_timeout)
        rc, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, log = -1, f"timeout after {args.cell_timeout}s\n{(e.stdout or b'')[-3000:]!r}"
    finally:
        pool.give(gpus)
    wall = time.perf_counter() - t0
    record: dict[str, Any] = {"cell": asdict(cell), "gpus": gpus, "wall_s": round(wall, 1),
                              "command": " ".join(cmd[1:])}
    found = sorted(root.rglob("throughput.json"))
    if rc != 0 or not found:
        oom = "out of memory" in log.lower() or "OutOfMemoryError" in log
        record.update(error="out of memory" if oom else f"exit {rc}", log_tail=log[-4000:])
    else:
        record.update(json.loads(found[-1].read_text()))
    print(f"{cell.name:24s} {_line(record)}", flush=True)
    return record


def _line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"ERROR {r['error']} ({r['wall_s']} s)"
    parts = [f"{r.get('tokens_per_sec_per_device', float('nan')):>10,.0f} tok/s/GPU"]
    if "mfu" in r:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    if "peak_memory_gib" in r:
        parts.append(f"peak {r['peak_memory_gib']:.1f} GiB")
    return "  ".join(parts) + f"  ({r['wall_s']} s)"


def add_scaling(results: list[dict[str, Any]]) -> None:
    """Scaling efficiency of each measured cell: its tokens/s per GPU over the first measured one-GPU cell's with the
    same model, micro-batch and accumulation (a cell with no such reference gets none)."""

    def shape(r: dict[str, Any]) -> tuple[Any, ...]:
        return r["cell"]["model"], r["cell"]["batch"], r["cell"].get("accumulate", 1)

    measured = [r for r in results if "tokens_per_sec_per_device" in r]
    bases: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in measured:
        if r["cell"]["devices"] == 1:
            bases.setdefault(shape(r), r)
    for r in measured:
        base = bases.get(shape(r))
        if base is not None:
            r["scaling_efficiency"] = r["tokens_per_sec_per_device"] / base["tokens_per_sec_per_device"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["speed", "tune", "memory", "largest"])
    parser.add_argument("--source", required=True, help="corpus file (plain text)")
    parser.add_argument("--tokenizer", default="gpt2", help="tokenizer directory or Hub name")
    parser.add_argument("--root", default="/tmp/lit_llm_bench_strategies")
    parser.add_argument("--only", action="append", help="run only the cells with this name (repeatable)")
    parser.add_argument("--cell-timeout", type=int, default=420)
    parser.add_argument("--json", help="write the results (a JSON list) to this file")
    args = parser.parse_args(argv)
    cells = {"speed": speed_cells, "tune": tune_cells, "memory": memory_cells, "largest": largest_cells}[args.mode]()
    if args.only:
        cells = [c for c in cells if c.name in args.only]
    n = torch.cuda.device_count()
    cells = [c for c in cells if c.devices <= n]
    pool = GPUPool(n)
    with ThreadPoolExecutor(max_workers=max(n, 1)) as ex:
        futures = []
        for cell in cells:  # submitted in order; a cell starts as soon as its GPUs are free
            futures.append(ex.submit(run_cell, cell, args, pool))
            time.sleep(0.5)
        results = [f.result() for f in futures]
    add_scaling(results)
    meta = {"date": time.strftime("%Y-%m-%d"), "gpus": n,
            "device": torch.cuda.get_device_name(0) if n else "cpu", "torch": torch.__version__}
    out = {"mode": args.mode, **meta, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    for r in results:
        eff = f"  scaling {100 * r['scaling_efficiency']:.1f}%" if "scaling_efficiency" in r else ""
        print(f"{r['cell']['name']:24s} {_line(r)}{eff}")


if __name__ == "__main__":
    main()
