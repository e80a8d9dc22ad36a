"""What the strategy families share: questions about a strategy (is the model sharded? is it DeepSpeed ZeRO-3?
what gradient norm did DeepSpeed compute?), the refusal to run a GPU strategy on the CPU, and atomic saves of
checkpoint directories (written as ``<name>.tmp`` and renamed once every rank has finished)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from pytorch_lightning.strategies import (
    DeepSpeedStrategy,
    Strategy,
)

from lit_llm.errors import ConfigError
from lit_llm.weights.files import TMP_SUFFIX


def params_are_sharded(strategy: Any) -> bool:
    """Whether the strategy shards the weights over ranks (FSDP, FSDP2/ModelParallel, DeepSpeed ZeRO stage 3).

    Then every rank has to take part in each forward pass, because the full weights are gathered collectively.
    """
    names = [cls.__name__ for cls in type(strategy).__mro__]
    if any("FSDP" in n or n == "ModelParallelStrategy" for n in names):
        return True
    if any("DeepSpeed" in n for n in names):
        return is_zero3(strategy)
    return False


def is_deepspeed(strategy: Any) -> bool:
    return isinstance(strategy, DeepSpeedStrategy)


def engine_grad_norm(strategy: Any) -> Any:
    """The global gradient norm DeepSpeed's engine computed for its last step (a tensor or a number), or ``None``
    for other strategies and when the engine computed none (no clipping)."""
    get = getattr(getattr(strategy, "deepspeed_engine", None), "get_global_grad_norm", None)
    return get() if callable(get) else None


def is_zero3(strategy: Any) -> bool:
    """Whether the strategy is DeepSpeed ZeRO stage 3 (parameters partitioned as they are built, gathered in module
    hooks): Lightning's ``DeepSpeedStrategy.zero_stage_3``, False for any other strategy or none."""
    return bool(getattr(strategy, "zero_stage_3", False))


def refuse_cpu(strategy: Strategy, name: str) -> None:
    if strategy.root_device.type != "cuda":
        raise ConfigError(
            f"{name} (trainer.strategy) needs CUDA GPUs, but this run is on {strategy.root_device.type.upper()} "
            f"(trainer.accelerator). On the CPU, use trainer.strategy=ddp with trainer.devices=N for N processes, or "
            "remove the strategy line (and the configs/trainer/<strategy>.yaml --config) for one process."
        )


def replace_directory(tmp: Path, final: Path) -> None:
    """Put the complete directory ``tmp`` in place of ``final`` (a file or a directory, or absent)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    if final.is_dir() and not final.is_symlink():
        final.rename(old)  # a directory cannot be renamed over a non-empty one
    elif final.exists() or final.is_symlink():
        final.unlink()
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


class AtomicDirectorySave:
    """Mixin: a strategy whose checkpoint is a directory written by every rank saves it into ``<path>.tmp`` and renames
    it once all ranks have finished (the rename happens on global rank 0, between two barriers)."""

    def _atomic_directory_save(self, save: Any, checkpoint: dict, filepath: Any, storage_options: Any) -> None:
        path = Path(str(filepath))
        if "://" in str(filepath):
            save(checkpoint, filepath, storage_options)
            return
        tmp = path.with_name(path.name + TMP_SUFFIX)
        if self.is_global_zero and tmp.exists():  # type: ignore[attr-defined]
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        self.barrier("lit_llm.save.start")  # type: ignore[attr-defined]
        save(checkpoint, tmp, storage_options)
        self.barrier("lit_llm.save.written")  # type: ignore[attr-defined]
        if self.is_global_zero:  # type: ignore[attr-defined]
            if tmp.is_dir():
                replace_directory(tmp, path)
            elif tmp.is_file():  # a strategy configured to write one file (e.g. FSDP state_dict_type=full)
                os.replace(tmp, path)
        self.barrier("lit_llm.save.renamed")  # type: ignore[attr-defined]


