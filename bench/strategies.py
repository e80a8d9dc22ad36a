"""Multi-GPU strategies measured through ``python -m lit_llm.train fit``: speed and scaling, memory, largest model.

Each cell is one real training run (its own processes), with the Throughput callback's summary (tokens/s per GPU
after a warm-up window, MFU, peak memory of rank 0) read back from ``throughput.json``. Cells that need fewer GPUs
than the machine has run side by side on disjoint GPUs, so one invocation measures a whole matrix.

    python bench/strategies.py speed   --source corpus.txt --tokenizer gpt2_dir/ --json speed.json
    python bench/strategies.py tune    --source corpus.txt --tokenizer gpt2_dir/ --json tune.json
    python bench/strategies.py memory  --source corpus.txt --tokenizer gpt2_dir/ --json memory.json
    python bench/strategies.py largest --source corpus.txt --tokenizer gpt2_dir/ --json largest.json
    python bench/strategies.py diagnose --source corpus.txt --tokenizer gpt2_dir/ --json diagnose.json
    python bench/strategies.py sharded --source corpus.txt --tokenizer gpt2_dir/ --json sharded.json
    python bench/strategies.py overlap --source corpus.txt --tokenizer gpt2_dir/ --json overlap.json
    python bench/strategies.py allreduce --json allreduce.json

- ``speed``: gpt2-124m, seq 1024, batch 32 per GPU, bf16-mixed, compiled (not under ZeRO-3): one GPU, DDP on 2 and 4,
  ZeRO-1/2 and FSDP on 4. Scaling efficiency = tokens/s per GPU / tokens/s of the one-GPU run.
- ``tune``: the speed cell under DDP's options (the compiled graph split at the gradient buckets, PyTorch's default;
  that with a static graph and 100 MB buckets; bf16 gradient all-reduce), FSDP's
  (forward prefetch; sharding only gradients and optimizer state) and FSDP2, each 4-GPU cell alone, after a one-GPU
  reference; then one GPU, DDP, ZeRO-2 and FSDP on 4 at the shipped config's micro-batch 64 x 8 accumulated
  (14 cells of about a minute each: split them over invocations with ``--only``).
- ``diagnose``: where DDP's and ZeRO-2's time goes at batch 32 (``diagnose_cells``), with profiles of every rank.
- ``sharded``: FSDP and ZeRO-2 presets against their former settings (FSDP's units per block or one for the whole
  model), and DDP against Lightning's per-batch SIGTERM broadcast, a bf16 all-reduce and the compiled graph split at
  the buckets, at batch 32 on the machine's 2 to 4 GPUs (``sharded_cells``): what the host-side costs of each
  strategy take.
- ``overlap``: DDP's all-reduce overlapping the backward (the compiled graph split at buckets of 100 and 200 MB, a
  static graph, a bf16 all-reduce), ZeRO-2 with ``overlap_comm``, and ``NonFiniteGuard`` reading its verdict a step
  later against before the step, on one GPU, DDP and ZeRO-2; then each GPU's own speed with all of them busy, DDP
  profiled on every rank, and NCCL's tree algorithm, protocols and an 8-SM limit; how far each rank's host runs ahead
  of its GPU (``HostLead``), with Lightning's launcher and with torchrun; every preset beside the others
  (``overlap_cells``; 32 cells of about a minute: split them over invocations with ``--only``).
- ``allreduce``: NCCL all-reduce of gpt2-124m's gradients on 2 and on all GPUs, float32 and bf16, one tensor and
  25 MB buckets: the communication that DDP adds to a step when nothing of it overlaps the backward.
- ``memory``: gpt2-1558m, seq 1024, batch 8 per GPU, eager: peak memory per GPU under each strategy on 2 GPUs.
- ``largest``: GPT-3-shaped presets (``gpt-6.7b``, ``gpt-13b``, ``gpt-20b``; seq 2048, batch 2 per GPU, activation
  checkpointing) under FSDP and ZeRO-3 on 2 and 4 GPUs, 20 optimizer steps each; a cell that runs out of memory is
  recorded as such.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_llm.model.config import PRESETS  # noqa: E402


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
    profile: bool = False  # after the timed windows, record two steps with torch.profiler (every rank)
    profile_stack: bool = True  # record Python stacks too (names the host code in idle gaps; slows the host)
    alone: bool = False  # hold every GPU of the machine while it runs, so nothing runs beside it
    env: dict[str, str] = field(default_factory=dict)  # set for the cell's processes (NCCL's tuning variables)
    host_lead: bool = False  # after the timed windows, measure how far each rank's host runs ahead of its GPU
    launcher: str = "lightning"  # or "torchrun": every rank a child of torchrun instead of rank 0 starting the others


#: lit_llm's strategy classes, named so that a cell can set their options (the presets' names cannot take any).
DDP_CLASS = "lit_llm.distributed.ddp.GPTDDPStrategy"
FSDP_CLASS = "lit_llm.distributed.fsdp.GPTFSDPStrategy"
DEEPSPEED_CLASS = "lit_llm.distributed.deepspeed.GPTDeepSpeedStrategy"
SPLIT_GRAPH = "--trainer.strategy.split_compiled_graph=true"
BF16_ALL_REDUCE = (
    "--trainer.strategy.ddp_comm_hook=torch.distributed.algorithms.ddp_comm_hooks.default_hooks.bf16_compress_hook")
WITH_GUARD = "--trainer.callbacks+=lit_llm.callbacks.NonFiniteGuard"


#: Batches that ``HostLead`` measures in a ``host_lead`` cell.
HOST_LEAD_STEPS = 20
#: Optimizer steps that a ``profile`` cell records, after ``PROFILE_WARMUP`` with the profiler on but not recording.
PROFILE_STEPS, PROFILE_WARMUP = 2, 2


def batch32(name: str, devices: int, strategy: str | None, *extra: str, **kw: Any) -> Cell:
    """A speed cell: GPT-2 124M at batch 32 per GPU without accumulation, compiled, three timed windows of 20 steps."""
    kw.setdefault("compile", True)
    return Cell(name, "gpt2-124m", devices, strategy, batch=32, window=20, windows=3, extra=list(extra), **kw)


def speed_cells() -> list[Cell]:
    c = batch32
    return [c("1 GPU", 1, None), c("DDP x2", 2, "lit_ddp"), c("DDP x4", 4, "lit_ddp"),
            c("ZeRO-2 x4", 4, "lit_deepspeed_zero2"), c("FSDP x4", 4, "lit_fsdp"),
            c("ZeRO-1 x4", 4, "lit_deepspeed_zero1"), c("ZeRO-3 x4", 4, "lit_deepspeed_zero3", compile=False)]


def tune_cells() -> list[Cell]:
    """The speed cell's settings under DDP's and FSDP's tuning options beside the presets, with a one-GPU reference,
    then the presets at the shipped config's accumulation. Each cell takes about a minute on an otherwise idle 4-GPU
    machine; to stay within a 10-minute window, run them in two invocations with ``--only``."""
    c, ddp, fsdp = batch32, DDP_CLASS, FSDP_CLASS

    def shipped(name: str, devices: int, strategy: str | None) -> Cell:
        # configs/pretrain/gpt2-124m.yaml as shipped: micro-batch 64, 8 micro-batches per optimizer step, so DDP
        # reduces gradients once per 8 forward/backward passes
        return Cell(name, "gpt2-124m", devices, strategy, batch=64, window=5, windows=3, compile=True, accumulate=8)

    return [
        c("1 GPU", 1, None),
        c("DDP x4", 4, "lit_ddp"),
        c("ZeRO-2 x4", 4, "lit_deepspeed_zero2"),
        c("FSDP x4", 4, "lit_fsdp"),
        c("DDP x4 compiled graph split at buckets", 4, ddp, SPLIT_GRAPH),
        c("DDP x4 static graph, 100 MB buckets", 4, ddp, SPLIT_GRAPH,
          "--trainer.strategy.static_graph=true", "--trainer.strategy.bucket_cap_mb=100"),
        c("DDP x4 bf16 gradient all-reduce", 4, ddp, BF16_ALL_REDUCE),
        c("FSDP x4 forward prefetch", 4, fsdp, "--trainer.strategy.forward_prefetch=true"),
        c("FSDP x4 shard grads and optimizer only", 4, fsdp, "--trainer.strategy.sharding_strategy=SHARD_GRAD_OP"),
        c("FSDP2 x4", 4, "lit_fsdp2"),
        shipped("1 GPU 64x8", 1, None),
        shipped("DDP x4 64x8", 4, "lit_ddp"),
        shipped("ZeRO-2 x4 64x8", 4, "lit_deepspeed_zero2"),
        shipped("FSDP x4 64x8", 4, "lit_fsdp"),
    ]


def diagnose_cells() -> list[Cell]:
    """Where DDP's and ZeRO-2's time goes at batch 32 without accumulation: the one-GPU run alone and four copies of it
    side by side (no communication, but four GPUs and their host processes busy at once), DDP without its gradient
    all-reduce (a hook that skips it), DDP with all gradients in one bucket, and DDP and ZeRO-2 each with two steps
    profiled on every rank after the timed windows (GPU time by kind of kernel, idle gaps)."""
    c, ddp = batch32, DDP_CLASS
    return [
        replace(c("1 GPU", 1, None), alone=True),
        *(c("1 GPU, four at once", 1, None) for _ in range(4)),
        c("DDP x4", 4, "lit_ddp"),
        c("DDP x4 without the gradient all-reduce", 4, ddp,
          "--trainer.strategy.ddp_comm_hook=torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks.noop_hook"),
        c("DDP x4 one 512 MB bucket", 4, ddp, "--trainer.strategy.bucket_cap_mb=512"),
        c("DDP x4 profiled", 4, "lit_ddp", profile=True),
        c("ZeRO-2 x4 profiled", 4, "lit_deepspeed_zero2", profile=True),
    ]


def sharded_cells(gpus: int = 4) -> list[Cell]:
    """FSDP and ZeRO-2 against DDP at batch 32 without accumulation on ``gpus`` GPUs (the machine's, 2 to 4), after a
    one-GPU reference alone: the presets, FSDP with its all-gathers rate-limited (PyTorch's default, which makes the
    host wait for the GPU every two units), ZeRO-2 with DeepSpeed's own defaults (its bf16 overflow check and
    ``overlap_comm`` on) and with its gradients not gathered into contiguous buffers, ZeRO-2 with the guard's
    per-step check, and ZeRO-2 and FSDP profiled on every rank (without Python stacks, which would slow the host
    they measure)."""
    fsdp, ds, ddp = FSDP_CLASS, DEEPSPEED_CLASS, DDP_CLASS
    n = max(2, min(gpus, 4))

    def c(name: str, strategy: str | None, *extra: str, devices: int = n, **kw: Any) -> Cell:
        return batch32(name.format(n=n), devices, strategy, *extra, profile_stack=False, **kw)

    return [
        replace(c("1 GPU", None, devices=1), alone=True),
        c("FSDP x{n}", "lit_fsdp"),
        c("FSDP x{n} one unit per block", fsdp, "--trainer.strategy.units=block"),
        c("FSDP x{n} the whole model one unit", fsdp, "--trainer.strategy.units=model"),
        c("FSDP x{n} one unit per block, all-gathers rate-limited", fsdp, "--trainer.strategy.units=block",
          "--trainer.strategy.limit_all_gathers=true"),
        c("ZeRO-2 x{n}", "lit_deepspeed_zero2"),
        c("ZeRO-2 x{n} DeepSpeed's defaults", ds, "--trainer.strategy.stage=2",
          "--trainer.strategy.check_grad_overflow=true", "--trainer.strategy.overlap_comm=true"),
        c("ZeRO-2 x{n} gradients not contiguous", ds, "--trainer.strategy.stage=2",
          "--trainer.strategy.overlap_comm=false", "--trainer.strategy.contiguous_gradients=false"),
        c("DDP x{n}", "lit_ddp"),
        c("DDP x{n} with Lightning's per-batch SIGTERM check", "lit_ddp",
          "--trainer.callbacks+=bench.throughput.LightningStopCheck"),
        c("DDP x{n} bf16 gradient all-reduce", ddp, BF16_ALL_REDUCE),
        c("DDP x{n} compiled graph split at buckets", ddp, SPLIT_GRAPH),
        c("ZeRO-2 x{n} with NonFiniteGuard", "lit_deepspeed_zero2", WITH_GUARD),
        c("ZeRO-2 x{n} profiled", "lit_deepspeed_zero2", profile=True),
        c("FSDP x{n} profiled", "lit_fsdp", profile=True),
    ]


def overlap_cells(gpus: int = 4) -> list[Cell]:
    """DDP with its compiled graph split at the gradient buckets (each bucket's all-reduce overlapping the rest of the
    backward) at several bucket sizes, with a static graph and with a bf16 all-reduce; ZeRO-2 with ``overlap_comm``;
    ``NonFiniteGuard`` reading its verdict a step later (its default for ``policy: stop`` on a GPU) against before the
    step; each GPU's own speed with the others busy, DDP profiled, NCCL's tuning variables, and DDP averaging each
    bucket inside the all-reduce; at batch 32 on the machine's 2 to 4 GPUs, after a one-GPU reference alone."""
    ddp, ds, guard, split = DDP_CLASS, DEEPSPEED_CLASS, WITH_GUARD, SPLIT_GRAPH
    guard_before = ("--trainer.callbacks+={'class_path': 'lit_llm.callbacks.NonFiniteGuard', "
                    "'init_args': {'check_before_step': true}}")
    n = max(2, min(gpus, 4))

    def c(name: str, strategy: str | None, *extra: str, devices: int = n, **kw: Any) -> Cell:
        return batch32(name.format(n=n), devices, strategy, *extra, **kw)

    def buckets(mb: int) -> str:
        return f"--trainer.strategy.bucket_cap_mb={mb}"

    return [
        replace(c("1 GPU", None, devices=1), alone=True),
        c("DDP x{n}", "lit_ddp"),
        c("DDP x{n} split, 100 MB buckets", ddp, split, buckets(100)),
        c("DDP x{n} split, 100 MB buckets, static graph", ddp, split, buckets(100),
          "--trainer.strategy.static_graph=true"),
        c("DDP x{n} split, 200 MB buckets", ddp, split, buckets(200)),
        c("DDP x{n} split, 100 MB buckets, bf16 all-reduce", ddp, split, buckets(100), BF16_ALL_REDUCE),
        c("ZeRO-2 x{n}", "lit_deepspeed_zero2"),
        c("ZeRO-2 x{n} overlap_comm", ds, "--trainer.strategy.stage=2", "--trainer.strategy.overlap_comm=true"),
        c("ZeRO-2 x{n} with NonFiniteGuard", "lit_deepspeed_zero2", guard),
        c("ZeRO-2 x{n} with NonFiniteGuard read before the step", "lit_deepspeed_zero2", guard_before),
        c("DDP x{n} with NonFiniteGuard", "lit_ddp", guard),
        c("DDP x{n} with NonFiniteGuard read before the step", "lit_ddp", guard_before),
        replace(c("1 GPU with NonFiniteGuard", None, guard, devices=1), alone=True),
        replace(c("1 GPU with NonFiniteGuard read before the step", None, guard_before, devices=1), alone=True),
        c("ZeRO-1 x{n}", "lit_deepspeed_zero1"),
        # Where the rest of DDP's step goes: each GPU's own speed with all four busy (the slowest paces DDP), every
        # rank's trace without Python stacks (time inside NCCL on the fast ranks is waiting for the slow one), and
        # NCCL's algorithm and its share of the GPU's SMs.
        *(c("1 GPU, four at once", None, devices=1) for _ in range(n)),
        c("DDP x{n} profiled", "lit_ddp", profile=True, profile_stack=False),
        c("DDP x{n} NCCL tree all-reduce", "lit_ddp", env={"NCCL_ALGO": "allreduce:tree"}),
        c("DDP x{n} NCCL at most 8 SMs", "lit_ddp", env={"NCCL_MAX_CTAS": "8"}),
        c("DDP x{n} split, 100 MB buckets, NCCL at most 8 SMs", ddp, split, buckets(100), env={"NCCL_MAX_CTAS": "8"}),
        # Which rank's host paces the step: each rank's lead over its GPU, with Lightning starting the ranks from
        # rank 0 and with torchrun starting them all.
        replace(c("1 GPU, host lead", None, devices=1, host_lead=True), alone=True),
        c("DDP x{n}, host lead", "lit_ddp", host_lead=True),
        c("DDP x{n} via torchrun, host lead", "lit_ddp", host_lead=True, launcher="torchrun"),
        c("ZeRO-2 x{n}, host lead", "lit_deepspeed_zero2", host_lead=True),
        c("ZeRO-1 x{n}, host lead", "lit_deepspeed_zero1", host_lead=True),
        # What DDP's step adds on the GPU once the host is a step ahead (the profiler warmed up first), and why a bf16
        # all-reduce (half the bytes) does not show in tokens/s; FSDP so that every preset is in one invocation.
        replace(c("1 GPU profiled", None, devices=1, profile=True, profile_stack=False), alone=True),
        c("DDP x{n} bf16 all-reduce, profiled", ddp, BF16_ALL_REDUCE, profile=True, profile_stack=False),
        c("FSDP x{n}", "lit_fsdp"),
        # NCCL's protocols (the profiles show it choosing LL, its low-latency one, for DDP's 25 MB buckets).
        c("DDP x{n} NCCL Simple protocol", "lit_ddp", env={"NCCL_PROTO": "Simple"}),
        c("DDP x{n} NCCL LL128 protocol", "lit_ddp", env={"NCCL_PROTO": "LL128"}),
        # Each bucket averaged by NCCL itself (ReduceOp.AVG) instead of DDP's division kernel before the sum.
        c("DDP x{n} averaged in the all-reduce", ddp, "--trainer.strategy.average_in_collective=true"),
        c("DDP x{n} averaged in the all-reduce, host lead", ddp, "--trainer.strategy.average_in_collective=true",
          host_lead=True),
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
    timed_steps = (1 + cell.windows) * cell.window
    after = (PROFILE_WARMUP + PROFILE_STEPS + 1) * cell.profile + (HOST_LEAD_STEPS + 1) * cell.host_lead
    text = ("trainer:\n  callbacks:\n    - class_path: lit_llm.callbacks.Throughput\n"
            f"      init_args:\n        window: {cell.window}\n")
    if cell.profile:  # after the last timed window, so the profiler's overhead is not in the measured tokens/s
        text += ("    - class_path: bench.throughput.ProfileWindow\n"
                 f"      init_args:\n        folder: {root / 'profile'}\n        start_step: {timed_steps}\n"
                 f"        steps: {PROFILE_STEPS}\n        warmup: {PROFILE_WARMUP}\n"
                 f"        with_stack: {str(cell.profile_stack).lower()}\n")
    if cell.host_lead:  # after the last timed window too: its one synchronisation is not in the measured tokens/s
        text += ("    - class_path: bench.throughput.HostLead\n"
                 f"      init_args:\n        folder: {root / 'host_lead'}\n        start_step: {timed_steps}\n"
                 f"        steps: {HOST_LEAD_STEPS}\n")
    callbacks.write_text(text, encoding="utf-8")
    launch = [sys.executable]
    if cell.launcher == "torchrun":
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cell.devices}"]
    elif cell.launcher != "lightning":
        raise ValueError(f"cell {cell.name!r}: launcher must be 'lightning' or 'torchrun', not {cell.launcher!r}")
    cmd = [*launch, "-m", "lit_llm.train", "fit", "--config", str(ROOT / "configs/pretrain/gpt2-124m.yaml"),
           "--config", str(callbacks),
           *(f"--model.init_args.model.{key}={shape[key]}" for key in ("emb_dim", "n_layers", "n_heads")),
           f"--model.init_args.model.context_length={shape['context_length']}",
           f"--model.init_args.speed.compile={str(cell.compile).lower()}",
           f"--model.init_args.speed.activation_checkpointing={str(cell.activation_checkpointing).lower()}",
           "--model.init_args.optim.warmup_steps=5",
           f"--data.init_args.source={args.source}", "--data.init_args.sha256=null",
           f"--data.init_args.tokenizer={args.tokenizer}", "--data.init_args.split_by=tokens",
           "--data.init_args.val_split=0.001", f"--data.init_args.batch_size={cell.batch}",
           "--trainer.accelerator=gpu", f"--trainer.devices={cell.devices}", "--trainer.precision=bf16-mixed",
           f"--trainer.accumulate_grad_batches={cell.accumulate}",
           f"--trainer.max_steps={timed_steps + after}",
           "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.enable_checkpointing=false",
           "--trainer.enable_progress_bar=false", "--trainer.logger=false", f"--trainer.default_root_dir={root}"]
    if cell.model.startswith("gpt-"):
        cmd.append("--model.init_args.model.tie_weights=false")  # the GPT-3-shaped presets are untied
    if cell.strategy is not None:
        cmd.append(f"--trainer.strategy={cell.strategy}")
    return cmd + cell.extra


_RUN_IDS = itertools.count()  # cells of one name may start within the same second (side-by-side copies)


class GPUPool:
    """Hands out disjoint sets of GPU indices in the order they are asked for; a cell waits until enough are free and
    every cell asked for before it has started."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.free = list(range(n))
        self.cond = threading.Condition()
        self._tickets = itertools.count()
        self._serving = 0

    def ticket(self) -> int:
        """A place in the queue, taken when a cell is submitted."""
        with self.cond:
            return next(self._tickets)

    def take(self, k: int, ticket: int) -> list[int]:
        with self.cond:
            self.cond.wait_for(lambda: self._serving == ticket and len(self.free) >= k)
            taken, self.free = self.free[:k], self.free[k:]
            self._serving += 1
            self.cond.notify_all()
            return taken

    def give(self, gpus: list[int]) -> None:
        with self.cond:
            self.free = sorted(self.free + gpus)
            self.cond.notify_all()


def run_cell(cell: Cell, args: argparse.Namespace, pool: GPUPool, ticket: int) -> dict[str, Any]:
    held = pool.take(pool.n if cell.alone else cell.devices, ticket)
    gpus = held[: cell.devices]
    root = Path(args.root) / f"{args.mode}-{cell.name.replace(' ', '_')}-{int(time.time())}-{next(_RUN_IDS)}"
    cmd = command(cell, args, root)
    env = {**__import__("os").environ, **cell.env, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.cell_timeout)
        rc, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, log = -1, f"timeout after {args.cell_timeout}s\n{(e.stdout or b'')[-3000:]!r}"
    finally:
        pool.give(held)
    wall = time.perf_counter() - t0
    record: dict[str, Any] = {"cell": asdict(cell), "gpus": gpus, "wall_s": round(wall, 1),
                              "command": " ".join(cmd[1:])}
    found = sorted(root.rglob("throughput.json"))
    if rc != 0 or not found:
        oom = "out of memory" in log.lower() or "OutOfMemoryError" in log
        record.update(error="out of memory" if oom else f"exit {rc}", log_tail=log[-4000:])
    else:
        record.update(json.loads(found[-1].read_text()))
    profiles = sorted((root / "profile").glob("**/trace_summary.json"))
    if profiles:
        record["profile"] = {p.parent.name: json.loads(p.read_text()) for p in profiles}
    leads = sorted((root / "host_lead").glob("**/host_lead.json"))
    if leads:
        record["host_lead"] = {p.parent.name: json.loads(p.read_text()) for p in leads}
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


def _allreduce_worker(rank: int, world: int, port: int, numel: int, bucket_mb: int, iters: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        flat = torch.randn(numel, dtype=dtype, device="cuda")
        size = flat.element_size()
        buckets = list(flat.split(bucket_mb * 2**20 // size))
        for layout, tensors in (("one tensor", [flat]), (f"{bucket_mb} MB buckets", buckets)):
            for _ in range(3):
                for t in tensors:
                    dist.all_reduce(t)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                for t in tensors:
                    dist.all_reduce(t)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / iters * 1e3
            nbytes = numel * size
            # NCCL's bus bandwidth of an all-reduce: bytes * 2 (n - 1) / n per unit time
            rows.append({"dtype": str(dtype).removeprefix("torch."), "layout": layout, "tensors": len(tensors),
                         "mbytes": round(nbytes / 2**20, 1), "ms": round(ms, 3),
                         "bus_gb_per_s": round(nbytes * 2 * (world - 1) / world / ms / 1e6, 1)})
    if rank == 0:
        Path(out).write_text(json.dumps(rows), encoding="utf-8")
    dist.destroy_process_group()


def allreduce_bench(model: str, devices: int, bucket_mb: int = 25, iters: int = 20) -> list[dict[str, Any]]:
    """The time of one all-reduce of ``model``'s gradients over ``devices`` GPUs (NCCL), float32 and bf16, as one
    tensor and in DDP-sized buckets one after another: the floor of what DDP adds to a step when nothing overlaps."""
    import tempfile

    import torch.multiprocessing as mp

    from lit_llm.model.config import GPTConfig
    from lit_llm.model.gpt import GPTModel

    shape = {k: PRESETS[model][k] for k in ("emb_dim", "n_layers", "n_heads", "context_length")}
    shape.update(tie_weights=True, pad_vocab_multiple=64)  # as configs/pretrain/gpt2-124m.yaml trains it
    with torch.device("meta"):
        numel = GPTModel(GPTConfig(**shape)).num_parameters()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "allreduce.json")
        mp.spawn(_allreduce_worker, args=(devices, 29400 + int(time.time()) % 500, numel, bucket_mb, iters, out),
                 nprocs=devices, join=True)
        rows = json.loads(Path(out).read_text())
    return [{"model": model, "devices": devices, "parameters": numel, **r} for r in rows]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["speed", "tune", "diagnose", "sharded", "overlap", "memory", "largest",
                                         "allreduce"])
    parser.add_argument("--source", help="corpus file (plain text); every mode but allreduce needs it")
    parser.add_argument("--tokenizer", default="gpt2", help="tokenizer directory or Hub name")
    parser.add_argument("--root", default="/tmp/lit_llm_bench_strategies")
    parser.add_argument("--only", action="append", help="run only the cells with this name (repeatable)")
    parser.add_argument("--cell-timeout", type=int, default=420)
    parser.add_argument("--json", help="write the results (a JSON list) to this file")
    args = parser.parse_args(argv)
    n = torch.cuda.device_count()
    meta = {"date": time.strftime("%Y-%m-%d"), "gpus": n,
            "device": torch.cuda.get_device_name(0) if n else "cpu", "torch": torch.__version__}
    if args.mode == "allreduce":
        if n < 2:
            parser.error("allreduce needs at least two CUDA GPUs")
        rows = [r for k in sorted({2, n}) for r in allreduce_bench("gpt2-124m", k)]
        if args.json:
            Path(args.json).write_text(json.dumps({"mode": "allreduce", **meta, "results": rows}, indent=2) + "\n",
                                       encoding="utf-8")
        for r in rows:
            print(f"{r['devices']} GPUs {r['dtype']:8s} {r['layout']:14s} {r['mbytes']:7.1f} MB  {r['ms']:7.3f} ms  "
                  f"bus {r['bus_gb_per_s']:6.1f} GB/s")
        return
    if not args.source:
        parser.error(f"{args.mode} needs --source (a corpus file)")
    cells = {"speed": speed_cells, "tune": tune_cells, "diagnose": diagnose_cells,
             "sharded": lambda: sharded_cells(n), "overlap": lambda: overlap_cells(n), "memory": memory_cells,
             "largest": largest_cells}[args.mode]()
    if args.only:
        cells = [c for c in cells if c.name in args.only]
    cells = [c for c in cells if c.devices <= n]
    pool = GPUPool(n)
    with ThreadPoolExecutor(max_workers=max(n, 1)) as ex:
        futures = []
        for cell in cells:  # submitted in order; a cell starts as soon as its GPUs are free
            futures.append(ex.submit(run_cell, cell, args, pool, pool.ticket()))
        results = []
        for future in futures:  # the JSON so far after each cell, so that a run cut short keeps what it measured
            results.append(future.result())
            if args.json:
                partial = {"mode": args.mode, **meta, "results": results, "partial": True}
                Path(args.json).write_text(json.dumps(partial, indent=2) + "\n", encoding="utf-8")
    add_scaling(results)
    out = {"mode": args.mode, **meta, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    for r in results:
        eff = f"  scaling {100 * r['scaling_efficiency']:.1f}%" if "scaling_efficiency" in r else ""
        print(f"{r['cell']['name']:24s} {_line(r)}{eff}")


if __name__ == "__main__":
    main()
