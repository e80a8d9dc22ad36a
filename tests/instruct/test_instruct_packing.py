"""Packing in instruction finetuning (``data.packing``): the packed rows hold every training example once, labelled
as the book's collate labels it; the task's loss on a packed batch is the padded batch's; training resumes exactly
mid-epoch; strategies that split the model refuse it in one line."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from support import ROOT

from lit_llm.data import InstructDataModule
from lit_llm.data.collate import collate_instructions
from lit_llm.data.packed import instruction_item
from lit_llm.data.prompts import format_prompt
from lit_llm.data.tokenizer import train_bpe
from lit_llm.errors import ConfigError
from lit_llm.tasks import InstructTask
from lit_llm.train import cli

WORDS = ["river", "stone", "light", "cloud", "amber", "quiet", "north", "ember"]
QUICKSTART = ROOT / "configs" / "instruct" / "quickstart.yaml"


def make_records(n: int) -> list[dict[str, str]]:
    """Records of varied lengths (outputs of 1 to 12 words), a third with an input."""
    return [
        {"instruction": f"Repeat the word {WORDS[i % 8]} {1 + i % 4} times.",
         "input": WORDS[(i + 3) % 8] if i % 3 == 0 else "",
         "output": " ".join([WORDS[i % 8]] * (1 + (i * 5) % 12))}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def records_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("records") / "records.json"
    path.write_text(json.dumps(make_records(200)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> str:
    texts = [format_prompt("alpaca", r["instruction"], r["input"]) + r["output"] for r in make_records(200)]
    return str(train_bpe(texts, vocab_size=400).save(tmp_path_factory.mktemp("tok")))


def dm(tmp_path: Path, records_file: Path, tok_path: str, **kw) -> InstructDataModule:
    kw = {"context_length": 128, "batch_size": 4, "mask_prompt": True, "packing": True, **kw}
    return InstructDataModule(source=str(records_file), tokenizer=tok_path, cache_dir=str(tmp_path / "c"), **kw)


def split_rows(inputs: torch.Tensor, targets: torch.Tensor, documents: torch.Tensor) -> list[tuple]:
    """The examples of a packed batch: ``(ids, targets)`` of each document, padding left out."""
    out = []
    for row in range(inputs.shape[0]):
        for doc in documents[row].unique().tolist():
            if doc == -1:
                continue
            keep = documents[row] == doc
            out.append((tuple(inputs[row, keep].tolist()), tuple(targets[row, keep].tolist())))
    return out


# ---- data -----------------------------------------------------------------------------------------------------------


def test_an_epoch_of_packed_rows_holds_every_training_example_once(tmp_path, records_file, tok_path, caplog):
    d = dm(tmp_path, records_file, tok_path, allowed_max_length=100, drop_last=False)
    with caplog.at_level("INFO"):
        d.setup()
    assert "Packing: packed 170 examples" in caplog.text and "packing efficiency" in caplog.text
    train = d.datasets["train"]
    expected = Counter()
    for ids, n in zip(train.ids, train.prompt_lens):
        item = instruction_item(ids, n, True, d.eos_id, 100)
        expected[(tuple(item["ids"]), tuple(item["targets"]))] += 1
    got = Counter()
    rows = 0
    for inputs, targets, documents in d.train_dataloader():
        assert inputs.shape[1] == 100  # every batch padded to allowed_max_length: one shape for compiled models
        got.update(split_rows(inputs, targets, documents))
        rows += inputs.shape[0]
    assert got == expected
    assert rows == len(d.packed_train) <= len(train) / 2  # at least two examples per row on average
    assert d.packed_train.efficiency > 0.8
    # Validation stays padded (the book's collate), so val/loss reads the same with and without packing.
    assert len(next(iter(d.val_dataloader()))) == 2


def test_packed_targets_are_the_book_collates(tmp_path, records_file, tok_path):
    """The labels of every example in a packed batch are its labels in the book's padded batch."""
    d = dm(tmp_path, records_file, tok_path)
    d.setup()
    inputs, targets, documents = next(iter(d.train_dataloader()))
    examples = split_rows(inputs, targets, documents)
    train = d.datasets["train"]
    padded_inputs, padded_targets = collate_instructions(train.ids, d.eos_id, allowed_max_length=128,
                                                         prompt_lengths=train.prompt_lens)
    by_ids = {}
    for row in range(len(train)):
        n = min(len(train.ids[row]), 128)
        by_ids[tuple(padded_inputs[row, :n].tolist())] = (tuple(padded_targets[row, :n].tolist()),
                                                          padded_targets[row, n:])
    for ids, labels in examples:
        book_labels, book_rest = by_ids[ids]
        assert labels == book_labels and (book_rest == -100).all()


def test_packed_loader_resumes_mid_epoch(tmp_path, records_file, tok_path):
    loader = dm(tmp_path, records_file, tok_path).train_dataloader()
    epoch = list(loader)
    assert len(epoch) > 5
    for _ in range(3):
        loader.consumed()
    resumed = dm(tmp_path, records_file, tok_path).train_dataloader()
    resumed.load_state_dict(loader.state_dict())
    rest = list(resumed)
    assert len(rest) == len(epoch) - 3
    assert all(all(torch.equal(x, y) for x, y in zip(a, b)) for a, b in zip(rest, epoch[3:]))


def test_packing_and_group_by_length_are_refused_together(tmp_path, records_file, tok_path):
    with pytest.raises(ConfigError, match="data.packing and data.group_by_length"):
        dm(tmp_path, records_file, tok_path, group_by_length=True)


# ---- the task's loss ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("speed", [{}, {"chunked_loss": 37}, {"activation_checkpointing": True}],
                         ids=["plain", "chunked_loss", "checkpointing"])
@pytest.mark.parametrize("attention", ["sdpa", "reference"])
def test_packed_loss_equals_the_padded_batchs_loss(tmp_path, records_file, tok_path, speed, attention):
    d = dm(tmp_path, records_file, tok_path)
    d.setup()
    batch = next(iter(d.train_dataloader()))
    examples = split_rows(*batch)
    torch.manual_seed(0)
    task = InstructTask(model=dict(context_length=128, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0,
                                   attention=attention),
                        vocab_size=d.vocab_size, speed=speed, generate_after_fit=False)
    task.configure_model()
    task.model.train()
    ids = [list(x) for x, _ in examples]
    prompt_lens = []
    for x, labels in examples:  # masked prompt: the first trained target is at prompt length - 1
        prompt_lens.append(next(i for i, t in enumerate(labels) if t != -100) + 1)
    padded = collate_instructions(ids, d.eos_id, allowed_max_length=128, prompt_lengths=prompt_lens)
    loss_packed, n_packed = task._loss(batch)
    loss_padded, n_padded = task._loss(padded)
    assert n_packed == n_padded > 0
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-6)
    loss_packed.backward()
    packed_grads = [p.grad.clone() for p in task.parameters()]
    task.zero_grad()
    loss_padded.backward()
    for g, h in zip(packed_grads, (p.grad for p in task.parameters()), strict=True):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_the_compiled_task_takes_packed_batches():
    """``speed.compile`` with inductor on the CPU (about a minute of compilation): the mask built outside the
    compiled model, new document layouts in every batch, the same losses as the eager model."""
    torch.manual_seed(0)
    task = InstructTask(model=dict(context_length=64, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0,
                                   vocab_size=100), speed={"compile": True}, generate_after_fit=False)
    task.configure_model()
    for shift in range(3):
        ids, targets = torch.randint(0, 100, (2, 64)), torch.randint(0, 100, (2, 64))
        docs = torch.repeat_interleave(torch.arange(4), torch.tensor([10 + shift, 20, 30 - shift, 4]))
        docs = docs.repeat(2, 1)
        compiled = task.loss(ids, targets, docs)
        compiled.backward()
        torch.testing.assert_close(compiled, task.model(ids, targets=targets, documents=docs), rtol=1e-5,
                                   atol=1e-6)


def test_tensor_and_pipeline_parallel_refuse_packing(monkeypatch):
    """Their split model has no per-document mask: one line names the setting and the way out."""
    import lit_llm.tasks.base as base
    import lit_llm.tasks.instruct as instruct

    task = InstructTask(model=dict(context_length=32, emb_dim=32, n_heads=2, n_layers=1, vocab_size=50),
                        generate_after_fit=False)
    task.configure_model()
    monkeypatch.setattr(base, "splits_model", lambda strategy: True)
    monkeypatch.setattr(instruct, "splits_model", lambda strategy: True)
    ids = torch.randint(0, 50, (1, 8))
    with pytest.raises(ConfigError, match="data.packing=true is not supported under tensor or pipeline"):
        task.loss(ids, ids, torch.zeros_like(ids))

    class FakeTrainer:
        strategy = object()
        datamodule = type("Data", (), {"packing": True})()

    task._trainer = FakeTrainer()
    with pytest.raises(ConfigError, match="Set data.packing=false, or use lit_ddp"):
        task.setup("fit")


# ---- exact resume through the CLI -------------------------------------------------------------------------------


class PackedLossRecorder(pl.Callback):
    """Test-only: each step's loss, inputs and documents."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.batches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = outputs["loss"].item()
        self.batches[trainer.global_step] = (batch[0].clone(), batch[2].clone())


def fit(root: Path, records_file: Path, max_steps: int, resume: str | None = None):
    callbacks = [
        {"class_path": "lit_llm.callbacks.Checkpoint", "init_args": {"every_n_train_steps": 5, "save_top_k": -1}},
        {"class_path": "lit_llm.callbacks.RNGState"},
        {"class_path": "test_instruct_packing.PackedLossRecorder"},
    ]
    args = [
        "fit", "--config", str(QUICKSTART), "--model.init_args.model.n_layers=2", "--model.init_args.model.emb_dim=32",
        "--model.init_args.model.n_heads=2", "--model.init_args.model.context_length=128",
        "--model.init_args.model.drop_rate=0.1", "--model.init_args.speed.compile=false",
        "--model.init_args.generate_after_fit=false", "--model.init_args.optim.warmup_steps=2",
        "--model.init_args.optim.schedule_steps=20", f"--trainer.default_root_dir={root}",
        f"--trainer.max_steps={max_steps}", "--trainer.deterministic=true", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        "--trainer.callbacks=" + json.dumps(callbacks), f"--data.init_args.source={records_file}",
        "--data.init_args.tokenizer_vocab_size=400", "--data.init_args.packing=true", "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
    ]
    if resume:
        args.append(f"--ckpt_path={resume}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = cli(args)
    return c, next(cb for cb in c.trainer.callbacks if isinstance(cb, PackedLossRecorder))


def test_packed_training_resumes_exactly_mid_epoch(records_file, tmp_path, in_repo_root):
    ref_c, ref = fit(tmp_path / "ref", records_file, 20)
    assert 10 < ref_c.trainer.num_training_batches < 20 and ref_c.trainer.current_epoch >= 1  # crosses an epoch
    assert len(ref_c.datamodule.packed_train) < 170 / 2  # the rows do hold several examples
    fit(tmp_path / "run", records_file, 10)
    c, rec = fit(tmp_path / "run", records_file, 20, resume="last")
    assert sorted(rec.losses) == list(range(11, 21))
    for step in range(11, 21):
        for a, b in zip(rec.batches[step], ref.batches[step]):
            assert torch.equal(a, b), f"step {step} saw other rows"
        assert rec.losses[step] == ref.losses[step], f"step {step}: {rec.losses[step]} != {ref.losses[step]}"
    for (name, a), b in zip(ref_c.model.state_dict().items(), c.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
