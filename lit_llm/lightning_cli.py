"""The LightningCLI behind ``python -m lit_llm.train`` / ``lit-llm fit|validate|test|predict``.

LightningCLI with omegaconf interpolation. Two values are linked so they cannot disagree: the tokenizer's
vocabulary size flows from the DataModule into the model, and the model's context length flows into the
DataModule's window length. Its parser takes no abbreviated flags (``--trainer.max_step`` is refused, not read as
``max_steps``), and every way a run can end is one exit status (:func:`run_training`): 0 done, 1 a user mistake (one
``error:`` line), 2 a usage mistake (one ``error:`` line), 75 stopped by SIGTERM (resume it), 130 Ctrl-C.
A ``--config`` that names no file is looked up among the configs shipped inside the package
(:func:`lit_llm.shipped.resolve_config`), so ``--config pretrain/quickstart`` works without a checkout.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import pytorch_lightning as pl
from jsonargparse import Namespace
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.utilities.exceptions import SIGTERMException

import lit_llm.distributed  # noqa: F401 - registers the lit_* strategy names
from lit_llm.callbacks.signals import REQUEUE_EXIT_CODE, stop_launched_processes
from lit_llm.cli import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, print_error
from lit_llm.diagnose import diagnose
from lit_llm.errors import ConfigError, DataError, UsageError, debugging, find_user_error
from lit_llm.shipped import resolve_config_args
from lit_llm.tasks.base import GPTTask
from lit_llm.weights.discovery import auto_checkpoint, check_checkpoint_path
from lit_llm.weights.pickled import check_sharded_directory
from lit_llm.weights.remote import read_as_data

DEFAULT_ROOT = "checkpoints/run"


class _NoAdvertisements(logging.Filter):
    """Drop Lightning's "Tip: try installing <cloud service>" lines, which are noise in a training log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_NoAdvertisements())
# Emitted by Lightning's own pytree helper on every step with recent torch; nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")
# cli() passes the command line as `args` once shipped config names are resolved in it; that is intended.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")


#: Classes that were renamed, so that an old config gets the new name in its error.
RENAMED = {
    "ClassifierModule": "lit_llm.tasks.ClassifyTask",
    "InstructModule": "lit_llm.tasks.InstructTask",
    "ClassificationDataModule": "lit_llm.data.ClassifyDataModule",
    "InstructionDataModule": "lit_llm.data.InstructDataModule",
}


class StrictArgumentParser(LightningArgumentParser):
    """LightningCLI's parser without prefix matching, raising instead of printing the usage and exiting, so that
    :func:`run_training` reports a mistake as one line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("exit_on_error", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Add the closest known flag to "unrecognized arguments" (``--trainer.max_step`` -> ``max_steps``)."""
        wanted = message.startswith("unrecognized arguments") and "did you mean" not in message
        unknown = re.findall(r"(--[\w.-]+)", message) if wanted else []
        known = [option for option in self._option_string_actions if option.startswith("--")]
        hints = []
        for flag in unknown:
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.8)
            if close and flag not in known:
                hints.append(f"{flag} is not an option; did you mean {close[0]}?")
        super().error(f"{message} ({'; '.join(hints)})" if hints else message, ex)


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
        parser.add_argument(
            "--overwrite", type=bool, default=False,
            help="fit: start a fresh run in a folder that already holds a run's checkpoints; they are moved into "
                 "<folder>/replaced-<time>/ (nothing is deleted). Without it such a fit is refused: resume the run "
                 "with --ckpt_path last instead, or use another --trainer.default_root_dir.",
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would replace the command line's model settings by the hyperparameters saved in a --ckpt_path
        # file (model shape, learning rate, task class...), silently. lit_llm keeps what was given: the task compares
        # it with the checkpoint when it is restored, applies what a resume may change and refuses the rest
        # (lit_llm.tasks.resume). Here only the path itself is checked: a missing file, a folder that is not a
        # sharded checkpoint, an unreadable or truncated file is one error line.
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        read_as_data(self.config[subcommand])  # an https URL becomes a verified local copy, read weights-only
        path = self.config[subcommand].get("ckpt_path")
        if path and path not in _CKPT_PATH_WORDS:
            check_checkpoint_path(str(path))

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        # The link from the tokenizer replaces these at instantiation; remember what the user asked for.
        model_args = (config.get("model") or Namespace()).get("init_args") or Namespace()
        self._explicit_vocab = _explicit_vocab_sizes(model_args)
        trainer = config.trainer
        if config.get("overwrite") and self.subcommand != "fit":
            warnings.warn(f"--overwrite applies to fit only; {self.subcommand} writes no checkpoint and ignores it",
                          UserWarning, stacklevel=1)
        if trainer.get("default_root_dir") is None:
            trainer.default_root_dir = DEFAULT_ROOT
        if config.get("ckpt_path") == "auto":
            config.ckpt_path = auto_checkpoint(Path(trainer.default_root_dir))
            if config.ckpt_path is not None:
                check_checkpoint_path(config.ckpt_path)
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
        if self.subcommand is not None:
            self._settle_run_folder()
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
        check_sharded_directory(ckpt_path)  # FSDP/DeepSpeed directories: their pickles checked before they are read
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

    def _settle_run_folder(self) -> None:
        """``--ckpt_path last`` becomes the file with the highest global step in the run folder (Lightning would take
        the newest ``last*.ckpt``), so that config.yaml records it; then a fit that does not resume from that folder
        is refused when the folder holds a run, before any data is read, or with ``--overwrite true`` the old
        checkpoints are moved aside (by rank 0; the ranks a launch starts later see the folder empty)."""
        from lit_llm.callbacks.checkpoint import Checkpoint

        config = self.config[self.subcommand]
        checkpoints = [cb for cb in self.trainer.callbacks if isinstance(cb, Checkpoint)]
        if config.get("ckpt_path") == "last":
            folder = checkpoints[0].folder(self.trainer) if checkpoints else str(self.trainer.default_root_dir)
            if "://" not in folder:
                resolved = auto_checkpoint(Path(folder), flag="last")
                config.ckpt_path = self.config_init[self.subcommand].ckpt_path = resolved
                if resolved is not None:
                    check_checkpoint_path(resolved)
        ckpt_path = config.get("ckpt_path")
        if self.subcommand != "fit" or ckpt_path in _CKPT_PATH_WORDS or getattr(self.trainer, "fast_dev_run", False):
            return  # resolved by Lightning inside the run folder; a smoke test writes no checkpoint
        for callback in checkpoints:
            if config.get("overwrite"):
                callback.overwrite_run(self.trainer)
            else:
                callback.refuse_fresh_start(self.trainer, ckpt_path)


#: ``--ckpt_path`` values that name no file: resolved later (``auto``, ``last`` by :class:`LitLLMCLI`, the rest by
#: Lightning).
_CKPT_PATH_WORDS = ("last", "auto", "best", "hpc", "registry")


class EffectiveConfig(SaveConfigCallback):
    """Lightning's ``config.yaml`` writer, recording the values in effect where they differ from what was parsed: the
    model's vocabulary size is linked from the tokenizer, and the parsed config shows the parser's default there.
    (``--ckpt_path last`` / ``auto`` are resolved to the file by :class:`LitLLMCLI` before it is written.)"""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.already_saved:
            self._record_effective(trainer, pl_module)
        super().setup(trainer, pl_module, stage)

    def _record_effective(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = self.config.get("model")
        nested = model.get("init_args", {}).get("model") if isinstance(model, Namespace) else None
        vocab = getattr(getattr(pl_module, "config", None), "vocab_size", None)
        if isinstance(nested, Namespace) and isinstance(vocab, int):
            nested.vocab_size = vocab


def _explicit_vocab_sizes(model_args: Namespace) -> dict[str, int]:
    """The vocabulary sizes the config sets by hand (the nested ``model.vocab_size`` only when not the default)."""
    from lit_llm.model.config import GPTConfig

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
        from lit_llm.model.config import GPTConfig

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
        parser_class=StrictArgumentParser,
        save_config_callback=EffectiveConfig,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"default_root_dir": DEFAULT_ROOT},
        args=_resolved_args(args),
        run=run,
        auto_configure_optimizers=False,
    )


def _resolved_args(args: list[str] | None) -> list[str] | None:
    """``args`` (or the command line) with shipped config names resolved; ``None`` when nothing changed, so that
    LightningCLI reads ``sys.argv`` itself."""
    given = sys.argv[1:] if args is None else args
    resolved = resolve_config_args(given)
    return None if args is None and resolved == given else resolved


def usage_message(error: BaseException) -> str:
    """The parser's complaint on one line, with the new name of a renamed class when the config used the old one."""
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    for old, new in RENAMED.items():
        if old in message:
            message += f" ({old} is now {new}: update the config's class_path)"
    return message


def run_training(args: list[str] | None = None) -> int:
    """Run the CLI and return the exit status (see the module docstring).

    A run stopped by SIGTERM (preemption; ``lit_llm.callbacks.Checkpoint`` saves at the end of the optimizer step)
    exits with ``REQUEUE_EXIT_CODE`` (75, ``EX_TEMPFAIL``), not with Lightning's 0, so a scheduler or a wrapper loop
    can tell it from a finished run and start it again with ``--ckpt_path auto``.
    """
    try:
        cli(args)
    except SIGTERMException:
        return REQUEUE_EXIT_CODE
    except argparse.ArgumentError as err:
        if debugging():
            raise
        print_error(UsageError(usage_message(err)))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - re-raised unless it is (or wraps) one of lit_llm's own errors
        # ... or a fault diagnose() knows: Lightning's configuration errors, a full disk, an unwritable folder, text
        # that is not UTF-8.
        user_error = find_user_error(e) or diagnose(e)
        if user_error is None or debugging():
            raise
        # One clear message, not a traceback through Lightning's internals (LIT_LLM_DEBUG=1 shows it).
        print_error(user_error)
        return EXIT_ERROR
    return EXIT_OK
