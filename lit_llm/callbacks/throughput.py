"""Training speed: tokens per second and model FLOPs utilisation (MFU), measured over windows of optimizer steps."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lit_llm.distributed import params_are_sharded
from lit_llm.errors import ConfigError
from lit_llm.model.gpt import GPTModel

# Dense (no 2:4 sparsity) peak FLOP/s of one device, from the vendors' datasheets and architecture whitepapers.
# "bf16"/"fp16" are tensor-core rates with fp32 accumulation (what training uses; GeForce cards run fp16
# accumulation at twice that), "tf32" the tensor-core rate for fp32 matmuls in TF32 mode, "fp32" the plain CUDA-core
# rate. A missing column means the chip has no such hardware path (V100 has no bf16 and no TF32).
# Names are matched as substrings of torch.cuda.get_device_name(), case-insensitively, FIRST MATCH WINS: keep the
# more specific names ("H200 NVL", "GH200", "A100", "L40S") above the names they contain ("H200", "A10", "L4").
_PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    # Hopper. H200 SXM has the H100 SXM's compute; GH200's GPU is an H100 SXM-class Hopper.
    ("GH200", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("H200 NVL", {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H200", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    # Per GPU (older datasheets quote the NVL pair).
    ("H100 NVL", {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51.2e12}),
    # The PCIe card reports "H100 PCIe"; SXM parts report e.g. "NVIDIA H100 80GB HBM3".
    ("H100", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    # Ampere. A100 SXM and PCIe share their tensor-core rates.
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    # AWS publishes no tensor rates for the A10G; these are the A10's, so the MFU shown on an A10G is a lower bound.
    ("A10G", {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    ("RTX 3090 Ti", {"bf16": 80e12, "fp16": 80e12, "tf32": 40e12, "fp32": 40e12}),
    ("RTX 3090", {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12}),
    # Ada
    ("L40S", {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("L40", {"bf16": 181e12, "fp16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    ("RTX 4090", {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    # Volta: no TF32 cores, so fp32 matmuls run at the CUDA-core rate whatever the TF32 setting.
    ("V100S", {"fp16": 130e12, "tf32": 16.4e12, "fp32": 16.4e12}),
    ("V100-PCIE", {"fp16": 112e12, "tf32": 14e12, "fp32": 14e12}),
    ("V100", {"fp16": 125e12, "tf32": 15.7e12, "fp32": 15.7e12}),
)


def _tf32_enabled() -> bool:
    """Whether fp32 matmuls on CUDA may run in TF32 (either of PyTorch's two switches turns it on)."""
    return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"


def _precision_column(precision: str) -> str | None:
    """Map a Lightning precision string (``"bf16-mixed"``, ``"16-mixed"``, ``"32-true"``...) or a column name
    (``"bf16"``, ``"fp16"``, ``"tf32"``, ``"fp32"``) to a column of the peak table; None for ``"64-true"`` and the
    like, which no table here covers."""
    p = str(precision).lower()
    if p in ("bf16", "fp16", "tf32", "fp32"):
        return p
    if p.startswith("bf16"):
        return "bf16"
    # Transformer Engine computes matmuls in fp8 but MFU is conventionally quoted against the 16-bit peak.
    if p == "transformer-engine":
        return "bf16"
    if p in ("16", "16-mixed", "16-true", "transformer-engine-float16"):
        return "fp16"
    if p in ("32", "32-true"):
        return "tf32" if _tf32_enabled() else "fp32"
    return None


def get_peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of one device at a precision, from lit_llm's own table.

    Args:
        device_name: What ``torch.cuda.get_device_name()`` returns, e.g. ``"NVIDIA H200"``; matched by substring.
        precision: A Lightning precision (``"bf16-mixed"``, ``"bf16-true"``, ``"16-mixed"``, ``"32-true"``) or a
            column name (``"bf16"``, ``"fp16"``, ``"tf32"``, ``"fp32"``). ``"32-true"`` counts as TF32 when
            ``torch.backends.cuda.matmul.allow_tf32`` is set or the float32 matmul precision is not ``"highest"``.

    Returns:
        FLOP/s, or None when the device or the precision is not in the table.
    """
    column = _precision_column(precision)
    if column is None:
        return None
    name = device_name.lower()
    for key, peaks in _PEAK_FLOPS:
        if key.lower() in name:
            return peaks.get(column)
    return None


class Throughput(pl.Callback):
    """Log training speed: tokens/s (global and per device), samples/s and, when the device's peak is known, MFU.

    Wall time is measured with ``time.perf_counter()`` over windows of ``window`` optimizer steps. The device is
    synchronised only at window boundaries and around validation, never per step, so measuring does not slow a GPU
    run. Left out of the windows: validation and what follows it up to the next training batch (such as checkpoint
    saving), and the seconds that other callbacks report in a ``throughput_excluded_seconds`` attribute (as
    :class:`~lit_llm.callbacks.SampleGeneration` does). The first window of each ``fit`` holds compilation and
    warm-up and is not reported.

    Tokens per batch are ``inputs.numel()`` on this rank times the world size (every rank sees batches of the same
    shape). MFU is ``flops_per_token(T) * tokens/s per device / peak``, with ``flops_per_token`` the model's
    PaLM-formula count (``6 N + 12 L d T``) for the batch's sequence length ``T``.

    Logged (straight to the Trainer's loggers at each window's end, so ``log_every_n_steps`` cannot drop them):
    ``perf/tokens_per_sec`` (also on the progress bar), ``perf/tokens_per_sec_per_device``, ``perf/samples_per_sec``,
    ``perf/sec_per_step`` and ``perf/mfu``. The same numbers are kept in ``history``.
    """

    def __init__(self, window: int = 20, peak_flops: float | None = None) -> None:
        """Measure throughput and MFU.

        Args:
            window: Optimizer steps per measurement. Larger windows average out step-to-step jitter.
            peak_flops: Dense peak FLOP/s of ONE device at the run's precision, used for MFU. None looks the GPU up
                in lit_llm's table (H100, H200, A100, A10G, L4, L40S, RTX 4090/3090, V100); on CPU, or a GPU not in
                the table, MFU is then not logged.
        """
        super().__init__()
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"Throughput(window={window!r}): window must be a positive number of optimizer steps")
        if peak_flops is not None and not (isinstance(peak_flops, (int, float)) and peak_flops > 0):
            raise ConfigError(
                f"Throughput(peak_flops={peak_flops!r}): peak_flops must be a positive FLOP/s figure per device "
                "(e.g. 989.4e12 for an H100 SXM in bf16), or None to look the GPU up"
            )
        self.window = window
        self.peak_flops = float(peak_flops) if peak_flops is not None else None
        self.history: list[dict[str, float]] = []  # every reported window of the current fit, for benchmarks
        self._peak: float | None = None
        self._sharded = False
        self._flops_cache: dict[int, float | None] = {}
        self._reset_window(None, 0)
        self._windows_done = 0

    # --- bookkeeping -------------------------------------------------------------------------------------------

    def _reset_window(self, t0: float | None, step: int, excluded: float = 0.0) -> None:
        self._started = t0 is not None
        self._t0 = t0  # start of the running stretch; None while paused (validation) or before the first batch
        self._elapsed = 0.0  # seconds banked from stretches before a pause
        self._excluded0 = excluded  # other callbacks' self-reported seconds at the window's start
        self._step0 = step
        self._tokens = 0
        self._samples = 0
        self._seq_len = 0

    @staticmethod
    def _excluded_seconds(trainer: pl.Trainer) -> float:
        # Callbacks that do heavy work between training steps (SampleGeneration) report its duration in
        # ``throughput_excluded_seconds``, so that work does not count as training time.
        return sum(float(getattr(cb, "throughput_excluded_seconds", 0.0)) for cb in trainer.callbacks)

    @staticmethod
    def _sync(trainer: pl.Trainer) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def _flops_per_token(self, pl_module: pl.LightningModule, seq_len: int) -> float | None:
        if seq_len not in self._flops_cache:
            model = getattr(pl_module, "model", None)
            flops = None
            if model is not None and hasattr(model, "flops_per_token"):
                if self._sharded and hasattr(model, "config"):
                    # Under FSDP / ZeRO-3 each rank holds only a shard, so counting its parameters would undercount:
                    # count them on a meta-device copy, which allocates nothing.
                    with torch.device("meta"):
                        model = GPTModel(model.config)
                flops = float(model.flops_per_token(seq_len))
            self._flops_cache[seq_len] = flops
        return self._flops_cache[seq_len]

    # --- hooks -------------------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.history = []
        self._windows_done = 0
        self._flops_cache = {}
        self._sharded = params_are_sharded(trainer.strategy)
        self._reset_window(None, trainer.global_step)
        self._peak = self.peak_flops
        device = trainer.strategy.root_device
        if self._peak is None and device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            self._peak = get_peak_flops(name, str(trainer.precision))
            if self._peak is None:
                rank_zero_warn(
                    f"Throughput: no peak FLOP/s known for {name!r} at precision {trainer.precision!r}, so perf/mfu is "
                    "not logged; pass Throughput(peak_flops=...) with the dense FLOP/s of one device to log it"
                )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._started:
            self._sync(trainer)
            self._reset_window(time.perf_counter(), trainer.global_step, self._excluded_seconds(trainer))
        elif self._t0 is None:
            # Back from validation: what ran since it started (validation, checkpoint saving) is not training time.
            self._sync(trainer)
            self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        if isinstance(inputs, torch.Tensor):
            self._tokens += inputs.numel()
            self._samples += inputs.shape[0] if inputs.dim() else 1
            self._seq_len = inputs.shape[-1] if inputs.dim() > 1 else 1
        if self._t0 is None or trainer.global_step - self._step0 < self.window:
            return
        self._sync(trainer)
        now = time.perf_counter()
        excluded = self._excluded_seconds(trainer)
        elapsed = self._elapsed + (now - self._t0) - (excluded - self._excluded0)
        steps = trainer.global_step - self._step0
        tokens, samples, seq_len = self._tokens, self._samples, self._seq_len
        self._reset_window(now, trainer.global_step, excluded)
        self._windows_done += 1
        if self._windows_done == 1 or elapsed <= 0 or tokens == 0:
            return  # the first window holds compilation and warm-up
        self._report(trainer, pl_module, elapsed, steps, tokens, samples, seq_len)

    def _report(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        elapsed: float,
        steps: int,
        tokens: int,
        samples: int,
        seq_len: int,
    ) -> None:
        world = max(trainer.world_size, 1)
        # Under tensor / pipeline parallelism the ranks of one model replica share a batch: count the replicas' data.
        replicas = getattr(trainer.strategy, "data_parallel_size", world)
        per_device = tokens * replicas / world / elapsed
        metrics = {
            "perf/tokens_per_sec": per_device * world,
            "perf/tokens_per_sec_per_device": per_device,
            "perf/samples_per_sec": samples * replicas / elapsed,
            "perf/sec_per_step": elapsed / steps,
        }
        flops = self._flops_per_token(pl_module, seq_len)
        if self._peak is not None and flops is not None:
            metrics["perf/mfu"] = flops * per_device / self._peak
        self.history.append({**metrics, "step": float(trainer.global_step), "seconds": elapsed,
                             "tokens": float(tokens * replicas)})
        # Progress bar only (logger=False): the loggers get every metric below at this exact step, whereas
        # pl_module.log would hand them over only on multiples of log_every_n_steps.
        pl_module.log(
            "perf/tokens_per_sec", torch.tensor(metrics["perf/tokens_per_sec"]), prog_bar=True, logger=False,
            on_step=True, on_epoch=False,
        )
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation is not training work: bank the time so far and restart the clock at the next training batch,
        # which also leaves out the checkpoint saving that Lightning runs after validation.
        if self._t0 is not None and not trainer.sanity_checking:
            self._sync(trainer)
            self._elapsed += time.perf_counter() - self._t0
            self._t0 = None

    def summary(self, trainer: pl.Trainer) -> dict[str, Any]:
        """Averages over the reported windows of this fit (time-weighted: total tokens / total seconds)."""
        out: dict[str, Any] = {"windows": len(self.history), "window_steps": self.window,
                               "world_size": trainer.world_size, "precision": str(trainer.precision)}
        if self.history:
            seconds = sum(h["seconds"] for h in self.history)
            out["tokens_per_sec"] = sum(h["tokens"] for h in self.history) / seconds
            out["tokens_per_sec_per_device"] = out["tokens_per_sec"] / max(trainer.world_size, 1)
            mfus = [h["perf/mfu"] for h in self.history if "perf/mfu" in h]
            if mfus:
                out["mfu"] = sum(mfus) / len(mfus)
        device = trainer.strategy.root_device
        if device.type == "cuda":
            out["device"] = torch.cuda.get_device_name(device)
            out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        return out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        summary = self.summary(trainer)
        if "tokens_per_sec" in summary:
            line = f"Throughput: {summary['tokens_per_sec']:,.0f} tokens/s over {summary['windows']} windows"
            if "mfu" in summary:
                line += f", MFU {100 * summary['mfu']:.1f}%"
            if "peak_memory_gib" in summary:
                line += f", peak memory {summary['peak_memory_gib']:.1f} GiB"
            rank_zero_info(f"{line} (windows of {self.window} steps; the first, with warm-up, excluded)")
        # trainer.log_dir is a collective call under DDP (it broadcasts rank 0's path): every rank must make it.
        log_dir = trainer.log_dir or trainer.default_root_dir
        if trainer.is_global_zero:
            # Machine-readable record of the run's speed (bench/throughput.py reads it).
            path = Path(log_dir) / "throughput.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
