"""Two training processes (DDP over gloo on the CPU), started by ``python -m lit_llm.train`` with ``devices: 2``:
exact stop/resume on both ranks, SIGTERM on one rank stops both at the same step, a rank that dies or hangs ends the
whole job, too little data for the ranks."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from faults import fit_args, losses_by_batch, read_losses, same_tree, train, training_state

from lit_llm.callbacks.signals import REQUEUE_EXIT_CODE

pytestmark = [pytest.mark.slow, pytest.mark.distributed]  # each launch starts two processes (~15-30 s)

DDP = ["--trainer.devices=2", "--trainer.strategy=pytorch_lightning.strategies.DDPStrategy",
       "--trainer.strategy.process_group_backend=gloo"]




def log(folder: Path) -> dict:
    return {"class_path": "faults.LossLog", "init_args": {"folder": str(folder)}}


def test_ddp_resume_is_exact_on_both_ranks(corpus, tmp_path):
    """Stopped after step 10 (mid-epoch: an epoch is 8 batches per rank) and resumed with ``--ckpt_path auto``: each
    rank's steps 11-20 see the same windows with the same losses as in an uninterrupted 2-process run, and the final
    weights, AdamW state and schedule are equal."""
    ref, run = tmp_path / "reference", tmp_path / "run"
    for root, steps, extra in ((ref, 20, []), (run, 10, []), (run, 20, ["--ckpt_path=auto"])):
        folder = root / ("log" if steps == 20 and not extra else f"log{steps}")
        proc = train(fit_args(root, corpus, steps, [log(folder)], *DDP, *extra), timeout=400)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in (0, 1):
        expected = losses_by_batch(read_losses(ref / "log", rank))
        first = read_losses(run / "log10", rank)
        assert first[-1]["step"] == 10 and first[-1]["epoch"] == 1  # stopped mid-epoch (after batch 2 of 8)
        resumed = losses_by_batch(read_losses(run / "log20", rank))
        assert sorted(resumed) == sorted(set(expected) - set(losses_by_batch(first)))
        for key, value in resumed.items():
            assert value == expected[key], f"rank {rank}, micro-batch {key}: {value[0]} != {expected[key][0]}"
    # The ranks saw different data (sharded), so the equalities above are two separate checks.
    assert losses_by_batch(read_losses(ref / "log", 0)) != losses_by_batch(read_losses(ref / "log", 1))
    assert same_tree(training_state(run / "last.ckpt"), training_state(ref / "last.ckpt"))


@pytest.mark.parametrize("signalled", [0, 1])
def test_sigterm_on_one_rank_stops_both_at_the_same_step(signalled, corpus, tmp_path):
    """SIGTERM reaches one rank only, between the two micro-batches of step 6 (rank 0 passes it on to the rank it
    launched; rank 1 tells no one). The next batch start's exchange carries it to both ranks, which finish the optimizer
    step, save last.ckpt once and exit with the requeue code; resumed, the run ends as the uninterrupted one.
    """
    sigterm = {"class_path": "faults.SigtermAt", "init_args": {"step": 5, "mid_step": True, "rank": signalled}}
    accumulate = "--trainer.accumulate_grad_batches=2"
    proc = train(fit_args(tmp_path, corpus, 12, [log(tmp_path / "first"), sigterm], *DDP, accumulate), timeout=400)
    out = proc.stdout + proc.stderr
    assert "SIGTERM sent at step 5 batch" in out
    assert proc.returncode == REQUEUE_EXIT_CODE, out
    ends = [read_losses(tmp_path / "first", rank)[-1] for rank in (0, 1)]
    stopped = ends[0]["step"]
    assert ends[1]["step"] == stopped and ends[0]["batch_idx"] == ends[1]["batch_idx"]
    # The batch start after the signal carries it; the ranks read it at the end of that optimizer step, step 6.
    assert stopped == 6
    assert f"SIGTERM: stopping after optimizer step {stopped}; saved {tmp_path / 'last.ckpt'}" in out
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == stopped

    ref = tmp_path / "reference"
    for root, extra in ((ref, []), (tmp_path, ["--ckpt_path=auto"])):
        proc = train(fit_args(root, corpus, 12, [log(root / "log")], *DDP, accumulate, *extra), timeout=400)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in (0, 1):
        expected = losses_by_batch(read_losses(ref / "log", rank))
        resumed = losses_by_batch(read_losses(tmp_path / "log", rank))
        assert sorted(resumed) == sorted(set(expected) - set(losses_by_batch(read_losses(tmp_path / "first", rank))))
        assert all(resumed[key] == expected[key] for key in resumed)
    assert same_tree(training_state(tmp_path / "last.ckpt"), training_state(ref / "last.ckpt"))


def _gone(pid: int) -> bool:
    """The process no longer runs (it may linger as a zombie until its new parent reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process states from /proc")
@pytest.mark.parametrize("how", ["exit", "sigkill", "hang"])
def test_a_failed_rank_ends_the_whole_job(how, corpus, tmp_path):
    """Rank 1 dies (``os._exit(1)`` / SIGKILL) or hangs (SIGSTOP) after step 5. Rank 0's next collective fails (a
    dead peer closes its socket; a hung one trips the 30 s process-group timeout), the job exits non-zero well within
    120 s, no rank process is left running, and the last checkpoint (step 4) is intact."""
    die = {"class_path": "faults.DieAt", "init_args": {"step": 5, "rank": 1, "how": how}}
    checkpoint = {"every_n_train_steps": 2, "filename": "step={step:06d}", "auto_insert_metric_name": False}
    started = time.monotonic()
    proc = train(fit_args(tmp_path, corpus, 20, [log(tmp_path / "log"), die], *DDP,
                          "--trainer.strategy.timeout=0:00:30", checkpoint=checkpoint), timeout=300)
    elapsed = time.monotonic() - started
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert elapsed < 120, f"took {elapsed:.0f} s"
    assert f"RANK 1 DIES ({how}) at step 5" in out
    pids = [int((tmp_path / "log" / f"pid.rank{rank}").read_text()) for rank in (0, 1)]
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(_gone(pid) for pid in pids), f"rank processes still running: {pids}"
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4 and last["state_dict"]
    assert not list(tmp_path.glob("*.tmp"))


def test_fewer_samples_than_ranks_times_batch_is_a_data_error(tmp_path):
    """8 training windows, 2 ranks, batch 6: 4 windows per rank and no batch anywhere. Lightning alone only logs that
    there are no training batches and exits 0 having trained nothing."""
    corpus = tmp_path / "small.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 6, encoding="utf-8")
    proc = train(fit_args(tmp_path, corpus, 5, [], *DDP, "--data.init_args.val_split=0", "--data.init_args.stride=6"),
                 timeout=300)
    err = proc.stderr
    assert proc.returncode == 1, proc.stdout + err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert lines and lines[0].startswith("error: DataError: the training loader has no batch on any of the 2 "), err
    assert "8 training samples over 2 process(es) is 4 per process, fewer than data.batch_size=6" in lines[0]
    assert "Traceback" not in err
