"""Training throughput of lit_llm's GPT: a plain PyTorch loop and the real ``python -m lit_llm.train fit`` path.

The plain loop runs the same model, loss, optimizer and precision as the Trainer path, with nothing else, so the
difference between the two is Lightning's (and lit_llm's callbacks') overhead as a measured number. The "ladder"
measures the plain loop from the book-faithful configuration (fp32, the book's explicit-mask attention, eager,
unfused AdamW, unpadded vocabulary) to the fastest, one change per rung.

Tokens/s exclude warm-up (compilation, autotuning, allocator growth): ``--warmup`` optimizer steps run first, then
``--steps`` are timed between two device synchronisations. MFU uses the PaLM formula (``6 N + 12 L d T`` FLOPs per
token, ``GPTModel.flops_per_token``) against the dense bf16 peak of lit_llm's table (989.4 TFLOP/s for H100/H200 SXM).

    python bench/throughput.py ladder --model gpt2-124m --batch 32 --json ladder.json
    python bench/throughput.py sweep --model gpt2-124m --json sweep.json   # options beside the top rung
    python bench/throughput.py plain --model gpt2-124m --batch 32 --precision bf16-mixed --compile true
    python bench/throughput.py trainer --model gpt2-124m --batch 32 --accumulate 16 \\
        --source corpus.txt --tokenizer gpt2_dir/ --json trainer.json

To see where the GPU waits, profile both paths: ``--trace-dir DIR`` records two plain-loop steps, and the
``ProfileWindow`` callback records ``fit`` steps; each writes ``trace.json`` (open it in Perfetto) and prints
``trace_summary``: the GPU's busy share and its longest idle gaps with what the host was running then.

    python bench/throughput.py compare ... --trace-dir plain_trace \
        '--trainer-arg=--trainer.callbacks+={"class_path": "bench.throughput.ProfileWindow",
                                             "init_args": {"folder": "fit_trace", "start_step": 25}}'
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU only for a smoke test of this script
sys.path.insert(0, str(ROOT))

from lit_llm.callbacks.throughput import get_peak_flops  # noqa: E402
from lit_llm.model.config import GPTConfig  # noqa: E402
from lit_llm.model.float8 import RECIPES as FLOAT8_RECIPES  # noqa: E402
from lit_llm.model.float8 import convert_to_float8  # noqa: E402
from lit_llm.model.gpt import GPTModel  # noqa: E402
from lit_llm.tasks.base import sdpa_backend_context  # noqa: E402
from lit_llm.tasks.optim import build_adamw, parameter_groups  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """One configuration of the training step."""

    name: str = "fast"
    precision: str = "bf16-mixed"  # 32-true | tf32 | bf16-mixed | bf16-true
    attention: str = "sdpa"  # sdpa | reference
    sdpa_backend: str = "auto"  # auto | flash | cudnn | efficient | math
    compile: str = "default"  # none | default | max-autotune | max-autotune-no-cudagraphs | reduce-overhead
    fused: bool = True
    pad_vocab_multiple: int = 64
    bias: bool = True
    qkv_bias: bool = True
    residual: str = "float32"  # float32 | autocast (the residual stream in bf16 under autocast)
    coordinate_descent: bool = False  # inductor's coordinate-descent tuning of the generated kernels
    loss_chunk: int = 0  # > 0: the head and its cross-entropy fused, this many tokens at a time (chunked_loss)
    fused_loss: bool = False  # the head's cross-entropy in lit_llm's Triton kernel (model.speed.fused_loss)
    # an FP8 recipe (tensorwise | rowwise): the blocks' Linear layers as FP8 matmuls (model.speed.float8)
    float8: str = ""
    float8_head: bool = False  # the output head in FP8 too (model.speed.float8_head)

    @property
    def compiled(self) -> bool:
        return self.compile != "none"


# From the book's chapter 5 model to the fastest: each rung changes one thing.
LADDER: list[tuple[str, dict[str, Any]]] = [
    ("book: fp32, explicit-mask attention, eager, AdamW", dict(precision="32-true", attention="reference",
                                                              compile="none", fused=False, pad_vocab_multiple=1)),
    ("+ TF32 matmuls", dict(precision="tf32")),
    ("+ fused attention (SDPA)", dict(attention="sdpa")),
    ("+ bf16 autocast", dict(precision="bf16-mixed")),
    ("+ torch.compile (model and loss)", dict(compile="default")),
    ("+ fused AdamW", dict(fused=True)),
    ("+ vocabulary padded to 50,304", dict(pad_vocab_multiple=64)),
    ("+ cuDNN attention", dict(sdpa_backend="cudnn")),
]
# Options measured beside the ladder's top rung (not kept by default: they change the model or its numerics).
EXTRAS: list[tuple[str, dict[str, Any]]] = [
    ("top rung, bf16-true (bf16 weights and AdamW state)", dict(precision="bf16-true")),
    ("top rung, bias-free layers", dict(bias=False, qkv_bias=False)),
    ("top rung, flash attention instead of cuDNN", dict(sdpa_backend="flash")),
    ("top rung, compile max-autotune (no CUDA graphs)", dict(compile="max-autotune-no-cudagraphs")),
]
# The speed sweep beside the top rung: (label, change, micro-batch).
SWEEP: list[tuple[str, dict[str, Any], int]] = [
    ("top rung", {}, 32),
    ("residual stream in bf16", dict(residual="autocast"), 32),
    ("top rung, batch 64", {}, 64),
    ("residual stream in bf16, batch 64", dict(residual="autocast"), 64),
    ("residual bf16, batch 64, coordinate-descent tuning", dict(residual="autocast", coordinate_descent=True), 64),
    ("residual bf16, batch 32, CUDA graphs (reduce-overhead)", dict(residual="autocast", compile="reduce-overhead"),
     32),
    ("bf16-true, batch 64", dict(precision="bf16-true"), 64),
    ("residual bf16, batch 64, chunked head loss (8192 tokens)", dict(residual="autocast", loss_chunk=8192), 64),
]


def model_config(name: str, v: Variant) -> GPTConfig:
    return GPTConfig.from_name(name).replace(
        drop_rate=0.0, qkv_bias=v.qkv_bias, bias=v.bias, tie_weights=True, pad_vocab_multiple=v.pad_vocab_multiple,
        attention=v.attention,
    )


def _set_matmul_precision(precision: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"


def plain_loop(model_name: str, v: Variant, batch: int, accumulate: int, steps: int, warmup: int,
               seq_len: int | None = None, trace_dir: str | None = None) -> dict[str, Any]:
    """Time ``steps`` optimizer steps of a plain PyTorch loop (after ``warmup`` untimed ones)."""
    device = torch.device(DEVICE)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    torch._dynamo.reset()
    import torch._inductor.config as inductor_config

    inductor_config.coordinate_descent_tuning = v.coordinate_descent
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _set_matmul_precision(v.precision)
    cfg = model_config(model_name, v)
    T = seq_len or cfg.context_length
    with device:
        model = GPTModel(cfg)
    if v.precision == "bf16-true":
        model = model.to(torch.bfloat16)
    model.autocast_residual = v.residual == "autocast"
    model.loss_chunk = v.loss_chunk or None
    model.fused_loss = v.fused_loss
    if v.float8:
        convert_to_float8(model, v.float8, head=v.float8_head)
    model.train()

    def model_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x, targets=y)

    step_fn = model_loss
    if v.compiled:
        step_fn = torch.compile(model_loss, mode=None if v.compile == "default" else v.compile)
    optimizer = build_adamw(parameter_groups(model, 0.1), 6e-4, (0.9, 0.95), 1e-8, fused=v.fused)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=v.precision == "bf16-mixed")
    # Batches come from pinned host memory like a DataLoader's, cycling through a few so nothing is cached.
    pool = [torch.randint(0, cfg.vocab_size, (batch, T + 1), dtype=torch.long) for _ in range(4)]
    if cuda:
        pool = [p.pin_memory() for p in pool]

    def one_step(i: int) -> torch.Tensor:
        for m in range(accumulate):
            ids = pool[(i * accumulate + m) % len(pool)].to(device, non_blocking=True)
            with autocast, sdpa_backend_context(v.sdpa_backend):
                loss = step_fn(ids[:, :-1], ids[:, 1:]) / accumulate
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    t_start = time.perf_counter()
    for i in range(warmup):
        one_step(i)
    _sync(device)
    warm_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    for i in range(steps):
        loss = one_step(warmup + i)
    _sync(device)
    elapsed = time.perf_counter() - t0
    tokens = steps * accumulate * batch * T
    tps = tokens / elapsed
    trace = None
    if trace_dir:
        folder = Path(trace_dir)
        folder.mkdir(parents=True, exist_ok=True)
        with torch.profiler.profile(with_stack=True) as prof:
            for i in range(2):
                one_step(warmup + steps + i)
            _sync(device)
        prof.export_chrome_trace(str(folder / "trace.json"))
        trace = trace_summary(folder / "trace.json")
        print("PROFILE plain", json.dumps(trace), flush=True)
    peak = get_peak_flops(_device_name(), "bf16" if v.precision.startswith("bf16") else v.precision)
    flops = model.flops_per_token(T)
    result = {
        "mode": "plain", "model": model_name, "variant": asdict(v), "batch": batch, "accumulate": accumulate,
        "seq_len": T, "steps": steps, "warmup_steps": warmup, "warmup_s": round(warm_s, 1),
        "tokens_per_sec": tps, "mfu_bf16_peak": flops * tps / 989.4e12,
        "mfu": flops * tps / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "final_loss": float(loss.detach()) * accumulate,
        "parameters": model.num_parameters(),
    }
    if trace is not None:
        result["trace"] = trace
    return result


def trace_summary(trace_file: str | Path, top: int = 12) -> dict[str, Any]:
    """GPU busy time of a Chrome trace written by ``torch.profiler``: the union of kernel / memcpy / memset intervals
    against the span from the first GPU event to the last, and the longest idle gaps with the host-side Python
    functions (``with_stack``) or operators that were running when each gap began."""
    events = json.loads(Path(trace_file).read_text())
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    gpu = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                 if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    if not gpu:
        return {"error": "no GPU events in the trace"}
    busy, gaps, (cur_s, cur_e) = 0.0, [], gpu[0]
    for s, e in gpu[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append((s - cur_e, cur_e))
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = gpu[-1][1] - gpu[0][0]
    host = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("python_function", "cpu_op",
                                                                          "user_annotation")]
    worst = []
    for length, start in sorted(gaps, reverse=True)[:top]:
        running = [e for e in host if e["ts"] <= start <= e["ts"] + e.get("dur", 0)]
        # The innermost few frames tell what the host was doing while the GPU waited.
        names = [e["name"] for e in sorted(running, key=lambda e: e.get("dur", 0))[:6]]
        worst.append({"gap_us": round(length, 1), "host": names})
    idle_by_size = {f">{t}us": round(sum(g for g, _ in gaps if g > t) / span, 4) for t in (10, 100, 1000)}
    return {"span_ms": round(span / 1e3, 2), "gpu_busy": round(busy / span, 4), "idle_fraction_in_gaps": idle_by_size,
            "gaps": len(gaps), "worst_gaps": worst, **kernel_breakdown(events, top)}


#: Kernel-name fragments (lower case) of each kind of GPU work, tried in this order; the rest is "other".
KERNEL_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("communication", ("nccl",)),
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "wgmma", "matmul")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("compiled (triton)", ("triton",)),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(p in low for p in parts)), "other")


def kernel_breakdown(events: list[dict[str, Any]], top: int = 12) -> dict[str, Any]:
    """GPU time by kind of work (matmul, attention, compiled Triton kernels, optimizer, communication, copies) and the
    ``top`` kernels by total time, from the events of a ``torch.profiler`` Chrome trace."""
    by_kind: dict[str, float] = {}
    by_name: dict[str, list[Any]] = {}  # name -> [microseconds, calls, kind]
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        dur, name = float(e.get("dur", 0)), e.get("name", "?")
        kind = "copies" if e["cat"] != "kernel" else kernel_kind(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + dur
        entry = by_name.setdefault(name, [0.0, 0, kind])
        entry[0] += dur
        entry[1] += 1
    total = sum(by_kind.values()) or 1.0
    kinds = {k: {"ms": round(v / 1e3, 3), "share": round(v / total, 4)}
             for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}
    kernels = [{"name": n[:120], "kind": kind, "ms": round(t / 1e3, 3), "calls": c, "share": round(t / total, 4)}
               for n, (t, c, kind) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]]
    return {"kernel_ms": round(total / 1e3, 3), "kernel_kinds": kinds, "top_kernels": kernels}


class ProfileWindow(pl.Callback):
    """A Lightning callback (``--trainer.callbacks+=bench.throughput.ProfileWindow``) that records ``steps`` optimizer
    steps with ``torch.profiler`` after ``warmup`` more from ``start_step``, and writes ``trace.json`` and
    ``trace_summary.json`` into ``folder`` (into ``folder/rank<N>`` on each rank of a multi-process run).

    It starts the profiler without waiting for the GPU, and records nothing during the ``warmup`` steps: starting the
    profiler costs the host time, and the host needs a step or two to run ahead of the GPU again, as it does in a run
    without a profiler. Recording from the first step instead shows the GPU waiting for a host that has just caught
    up, which the run being measured does not do (``HostLead`` measures how far ahead each rank's host is)."""

    def __init__(self, folder: str, start_step: int = 10, steps: int = 2, with_stack: bool = True,
                 warmup: int = 2) -> None:
        self.folder, self.start, self.steps, self.warmup = Path(folder), start_step, steps, warmup
        self.with_stack = with_stack
        self.prof: Any = None
        self._seen = -1  # the last optimizer step counted while recording

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.prof is None and trainer.global_step == self.start:  # once: global_step only grows
            schedule = torch.profiler.schedule(wait=0, warmup=self.warmup, active=self.steps, repeat=1)
            self.prof = torch.profiler.profile(with_stack=self.with_stack, schedule=schedule,
                                               on_trace_ready=lambda prof: self._write(trainer, prof))
            self.prof.__enter__()
            self._seen = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.prof is not None and trainer.global_step > self._seen:  # an optimizer step ended with this batch
            self._seen = trainer.global_step
            self.prof.step()  # the schedule counts optimizer steps, not micro-batches
            if trainer.global_step >= self.start + self.warmup + self.steps:
                self.prof.__exit__(None, None, None)
                self.prof = None

    def _write(self, trainer: pl.Trainer, prof: Any) -> None:
        folder = self.folder / f"rank{trainer.global_rank}" if trainer.world_size > 1 else self.folder
        folder.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(folder / "trace.json"))
        summary = trace_summary(folder / "trace.json")
        (folder / "trace_summary.json").write_text(json.dumps(summary, indent=1))
        print(f"PROFILE trainer rank {trainer.global_rank}", json.dumps(summary), flush=True)


class HostSyncs(pl.Callback):
    """A Lightning callback (``--trainer.callbacks+=bench.throughput.HostSyncs``) that lists every place where the
    host waits for the GPU during ``steps`` training batches from batch ``start``: PyTorch's CUDA sync debug mode
    warns at each such operation (``.item()``, a copy to or from pageable memory, ...), and this records the Python
    stack of each warning. Writes ``folder/host_syncs.rank<N>.json`` (count, message and stack of each place, most
    frequent first). A GPU training loop that lets the host run ahead has none."""

    def __init__(self, folder: str, start: int = 16, steps: int = 2) -> None:
        self.folder, self.start, self.steps = Path(folder), start, steps
        self.counts: dict[tuple[str, tuple[str, ...]], int] = {}
        self._show: Any = None
        self._filters: Any = None

    def _record(self, message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                line: Any = None) -> None:
        text = str(message)
        if "synchronizing" not in text:
            return self._show(message, category, filename, lineno, file, line)
        import traceback

        stack = tuple(f"{f.filename}:{f.lineno} {f.name}: {f.line}" for f in traceback.extract_stack()[-18:-2])
        key = (text.split("\n")[0][:120], stack)
        self.counts[key] = self.counts.get(key, 0) + 1
        return None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        import warnings

        if batch_idx == self.start and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
            self._show, self._filters = warnings.showwarning, list(warnings.filters)
            warnings.simplefilter("always")
            warnings.showwarning = self._record
            torch.cuda.set_sync_debug_mode("warn")
        elif batch_idx == self.start + self.steps and self._show is not None:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning, self._show = self._show, None
            warnings.filters[:] = self._filters  # the run's own warning filters again
            self.write(trainer.global_rank)

    def write(self, rank: int) -> Path:
        rows = [{"count": n, "message": m, "stack": list(s)}
                for (m, s), n in sorted(self.counts.items(), key=lambda kv: -kv[1])]
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"host_syncs.rank{rank}.json"
        path.write_text(json.dumps({"batches": self.steps, "waits": sum(r["count"] for r in rows), "places": rows},
                                   indent=1), encoding="utf-8")
        print(f"HOST SYNCS rank {rank}: {sum(r['count'] for r in rows)} waits over {self.steps} batches -> {path}",
              flush=True)
        return path


class HostLead(pl.Callback):
    """A Lightning callback (``--trainer.callbacks+=bench.throughput.HostLead``) that measures, without a profiler, how
    far each rank's host runs ahead of its GPU during ``steps`` training batches from optimizer step ``start_step``.

    At five points of every batch (its start, before and after the backward, before the optimizer step, its end) it
    reads the host's clock and records a CUDA event. After one synchronisation at the start, the GPU reaches each event
    ``lead`` ms after the host passed it: a lead near zero means the GPU waited for the host there (the host paces the
    step), a lead of tens of ms means the host is a step ahead. It also gives the host's and the GPU's time between
    consecutive points. Writes ``folder/rank<N>/host_lead.json`` (``folder`` alone on one device) and prints it."""

    POINTS = ("batch_start", "before_backward", "after_backward", "before_optimizer_step", "batch_end")

    def __init__(self, folder: str, start_step: int = 10, steps: int = 20, skip: int = 3) -> None:
        self.folder, self.start, self.steps, self.skip = Path(folder), start_step, steps, skip
        self.marks: list[tuple[int, str, float, Any]] = []
        self.batches = -1  # batches marked so far, -1 before the window
        self.h0, self.e0 = 0.0, None

    def _mark(self, point: str) -> None:
        if 0 <= self.batches < self.steps:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((self.batches, point, time.perf_counter(), event))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.batches == -1 and trainer.global_step >= self.start and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
            self.e0 = torch.cuda.Event(enable_timing=True)
            self.e0.record()
            self.h0, self.batches = time.perf_counter(), 0
        self._mark("batch_start")

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._mark("before_backward")

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mark("after_backward")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._mark("before_optimizer_step")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not 0 <= self.batches < self.steps:
            return
        self._mark("batch_end")
        self.batches += 1
        if self.batches == self.steps:
            self._write(trainer, pl_module)

    def summary(self) -> dict[str, Any]:
        """Per point: the lead (mean, smallest, median, in ms) over the batches after the first ``skip`` (which start
        from the synchronisation), and the host's and the GPU's mean ms since the point before it."""
        torch.cuda.synchronize()
        rows = [(b, point, 1e3 * (host - self.h0), self.e0.elapsed_time(event)) for b, point, host, event in self.marks]
        out: dict[str, Any] = {"batches": self.steps - self.skip, "points": {}}
        for i, point in enumerate(self.POINTS):
            kept = [r for r in rows if r[1] == point and r[0] >= self.skip]
            leads = sorted(gpu - host for _, _, host, gpu in kept)
            before = {r[0]: r for r in rows if r[1] == self.POINTS[i - 1]} if i else {
                r[0] + 1: r for r in rows if r[1] == self.POINTS[-1]}
            pairs = [(before[r[0]], r) for r in kept if r[0] in before]
            out["points"][point] = {
                "lead_ms_mean": round(sum(leads) / len(leads), 3),
                "lead_ms_min": round(leads[0], 3),
                "lead_ms_median": round(leads[len(leads) // 2], 3),
                "host_ms_since_previous": round(sum(r[2] - p[2] for p, r in pairs) / len(pairs), 3),
                "gpu_ms_since_previous": round(sum(r[3] - p[3] for p, r in pairs) / len(pairs), 3),
            }
        return out

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        summary = self.summary()
        folder = self.folder / f"rank{trainer.global_rank}" if trainer.world_size > 1 else self.folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "host_lead.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
        print(f"HOST LEAD rank {trainer.global_rank}", json.dumps(summary), flush=True)


class LightningStopCheck(pl.Callback):
    """A Lightning callback (``--trainer.callbacks+=bench.throughput.LightningStopCheck``) that puts back Lightning's
    own per-batch SIGTERM broadcast, which reads its result at once (a wait for the GPU at every batch), in place of
    lit_llm's :class:`~lit_llm.callbacks.signals.StopAgreement`: to measure what that wait costs."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loop = trainer.fit_loop.epoch_loop
        loop._broadcast_sigterm_tensor = type(loop)._broadcast_sigterm_tensor.__get__(loop)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"


def config_with_window(config: Path, window: int, out: Path) -> Path:
    """A copy of the run config ``config`` at ``out`` whose Throughput callback averages over ``window`` optimizer
    steps (one is added when the config has none), so ``--window`` sets the timed windows' length."""
    import yaml

    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    trainer = data.setdefault("trainer", {})
    callbacks = trainer["callbacks"] = trainer.get("callbacks") or []
    found = [c for c in callbacks if isinstance(c, dict) and str(c.get("class_path", "")).endswith("Throughput")]
    if not found:
        found = [{"class_path": "lit_llm.callbacks.Throughput"}]
        callbacks.extend(found)
    for c in found:
        c["init_args"] = {**(c.get("init_args") or {}), "window": window}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return out


def trainer_run(args: argparse.Namespace, v: Variant) -> dict[str, Any]:
    """Run ``python -m lit_llm.train fit`` with the shipped GPT-2 config and read the Throughput callback's summary."""
    root = Path(args.root) / f"trainer-{v.name}-{int(time.time())}"
    window = args.window
    config = config_with_window(ROOT / args.config, window, root / "config.yaml")
    cmd = [
        sys.executable, "-m", "lit_llm.train", "fit", "--config", str(config),
        f"--model.init_args.model.n_layers={model_config(args.model, v).n_layers}",
        f"--model.init_args.model.emb_dim={model_config(args.model, v).emb_dim}",
        f"--model.init_args.model.n_heads={model_config(args.model, v).n_heads}",
        f"--model.init_args.model.pad_vocab_multiple={v.pad_vocab_multiple}",
        f"--model.init_args.model.bias={str(v.bias).lower()}",
        f"--model.init_args.model.qkv_bias={str(v.qkv_bias).lower()}",
        f"--model.init_args.model.attention={v.attention}",
        "--model.init_args.speed.compile="
        + ('false' if not v.compiled else ('true' if v.compile == 'default' else v.compile)),
        f"--model.init_args.speed.sdpa_backend={v.sdpa_backend}",
        f"--model.init_args.optim.fused_adamw={str(v.fused).lower()}",
        f"--model.init_args.speed.low_precision_residual={str(v.residual == 'autocast').lower()}",
        *(["--model.init_args.speed.compile_options={coordinate_descent_tuning: true}"]
          if v.coordinate_descent else []),
        *([f"--model.init_args.speed.chunked_loss={v.loss_chunk}"] if v.loss_chunk else []),
        *(["--model.init_args.speed.fused_loss=true"] if v.fused_loss else []),
        *([f"--model.init_args.speed.float8={v.float8}"] if v.float8 else []),
        *(["--model.init_args.speed.float8_head=true"] if v.float8_head else []),
        "--model.init_args.optim.warmup_steps=5",
        f"--data.init_args.source={args.source}", "--data.init_args.sha256=null",
        f"--data.init_args.tokenizer={args.tokenizer}", "--data.init_args.split_by=tokens",
        "--data.init_args.val_split=0.001", f"--data.init_args.batch_size={args.batch}",
        f"--trainer.precision={'32-true' if v.precision == 'tf32' else v.precision}",
        f"--trainer.accumulate_grad_batches={args.accumulate}",
        f"--trainer.max_steps={(1 + args.windows) * window}",
        "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={root}",
    ]
    cmd += args.trainer_arg or []
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    found = sorted(root.rglob("throughput.json"))
    if proc.returncode != 0 or not found:
        tail = (proc.stdout + proc.stderr)[-4000:]
        return {"mode": "trainer", "variant": asdict(v), "error": f"exit {proc.returncode}", "log_tail": tail}
    summary = json.loads(found[-1].read_text())
    if "tokens_per_sec" not in summary:
        return {"mode": "trainer", "variant": asdict(v), "error": f"no timed window: {summary}",
                "log_tail": (proc.stdout + proc.stderr)[-2000:]}
    return {"mode": "trainer", "model": args.model, "variant": asdict(v), "batch": args.batch,
            "accumulate": args.accumulate, "wall_s": round(wall, 1), "command": " ".join(cmd[1:]), **summary}


def _print(r: dict[str, Any], label: str) -> None:
    if "error" in r:
        print(f"{label:55s} ERROR {r['error']}\n{r.get('log_tail', '')}", flush=True)
        return
    mfu = r.get("mfu") or r.get("mfu_bf16_peak") or 0.0
    print(f"{label:55s} {r['tokens_per_sec']:>11,.0f} tok/s  MFU {100 * mfu:5.1f}%  "
          f"peak {r.get('peak_memory_gib') or float('nan'):5.1f} GiB", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["ladder", "sweep", "plain", "trainer", "compare"],
                        help="ladder: every rung in the plain loop; sweep: the options beside the top rung (SWEEP); "
                             "plain/trainer: one variant; compare: the same variant through both paths")
    parser.add_argument("--model", default="gpt2-124m")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed optimizer steps first (plain loop)")
    parser.add_argument("--window", type=int, default=20,
                        help="trainer: optimizer steps per timed window (set on the config's Throughput callback)")
    parser.add_argument("--windows", type=int, default=2,
                        help="trainer: timed windows; one more runs first, untimed (compilation, warm-up)")
    parser.add_argument("--extras", action="store_true", help="ladder: also measure the EXTRAS options")
    for field in ("precision", "attention", "sdpa_backend", "compile", "residual"):
        parser.add_argument(f"--{field.replace('_', '-')}", dest=field)
    parser.add_argument("--fused", choices=["true", "false"])
    parser.add_argument("--bias", choices=["true", "false"])
    parser.add_argument("--coordinate-descent", action="store_true", help="inductor's coordinate-descent tuning")
    parser.add_argument("--loss-chunk", type=int, default=0,
                        help="the head and its cross-entropy fused, this many tokens at a time (0: plain head)")
    parser.add_argument("--fused-loss", action="store_true",
                        help="the head's cross-entropy in lit_llm's Triton kernel (softmax and gradient in one pass)")
    parser.add_argument("--float8", choices=FLOAT8_RECIPES,
                        help="the blocks' Linear layers as FP8 matmuls with this scaling recipe (torchao)")
    parser.add_argument("--float8-head", action="store_true", help="with --float8: the output head in FP8 too")
    parser.add_argument("--config", default="configs/pretrain/gpt2-124m.yaml")
    parser.add_argument("--source", help="trainer: corpus file")
    parser.add_argument("--tokenizer", default="gpt2", help="trainer: tokenizer directory or Hub name")
    parser.add_argument("--root", default="/tmp/lit_llm_bench")
    parser.add_argument("--trainer-arg", action="append", help="extra argument for lit_llm.train (repeatable)")
    parser.add_argument("--json", help="append the results (a JSON list) to this file")
    parser.add_argument("--trace-dir", help="plain/compare: also profile two steps of the plain loop and write "
                                            "trace.json and its GPU-idle summary here")
    args = parser.parse_args(argv)

    v = Variant()
    overrides = {k: getattr(args, k) for k in ("precision", "attention", "sdpa_backend", "compile", "residual")
                 if getattr(args, k)}
    if args.fused:
        overrides["fused"] = args.fused == "true"
    if args.bias:
        overrides["bias"] = overrides["qkv_bias"] = args.bias == "true"
    if args.coordinate_descent:
        overrides["coordinate_descent"] = True
    if args.loss_chunk:
        overrides["loss_chunk"] = args.loss_chunk
    if args.fused_loss:
        overrides["fused_loss"] = True
    if args.float8_head and not args.float8:
        parser.error("--float8-head needs --float8 (a recipe)")
    if args.float8:
        overrides["float8"] = args.float8
        overrides["float8_head"] = args.float8_head
    v = replace(v, **overrides)
    print(f"{_device_name()}  torch {torch.__version__}  {args.model} batch {args.batch} x "
          f"accumulate {args.accumulate}", flush=True)
    results = []
    if args.mode == "ladder":
        rung = Variant()
        for label, change in LADDER:
            rung = replace(rung, name=label, **change)
            gc.collect()
            results.append(r := plain_loop(args.model, rung, args.batch, args.accumulate, args.steps, args.warmup))
            _print(r, label)
        if args.extras:
            for label, change in EXTRAS:
                extra = replace(rung, name=label, **change)
                gc.collect()
                results.append(r := plain_loop(args.model, extra, args.batch, args.accumulate, args.steps, args.warmup))
                _print(r, label)
    if args.mode == "sweep":
        for label, change, batch in SWEEP:
            gc.collect()
            variant = replace(v, name=label, **change)
            results.append(r := plain_loop(args.model, variant, batch, args.accumulate, args.steps, args.warmup))
            _print(r, f"{label} (batch {batch})")
    if args.mode in ("plain", "compare"):
        results.append(r := plain_loop(args.model, v, args.batch, args.accumulate, args.steps, args.warmup,
                                       trace_dir=args.trace_dir))
        _print(r, f"plain loop: {v.precision} compile={v.compile} sdpa={v.sdpa_backend}")
    if args.mode in ("trainer", "compare"):
        if not args.source:
            parser.error("trainer mode needs --source (a corpus file)")
        results.append(r := trainer_run(args, v))
        _print(r, f"lit_llm.train fit: {v.precision} compile={v.compile} sdpa={v.sdpa_backend}")
    if args.mode == "compare" and "error" not in results[-1]:
        overhead = 1 - results[-1]["tokens_per_sec"] / results[-2]["tokens_per_sec"]
        print(f"Trainer path vs plain loop: {100 * overhead:+.1f}% slower", flush=True)
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.is_file() else []
        stamp = {"date": time.strftime("%Y-%m-%d"), "device": _device_name(), "torch": torch.__version__}
        path.write_text(json.dumps(old + [{**stamp, **r} for r in results], indent=1) + "\n")


if __name__ == "__main__":
    main()
