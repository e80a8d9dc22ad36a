"""PeriodicEval: benchmark scores logged beside the loss while training, within a time budget."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("lm_eval")

from eval_helpers import sentence, write_jsonl  # noqa: E402

from lit_llm.callbacks import PeriodicEval, Throughput  # noqa: E402
from lit_llm.errors import ConfigError, DataError  # noqa: E402
from lit_llm.model.config import GPTConfig  # noqa: E402
from lit_llm.model.gpt import GPTModel  # noqa: E402

T = 16


class TinyTask(pl.LightningModule):
    """What the callbacks read of a lit_llm task: ``.model`` (a GPT, compiled or not) and a ``{"loss": ...}``."""

    def __init__(self, vocab_size: int, compile_model: bool = False) -> None:
        super().__init__()
        model = GPTModel(GPTConfig(vocab_size=vocab_size, context_length=32, emb_dim=32, n_heads=2, n_layers=2,
                                   drop_rate=0.1))
        # The eager backend wraps the GPT as torch.compile does, without the seconds of code generation.
        self.model = torch.compile(model, backend="eager") if compile_model else model

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        loss = self.model(inputs, targets=targets)
        self.log("train/loss", loss)
        return {"loss": loss}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class TinyData(pl.LightningDataModule):
    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        ids = torch.randint(0, tokenizer.vocab_size, (32, T + 1), generator=torch.Generator().manual_seed(0))
        self.train_set = TensorDataset(ids[:, :-1], ids[:, 1:])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=4)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bench")
    rng = random.Random(0)
    questions = [{"context": sentence(rng, 4), "choices": [" " + sentence(rng, 1) for _ in range(3)], "answer": 1}
                 for _ in range(8)]
    return {"mc": write_jsonl(folder / "mini_mc.jsonl", questions),
            "ppl": write_jsonl(folder / "mini_text.jsonl", [{"text": sentence(rng, 50)} for _ in range(2)])}


def fit(tmp_path: Path, tokenizer, callback: PeriodicEval, steps: int, compile_model: bool = False) -> Path:
    torch.manual_seed(0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, max_steps=steps,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         log_every_n_steps=50, logger=CSVLogger(tmp_path, name="csv"),
                         callbacks=[callback, Throughput(window=2)])
    task = TinyTask(tokenizer.vocab_size, compile_model)
    trainer.fit(task, datamodule=TinyData(tokenizer))
    assert task.model.training  # back in train mode after each evaluation
    return Path(trainer.log_dir)


@pytest.mark.parametrize("compile_model", [False, True])
def test_scores_are_logged_beside_the_loss(tmp_path, eval_tokenizer, files, compile_model):
    callback = PeriodicEval(multiple_choice=str(files["mc"]), perplexity=str(files["ppl"]), every_n_steps=2,
                            max_overhead=None)
    log_dir = fit(tmp_path, eval_tokenizer, callback, steps=4, compile_model=compile_model)
    # Steps 2 and 4; the fit-end evaluation would score step 4's weights again and is skipped.
    assert [h["step"] for h in callback.history] == [2.0, 4.0]
    names = {"eval/mini_mc_acc", "eval/mini_mc_acc_norm", "eval/mini_text_word_perplexity",
             "eval/mini_text_byte_perplexity", "eval/mini_text_bits_per_byte"}
    for entry in callback.history:
        assert names <= entry.keys()
        assert 0.0 <= entry["eval/mini_mc_acc"] <= 1.0
        assert entry["eval/mini_text_bits_per_byte"] > 0
    with open(log_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval/mini_mc_acc")]
    assert [int(r["step"]) for r in rows] == [2, 4]  # at the step measured, whatever log_every_n_steps says
    assert float(rows[1]["eval/mini_text_bits_per_byte"]) == pytest.approx(callback.history[1][
        "eval/mini_text_bits_per_byte"])
    assert callback.throughput_excluded_seconds == pytest.approx(sum(h["seconds"] for h in callback.history))


def test_evaluations_are_put_off_beyond_the_overhead_budget(tmp_path, eval_tokenizer, files):
    """The first evaluation runs (nothing is known of its cost); with a tiny budget the next ones wait, and the
    fit-end evaluation runs whatever the budget."""
    callback = PeriodicEval(multiple_choice=str(files["mc"]), every_n_steps=2, max_overhead=1e-6)
    fit(tmp_path, eval_tokenizer, callback, steps=6)
    assert [h["step"] for h in callback.history] == [2.0, 6.0]


def test_the_budget_counts_the_last_evaluations_cost_ahead(monkeypatch):
    """Due while the seconds spent plus the last evaluation's fit within max_overhead of the training time."""
    from types import SimpleNamespace

    trainer = SimpleNamespace(strategy=SimpleNamespace(broadcast=lambda value, src: value))
    callback = PeriodicEval(perplexity=None, tasks=["any"], max_overhead=0.02)
    monkeypatch.setattr("lit_llm.callbacks.evaluation.time.perf_counter", lambda: 1101.0)
    callback._train_start = 1000.0  # 101 s ago, 1 s of it evaluating: 100 s of training allow 2 s
    callback.throughput_excluded_seconds = 1.0
    callback._last_cost = 1.0
    assert callback._due(trainer)
    callback._last_cost = 1.01
    assert not callback._due(trainer)


def test_the_score_is_the_adapters(eval_tokenizer, files):
    """The callback's numbers are the harness's numbers for the same model (its own entry point, not a copy)."""
    import lm_eval

    from lit_llm.evaluation import LitLLMEvalModel, build_task_manager, multiple_choice_task, scalar_metrics

    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=eval_tokenizer.vocab_size, context_length=32, emb_dim=32, n_heads=2,
                               n_layers=2))
    callback = PeriodicEval(multiple_choice=str(files["mc"]), limit=None)
    ours = callback.evaluate(model, eval_tokenizer)
    lm = LitLLMEvalModel(model=model, tokenizer=eval_tokenizer, show_progress=False)
    expected = scalar_metrics(lm_eval.simple_evaluate(model=lm, tasks=[multiple_choice_task(files["mc"])],
                                                      task_manager=build_task_manager(include_defaults=False)))
    assert ours == pytest.approx(expected)
    assert callback.evaluate(model, eval_tokenizer) == ours  # the tasks are built once and reused


def test_bad_arguments_and_files_are_reported(tmp_path, files):
    with pytest.raises(ConfigError) as err:
        PeriodicEval(every_n_steps=0, limit=-1, batch_size=0, max_overhead=2.0)
    for fragment in ("nothing to evaluate", "every_n_steps=0", "limit=-1", "batch_size=0", "max_overhead=2.0"):
        assert fragment in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        PeriodicEval(multiple_choice=str(tmp_path / "missing.jsonl"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"context": "a", "choices": ["b"], "answer": "0"}])
    with pytest.raises(DataError, match=r'bad.jsonl:1 must be a JSON object with "context": str, "choices": list'):
        PeriodicEval(multiple_choice=str(bad))


def test_the_documented_config_instantiates_through_the_cli(tmp_path, files, monkeypatch):
    """docs/evaluation.md's callback entry, as a second --config over the quickstart's run config."""
    from lit_llm.train import cli

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    extra = tmp_path / "eval.yaml"
    extra.write_text(
        "trainer:\n  callbacks:\n    - class_path: lit_llm.callbacks.PeriodicEval\n      init_args:\n"
        f"        multiple_choice: {files['mc']}\n        perplexity: null\n        tasks: null\n"
        "        every_n_steps: 500\n        limit: 200\n        max_overhead: 0.02\n", encoding="utf-8")
    c = cli(["--config", "configs/pretrain/quickstart.yaml", "--config", str(extra),
             "--data.init_args.tokenizer_vocab_size=300"], run=False)
    (callback,) = [cb for cb in c.trainer.callbacks if isinstance(cb, PeriodicEval)]
    assert (callback.every_n_steps, callback.limit, callback.max_overhead) == (500, 200, 0.02)
