"""Gradient accumulation: checkpoints land on optimizer-step boundaries, and a run stopped at step 10 and resumed to
20 matches an uninterrupted one exactly (every micro-batch's loss, weights, AdamW state, schedule)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from faults import SaveLog, fit_args, losses_by_batch, read_losses, same_tree, training_state

from lit_llm.callbacks.signals import REQUEUE_EXIT_CODE
from lit_llm.train import cli, main


def run(root: Path, corpus: Path, max_steps: int, accumulate: int, *extra: str, **kwargs) -> tuple[object, SaveLog]:
    """``fit`` with a LossLog and a SaveLog; returns the CLI and the SaveLog."""
    cbs = [{"class_path": "faults.LossLog", "init_args": {"folder": str(root / "log")}},
           {"class_path": "faults.SaveLog"}]
    c = cli(fit_args(root, corpus, max_steps, cbs, f"--trainer.accumulate_grad_batches={accumulate}", *extra, **kwargs))
    return c, next(cb for cb in c.trainer.callbacks if isinstance(cb, SaveLog))


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"accumulate{n}")
def reference(request, corpus, tmp_path_factory):
    """The uninterrupted 20-step run."""
    root = tmp_path_factory.mktemp(f"reference{request.param}")
    c, _ = run(root, corpus, 20, request.param)
    assert c.trainer.global_step == 20 and c.trainer.current_epoch >= 2  # 20 steps cross epoch boundaries
    return request.param, losses_by_batch(read_losses(root / "log")), training_state(root / "last.ckpt")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_resumed_exactly(root: Path, first: dict, reference) -> None:
    """The resumed run's micro-batches (appended to ``root/log`` after ``first``) are exactly the reference's that
    were left, with the same windows and losses; its final weights, AdamW state and schedule are the reference's."""
    _, ref_losses, ref_state = reference
    resumed = {k: v for k, v in losses_by_batch(read_losses(root / "log")).items() if k not in first}
    assert sorted(resumed) == sorted(set(ref_losses) - set(first))
    for key, (loss, window) in resumed.items():
        assert window == ref_losses[key][1], f"micro-batch {key} saw another window"
        assert loss == ref_losses[key][0], f"micro-batch {key}: loss {loss} != {ref_losses[key][0]}"
    assert same_tree(training_state(root / "last.ckpt"), ref_state)


def test_resume_with_accumulation_is_exact(reference, corpus, tmp_path, in_repo_root):
    accumulate = reference[0]
    c, _ = run(tmp_path, corpus, 10, accumulate)
    rows = read_losses(tmp_path / "log")
    assert rows[-1]["step"] == 10 and rows[-1]["batch_idx"] + 1 < c.trainer.num_training_batches  # mid-epoch
    assert training_state(tmp_path / "last.ckpt")["global_step"] == 10
    step10 = digest(tmp_path / "step=000010.ckpt")

    c, saves = run(tmp_path, corpus, 20, accumulate, "--ckpt_path=auto")
    assert c.config.fit.ckpt_path == str(tmp_path / "last.ckpt")
    assert_resumed_exactly(tmp_path, losses_by_batch(rows), reference)
    # Every save of the resumed run followed a completed optimizer step. Lightning alone saves again right after the
    # resume (the step count still matches every_n_train_steps), overwriting step=000010.ckpt with a state whose data
    # position has moved one micro-batch past its weights.
    assert saves.saves and all(stepped for _, stepped in saves.saves), saves.saves
    assert sorted(step for step, _ in saves.saves) == [15, 15, 20, 20]  # step=N.ckpt and last.ckpt
    assert digest(tmp_path / "step=000010.ckpt") == step10


def test_sigterm_between_micro_batches(reference, corpus, tmp_path, in_repo_root):
    """SIGTERM after the first micro-batch of an optimizer step, mid-epoch (step 6 of 2 micro-batches, step 8 of 3):
    the step is finished, last.ckpt saved, the command exits with 75, and ``--ckpt_path auto`` continues exactly. (In
    one process; test_process_faults.py does it to a ``python -m lit_llm.train`` subprocess.)"""
    accumulate = reference[0]
    sent_after = {2: 5, 3: 7}[accumulate]  # (with 3, the step after step 5 is the epoch's last: one micro-batch)
    log = {"class_path": "faults.LossLog", "init_args": {"folder": str(tmp_path / "log")}}
    sigterm = {"class_path": "faults.SigtermAt", "init_args": {"step": sent_after, "mid_step": True}}
    with pytest.raises(SystemExit) as exit_:
        main(fit_args(tmp_path, corpus, 20, [log, sigterm], f"--trainer.accumulate_grad_batches={accumulate}"))
    assert exit_.value.code == REQUEUE_EXIT_CODE == 75
    rows = read_losses(tmp_path / "log")
    epoch_batches = 1 + max(batch for epoch, batch in reference[1] if epoch == 0)
    assert rows[-1]["step"] == sent_after + 1 and rows[-1]["batch_idx"] + 1 < epoch_batches  # a mid-epoch step
    assert rows[-2]["step"] == sent_after  # the micro-batch SIGTERM arrived after; nothing ran after the next one
    assert training_state(tmp_path / "last.ckpt")["global_step"] == sent_after + 1

    run(tmp_path, corpus, 20, accumulate, "--ckpt_path=auto")
    assert_resumed_exactly(tmp_path, losses_by_batch(rows), reference)


@pytest.mark.parametrize("trigger", ["train_time_interval", "val_check_interval"])
def test_every_save_lands_on_a_step_boundary(trigger, corpus, tmp_path, in_repo_root):
    """Saves Lightning would make between micro-batches wait for the end of the optimizer step: a time interval of 0
    (due after every batch), and a validation every 4 batches with 3 micro-batches per step, ranked by val/loss."""
    if trigger == "train_time_interval":
        checkpoint = {"train_time_interval": "0:00:00", "save_top_k": -1, "filename": "{step}"}
        extra = []
    else:
        checkpoint = {"monitor": "val/loss", "save_top_k": 2, "filename": "{step}"}
        extra = ["--trainer.limit_val_batches=1", "--trainer.val_check_interval=4",
                 "--trainer.check_val_every_n_epoch=null", "--data.init_args.val_split=0.2"]
    c, saves = run(tmp_path, corpus, 6, 3, *extra, checkpoint=checkpoint)
    assert c.trainer.global_step == 6
    assert saves.saves and all(stepped for _, stepped in saves.saves), saves.saves
    steps = sorted({step for step, _ in saves.saves})
    if trigger == "train_time_interval":
        assert steps == [1, 2, 3, 4, 5, 6]  # one save per optimizer step, none between its micro-batches
    else:
        # Validations after batches 4, 8, 12, 16 (mid-step for all but 12): saved at the end of steps 2, 3, 4, 6.
        assert steps == [2, 3, 4, 6]
