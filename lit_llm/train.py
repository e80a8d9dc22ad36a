"""``python -m lit_llm.train {fit,validate,test,predict} --config configs/....yaml``

LightningCLI with omegaconf interpolation. Two values are linked so they cannot disagree: the tokenizer's
vocabulary size flows from the DataModule into the model, and the model's context length flows into the
DataModule's window length.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import pytorch_lightning as pl
from jsonargparse import Namespace
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from lit_llm.errors import debugging, exit_with_error, find_user_error
from lit_llm.tasks.base import GPTTask

DEFAULT_ROOT = "checkpoints/run"


class _NoAdvertisements(logging.Filter):
    """Drop Lightning's "Tip: try installing <cloud service>" lines, which are noise in a training log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_NoAdvertisements())
# Emitted by Lightning's own pytree helper on every step with recent torch; nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")


class LitLLMCLI(LightningCLI):
    """LightningCLI that links tokenizer -> model and model -> data, and sets up lit_llm's default loggers."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 - jsonargparse parser
        parser.link_arguments(
            "model.init_args.model", "data.init_args.context_length", compute_fn=_context_length, apply_on="parse"
        )
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        if trainer.get("default_root_dir") is None:
            trainer.default_root_dir = DEFAULT_ROOT
        if config.get("ckpt_path") == "auto":
            config.ckpt_path = auto_checkpoint(Path(trainer.default_root_dir))
        if trainer.get("logger") in (None, True) and not trainer.get("fast_dev_run"):
            trainer.logger = default_loggers(trainer.default_root_dir)
        if self.subcommand == "predict":
            callbacks = list(trainer.get("callbacks") or [])
            if not any(str(cb.get("class_path", "")).endswith("PredictionWriter") for cb in callbacks):
                callbacks.append(Namespace(class_path="lit_llm.callbacks.PredictionWriter", init_args=Namespace()))
            trainer.callbacks = callbacks
        if trainer.get("enable_progress_bar") is False and trainer.get("callbacks"):
            # Lightning refuses a progress-bar callback together with enable_progress_bar=false; the flag wins.
            trainer.callbacks = [
                cb for cb in trainer.callbacks if not str(cb.get("class_path", "")).endswith("ProgressBar")
            ]


def auto_checkpoint(root: Path) -> str | None:
    """``--ckpt_path auto``: the newest complete checkpoint in the run folder, or None (start fresh).

    ``last.ckpt`` wins; otherwise the ``*.ckpt`` with the highest ``step=N`` in its name, then the newest. Empty
    files and temporary leftovers of an interrupted save (not named ``*.ckpt``) are ignored.
    """
    last = root / "last.ckpt"
    if last.is_file() and last.stat().st_size > 0:
        return str(last)
    candidates = [p for p in root.glob("*.ckpt") if p.is_file() and p.stat().st_size > 0]
    if not candidates:
        rank_zero_info(f"--ckpt_path auto: no checkpoint in {root}: starting fresh")
        return None

    def order(path: Path) -> tuple[int, float]:
        step = re.search(r"step=(\d+)", path.name)
        return (int(step.group(1)) if step else -1, path.stat().st_mtime)

    newest = max(candidates, key=order)
    rank_zero_info(f"--ckpt_path auto: resuming from {newest}")
    return str(newest)


def _context_length(model: Namespace | None) -> int:
    """``context_length`` of the parsed model config (jsonargparse nests a dataclass under ``init_args``)."""
    if model is None:
        from lit_llm.config import GPTConfig

        return GPTConfig().context_length
    values = model.get("init_args", model)
    return values.context_length


def default_loggers(root: str) -> list[Namespace]:
    """CSV and TensorBoard loggers sharing one folder per run: ``<root>/logs/version_N`` holds ``metrics.csv``,
    ``config.yaml``, the loss plot and samples; TensorBoard's event files go in its ``tensorboard/`` subfolder."""
    version = f"version_{next_version(Path(root) / 'logs')}"
    common = {"save_dir": root, "name": "logs", "version": version}
    return [
        Namespace(class_path="pytorch_lightning.loggers.CSVLogger", init_args=Namespace(**common)),
        Namespace(
            class_path="pytorch_lightning.loggers.TensorBoardLogger",
            init_args=Namespace(**common, sub_dir="tensorboard"),
        ),
    ]


def next_version(logs: Path) -> int:
    numbers = [int(m.group(1)) for p in logs.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return max(numbers, default=-1) + 1


def cli(args: list[str] | None = None, run: bool = True) -> LitLLMCLI:
    """Build (and by default run) the CLI; ``args`` replaces ``sys.argv[1:]`` (used by tests)."""
    return LitLLMCLI(
        GPTTask,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"default_root_dir": DEFAULT_ROOT},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def main(args: list[str] | None = None) -> None:
    try:
        cli(args)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is (or wraps) one of lit_llm's own errors
        user_error = find_user_error(e)
        if user_error is None or debugging():
            raise
        # One clear message, not a traceback through Lightning's internals (LIT_LLM_DEBUG=1 shows it).
        exit_with_error(user_error)


if __name__ == "__main__":
    main()
