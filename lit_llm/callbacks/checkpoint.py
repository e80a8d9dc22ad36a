"""ModelCheckpoint that saves into the run's own folder (so ``fit --ckpt_path last`` finds the previous run), only at
optimizer-step boundaries, atomically, and once more on SIGTERM."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, Literal

import pytorch_lightning as pl
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lit_llm.callbacks.signals import REQUEUE_EXIT_CODE, SigtermStop
from lit_llm.errors import ConfigError, NonFiniteLossError
from lit_llm.weights.discovery import (
    auto_checkpoint,
    checkpoint_step,
    looks_complete,
    naming_unreadable_checkpoint,
    run_checkpoints,
)
from lit_llm.weights.files import TMP_SUFFIX, atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic and whose unreadable files give a ``CheckpointError``.

    A checkpoint is written to ``<name>.tmp`` in its own directory, flushed to disk, and renamed over ``<name>`` with
    ``os.replace``: a crash or a failed write at any point leaves the previous file whole. (Lightning's own save
    stages the file in the system temporary directory and, when that is on another filesystem, copies it over the
    old one in place.) Remote paths (``s3://`` ...) keep Lightning's behaviour. ``Checkpoint`` installs this on the
    strategy when it uses plain ``TorchCheckpointIO``; it can also be given as ``trainer.plugins``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = str(path)
        if "://" in path or storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Callable | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        with naming_unreadable_checkpoint(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)










class Checkpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, except that without ``dirpath`` it saves straight into
    ``trainer.default_root_dir`` and keeps ``last.ckpt`` by default.

    Lightning's own default is ``<logger dir>/<name>/version_N/checkpoints``, and each run gets a new version, so
    ``ckpt_path="last"`` (which looks only in the directory the current run would write to) never sees the previous
    run's checkpoint. With lit_llm's layout a run lives in ``checkpoints/<run>/`` (its ``default_root_dir``), so
    ``checkpoints/<run>/last.ckpt`` is found by the next ``fit --ckpt_path last`` of the same run.

    Lightning resolves the directory in two places, both redirected here: in ``setup``, and, earlier, when
    ``ckpt_path="last"`` is turned into a file through ``_find_last_checkpoints``.

    Three more guarantees, for exact resumes and checkpoints that are never lost:

    - **Saves only at optimizer-step boundaries.** With ``trainer.accumulate_grad_batches > 1`` Lightning can save
      between the micro-batches of a step: right after a resume (the step count still matches
      ``every_n_train_steps``; this overwrites the good checkpoint of that step), when ``train_time_interval`` is up,
      after a validation placed by ``val_check_interval`` (which counts batches), on an exception, or at the end of
      training stopped early. Such a checkpoint records the data position after those micro-batches but not their
      gradients. Here those saves wait for the end of the step (a validation save happens then, with its metrics), and
      exception / end-of-training saves that would land mid-step are skipped with a log line.
    - **Atomic writes** through :class:`AtomicCheckpointIO`; leftovers of a killed save are removed at setup. A failed
      save raises before any older checkpoint is pruned, so ``save_top_k`` never deletes the last good one.
    - **SIGTERM** (preemption): the current optimizer step is finished, ``last.ckpt`` (or, with ``save_last: false``,
      a regular checkpoint) is saved, and Lightning stops the run on every rank; ``python -m lit_llm.train`` then exits
      with :data:`~lit_llm.callbacks.signals.REQUEUE_EXIT_CODE` (75) so that the job is requeued and continues with
      ``--ckpt_path auto``. Under several processes this costs one boolean all-reduce per optimizer step.

    And one folder holds one run:

    - **A fresh fit into a folder that holds a run's checkpoints is refused** (:meth:`refuse_fresh_start`): Lightning
      would write ``last-v1.ckpt`` beside the old ``last.ckpt`` and the two runs' files would mix. ``python -m
      lit_llm.train fit --overwrite true`` moves the old checkpoints aside (:meth:`move_aside`) instead.
    - **``ckpt_path="last"`` takes the checkpoint with the highest global step** in the folder
      (:func:`lit_llm.weights.discovery.auto_checkpoint`), not Lightning's newest ``last*.ckpt`` file.
    - **Leftovers are tidied when a run resumes** (:meth:`tidy_after_resume`): a checkpoint of a step after the one
      resumed from (the continuation being replaced) is moved into ``abandoned-after-step-N/``; a step checkpoint
      that ``save_top_k`` would have pruned but a kill left behind is removed; partial ``*.ckpt.tmp`` saves are
      removed at setup. Files that do not match this callback's ``filename`` pattern are never touched.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        verbose: bool = False,
        save_last: bool | Literal["link"] | None = True,
        save_top_k: int = 1,
        save_on_exception: bool = False,
        save_weights_only: bool = False,
        mode: Literal["min", "max"] = "min",
        auto_insert_metric_name: bool = True,
        every_n_train_steps: int | None = None,
        train_time_interval: timedelta | None = None,
        every_n_epochs: int | None = None,
        save_on_train_epoch_end: bool | None = None,
        enable_version_counter: bool = True,
    ) -> None:
        """Save checkpoints into the run's folder.

        Args:
            dirpath: Directory to save into. None (the default) uses ``trainer.default_root_dir`` itself, not a
                ``checkpoints/`` folder inside the logger's version directory as Lightning does.
            filename: Checkpoint file name pattern, e.g. ``"{epoch}-{step}-{val/loss:.3f}"``. None gives
                ``"{epoch}-{step}"``.
            monitor: Metric to rank checkpoints by (e.g. ``"val/loss"``). None keeps the latest ones.
            verbose: Print a line at every save.
            save_last: Also keep ``last.ckpt``, the latest state, which ``fit --ckpt_path last`` resumes from.
                ``"link"`` makes it a symbolic link to the latest checkpoint instead of a copy.
            save_top_k: Keep this many best checkpoints by ``monitor`` (the latest ones when ``monitor`` is None);
                0 keeps none (except ``last.ckpt``), -1 keeps all.
            save_on_exception: Also save a checkpoint when training stops on an exception.
            save_weights_only: Save only the weights, not optimizer and loop state (such a checkpoint cannot resume).
            mode: ``"min"`` or ``"max"``: whether a lower or a higher ``monitor`` value is better.
            auto_insert_metric_name: Write ``name=value`` for each metric in ``filename``.
            every_n_train_steps: Save every this many optimizer steps.
            train_time_interval: Save at this wall-clock interval (cannot be combined with the step/epoch intervals).
            every_n_epochs: Save every this many epochs.
            save_on_train_epoch_end: Save at the end of the training epoch rather than after validation.
            enable_version_counter: Add ``-v1``, ``-v2`` to a file name that already exists instead of overwriting.
        """
        extra = {}
        # Passed only when set, so lit_llm keeps working with Lightning releases whose ModelCheckpoint lacks it.
        if save_on_exception:
            extra["save_on_exception"] = True
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            verbose=verbose,
            save_last=save_last,
            save_top_k=save_top_k,
            save_weights_only=save_weights_only,
            mode=mode,
            auto_insert_metric_name=auto_insert_metric_name,
            every_n_train_steps=every_n_train_steps,
            train_time_interval=train_time_interval,
            every_n_epochs=every_n_epochs,
            save_on_train_epoch_end=save_on_train_epoch_end,
            enable_version_counter=enable_version_counter,
            **extra,
        )
        self._dirpath_from_root = dirpath is None
        self._sigterm = SigtermStop()
        self._step_at_batch_start = -1
        self._in_batch = False  # between a training batch's start and its end: the weights may be half-updated
        self._mid_step = False  # the last training batch was accumulated, not followed by an optimizer step
        self._validation_save_pending = False
        self._saved_for_requeue = False
        self._retention_restored = False
        #: Set by ``python -m lit_llm.train fit --overwrite true``: a fresh fit may start in a folder that holds a run
        #: (whose checkpoints were moved aside).
        self.overwrite = False

    def _use_root_dir(self, trainer: pl.Trainer) -> None:
        # Setting dirpath makes ModelCheckpoint's own (private) directory resolution return it unchanged.
        root = str(trainer.default_root_dir)
        if "://" not in root:  # local path: normalise as ModelCheckpoint does for a dirpath given to it
            root = os.path.realpath(os.path.expanduser(root))
        self.dirpath = root
        self._fs = get_filesystem(root)

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        # Called while resolving ckpt_path="last", before setup. Lightning takes the newest of the last*.ckpt files;
        # the run's furthest point is the checkpoint with the highest global step.
        if self._dirpath_from_root:
            self._use_root_dir(trainer)
        if self.dirpath is None or "://" in str(self.dirpath):
            found = super()._find_last_checkpoints(trainer)
        else:
            taken = auto_checkpoint(self.dirpath, flag="last") if os.path.isdir(self.dirpath) else None
            found = {os.path.normpath(taken)} if taken else set()
        return found

    def folder(self, trainer: pl.Trainer) -> str:
        """The folder this callback saves into: ``dirpath``, else ``trainer.default_root_dir``."""
        if self._dirpath_from_root:
            self._use_root_dir(trainer)
        return str(self.dirpath) if self.dirpath is not None else str(trainer.default_root_dir)

    def refuse_fresh_start(self, trainer: pl.Trainer, ckpt_path: str | None) -> None:
        """Raise a one-line ConfigError when a fit that does not resume from this folder would write into a folder
        that already holds a run's checkpoints (unless :attr:`overwrite`)."""
        folder = self.folder(trainer)
        if self.overwrite or "://" in folder:
            return
        existing = run_checkpoints(folder)
        if not existing or _inside(ckpt_path, folder):
            return
        names = ", ".join(p.name for p in existing[-3:][::-1]) + (" ..." if len(existing) > 3 else "")
        start = f"resuming {ckpt_path} into" if ckpt_path else "a new run in"
        raise ConfigError(
            f"{folder} already holds a run ({names}): {start} it would mix the two runs' checkpoints. Resume that run "
            f"with --ckpt_path last, start this one in another folder (--trainer.default_root_dir=<new folder>), or "
            "pass --overwrite true to move the old checkpoints aside and start afresh there"
        )

    def move_aside(self, paths: list[str] | list[os.PathLike], subfolder: str, why: str) -> str | None:
        """Move ``paths`` into ``<folder>/<subfolder>`` (a new name if that exists), with a log line; nothing is
        deleted. Returns the folder they went to."""
        if not paths:
            return None
        root = os.path.dirname(os.path.abspath(paths[0]))
        target = os.path.join(root, subfolder)
        n = 1
        while os.path.exists(target):
            n += 1
            target = os.path.join(root, f"{subfolder}-{n}")
        os.makedirs(target)
        for path in paths:
            os.replace(path, os.path.join(target, os.path.basename(path)))
        names = ", ".join(os.path.basename(p) for p in paths)
        rank_zero_info(f"Checkpoint: moved {names} into {target} ({why})")
        return target

    def overwrite_run(self, trainer: pl.Trainer) -> None:
        """``--overwrite true``: move the checkpoints of the run already in the folder into ``replaced-<time>/``."""
        self.overwrite = True
        folder = self.folder(trainer)
        # Before the launch the strategy may not know its rank yet; the launcher's environment does (torchrun, SLURM).
        if "://" in folder or rank_zero_only.rank != 0:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.move_aside([str(p) for p in run_checkpoints(folder)], f"replaced-{stamp}",
                        "--overwrite true: a new run starts in this folder; delete that folder when it is not needed")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._dirpath_from_root:
            self._use_root_dir(trainer)
        self._in_batch = self._mid_step = self._validation_save_pending = self._saved_for_requeue = False
        self._sigterm.setup(trainer)
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
        if trainer.is_global_zero:
            self._remove_partial_saves()
        # Lightning's "exists and is not empty" warning is replaced by refuse_fresh_start: a fresh fit into a folder
        # holding a run stops, and a resume is expected to find its checkpoints there.
        with _ignore_not_empty_warning(True):
            super().setup(trainer, pl_module, stage)

    def _remove_partial_saves(self) -> None:
        # Leftovers of a save that was killed before its rename; the previous complete checkpoint is still there.
        if not self.dirpath or "://" in str(self.dirpath):
            return
        pattern = os.path.join(str(self.dirpath), f"*{self.FILE_EXTENSION}")
        for leftover in sorted(glob.glob(pattern + TMP_SUFFIX) + glob.glob(pattern + ".old")):
            with contextlib.suppress(OSError):
                shutil.rmtree(leftover) if os.path.isdir(leftover) else os.remove(leftover)
                rank_zero_info(f"Removed {leftover}, the partial file of a checkpoint save that did not finish")

    # ---- leftovers of stopped runs ------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores the retention state (which files save_top_k keeps) only when the folder is the same.
        self._retention_restored = state_dict.get("dirpath", self.dirpath) == self.dirpath
        super().load_state_dict(state_dict)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # By now Lightning has restored the checkpoint (under every strategy), so trainer.ckpt_path says whether this
        # run resumes; python -m lit_llm.train has refused a fresh fit earlier, before reading any data.
        if not trainer.ckpt_path and trainer.global_step == 0 and not trainer.fast_dev_run:
            self.refuse_fresh_start(trainer, None)
        if trainer.ckpt_path and trainer.is_global_zero:
            self.tidy_after_resume(trainer)

    def tidy_after_resume(self, trainer: pl.Trainer) -> None:
        """After a resume from a checkpoint of this folder at step S: move this callback's checkpoints of later steps
        (and ``last*.ckpt`` of a later step) into ``abandoned-after-step-S/``, so that ``--ckpt_path last`` never
        jumps back onto the continuation being replaced; and remove step checkpoints at or before S that
        ``save_top_k`` would have pruned (a kill between a save and its pruning leaves them) and that the restored
        retention state does not keep. Only files matching ``filename`` (and ``last``) are considered."""
        folder, resumed = self.dirpath, str(trainer.ckpt_path)
        if folder is None or "://" in str(folder) or not _inside(resumed, str(folder)):
            return
        step = trainer.global_step
        ours = self._our_file_pattern()
        later, pruned = [], []
        kept = {os.path.abspath(p) for p in (self.best_model_path, self.last_model_path, resumed, *self.best_k_models)
                if p}
        for path in sorted(glob.glob(os.path.join(str(folder), f"*{self.FILE_EXTENSION}"))):
            name = os.path.basename(path)
            is_last = re.fullmatch(rf"{self.CHECKPOINT_NAME_LAST}(-v\d+)?{re.escape(self.FILE_EXTENSION)}", name)
            if os.path.abspath(path) == os.path.abspath(resumed) or name.endswith(".consolidated.ckpt"):
                continue
            if not (is_last or ours.fullmatch(name)):
                continue
            saved_at = checkpoint_step(path)
            if saved_at is not None and saved_at > step:
                later.append(path)
            elif (not is_last and saved_at is not None and self.save_top_k != -1 and self._retention_restored
                  and os.path.abspath(path) not in kept and os.path.isfile(path) and looks_complete(path)):
                pruned.append(path)
        self.move_aside(later, f"abandoned-after-step-{step}",
                        f"saved after step {step}, which this run resumed from; they belong to the continuation it "
                        "replaces")
        for path in pruned:
            with contextlib.suppress(OSError):
                os.remove(path)
                rank_zero_info(f"Checkpoint: removed {path}, which save_top_k={self.save_top_k} would have pruned "
                               "(left behind by a run that was stopped)")

    def _our_file_pattern(self) -> re.Pattern[str]:
        """What the names of this callback's checkpoints look like: ``filename`` with every ``{metric}`` a wildcard,
        an optional ``-vN``, and the extension."""
        template = self.filename or "{epoch}-{step}"
        parts, last = [], 0
        for match in re.finditer(r"\{([^}:]+)(:[^}]*)?\}", template):
            parts.append(re.escape(template[last:match.start()]))
            name = match.group(1).strip()
            prefix = re.escape(name + self.CHECKPOINT_EQUALS_CHAR) if self.auto_insert_metric_name else ""
            parts.append(prefix + r"[^/]*?")
            last = match.end()
        parts.append(re.escape(template[last:]))
        return re.compile("".join(parts) + rf"(-v\d+)?{re.escape(self.FILE_EXTENSION)}")

    # ---- saving only at optimizer-step boundaries -------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step
        self._in_batch = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._in_batch = False
        # global_step counts optimizer steps (skipped ones included), so it moved iff this batch ended a step.
        self._mid_step = trainer.global_step == self._step_at_batch_start
        if self._mid_step:
            self._sigterm.hold(trainer)
            return
        if self._validation_save_pending:
            self._validation_save_pending = False
            super().on_validation_end(trainer, pl_module)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._sigterm.requested(trainer):
            self._save_for_requeue(trainer)
            self._sigterm.stop(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._mid_step:
            self._validation_save_pending = True  # saved at the end of the optimizer step being accumulated
            return
        super().on_validation_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:
            # Lightning's own end-of-training save_last ignores fast_dev_run: a smoke test in a real run's folder would
            # replace that run's last.ckpt with a one-step model (and --ckpt_path auto would then resume from it).
            rank_zero_info("Checkpoint: fast_dev_run writes no checkpoint")
            return
        if self._mid_step:
            if self.save_last and not self._last_checkpoint_saved:
                rank_zero_info("Checkpoint: training stopped between the micro-batches of an optimizer step; "
                               "last.ckpt is not written there (it could not resume exactly)")
            return
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, NonFiniteLossError):
            return  # nothing is saved after a numerical fault, even with save_on_exception
        preempted = isinstance(exception, SIGTERMException)
        if preempted and self._saved_for_requeue:
            return  # saved at the end of the optimizer step, just before Lightning stopped
        if not (preempted or self._should_save_on_exception(trainer)):
            return
        if self._in_batch or self._mid_step:
            where = "during a training batch" if self._in_batch else "between the micro-batches of an optimizer step"
            last = self.last_model_path or self.best_model_path or "none"
            rank_zero_info(f"Checkpoint: {type(exception).__name__} {where}; no checkpoint is written there (it could "
                           f"not resume exactly). The last one is {last}")
            return
        if preempted:
            self._save_for_requeue(trainer)
        else:
            super().on_exception(trainer, pl_module, exception)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        # Every save (periodic, last, on SIGTERM, on an exception) comes through here on every rank: a guard that
        # knows of a non-finite step already applied (DeepSpeed) stops the run before its weights are written.
        for callback in trainer.callbacks:
            check = getattr(callback, "check_before_save", None)
            if callable(check):
                check(trainer)
        super()._save_checkpoint(trainer, filepath)

    def _save_for_requeue(self, trainer: pl.Trainer) -> None:
        self._saved_for_requeue = True
        if self._last_global_step_saved == trainer.global_step and self._last_checkpoint_saved:
            saved = f"saved {self._last_checkpoint_saved}"  # by the periodic save of this same step
        elif self._should_skip_saving_checkpoint(trainer):  # no step taken yet (or sanity check, fast_dev_run)
            saved = f"nothing new to save (last checkpoint: {self.last_model_path or trainer.ckpt_path or 'none'})"
        else:
            candidates = self._monitor_candidates(trainer)
            if self.save_last in (None, False, "link"):  # no last.ckpt, or one that links to the newest regular file
                self._save_checkpoint(trainer, self.format_checkpoint_name(candidates))
            if self.save_last:
                self._save_last_checkpoint(trainer, candidates)
            saved = f"saved {self._last_checkpoint_saved}"
        rank_zero_info(f"SIGTERM: stopping after optimizer step {trainer.global_step}; {saved}. "
                       f"python -m lit_llm.train exits with code {REQUEUE_EXIT_CODE} (requeue me); "
                       "continue with --ckpt_path auto")


def _inside(path: str | None, folder: str) -> bool:
    """Whether the checkpoint ``path`` is in ``folder`` (a local path)."""
    if not path or "://" in str(path):
        return False
    return os.path.dirname(os.path.realpath(str(path))) == os.path.realpath(folder)


@contextlib.contextmanager
def _ignore_not_empty_warning(active: bool) -> Iterator[None]:
    if not active:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        yield
