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

When Lightning starts the other ranks itself (``devices: N`` without ``torchrun``/SLURM), rank 0 is their parent. Its
observer thread kills everything when a child fails, but when rank 0 fails first (e.g. a collective timed out because
another rank hangs) the children are left running, stuck in their next collective. :func:`stop_launched_processes`
ends them; ``python -m lit_llm.train`` calls it whenever a subcommand fails. (``torchrun``'s agent does the same for
the workers it starts: when one fails it stops the others.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytorch_lightning as pl
import torch
import torch.distributed as dist

#: Exit status of ``python -m lit_llm.train`` after a SIGTERM stop: ``EX_TEMPFAIL`` (75) of ``sysexits.h``,
#: "temporary failure, the user is invited to retry". It differs from 0 (done), 1 (an error that a retry repeats) and
#: 128 + n (killed by signal n before anything was saved), so a wrapper or a scheduler rule can requeue exactly these
#: runs, which continue exactly with ``--ckpt_path auto``.
REQUEUE_EXIT_CODE = getattr(os, "EX_TEMPFAIL", 75)


class SigtermStop:
    """Decides, at optimizer-step boundaries, whether a SIGTERM asks the run to save and stop now.

    Lightning keeps the flag in its (private) signal connector; this reads and sets it there, falling back to doing
    nothing when a Lightning release moves it (the stop then happens where Lightning puts it).
    """

    def __init__(self) -> None:
        self._held = False  # a SIGTERM held back until the optimizer step completes

    @staticmethod
    def _connector(trainer: pl.Trainer) -> object | None:
        connector = getattr(trainer, "_signal_connector", None)
        return connector if hasattr(connector, "received_sigterm") else None

    def hold(self, trainer: pl.Trainer) -> None:
        """Mid-step: keep Lightning from stopping before the optimizer step that is being accumulated is taken."""
        connector = self._connector(trainer)
        if connector is not None and connector.received_sigterm:
            self._held = True
            connector.received_sigterm = False

    def requested(self, trainer: pl.Trainer) -> bool:
        """At a step boundary: whether any rank received SIGTERM (one 1-element all-reduce under several processes)."""
        connector = self._connector(trainer)
        local = self._held or bool(connector is not None and connector.received_sigterm)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            # Not strategy.reduce_boolean_decision: that adds a barrier before its all-reduce.
            flag = torch.tensor([float(local)], device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item())
        return local

    def stop(self, trainer: pl.Trainer) -> None:
        """Let Lightning stop at the end of this batch (it raises ``SIGTERMException`` on every rank)."""
        self._held = False
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
