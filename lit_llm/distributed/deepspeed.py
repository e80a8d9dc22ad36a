"""``lit_deepspeed_zero1/2/3`` and ``lit_deepspeed_zero3_offload``.

DeepSpeed is imported only when used, and a missing install is one error naming the extra to install. DeepSpeed's op
builder cannot parse an architecture suffix in ``TORCH_CUDA_ARCH_LIST`` (``9.0a``); it is removed for the run, with a
log line. ``model.optim.gradient_clip`` is passed to DeepSpeed, which clips inside its engine. DeepSpeed's bf16 overflow
check (a wait for the GPU at every step) is off; ``NonFiniteGuard`` stops a run whose engine applied a non-finite step
before anything from it is saved. The throughput timer does not wait for the GPU. The ZeRO-1/2 step's remaining reads
back to the host are replaced by the same arithmetic on the GPU (:func:`make_zero_step_sync_free`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import types
from typing import Any

import torch
from pytorch_lightning.strategies import (
    DeepSpeedStrategy,
)
from pytorch_lightning.utilities import rank_zero_info

from lit_llm.distributed.common import AtomicDirectorySave, refuse_cpu
from lit_llm.errors import ConfigError

DEEPSPEED_INSTALL = "pip install 'lit_llm[deepspeed]'"


class GPTDeepSpeedStrategy(AtomicDirectorySave, DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` with a lazy import of DeepSpeed, a sanitised ``TORCH_CUDA_ARCH_LIST``,
    ``model.optim.gradient_clip`` handed to DeepSpeed's engine, and atomic checkpoint directories."""

    strategy_name = "lit_deepspeed"

    def __init__(self, check_grad_overflow: bool = False, synchronized_timer: bool = False, **kwargs: Any) -> None:
        """
        Args:
            check_grad_overflow: Under bf16, DeepSpeed's check of every gradient for inf/NaN before each optimizer step
                (a step with one is skipped): one small kernel per gradient tensor, an all-reduce and a wait for the
                GPU at every step. ``false`` leaves non-finite values to lit_llm's ``NonFiniteGuard``, which checks
                the loss before the step and the engine's gradient norm after it, and stops the run before anything
                from such a step is saved. Ignored when the DeepSpeed config sets ``bf16.check_grad_overflow``.
            synchronized_timer: DeepSpeed's throughput timer (``timers.throughput.synchronized``, on by default in
                DeepSpeed) waits for the GPU when each forward starts and when each optimizer step ends, so that its
                own samples/s log is exact: two waits for the GPU at every step, which leave the GPU idle while the
                host prepares the next batch. ``false`` times on the host alone (its averages stay right once the
                host runs a step ahead); lit_llm's ``Throughput`` callback measures speed without either. Ignored
                when the DeepSpeed config sets ``timers.throughput.synchronized``.
            **kwargs: Lightning's ``DeepSpeedStrategy`` arguments (``stage``, ``offload_optimizer``, ``config``, ...).
        """
        self.check_grad_overflow = check_grad_overflow
        self.synchronized_timer = synchronized_timer
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                f"DeepSpeed (trainer.strategy) is not installed: {DEEPSPEED_INSTALL} (on a machine with CUDA), or use "
                "trainer.strategy=lit_fsdp, which needs nothing extra."
            )
        sanitize_cuda_arch_list()
        super().__init__(**kwargs)

    def setup_environment(self) -> None:
        refuse_cpu(self, "DeepSpeed")
        super().setup_environment()

    def setup(self, trainer: Any) -> None:
        # DeepSpeed clips inside its engine, from its config. Lightning fills that from trainer.gradient_clip_val only,
        # and may have done so already (with 0.0, no clipping) when it built the model under ZeRO stage 3's context.
        clip = trainer.gradient_clip_val or getattr(trainer.lightning_module, "hparams", {}).get("gradient_clip")
        if clip and not self.config.get("gradient_clipping"):
            self.config["gradient_clipping"] = float(clip)
        with contextlib.ExitStack() as stack:
            import warnings

            stack.enter_context(warnings.catch_warnings())
            # lit_llm's configure_gradient_clipping only serves the other strategies; the warning would mislead here.
            warnings.filterwarnings("ignore", message=r".*configure_gradient_clipping.*")
            super().setup(trainer)
        if make_zero_step_sync_free(getattr(self.deepspeed_engine, "optimizer", None)):
            rank_zero_info("DeepSpeed ZeRO: gradient norm and clipping run without waiting for the GPU")

    def _format_config(self) -> None:
        super()._format_config()  # Lightning adds the precision section ({"bf16": {"enabled": true}}) here
        set_bf16_overflow_check(self.config, self.check_grad_overflow)
        set_timer_sync(self.config, self.synchronized_timer)

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any | None = None) -> None:
        self._atomic_directory_save(super().save_checkpoint, checkpoint, filepath, storage_options)

    @property
    def offloads_optimizer(self) -> bool:
        zero = self.config.get("zero_optimization", {}) if isinstance(self.config, dict) else {}
        return bool(zero.get("offload_optimizer"))


def _mask_non_finite_(tensor: torch.Tensor, device: Any = None, val: float = -1.0) -> None:
    """DeepSpeed's ``mask_nan_or_inf_with_val_inplace`` (inf/NaN become ``val``) with ``val`` as a number: the original
    copies it to the GPU from pageable memory and fills with a GPU scalar, two waits for the GPU per call."""
    tensor.masked_fill_(~torch.isfinite(tensor), val)


def _unscale_and_clip_grads(self: Any, grad_groups_flat: list, total_norm: Any) -> None:
    """``DeepSpeedZeroOptimizer.unscale_and_clip_grads`` (DeepSpeed 0.19) kept on the GPU: the same scale,
    ``1 / (loss_scale * max(1, (norm / loss_scale + 1e-6) / clip))``, with a non-finite or negative (DeepSpeed's
    marker for non-finite) norm taken as infinite, without the original's ``bool`` of that test, a wait for the GPU."""
    if not torch.is_tensor(total_norm):
        return type(self).unscale_and_clip_grads(self, grad_groups_flat, total_norm)
    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return None
    scale: Any = self.loss_scale
    if self.clip_grad > 0.0:
        norm = total_norm.float()
        norm = torch.where(torch.isfinite(norm) & (norm >= 0), norm, torch.full_like(norm, float("inf")))
        scale = torch.clamp((norm / self.loss_scale + 1e-6) / self.clip_grad, min=1.0) * self.loss_scale
    for grad in grad_groups_flat:
        for part in grad if isinstance(grad, list) else [grad]:
            part.data.mul_(1.0 / scale)
    return None


def make_zero_step_sync_free(optimizer: Any) -> bool:
    """Take the host's waits for the GPU out of the optimizer step of DeepSpeed's ZeRO stage 1/2 optimizer (with
    ``check_grad_overflow`` off, the remaining ones: two per parameter group in its gradient-norm masking, one in its
    clipping). The arithmetic is DeepSpeed 0.19's; only where a number is read back to the host changes. Returns
    whether ``optimizer`` is one (nothing is changed otherwise, e.g. for ZeRO stage 3 or another DeepSpeed layout)."""
    try:
        from deepspeed.runtime.zero import stage_1_and_2
    except ImportError:
        return False
    zero_optimizer = getattr(stage_1_and_2, "DeepSpeedZeroOptimizer", None)
    if zero_optimizer is None or not isinstance(optimizer, zero_optimizer):
        return False
    if not callable(getattr(zero_optimizer, "unscale_and_clip_grads", None)):
        return False
    if callable(getattr(stage_1_and_2, "mask_nan_or_inf_with_val_inplace", None)):
        stage_1_and_2.mask_nan_or_inf_with_val_inplace = _mask_non_finite_
    optimizer.unscale_and_clip_grads = types.MethodType(_unscale_and_clip_grads, optimizer)
    return True


def set_bf16_overflow_check(config: dict[str, Any], check: bool) -> None:
    """Set DeepSpeed's ``bf16.check_grad_overflow`` to ``check`` in ``config`` when bf16 is enabled there and the
    config does not choose it already."""
    bf16 = config.get("bf16")
    if isinstance(bf16, dict) and bf16.get("enabled"):
        bf16.setdefault("check_grad_overflow", check)


def set_timer_sync(config: dict[str, Any], synchronized: bool) -> None:
    """Set DeepSpeed's ``timers.throughput.synchronized`` to ``synchronized`` in ``config`` unless the config chooses
    it already."""
    timers = config.setdefault("timers", {})
    if isinstance(timers, dict):
        throughput = timers.setdefault("throughput", {})
        if isinstance(throughput, dict):
            throughput.setdefault("synchronized", synchronized)


def sanitize_cuda_arch_list() -> None:
    """Drop architecture suffixes (``9.0a`` -> ``9.0``) from ``TORCH_CUDA_ARCH_LIST``, which DeepSpeed's op builder
    parses as plain ``major.minor`` numbers (``int('0a')`` fails when it compiles an op such as CPU Adam)."""
    value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not value:
        return
    cleaned = re.sub(r"(\d+\.\d+)[a-zA-Z]+", r"\1", value)
    if cleaned != value:
        os.environ["TORCH_CUDA_ARCH_LIST"] = cleaned
        rank_zero_info(f"TORCH_CUDA_ARCH_LIST={value!r} -> {cleaned!r} for DeepSpeed's op builder, which cannot "
                       "parse architecture suffixes")
