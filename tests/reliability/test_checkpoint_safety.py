"""Checkpoints are never lost: atomic saves, partial leftovers cleaned up, unreadable files named."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from test_numerical import GUARD, build, corpus, fit  # noqa: F401 - corpus is a fixture

from lit_llm.callbacks.checkpoint import AtomicCheckpointIO
from lit_llm.errors import CheckpointError


def test_a_failed_save_leaves_the_previous_checkpoint(corpus, tmp_path, in_repo_root, monkeypatch):  # noqa: F811
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


def test_partial_leftovers_are_removed_with_a_log_line(corpus, tmp_path, in_repo_root, caplog):  # noqa: F811
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
def test_unreadable_checkpoint_is_named(damage, corpus, tmp_path, in_repo_root):  # noqa: F811
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
    assert str(tmp_path / "last.ckpt") in message  # the previous good one


def test_atomic_io_round_trip_and_missing_file(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "sub" / "a.ckpt"
    io.save_checkpoint({"x": torch.arange(3)}, path)
    assert torch.equal(io.load_checkpoint(path)["x"], torch.arange(3))
    assert sorted(os.listdir(path.parent)) == ["a.ckpt"]
    with pytest.raises(FileNotFoundError):
        io.load_checkpoint(tmp_path / "missing.ckpt")
