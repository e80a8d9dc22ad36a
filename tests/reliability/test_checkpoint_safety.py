"""Checkpoints are never lost: atomic saves, partial leftovers cleaned up, unreadable files named."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from faults import build, fit, fit_args, write_pydoc_corpus

from lit_llm.callbacks.checkpoint import AtomicCheckpointIO
from lit_llm.errors import CheckpointError
from lit_llm.train import cli, main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """30,000 characters of CPython's docs: more than the shared 4,000, for runs of more steps per epoch."""
    return write_pydoc_corpus(tmp_path_factory.mktemp("corpus"), 30_000)



def test_a_failed_save_leaves_the_previous_checkpoint(corpus, tmp_path, in_repo_root, monkeypatch):
    c = build(corpus, tmp_path, "--trainer.max_steps=4")
    fit(c)
    last = tmp_path / "last.ckpt"
    assert isinstance(c.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    before = last.read_bytes()
    real_save = torch.save

    def save_then_fail(obj, f, *args, **kwargs):
        real_save({"half": torch.zeros(1000)}, f)  # some bytes reach the disk, then the "disk is full"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        c.trainer.save_checkpoint(last)
    monkeypatch.undo()
    assert last.read_bytes() == before
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert not list(tmp_path.glob("*.tmp"))


def test_partial_leftovers_are_removed_with_a_log_line(corpus, tmp_path, in_repo_root, caplog):
    leftover = tmp_path / "last.ckpt.tmp"
    leftover.write_bytes(b"half a checkpoint")
    other = tmp_path / "notes.tmp"  # not ours: left alone
    other.write_text("keep")
    c = build(corpus, tmp_path, "--trainer.max_steps=1")
    with caplog.at_level(logging.INFO):
        fit(c)
    assert not leftover.exists() and other.exists()
    assert f"Removed {leftover}" in caplog.text
    assert (tmp_path / "last.ckpt").is_file()


@pytest.mark.filterwarnings("ignore:Checkpoint directory")
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_checkpoint_is_named(damage, corpus, tmp_path, in_repo_root):
    c = build(corpus, tmp_path, "--trainer.max_steps=2")
    fit(c)
    bad = tmp_path / "broken.ckpt"
    data = (tmp_path / "last.ckpt").read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(4096))
    c = build(corpus, tmp_path, "--trainer.max_steps=4")
    with pytest.raises(CheckpointError) as info:
        c.trainer.fit(c.model, datamodule=c.datamodule, ckpt_path=str(bad))
    message = str(info.value)
    assert str(bad) in message and "truncated or corrupt" in message
    last = tmp_path / "last.ckpt"
    assert f"Previous good checkpoint in its folder: {last}; resume from it with --ckpt_path {last}" in message


def test_unreadable_checkpoint_through_the_cli_is_one_line(corpus, tmp_path, in_repo_root, capsys):
    """``python -m lit_llm.train fit --ckpt_path <garbage>``: one ``error:`` line naming the file and the previous good
    checkpoint; "none" when the folder holds no intact one."""
    main(fit_args(tmp_path, corpus, 2, []))
    bad = tmp_path / "step=000009.ckpt"
    bad.write_bytes((tmp_path / "last.ckpt").read_bytes()[:5000])  # truncated
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(fit_args(tmp_path, corpus, 4, [], f"--ckpt_path={bad}"))
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: CheckpointError: could not read checkpoint {bad} (")
    assert f"Previous good checkpoint in its folder: {tmp_path / 'last.ckpt'}" in lines[0]

    alone = tmp_path / "elsewhere" / "broken.ckpt"
    alone.parent.mkdir()
    alone.write_bytes(os.urandom(2048))
    with pytest.raises(SystemExit):
        main(fit_args(tmp_path, corpus, 4, [], f"--ckpt_path={alone}"))
    assert "No other checkpoint in its folder; start fresh." in capsys.readouterr().err


@pytest.mark.parametrize("failing", ["step=000006.ckpt", "last.ckpt"])
def test_retention_never_deletes_the_last_good_checkpoint(failing, corpus, tmp_path, in_repo_root,
                                                          monkeypatch):
    """Keep the 2 newest (``monitor: step, mode: max, save_top_k: 2``), saving every 2 steps: the save at step 6
    prunes step 2. When the step-6 file (or then last.ckpt) cannot be written, the run stops with the error, and only
    a file that a complete newer one replaced is gone: the newest good checkpoint and last.ckpt (step 4) load."""
    checkpoint = {"monitor": "step", "mode": "max", "save_top_k": 2, "every_n_train_steps": 2,
                  "filename": "step={step:06d}", "auto_insert_metric_name": False}
    c = cli(fit_args(tmp_path, corpus, 8, [], checkpoint=checkpoint)[1:], run=False)
    real_save = AtomicCheckpointIO.save_checkpoint

    def save(self, checkpoint, path, storage_options=None):
        if os.path.basename(path) == failing and checkpoint["global_step"] == 6:
            raise OSError(28, "No space left on device")
        return real_save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save)
    with pytest.raises(OSError, match="No space left"):
        c.trainer.fit(c.model, datamodule=c.datamodule)
    if failing == "last.ckpt":  # step 6 was saved, and only then step 2 pruned
        expected = {"last.ckpt": 4, "step=000004.ckpt": 4, "step=000006.ckpt": 6}
    else:  # step 2 was due to be pruned by the step-6 save, which failed: it stays
        expected = {"last.ckpt": 4, "step=000002.ckpt": 2, "step=000004.ckpt": 4}
    assert {p.name: torch.load(p, weights_only=True)["global_step"] for p in tmp_path.glob("*.ckpt")} == expected
    assert not list(tmp_path.glob("*.tmp"))
