"""Process faults: SIGTERM (preemption) stops at an optimizer-step boundary with a requeue exit code, and a failed
rank 0 takes the processes it launched down with it.

Lightning already catches SIGTERM: its handler sets ``trainer.received_sigterm`` (forwarding the signal to the
processes its launcher started), and the training loop raises ``SIGTERMException`` at the end of the current batch.
Two gaps remain, which :class:`SigtermStop` closes for :class:`~lit_llm.callbacks.Checkpoint`:

- The batch may be in the middle of gradient accumulation. Stopping there loses the accumulated gradients, and a
  checkpoint written there is not a state the uninterrupted run ever had. The stop is deferred to the end of the
  optimizer step (Lightning's flag is held back for the remaining micro-batches), and under DDP the ranks agree on
  the step first, so all of them save and stop together.
- ``SIGTERMException`` is a ``SystemExit`` without a code, so the process exits with 0 and a scheduler takes the
  preempted job for a finished one. ``python -m lit_llm.train`` exits with :data:`REQUEUE_EXIT_CODE` instead.

Under several processes the ranks must agree on the step to stop at, or the ones that go on wait forever in their
next collective. Lightning (2.6) agrees at the start of every training batch with a broadcast whose result it reads at
once, and its signal handler sends one more broadcast from wherever the signal lands; the first makes the CPU wait
for all queued GPU work at every step (the GPU then idles while the CPU prepares the next one), the second can pair
with an unrelated collective. :class:`StopAgreement` replaces both for lit_llm's tasks: every batch start launches a
one-number all-reduce of "this rank received SIGTERM" and reads the one launched at the previous batch start, which
only waits for GPU work queued before that (done, or nearly), so the ranks agree one batch later without stalling.

When Lightning starts the other ranks itself (``devices: N`` without ``torchrun``/SLURM), rank 0 is their parent. Its
observer thread kills everything when a child fails, but when rank 0 fails first (e.g. a collective timed out because
another rank hangs) the children are left running, stuck in their next collective. :func:`stop_launched_processes`
ends them; ``python -m lit_llm.train`` calls it whenever a subcommand fails. (``torchrun``'s agent does the same for
the workers it starts: when one fails it stops the others.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lit_llm.callbacks.deferred import DeferredRead

log = logging.getLogger(__name__)

#: Exit status of ``python -m lit_llm.train`` after a SIGTERM stop: ``EX_TEMPFAIL`` (75) of ``sysexits.h``,
#: "temporary failure, the user is invited to retry". It differs from 0 (done), 1 (an error that a retry repeats) and
#: 128 + n (killed by signal n before anything was saved), so a wrapper or a scheduler rule can requeue exactly these
#: runs, which continue exactly with ``--ckpt_path auto``.
REQUEUE_EXIT_CODE = getattr(os, "EX_TEMPFAIL", 75)


class StopAgreement:
    """Whether any rank received SIGTERM, agreed by every rank at the same training batch without a GPU stall.

    :meth:`install` puts it in place of two private pieces of Lightning (the epoch loop's per-batch
    ``_broadcast_sigterm_tensor`` and the signal connector's ``_sigterm_notifier_fn``) when a task is set up; with a
    Lightning release that moved them it installs nothing and Lightning's own checks stay.

    Each batch start (:meth:`exchange`, on every rank of a multi-process run) first reads the result launched at the
    previous batch start, then launches a MAX all-reduce of this rank's flag, with its copy to pinned host memory
    behind a CUDA event. Reading waits for that event only: for the GPU work queued before the previous batch
    started. Every rank reads the same results at the same batches, so :attr:`agreed` turns true on all of them at
    once: at the end of the optimizer step after the batch start that carried the first SIGTERM (read by
    :class:`SigtermStop`), or at the next batch start. Without a :class:`~lit_llm.callbacks.Checkpoint` to save first
    (:attr:`deferred`), the run then stops there, as Lightning's check would (after a barrier, ``SIGTERMException``).
    """

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer
        self.agreed = False  # some rank received SIGTERM, as of the last result read
        self.held = False  # this rank's SIGTERM, kept from Lightning's loops until every rank agrees (or the step ends)
        self.deferred = False  # a Checkpoint stops the run at a step boundary once agreed, after saving
        self._flag: torch.Tensor | None = None
        self._result = DeferredRead()

    @classmethod
    def of(cls, trainer: pl.Trainer) -> StopAgreement | None:
        return getattr(trainer, "_lit_llm_stop_agreement", None)

    @classmethod
    def install(cls, trainer: pl.Trainer) -> StopAgreement | None:
        """The trainer's agreement, put in place the first time (idempotent); ``None`` if Lightning's pieces moved."""
        agreement = cls.of(trainer)
        if agreement is not None:
            return agreement
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        connector = getattr(trainer, "_signal_connector", None)
        if not (callable(getattr(loop, "_broadcast_sigterm_tensor", None))
                and callable(getattr(connector, "_sigterm_notifier_fn", None))
                and hasattr(connector, "received_sigterm")):
            log.debug("StopAgreement: this Lightning release has no per-batch SIGTERM broadcast to replace")
            return None
        agreement = cls(trainer)
        loop._broadcast_sigterm_tensor = agreement.check_at_batch_start
        # Read when Lightning registers its handlers (after setup): the same handler without its broadcast.
        connector._sigterm_notifier_fn = agreement.on_sigterm
        trainer._lit_llm_stop_agreement = agreement
        return agreement

    @property
    def received(self) -> bool:
        """Whether this rank has received SIGTERM (Lightning's flag, or :attr:`held`)."""
        connector = getattr(self.trainer, "_signal_connector", None)
        return self.held or bool(getattr(connector, "received_sigterm", False))

    def resolve(self) -> bool:
        """Read the result of the last exchange launched (if not read yet) into :attr:`agreed`, and return it. Waits
        only for the GPU work queued before that launch; every rank must call it at the same batch."""
        result = self._result.read()
        if result is not None:
            self.agreed = self.agreed or bool(result[0] > 0)
        return self.agreed

    def exchange(self) -> bool:
        """Read the previous batch start's result into :attr:`agreed`, launch this one's, return :attr:`agreed`."""
        self.resolve()
        device = self.trainer.strategy.root_device
        if self._flag is None:
            self._flag = torch.zeros(1, device=device)  # a fill on the GPU: no host-to-device copy
        self._flag.fill_(float(self.received))
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
        self._result.launch(self._flag)  # the last launch was read (resolve) above
        return self.agreed

    def check_at_batch_start(self) -> None:
        """In place of Lightning's per-batch broadcast (called at each batch start when ``world_size > 1``)."""
        if self.exchange() and not self.deferred:
            self.trainer._signal_connector.received_sigterm = True
            with contextlib.suppress(Exception):
                dist.barrier()  # every rank stops here; none is left waiting in a collective
            raise SIGTERMException()

    def on_sigterm(self, signum: Any, frame: Any) -> None:
        """Lightning's SIGTERM notifier without its broadcast: pass the signal on to the processes Lightning
        launched (once) and note it. Under several processes it is noted here only (:attr:`held`), not in the flag
        Lightning's loops read, which would stop this rank alone at the end of its batch."""
        connector = self.trainer._signal_connector
        log.info(f"[rank: {self.trainer.global_rank}] Received SIGTERM: {signum}")
        if not (connector.received_sigterm or self.held):
            launcher = self.trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)
        if self.trainer.world_size > 1:
            self.held = True
        else:
            connector.received_sigterm = True


class SigtermStop:
    """Decides, at optimizer-step boundaries, whether a SIGTERM asks the run to save and stop now.

    Lightning keeps the flag in its (private) signal connector; this reads and sets it there, falling back to doing
    nothing when a Lightning release moves it (the stop then happens where Lightning puts it). Under several
    processes it stops when :class:`StopAgreement` says every rank agrees; until then a rank's own SIGTERM is held
    back, so Lightning does not stop that rank alone.
    """

    def __init__(self) -> None:
        self._fallback: StopAgreement | None = None  # holds the flag where no agreement could be installed

    @staticmethod
    def _connector(trainer: pl.Trainer) -> object | None:
        connector = getattr(trainer, "_signal_connector", None)
        return connector if hasattr(connector, "received_sigterm") else None

    def _agreement(self, trainer: pl.Trainer) -> tuple[StopAgreement, bool]:
        """The trainer's installed agreement (and ``True``), or one that only holds this rank's flag (and ``False``)."""
        installed = StopAgreement.of(trainer)
        if installed is not None:
            return installed, True
        if self._fallback is None or self._fallback.trainer is not trainer:
            self._fallback = StopAgreement(trainer)
        return self._fallback, False

    def setup(self, trainer: pl.Trainer) -> None:
        """Install the trainer's :class:`StopAgreement` and let it leave the stop to this (after the save)."""
        agreement = StopAgreement.install(trainer)
        if agreement is not None:
            agreement.deferred = True

    def hold(self, trainer: pl.Trainer) -> None:
        """Keep Lightning from stopping this rank before the optimizer step being accumulated is taken (or, under
        several processes, before every rank agrees)."""
        connector = self._connector(trainer)
        if connector is not None and connector.received_sigterm:
            self._agreement(trainer)[0].held = True
            connector.received_sigterm = False

    def requested(self, trainer: pl.Trainer) -> bool:
        """At a step boundary: whether the run should save and stop now."""
        agreement, installed = self._agreement(trainer)
        distributed = trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
        if distributed and installed:
            # The exchange launched at this batch's start: its wait is for the GPU work of the batches before.
            if agreement.resolve():
                return True
            self.hold(trainer)  # this rank's SIGTERM, if any, goes out with the next batch start's exchange
            return False
        if distributed:
            # No agreement installed (a Lightning release without the pieces it replaces): a blocking all-reduce.
            flag = torch.tensor([float(agreement.received)], device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item())
        return agreement.received

    def stop(self, trainer: pl.Trainer) -> None:
        """Let Lightning stop at the end of this batch (it raises ``SIGTERMException`` on every rank)."""
        self._agreement(trainer)[0].held = False
        connector = self._connector(trainer)
        if connector is not None:
            connector.received_sigterm = True


def stop_launched_processes(trainer: pl.Trainer | None, grace_s: float = 10.0) -> None:
    """Kill the rank processes that this process's launcher started and that are still running after ``grace_s``.

    The grace period lets ranks that are stopping on their own (after a SIGTERM, or an error every rank saw) finish;
    the rest are killed with SIGKILL, as Lightning's own observer does: a rank blocked in a collective ignores SIGTERM.
    A no-op in processes that started none (every rank under ``torchrun`` or SLURM, and ranks > 0).
    """
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    procs = [p for p in getattr(launcher, "procs", []) if isinstance(p, subprocess.Popen)]
    deadline = time.monotonic() + grace_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
