"""Callbacks on real (tiny) Trainer runs on the CPU: throughput, samples, loss plot, checkpoint resume."""

from __future__ import annotations

import csv
import json
import string
import time
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lit_llm.callbacks import Checkpoint, LossPlot, SampleGeneration, Throughput, get_peak_flops
from lit_llm.errors import ConfigError
from lit_llm.model.config import GPTConfig
from lit_llm.model.gpt import GPTModel

T = 16  # sequence length of the batches
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class CharTokenizer:
    """Character-level stand-in for the real tokenizer: id 0 is end-of-text, then the printable characters."""

    eos_id = 0

    def __init__(self) -> None:
        self.chars = ["<|endoftext|>", *string.printable]
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self.stoi[c] for c in text if c in self.stoi]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids if i != self.eos_id)


def tiny_config(vocab_size: int) -> GPTConfig:
    return GPTConfig.from_name(
        "tiny", vocab_size=vocab_size, context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.1
    )


class TinyTask(pl.LightningModule):
    """Satisfies the callbacks' contract: ``.model``, ``.tokens_seen``, ``{"loss": ...}``, train/val loss keys."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.model = GPTModel(tiny_config(vocab_size))
        self.vocab_size = vocab_size
        self.tokens_seen = 0

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        logits = self.model(inputs)[..., : self.vocab_size]
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.tokens_seen += batch[0].numel() * self.trainer.world_size
        self.log("train/loss", loss)
        return {"loss": loss}

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def random_ids(n: int, vocab_size: int, seed: int) -> TensorDataset:
    ids = torch.randint(1, vocab_size, (n, T + 1), generator=torch.Generator().manual_seed(seed))
    return TensorDataset(ids[:, :-1], ids[:, 1:])


class TinyData(pl.LightningDataModule):
    def __init__(self, n_train: int = 24, n_val: int = 8, batch_size: int = 4) -> None:
        super().__init__()
        self.tokenizer = CharTokenizer()
        self.train_set = random_ids(n_train, self.tokenizer.vocab_size, seed=1)
        self.val_set = random_ids(n_val, self.tokenizer.vocab_size, seed=2)
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


def trainer_kwargs(tmp_path: Path, **kw) -> dict:
    return dict(
        accelerator="cpu", devices=1, default_root_dir=tmp_path, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, **kw,
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- a full run with every callback -------------------------------------------------------------------------------


def test_callbacks_on_a_real_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = TinyData()  # 6 training batches an epoch of 4 x 16 tokens
    task = TinyTask(data.tokenizer.vocab_size)
    throughput = Throughput(window=2, peak_flops=1e12)
    loss_plot = LossPlot()
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=6, val_check_interval=3, log_every_n_steps=50),
        logger=[CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")],
        callbacks=[throughput, SampleGeneration(every_n_steps=3, max_new_tokens=5), loss_plot],
    )
    trainer.fit(task, datamodule=data)
    log_dir = Path(trainer.log_dir)
    assert log_dir == tmp_path / "csv" / "version_0"

    # Throughput: windows end at steps 2 (warm-up, not reported), 4 and 6. log_every_n_steps=50 must not drop them.
    assert [h["step"] for h in throughput.history] == [4.0, 6.0]
    rows = [r for r in read_csv(log_dir / "metrics.csv") if r.get("perf/tokens_per_sec")]
    assert [int(r["step"]) for r in rows] == [4, 6]
    for r in rows:
        assert float(r["perf/tokens_per_sec"]) > 0
        assert float(r["perf/tokens_per_sec"]) == pytest.approx(float(r["perf/tokens_per_sec_per_device"]))
        assert float(r["perf/samples_per_sec"]) == pytest.approx(float(r["perf/tokens_per_sec"]) / T)
        assert 0 < float(r["perf/mfu"]) < 1
    assert trainer.callback_metrics["perf/tokens_per_sec"] > 0  # what the progress bar shows
    tps = throughput.history[-1]["perf/tokens_per_sec"]
    expected_mfu = task.model.flops_per_token(T) * tps / 1e12
    assert throughput.history[-1]["perf/mfu"] == pytest.approx(expected_mfu)

    # Samples at steps 3 and 6; the fit-end sample would repeat step 6's weights and is skipped.
    lines = (log_dir / "samples.txt").read_text().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[step 3 | 192 tokens] Every effort moves you")
    assert lines[1].startswith("[step 6 | 384 tokens] Every effort moves you")
    assert task.model.training  # train mode restored after generating

    # Loss plot: one point per validation (the sanity check is skipped), at half and one full epoch.
    png = log_dir / "loss.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5_000
    points = read_csv(log_dir / "loss.csv")
    assert len(points) == 2
    assert [float(p["epoch"]) for p in points] == [0.5, 1.0]
    assert [int(float(p["tokens_seen"])) for p in points] == [192, 384]
    for p in points:
        assert 3.0 < float(p["train_loss"]) < 6.0  # ~ln(101) for an untrained model on random ids
        assert 3.0 < float(p["val_loss"]) < 6.0
    assert float(points[-1]["val_loss"]) == pytest.approx(float(trainer.callback_metrics["val/loss"]))

    # TensorBoard got the samples as text.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"tensors": 0}).Reload()
    texts = events.Tensors("samples/text_summary")
    assert [t.step for t in texts] == [3, 6]
    assert b"Every effort moves you" in texts[0].tensor_proto.string_val[0]


def test_fast_dev_run_and_no_logger(tmp_path: Path) -> None:
    data = TinyData()
    task = TinyTask(data.tokenizer.vocab_size)
    throughput = Throughput(window=1)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, fast_dev_run=4),
        callbacks=[throughput, SampleGeneration(every_n_steps=None, max_new_tokens=3), LossPlot()],
    )
    trainer.fit(task, datamodule=data)
    assert [h["step"] for h in throughput.history] == [2.0, 3.0, 4.0]  # step 1 is the warm-up window
    assert "perf/mfu" not in throughput.history[0]  # CPU and no peak_flops: no MFU
    assert trainer.callback_metrics["perf/tokens_per_sec"] > 0
    # No logger: files go to default_root_dir; only the fit-end sample.
    lines = (tmp_path / "samples.txt").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[step 4 | 256 tokens] Every effort moves you")
    assert (tmp_path / "loss.png").read_bytes()[:8] == PNG_MAGIC


def test_gradient_accumulation_counts_optimizer_steps_and_real_losses(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = TinyData()  # 6 batches an epoch -> 3 optimizer steps an epoch
    task = TinyTask(data.tokenizer.vocab_size)
    throughput = Throughput(window=1)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=4, accumulate_grad_batches=2, num_sanity_val_steps=0, logger=False),
        callbacks=[throughput, SampleGeneration(every_n_steps=1, max_new_tokens=2), LossPlot()],
    )
    trainer.fit(task, datamodule=data)
    assert [h["step"] for h in throughput.history] == [2.0, 3.0, 4.0]
    # Two batches of 4 x 16 tokens per reported step-window.
    assert all(h["perf/samples_per_sec"] * h["perf/sec_per_step"] == pytest.approx(8) for h in throughput.history)
    # The run's summary, for benchmarks: total tokens over total seconds of the reported windows.
    summary = json.loads((tmp_path / "throughput.json").read_text())
    seconds = sum(h["seconds"] for h in throughput.history)
    assert summary["windows"] == 3 and summary["tokens_per_sec"] == pytest.approx(3 * 2 * 4 * 16 / seconds)
    lines = (tmp_path / "samples.txt").read_text().splitlines()
    assert [line.split(" |")[0] for line in lines] == ["[step 1", "[step 2", "[step 3", "[step 4"]  # one per step
    (point,) = read_csv(tmp_path / "loss.csv")  # validation at the end of epoch 0
    assert float(point["epoch"]) == 1.0
    # Lightning passes on the loss divided by accumulate_grad_batches; the plot shows the real one (~ln 101 = 4.6).
    assert 4.0 < float(point["train_loss"]) < 5.5


# --- SampleGeneration ---------------------------------------------------------------------------------------------


def test_generate_sample_is_deterministic_and_crops_the_prompt() -> None:
    tok = CharTokenizer()
    torch.manual_seed(0)
    model = GPTModel(tiny_config(tok.vocab_size))  # train mode, dropout on
    greedy = SampleGeneration(max_new_tokens=8)
    first = greedy.generate_sample(model, tok)
    assert first == greedy.generate_sample(model, tok)
    assert first.startswith("Every effort moves you") and len(first) == len("Every effort moves you") + 8
    assert model.training

    sampled = SampleGeneration(max_new_tokens=8, temperature=1.0, top_k=20, seed=7)
    assert sampled.generate_sample(model, tok) == sampled.generate_sample(model, tok)  # seeded each time

    long_prompt = "x" * 40 + "the end"  # 47 characters, context is 32
    out = SampleGeneration(prompt=long_prompt, max_new_tokens=2).generate_sample(model, tok)
    assert out.startswith("x" * 25 + "the end") and not out.startswith("x" * 26)


def test_sample_generation_without_tokenizer_warns_once(tmp_path: Path) -> None:
    vocab = CharTokenizer().vocab_size
    loader = DataLoader(random_ids(8, vocab, seed=3), batch_size=4)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, logger=False),
                         callbacks=[SampleGeneration(every_n_steps=1, max_new_tokens=2)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyTask(vocab), train_dataloaders=loader)
    ours = [w for w in caught if "SampleGeneration: no tokenizer" in str(w.message)]
    assert len(ours) == 1
    assert not (tmp_path / "samples.txt").exists()


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        (dict(prompt=""), "prompt"),
        (dict(every_n_steps=0), "every_n_steps"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_sample_generation_rejects_bad_arguments(kwargs: dict, bad: str) -> None:
    with pytest.raises(ConfigError, match=bad):
        SampleGeneration(**kwargs)


# --- Throughput ---------------------------------------------------------------------------------------------------


def test_get_peak_flops() -> None:
    assert get_peak_flops("NVIDIA H200", "bf16-mixed") == 989.4e12
    assert get_peak_flops("NVIDIA H200", "bf16") == 989.4e12
    assert get_peak_flops("NVIDIA H200 NVL", "bf16-true") == 835.5e12
    assert get_peak_flops("NVIDIA GH200 480GB", "16-mixed") == 989.4e12
    assert get_peak_flops("NVIDIA H100 80GB HBM3", "bf16-mixed") == 989.4e12
    assert get_peak_flops("NVIDIA H100 PCIe", "bf16-mixed") == 756e12
    assert get_peak_flops("NVIDIA A100-SXM4-80GB", "bf16-mixed") == 312e12
    assert get_peak_flops("NVIDIA A100-SXM4-80GB", "tf32") == 156e12
    assert get_peak_flops("NVIDIA A10G", "16-mixed") == 125e12
    assert get_peak_flops("NVIDIA L4", "bf16-mixed") == 121e12
    assert get_peak_flops("NVIDIA L40S", "bf16-mixed") == 362.05e12
    assert get_peak_flops("NVIDIA GeForce RTX 4090", "bf16-mixed") == 165.2e12
    assert get_peak_flops("NVIDIA GeForce RTX 3090", "16-mixed") == 71e12
    assert get_peak_flops("Tesla V100-SXM2-16GB", "16-mixed") == 125e12
    assert get_peak_flops("Tesla V100-SXM2-16GB", "bf16-mixed") is None  # no bf16 tensor cores
    assert get_peak_flops("Some Future GPU", "bf16-mixed") is None
    assert get_peak_flops("NVIDIA H200", "64-true") is None

    # "32-true" follows PyTorch's TF32 switches.
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        if not torch.backends.cuda.matmul.allow_tf32:
            assert get_peak_flops("NVIDIA A100-SXM4-80GB", "32-true") == 19.5e12
        torch.set_float32_matmul_precision("high")
        assert get_peak_flops("NVIDIA A100-SXM4-80GB", "32-true") == 156e12
        assert get_peak_flops("NVIDIA H200", "32-true") == 494.7e12
    finally:
        torch.set_float32_matmul_precision(before)


class SlowWork(pl.Callback):
    """Sleeps after step 3 and says so, as SampleGeneration reports its generation time."""

    def __init__(self) -> None:
        self.throughput_excluded_seconds = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            time.sleep(0.6)
            self.throughput_excluded_seconds += 0.6


class SlowValidationTask(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self.layer(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        time.sleep(0.6)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_throughput_leaves_out_validation_and_reported_work(tmp_path: Path) -> None:
    throughput = Throughput(window=2)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=8, val_check_interval=5, limit_val_batches=1, num_sanity_val_steps=0,
                         logger=False),
        callbacks=[throughput, SlowWork()],
    )
    trainer.fit(SlowValidationTask(), train_dataloaders=linear_loader(), val_dataloaders=linear_loader())
    # Windows 2-4 (holds the 0.6 s of reported work) and 4-6 (holds the 0.6 s validation) would take >= 0.3 s/step.
    assert [h["step"] for h in throughput.history] == [4.0, 6.0, 8.0]
    assert all(h["perf/sec_per_step"] < 0.2 for h in throughput.history), throughput.history
    assert all("perf/mfu" not in h for h in throughput.history)  # this module has no flops_per_token


@pytest.mark.parametrize("kwargs", [dict(window=0), dict(window=2.5), dict(peak_flops=0.0), dict(peak_flops=-1e12)])
def test_throughput_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        Throughput(**kwargs)


# --- LossPlot -----------------------------------------------------------------------------------------------------


def test_loss_plot_without_points_writes_nothing_and_state_round_trips(tmp_path: Path) -> None:
    plot = LossPlot(filename="curve.svg")
    assert plot.write(str(tmp_path)) is None
    assert not list(tmp_path.iterdir())

    plot.points = [
        dict(step=10.0, tokens_seen=1000.0, epoch=0.5, train_loss=5.0, val_loss=5.5),
        dict(step=20.0, tokens_seen=2000.0, epoch=1.0, train_loss=4.0, val_loss=float("nan")),
    ]
    restored = LossPlot()
    restored.load_state_dict(plot.state_dict())
    assert restored.points[0] == plot.points[0] and [p["step"] for p in restored.points] == [10.0, 20.0]
    path = plot.write(str(tmp_path))
    assert path == str(tmp_path / "curve.svg") and (tmp_path / "curve.svg").read_text().lstrip().startswith("<?xml")
    assert len(read_csv(tmp_path / "loss.csv")) == 2

    with pytest.raises(ConfigError, match="filename"):
        LossPlot(filename="plots/loss.png")


# --- Checkpoint ---------------------------------------------------------------------------------------------------


class LinearTask(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.start_step: int | None = None

    def on_train_start(self) -> None:
        self.start_step = self.trainer.global_step

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def linear_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)), batch_size=4)


def fit_linear(
    root: Path, max_steps: int, ckpt_path: str | None = None, **ckpt_kwargs
) -> tuple[pl.Trainer, LinearTask]:
    task = LinearTask()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, default_root_dir=root, max_steps=max_steps, logger=CSVLogger(root),
        callbacks=[Checkpoint(**ckpt_kwargs)], enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(task, train_dataloaders=linear_loader(), ckpt_path=ckpt_path)
    return trainer, task


def test_checkpoint_saves_into_default_root_dir_and_resumes_from_last(tmp_path: Path) -> None:
    first, _ = fit_linear(tmp_path, max_steps=3)
    assert (tmp_path / "last.ckpt").is_file()
    assert not (tmp_path / "lightning_logs" / "version_0" / "checkpoints").exists()
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 3

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second, task = fit_linear(tmp_path, max_steps=5, ckpt_path="last")
    messages = [str(w.message) for w in caught]
    assert not any("no last checkpoint" in m for m in messages), messages
    assert not any("exists and is not empty" in m for m in messages), messages
    assert task.start_step == 3  # resumed where the first run stopped
    assert second.global_step == 5
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 5


def test_fast_dev_run_leaves_a_runs_last_checkpoint_alone(tmp_path: Path) -> None:
    """Lightning's end-of-training save_last ignores fast_dev_run; a smoke test in a real run's folder must not
    replace that run's last.ckpt (which ``--ckpt_path auto`` resumes from)."""
    fit_linear(tmp_path, max_steps=3)
    before = (tmp_path / "last.ckpt").read_bytes()
    files = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    trainer = pl.Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, fast_dev_run=True,
                         callbacks=[Checkpoint()], enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(LinearTask(), train_dataloaders=linear_loader())
    assert trainer.global_step == 1
    assert (tmp_path / "last.ckpt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == files  # nothing new written either


def test_checkpoint_keeps_an_explicit_dirpath(tmp_path: Path) -> None:
    fit_linear(tmp_path, max_steps=2, dirpath=str(tmp_path / "elsewhere"), save_last=False)
    assert [p.name for p in (tmp_path / "elsewhere").iterdir()] == ["epoch=0-step=2.ckpt"]
    assert not (tmp_path / "last.ckpt").exists()


def test_progress_bar_reads_metrics_at_most_twice_a_second(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading logged metrics copies them to the host (a GPU synchronisation); the bar must not do it every batch."""
    from lit_llm.callbacks import ProgressBar

    reads = []
    original = ProgressBar.get_metrics

    def counting(self, trainer, pl_module):  # noqa: ANN001, ANN202
        reads.append(trainer.state.stage)
        return original(self, trainer, pl_module)

    monkeypatch.setattr(ProgressBar, "get_metrics", counting)
    clock = iter(range(10**6))  # every call to time.monotonic advances a tenth of a second
    monkeypatch.setattr("lit_llm.callbacks.progress.time.monotonic", lambda: next(clock) / 10)
    data = TinyData()
    task = TinyTask(data.tokenizer.vocab_size)
    kwargs = {**trainer_kwargs(tmp_path, max_steps=30, logger=False, num_sanity_val_steps=0),
              "enable_progress_bar": True}
    trainer = pl.Trainer(**kwargs, callbacks=[ProgressBar()])
    trainer.fit(task, datamodule=data)
    train_reads = [r for r in reads if r == "train"]
    # 30 batches, one clock tick each: the metrics are read on the first batch and then every 5 ticks (0.5 s).
    assert 3 <= len(train_reads) <= 8, reads
