"""``python -m lit_llm.train {fit,validate,test,predict} --config configs/....yaml``

LightningCLI with omegaconf interpolation. Two values are linked so they cannot disagree: the tokenizer's
vocabulary size flows from the DataModule into the model, and the model's context length flows into the
DataModule's window length.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
from jsonargparse import Namespace
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from lit_llm import strategies as _strategies  # noqa: F401 - registers the lit_* strategy names
from lit_llm.callbacks.checkpoint import checkpoint_order, looks_complete, naming_unreadable_checkpoint
from lit_llm.callbacks.signals import REQUEUE_EXIT_CODE, stop_launched_processes
from lit_llm.errors import ConfigError, DataError, debugging, exit_with_error, find_user_error
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
    """LightningCLI that links tokenizer -> model and model -> data, and sets up lit_llm's default loggers.

    It also resolves ``--ckpt_path auto``, reports a damaged ``--ckpt_path`` file, a model vocabulary set smaller than
    the tokenizer's and a training loader without a batch as lit_llm errors, warns when the warmup spans the whole
    schedule, and stops the rank processes it launched when the run fails.
    """

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 - jsonargparse parser
        parser.link_arguments(
            "model.init_args.model", "data.init_args.context_length", compute_fn=_context_length, apply_on="parse"
        )
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the hyperparameters of --ckpt_path with a bare torch.load before anything else runs.
        subcommand = self.config.get("subcommand")
        with naming_unreadable_checkpoint(self.config[subcommand].get("ckpt_path") if subcommand else None):
            super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        # The link from the tokenizer replaces these at instantiation; remember what the user asked for.
        model_args = (config.get("model") or Namespace()).get("init_args") or Namespace()
        self._explicit_vocab = _explicit_vocab_sizes(model_args)
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

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        tokenizer_ids = getattr(self.datamodule, "vocab_size", None) if self.datamodule is not None else None
        if not isinstance(tokenizer_ids, int):
            return
        too_small = {key: n for key, n in getattr(self, "_explicit_vocab", {}).items() if n < tokenizer_ids}
        if too_small:
            settings = " and ".join(f"{key}={n}" for key, n in too_small.items())
            source = getattr(self.datamodule, "tokenizer_source", None)
            raise ConfigError(
                f"{settings} {'is' if len(too_small) == 1 else 'are'} smaller than the tokenizer's {tokenizer_ids} "
                f"token ids{f' (data.tokenizer={source!r})' if source else ''}: ids >= {min(too_small.values())} would "
                "index past the model's embedding. Remove the setting (the vocabulary size is linked from the "
                "tokenizer) or use a tokenizer with fewer ids."
            )

    def _run_subcommand(self, subcommand: str) -> None:  # LightningCLI's (private) runner of fit/validate/...
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if ckpt_path and Path(str(ckpt_path)).is_file() and isinstance(self.model, GPTTask):
            # Lightning sets trainer.ckpt_path only after configure_model; tell the task now, so that it does not read
            # model.init_weights (possibly deleted by now) just to have the checkpoint's weights replace them.
            self.model.resume_checkpoint = str(ckpt_path)
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            # Lightning's launcher stops the ranks it started only on Ctrl-C; after any other failure of rank 0 they
            # would be left behind as orphans, blocked in their next collective.
            stop_launched_processes(getattr(self, "trainer", None))
            raise

    def after_fit(self) -> None:
        _raise_if_nothing_trained(self.trainer)


def auto_checkpoint(root: Path) -> str | None:
    """``--ckpt_path auto``: the newest complete checkpoint in the run folder, or None (start fresh).

    ``last.ckpt`` wins; otherwise the ``*.ckpt`` with the highest ``step=N`` in its name, then the newest. Leftovers of
    an interrupted save (``*.ckpt.tmp``, not ``*.ckpt``) are ignored, and so, with a log line, are files that are
    empty or not a complete ``torch.save`` archive (truncated or overwritten).
    """
    # Directories are FSDP / DeepSpeed checkpoints; a consolidated file holds weights only and cannot resume.
    candidates = [p for p in root.glob("*.ckpt")
                  if (p.is_file() or p.is_dir()) and not p.name.endswith(".consolidated.ckpt")]
    broken = [p for p in candidates if not looks_complete(p)]
    for path in broken:
        rank_zero_info(f"--ckpt_path auto: skipping {path}, which is not a complete checkpoint (empty or truncated)")
    candidates = [p for p in candidates if p not in broken]
    if not candidates:
        rank_zero_info(f"--ckpt_path auto: no checkpoint in {root}: starting fresh")
        return None
    newest = max(candidates, key=lambda p: (p.name == "last.ckpt", checkpoint_order(p)))
    rank_zero_info(f"--ckpt_path auto: resuming from {newest}")
    return str(newest)


def _explicit_vocab_sizes(model_args: Namespace) -> dict[str, int]:
    """The vocabulary sizes the config sets by hand (the nested ``model.vocab_size`` only when not the default)."""
    from lit_llm.config import GPTConfig

    found = {}
    if isinstance(model_args.get("vocab_size"), int):
        found["model.vocab_size"] = model_args.vocab_size
    nested = model_args.get("model")
    nested_vocab = nested.get("vocab_size") if hasattr(nested, "get") else getattr(nested, "vocab_size", None)
    if isinstance(nested_vocab, int) and nested_vocab != GPTConfig().vocab_size:
        found["model.model.vocab_size"] = nested_vocab
    return found


def _raise_if_nothing_trained(trainer: pl.Trainer) -> None:
    """Lightning only logs "No training batches" when the training loader is empty on every rank; make it an error."""
    if trainer.num_training_batches != 0 or trainer.limit_train_batches == 0:
        return
    detail = ""
    loaders = getattr(trainer.fit_loop, "_combined_loader", None)
    loader = loaders.flattened[0] if loaders is not None and loaders.flattened else None
    dataset = getattr(loader, "dataset", None)
    if loader is not None and hasattr(dataset, "__len__"):
        detail = (f": {len(dataset)} training samples over {trainer.world_size} process(es) is "
                  f"{-(-len(dataset) // trainer.world_size)} per process, fewer than data.batch_size="
                  f"{loader.batch_size}")
    raise DataError(
        f"the training loader has no batch on any of the {trainer.world_size} process(es){detail}, so nothing was "
        "trained. Lower data.batch_size, use fewer devices, set data.drop_last=false, or add data."
    )


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
    """``python -m lit_llm.train``: run the CLI; a user mistake prints one ``error:`` line and exits with 1.

    A run stopped by SIGTERM (preemption; ``lit_llm.callbacks.Checkpoint`` saves at the end of the optimizer step)
    exits with ``REQUEUE_EXIT_CODE`` (75, ``EX_TEMPFAIL``), not with Lightning's 0, so a scheduler or a wrapper loop
    can tell it from a finished run and start it again with ``--ckpt_path auto``.
    """
    try:
        cli(args)
    except SIGTERMException:
        sys.exit(REQUEUE_EXIT_CODE)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is (or wraps) one of lit_llm's own errors
        user_error = find_user_error(e)
        if user_error is None or debugging():
            raise
        # One clear message, not a traceback through Lightning's internals (LIT_LLM_DEBUG=1 shows it).
        exit_with_error(user_error)


if __name__ == "__main__":
    main()
