"""Exact resume: a run stopped at step 10 and resumed matches an uninterrupted 20-step run, mid-epoch, with
shuffling and dropout, across an epoch boundary."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from support import ROOT, TINY_MODEL

from lit_llm.data.sampler import ResumableSampler
from lit_llm.train import cli
from lit_llm.weights.discovery import auto_checkpoint

QUICKSTART = ROOT / "configs" / "pretrain" / "quickstart.yaml"
BATCH = 6


class LossRecorder(pl.Callback):
    """Test-only: the per-step training loss and the windows each step saw."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.batches: dict[int, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses[trainer.global_step] = loss.item()
        self.batches[trainer.global_step] = batch[0].clone()


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    """A corpus small enough that an epoch is ~16 batches, so 20 steps cross an epoch boundary."""
    from lit_llm.data.builtin import load_builtin

    path = tmp_path_factory.mktemp("small") / "corpus.txt"
    path.write_text("\n\n".join(load_builtin("pydoc")["text"])[:4_000], encoding="utf-8")
    return path


def callbacks(rng: bool) -> str:
    cbs = [{"class_path": "lit_llm.callbacks.Checkpoint", "init_args": {"every_n_train_steps": 5, "save_top_k": -1}}]
    if rng:
        cbs.append({"class_path": "lit_llm.callbacks.RNGState"})
    cbs.append({"class_path": "test_resume.LossRecorder"})
    return "--trainer.callbacks=" + json.dumps(cbs)


def run(root: Path, corpus: Path, max_steps: int, rng: bool = True, resume: str | None = None, stride: int = 24):
    args = [
        "fit", "--config", str(QUICKSTART), *TINY_MODEL,
        "--model.init_args.model.context_length=16", "--model.init_args.model.drop_rate=0.2",
        "--model.init_args.optim.warmup_steps=2", "--model.init_args.optim.schedule_steps=20",
        f"--trainer.default_root_dir={root}", f"--trainer.max_steps={max_steps}", "--trainer.deterministic=true",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0", callbacks(rng),
        f"--data.init_args.source={corpus}", "--data.init_args.tokenizer_vocab_size=300",
        f"--data.init_args.batch_size={BATCH}", f"--data.init_args.stride={stride}", "--data.init_args.num_workers=0",
    ]
    if resume:
        args.append(f"--ckpt_path={resume}")
    c = cli(args)
    return c, next(cb for cb in c.trainer.callbacks if type(cb).__name__ == "LossRecorder")


@pytest.fixture(scope="module")
def reference(small_corpus, tmp_path_factory):
    """The uninterrupted 20-step run."""
    c, rec = run(tmp_path_factory.mktemp("ref"), small_corpus, 20)
    return c, rec


def test_epoch_shape(reference):
    """The setup the parity tests rely on: an epoch is longer than 10 steps, and 20 steps cross into the next."""
    c, _ = reference
    assert 10 < c.trainer.num_training_batches < 20
    assert c.trainer.current_epoch >= 1


def _resumed(tmp_path, corpus, rng: bool):
    run(tmp_path, corpus, 10, rng=rng)
    assert (tmp_path / "last.ckpt").is_file()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c, rec = run(tmp_path, corpus, 20, rng=rng, resume="last")
    return c, rec, caught


def test_resume_mid_epoch_is_exact(reference, small_corpus, tmp_path, in_repo_root):
    ref_c, ref = reference
    c, rec, caught = _resumed(tmp_path, small_corpus, rng=True)
    assert sorted(rec.losses) == list(range(11, 21))
    for step in range(11, 21):
        assert torch.equal(rec.batches[step], ref.batches[step]), f"step {step} saw other windows"
        assert rec.losses[step] == ref.losses[step], f"step {step}: {rec.losses[step]} != {ref.losses[step]}"
    for (name, a), b in zip(ref_c.model.state_dict().items(), c.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert c.trainer.global_step == 20
    # The loader position and RNG states are in the checkpoint, in types that load with weights_only=True.
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["epoch"] == 1
    assert any(k.startswith("RNGState") for k in ckpt["callbacks"])
    assert not [w for w in caught if "ended before the epoch ended" in str(w.message)]


def test_without_rng_state_dropout_diverges(reference, small_corpus, tmp_path, in_repo_root):
    _, ref = reference
    _, rec, _ = _resumed(tmp_path, small_corpus, rng=False)
    # Same windows (the sampler resumes) but different dropout masks.
    assert all(torch.equal(rec.batches[s], ref.batches[s]) for s in range(11, 21))
    assert any(rec.losses[s] != ref.losses[s] for s in range(11, 21))


def test_sampler_resume_and_shards():
    s = ResumableSampler(10, seed=3)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    s.set_epoch(0)
    it = iter(s)
    head = [next(it) for _ in range(4)]
    state = s.state_dict()
    t = ResumableSampler(10, seed=3)
    t.load_state_dict(state)
    assert head + list(t) == first and len(t) == 10
    t.set_epoch(1)
    assert list(t) == second  # the next epoch reshuffles as it would have
    shards = [list(ResumableSampler(10, seed=3, num_replicas=3, rank=r)) for r in range(3)]
    assert all(len(x) == 4 for x in shards) and set(sum(shards, [])) == set(range(10))


def test_sampler_keeps_the_previous_shuffle_order():
    """Epoch by epoch, the order ``DataLoader(shuffle=True, generator=seeded)`` gave before the sampler existed."""
    from torch.utils.data import DataLoader

    old = DataLoader(range(37), batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(7), drop_last=True)
    expected = [[i for b in old for i in b.tolist()] for _ in range(3)]
    sampler = ResumableSampler(37, seed=7)
    for epoch in (0, 2, 1):  # any epoch, in any order
        sampler.set_epoch(epoch)
        assert list(sampler)[:35] == expected[epoch]


def test_ckpt_path_auto(tmp_path, caplog):
    with caplog.at_level("INFO"):
        assert auto_checkpoint(tmp_path) is None
    assert f"no checkpoint in {tmp_path}: starting fresh" in caplog.text
    for step in (5, 10):
        torch.save({"global_step": step}, tmp_path / f"step={step:06d}.ckpt")
    (tmp_path / "step=000015.ckpt.tmp").write_bytes(b"x")  # the leftover of a killed save: not a *.ckpt
    assert auto_checkpoint(tmp_path) == str(tmp_path / "step=000010.ckpt")
    # A truncated file under a final name (a copy cut short, a save by a non-atomic writer) is skipped, with a log line.
    data = (tmp_path / "step=000010.ckpt").read_bytes()
    (tmp_path / "step=000020.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "step=000025.ckpt").write_bytes(b"")
    caplog.clear()
    with caplog.at_level("INFO"):
        assert auto_checkpoint(tmp_path) == str(tmp_path / "step=000010.ckpt")
    assert f"skipping {tmp_path / 'step=000020.ckpt'}, which is not a complete checkpoint" in caplog.text
    # The highest global step wins, read from the file when its name has no step=N; at the same step, last.ckpt.
    torch.save({"global_step": 3}, tmp_path / "last.ckpt")
    assert auto_checkpoint(tmp_path) == str(tmp_path / "step=000010.ckpt")
    torch.save({"global_step": 10}, tmp_path / "last.ckpt")
    assert auto_checkpoint(tmp_path) == str(tmp_path / "last.ckpt")


def test_ckpt_path_auto_through_cli(small_corpus, tmp_path, in_repo_root):
    """``auto`` starts fresh in an empty folder, then resumes from the folder's last.ckpt."""
    c, _ = run(tmp_path, small_corpus, 5, resume="auto")
    assert c.config.fit.ckpt_path is None and c.trainer.global_step == 5
    c, rec = run(tmp_path, small_corpus, 8, resume="auto")
    assert c.config.fit.ckpt_path == str(tmp_path / "last.ckpt") and sorted(rec.losses) == [6, 7, 8]
