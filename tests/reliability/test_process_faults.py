"""Process faults of a single training process, in subprocesses of ``python -m lit_llm.train``: SIGTERM mid-epoch
(saved at the end of the optimizer step, exit code 75, exact resume) and SIGKILL in the middle of a checkpoint save
(the previous checkpoint survives, the leftover is removed, the resume is exact)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from faults import fit_args, losses_by_batch, read_losses, same_tree, start, train, training_state

from lit_llm.callbacks.signals import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow  # each test starts two or three training processes (~10 s each on an idle 2-core CPU)

ACCUMULATE = "--trainer.accumulate_grad_batches=2"




def log(folder: Path) -> dict:
    return {"class_path": "faults.LossLog", "init_args": {"folder": str(folder)}}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The uninterrupted 20-step run (2 micro-batches per step, dropout, shuffling, across epochs)."""
    root = tmp_path_factory.mktemp("reference")
    proc = train(fit_args(root, corpus, 20, [log(root / "log")], ACCUMULATE))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return losses_by_batch(read_losses(root / "log")), training_state(root / "last.ckpt")


def assert_resumed_exactly(resumed_log: Path, done: set, last: Path, reference) -> None:
    """The resumed run's micro-batches are exactly the reference's that were not ``done`` before the checkpoint, with
    the same windows and losses; its final weights, AdamW state and schedule are the reference's."""
    ref_losses, ref_state = reference
    resumed = losses_by_batch(read_losses(resumed_log))
    assert resumed and sorted(resumed) == sorted(set(ref_losses) - done)
    for key, value in resumed.items():
        assert value == ref_losses[key], f"micro-batch {key}: {value[0]} != {ref_losses[key][0]}"
    assert same_tree(training_state(last), ref_state)


def test_sigterm_mid_step_saves_requeues_and_resumes_exactly(corpus, reference, tmp_path):
    sigterm = {"class_path": "faults.SigtermAt", "init_args": {"step": 5, "mid_step": True}}
    proc = train(fit_args(tmp_path, corpus, 20, [log(tmp_path / "first"), sigterm], ACCUMULATE))
    out = proc.stdout + proc.stderr
    # SIGTERM arrived between the two micro-batches of step 6 (mid-epoch: an epoch is 16 batches): the step was
    # finished, saved, and the run stopped.
    assert "SIGTERM sent at step 5 batch 10" in out
    assert proc.returncode == REQUEUE_EXIT_CODE == 75, out
    assert f"SIGTERM: stopping after optimizer step 6; saved {tmp_path / 'last.ckpt'}" in out
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 6
    first = read_losses(tmp_path / "first")
    assert len(first) == 12 and (first[-1]["step"], first[-1]["epoch"]) == (6, 0)  # nothing ran after the save

    proc = train(fit_args(tmp_path, corpus, 20, [log(tmp_path / "resumed")], ACCUMULATE, "--ckpt_path=auto"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"--ckpt_path auto: resuming from {tmp_path / 'last.ckpt'}" in proc.stdout + proc.stderr
    assert_resumed_exactly(tmp_path / "resumed", set(losses_by_batch(first)), tmp_path / "last.ckpt", reference)


def test_sigkill_during_a_save_loses_nothing(corpus, reference, tmp_path):
    """SIGKILL while step=000010.ckpt is half written: last.ckpt (step 5) is intact, ``auto`` resumes from it and the
    next start removes the partial file with a log line; the finished run equals the uninterrupted one."""
    stall = json.dumps([{"class_path": "faults.StallingIO", "init_args": {"stall_at_step": 10}}])
    proc = start(fit_args(tmp_path, corpus, 20, [log(tmp_path / "first")], ACCUMULATE, f"--trainer.plugins={stall}"))
    partial = tmp_path / "step=000010.ckpt.tmp"
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:
            if line.startswith("STALLED") or time.monotonic() > deadline:
                break
        assert partial.is_file() and partial.stat().st_size > 0, "the save did not stall"
        last_before = (tmp_path / "last.ckpt").read_bytes()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert not (tmp_path / "step=000010.ckpt").exists()
    assert (tmp_path / "last.ckpt").read_bytes() == last_before  # the previous checkpoint, untouched
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 5
    first = read_losses(tmp_path / "first")
    assert first[-1]["step"] == 10  # steps 6-10 ran but were not saved: they run again after the resume

    proc = train(fit_args(tmp_path, corpus, 20, [log(tmp_path / "resumed")], ACCUMULATE, "--ckpt_path=auto"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"--ckpt_path auto: resuming from {tmp_path / 'last.ckpt'}" in out
    assert f"Removed {partial}, the partial file of a checkpoint save that did not finish" in out
    assert not list(tmp_path.glob("*.tmp"))
    done = set(losses_by_batch(first[:10]))  # the micro-batches of steps 1-5
    assert_resumed_exactly(tmp_path / "resumed", done, tmp_path / "last.ckpt", reference)
