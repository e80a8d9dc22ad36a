"""The shipped configs and the ``python -m lit_llm.train`` entry point."""

from __future__ import annotations

import argparse
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from support import ROOT, SHARED_DATA, TINY_MODEL

from lit_llm.callbacks import Checkpoint, LossPlot, ProgressBar, SampleGeneration, Throughput
from lit_llm.data import PretrainDataModule
from lit_llm.errors import ConfigError
from lit_llm.tasks import PretrainTask
from lit_llm.train import cli, main

RUN_CONFIGS = sorted((ROOT / "configs" / "pretrain").glob("*.yaml"))
TRAINER_CONFIGS = sorted((ROOT / "configs" / "trainer").glob("*.yaml"))
CALLBACK_PRESETS = sorted((ROOT / "callbacks").glob("*.yaml"))
ALL_YAML = sorted(set((ROOT / "configs").rglob("*.yaml")) | set(CALLBACK_PRESETS))



@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~60k characters of real English (CPython's docs) in a local file, standing in for downloads."""
    from lit_llm.data.builtin import load_builtin

    texts = load_builtin("pydoc")["text"]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(texts)[:60_000], encoding="utf-8")
    return path


def tiny_overrides(config: Path, corpus: Path, root: Path, hardware: bool = True) -> list[str]:
    """Shrink a shipped run config to seconds on a CPU, and point downloads at local files."""
    args = [*TINY_MODEL, f"--trainer.default_root_dir={root}", "--data.init_args.num_workers=0"]
    if hardware:
        args += ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true"]
    text = config.read_text()
    if "source: builtin:" not in text:
        args += [f"--data.init_args.source={corpus}", "--data.init_args.sha256=null",
                 "--data.init_args.split_by=characters", "--data.init_args.val_split=0.1"]
    if "tokenizer: gpt2" in text:
        args += ["--data.init_args.tokenizer=train", "--data.init_args.tokenizer_vocab_size=300"]
    if "context_length: 1024" in text:
        args += ["--model.init_args.model.context_length=64"]
    return args


def test_every_yaml_is_tested():
    """Each YAML in configs/ and callbacks/ is exercised by a test below (this guards new files)."""
    # Finetuning configs are run by tests/classify, tests/instruct, tests/dpo and tests/chat, over the same globs.
    tasks = ("classify", "instruct", "dpo", "chat")
    finetuning = {p for task in tasks for p in (ROOT / "configs" / task).glob("*.yaml")}
    covered = set(RUN_CONFIGS) | set(TRAINER_CONFIGS) | set(CALLBACK_PRESETS) | finetuning
    assert set(ALL_YAML) == covered
    assert {p.name for p in RUN_CONFIGS} >= {"quickstart.yaml", "verdict.yaml", "gpt2-124m.yaml"}


@pytest.mark.parametrize("config", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_config_fast_dev_run(config, corpus, tmp_path, in_repo_root):
    c = cli(["fit", "--config", str(config), *tiny_overrides(config, corpus, tmp_path), "--trainer.fast_dev_run=true"])
    assert isinstance(c.model, PretrainTask) and isinstance(c.datamodule, PretrainDataModule)
    # The links: vocabulary from the tokenizer into the model, context length from the model into the data.
    assert c.model.config.vocab_size == c.datamodule.vocab_size
    assert c.datamodule.context_length == c.model.config.context_length
    assert c.trainer.state.finished and c.trainer.global_step == 1
    assert torch.isfinite(c.trainer.callback_metrics["train/loss"])
    # Not a progress-bar metric, which Lightning would copy to the host after every batch (a GPU synchronisation);
    # lit_llm's ProgressBar shows it all the same.
    assert "train/loss" not in c.trainer.progress_bar_metrics
    bars = [cb for cb in c.trainer.callbacks if isinstance(cb, ProgressBar)]
    if bars:
        c.trainer.state.stage = "train"
        assert bars[0].get_metrics(c.trainer, c.model)["loss"] == pytest.approx(
            float(c.trainer.callback_metrics["train/loss"]))


def test_quickstart_values(in_repo_root):
    """The quickstart is what the README says: built-in corpus, trained BPE, small CPU model."""
    c = cli(["--config", "configs/pretrain/quickstart.yaml", "--data.init_args.tokenizer_vocab_size=300"], run=False)
    assert c.datamodule.source == "builtin:pydoc" and c.datamodule.tokenizer_source == "train"
    assert c.trainer.max_steps == 600 and c.model.config.n_layers == 4
    kinds = {type(cb) for cb in c.trainer.callbacks}
    assert {Checkpoint, Throughput, SampleGeneration, LossPlot} <= kinds


def test_verdict_is_the_books_run():
    """configs/pretrain/verdict.yaml holds the book's chapter 5 settings (it is run by test_run_config_fast_dev_run
    with local files in place of its downloads)."""
    cfg = yaml.safe_load((ROOT / "configs/pretrain/verdict.yaml").read_text())
    m, d, t = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]
    assert cfg["seed_everything"] == 123
    assert m["model"] == {"context_length": 256, "emb_dim": 768, "n_heads": 12, "n_layers": 12, "drop_rate": 0.1,
                          "qkv_bias": False, "tie_weights": False, "pad_vocab_multiple": 1, "init": "pytorch"}
    o = m["optim"]
    assert (o["learning_rate"], o["weight_decay"], o["decay_all"], o["lr_schedule"]) == (4e-4, 0.1, True, "constant")
    assert o["gradient_clip"] is None and o["betas"] == [0.9, 0.999]
    assert (d["batch_size"], d["stride"], d["val_split"], d["split_by"]) == (2, 256, 0.1, "characters")
    assert d["tokenizer"] == "gpt2" and d["sha256"].startswith("b41e41a6")
    assert t["max_epochs"] == 10


@pytest.mark.parametrize("config", TRAINER_CONFIGS, ids=lambda p: p.name)
def test_trainer_presets(config, corpus, tmp_path, in_repo_root):
    quick = ROOT / "configs/pretrain/quickstart.yaml"
    args = ["fit", "--config", str(quick), "--config", str(config),
            *tiny_overrides(quick, corpus, tmp_path, hardware=False), "--data.init_args.tokenizer_vocab_size=300"]
    if "accelerator: gpu" in config.read_text() and not torch.cuda.is_available():
        # Instantiate everything but the accelerator, which this machine lacks (run for real by the gpu tests).
        strategy = yaml.safe_load(config.read_text())["trainer"].get("strategy")
        if "deepspeed" in str(strategy) and importlib.util.find_spec("deepspeed") is None:
            with pytest.raises(ConfigError, match=r"pip install 'lit_llm\[deepspeed\]'"):
                cli([*args[1:], "--trainer.accelerator=cpu"], run=False)
            return
        c = cli([*args[1:], "--trainer.accelerator=cpu"], run=False)
        assert c.trainer.precision == "bf16-mixed"
        if strategy is not None:  # the registered name resolved to its class and settings
            from pytorch_lightning.strategies import StrategyRegistry

            assert type(c.trainer.strategy) is StrategyRegistry[strategy]["strategy"]
            wanted = StrategyRegistry[strategy]["init_params"].get("sharding_strategy")
            if wanted is not None:
                assert c.trainer.strategy.sharding_strategy.name == wanted
        return
    c = cli([*args, "--trainer.fast_dev_run=true"])
    assert c.trainer.state.finished
    assert c.trainer.precision == yaml.safe_load(config.read_text())["trainer"]["precision"]


@pytest.mark.parametrize("preset", CALLBACK_PRESETS, ids=lambda p: p.name)
def test_callback_presets_replace_the_list(preset, corpus, tmp_path, in_repo_root):
    """A later --config's trainer.callbacks replaces the run config's list whole (it does not merge)."""
    quick = ROOT / "configs/pretrain/quickstart.yaml"
    c = cli(["fit", "--config", str(quick), "--config", str(preset), *tiny_overrides(quick, corpus, tmp_path),
             "--data.init_args.tokenizer_vocab_size=300", "--trainer.fast_dev_run=true"])
    wanted = [e["class_path"].rsplit(".", 1)[1] for e in yaml.safe_load(preset.read_text())["trainer"]["callbacks"]]
    ours = [type(cb).__name__ for cb in c.trainer.callbacks if type(cb).__module__.startswith("lit_llm")]
    # (Lightning moves checkpoint callbacks to the end of the list, so compare as sorted lists.)
    assert sorted(ours) == sorted(wanted)
    assert c.trainer.state.finished


def _usage_error(capsys, args: list[str]) -> str:
    """``main(args)`` ends with exit status 2 and one ``error: UsageError`` line, no traceback; returns that line."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: UsageError: ")
    return lines[0]


def test_unknown_key_is_named(in_repo_root, capsys):
    assert "learnin_rate" in _usage_error(capsys, ["fit", "--config", "configs/pretrain/quickstart.yaml",
                                                   "--model.init_args.optim.learnin_rate=1"])


def test_an_abbreviated_flag_is_refused_with_the_full_name(in_repo_root, capsys):
    """argparse would take ``--trainer.max_step`` for ``--trainer.max_steps``; lit_llm refuses and names it."""
    line = _usage_error(capsys, ["fit", "--config", "configs/pretrain/quickstart.yaml", "--trainer.max_step", "10"])
    assert "--trainer.max_step " in line + " " and "did you mean --trainer.max_steps?" in line


def test_a_renamed_class_is_named_with_its_new_path(in_repo_root, capsys):
    line = _usage_error(capsys, ["fit", "--config", "configs/pretrain/quickstart.yaml",
                                 "--model.class_path=lit_llm.tasks.ClassifierModule"])
    assert "ClassifierModule is now lit_llm.tasks.ClassifyTask" in line


def test_unknown_key_in_yaml_is_named(in_repo_root, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    model:\n      n_layrs: 3\n")
    assert "n_layrs" in _usage_error(capsys, ["fit", "--config", "configs/pretrain/quickstart.yaml",
                                              "--config", str(bad)])


def test_print_config(in_repo_root):
    out = subprocess.run(
        [sys.executable, "-m", "lit_llm.train", "fit", "--config", "configs/pretrain/quickstart.yaml",
         "--print_config"], capture_output=True, text=True, cwd=ROOT, check=True,
    ).stdout
    assert "class_path: lit_llm.tasks.PretrainTask" in out and "emb_dim: 128" in out


def test_bad_input_is_one_clear_message(tmp_path, in_repo_root):
    """A missing data file ends the command with one line naming the path, not a traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "lit_llm.train", "fit", "--config", "configs/pretrain/quickstart.yaml",
         f"--data.init_args.source={tmp_path / 'nope.txt'}", f"--trainer.default_root_dir={tmp_path}"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode == 1
    assert "error: DataError" in proc.stderr and "nope.txt" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_overfits_tiny_corpus(tmp_path, in_repo_root):
    """A small GPT memorises a 2k-character text: training loss below 0.3 within 150 steps (from ~5.7)."""
    text = tmp_path / "tiny.txt"
    text.write_text(
        "It had always been his fate to have his judgement questioned, and his work admired by those who "
        "never understood it. The sketch of the donkey was the last thing he painted before he gave it up. " * 10
    )
    c = cli([
        "fit", "--config", "configs/pretrain/quickstart.yaml", *TINY_MODEL,
        "--model.init_args.model.context_length=32", "--model.init_args.model.drop_rate=0.0",
        "--model.init_args.optim.warmup_steps=10", "--model.init_args.optim.learning_rate=1e-2",
        f"--data.init_args.source={text}", "--data.init_args.tokenizer=train",
        "--data.init_args.tokenizer_vocab_size=300", "--data.init_args.val_split=0", "--data.init_args.batch_size=8",
        "--data.init_args.stride=8", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=150",
        "--trainer.logger=false", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
    ])
    assert c.trainer.global_step == 150
    assert c.trainer.callback_metrics["train/loss"].item() < 0.3


def test_resume_from_last(corpus, tmp_path, in_repo_root):
    """`fit --ckpt_path last` continues the run from checkpoints/<run>/last.ckpt, with its token count."""
    quick = "configs/pretrain/quickstart.yaml"
    common = [*tiny_overrides(ROOT / quick, corpus, tmp_path), "--data.init_args.tokenizer_vocab_size=300",
              "--trainer.enable_progress_bar=false", "--trainer.val_check_interval=3"]
    first = cli(["fit", "--config", quick, *common, "--trainer.max_steps=3"])
    assert (tmp_path / "last.ckpt").is_file() and (tmp_path / "tokenizer.json").is_file()
    assert first.model.tokens_seen == 3 * 16 * 128  # steps x batch x context
    second = cli(["fit", "--config", quick, *common, "--trainer.max_steps=6", "--ckpt_path=last"])
    assert second.trainer.global_step == 6
    assert second.model.tokens_seen == 2 * first.model.tokens_seen
    # The run's record: the resolved config of each launch.
    assert (tmp_path / "logs" / "version_0" / "config.yaml").is_file()
    assert (tmp_path / "logs" / "version_1" / "config.yaml").is_file()


@pytest.mark.skipif(not (SHARED_DATA / "gpt2" / "encoder.json").is_file(), reason="GPT-2 BPE files not present")
def test_gpt2_tokenizer_links_vocab(in_repo_root, corpus, tmp_path):
    c = cli(["--config", "configs/pretrain/verdict.yaml", *TINY_MODEL, f"--data.init_args.source={corpus}",
             "--data.init_args.sha256=null", f"--data.init_args.tokenizer={SHARED_DATA / 'gpt2'}",
             f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert c.model.config.vocab_size == 50257 and c.model.config.padded_vocab_size == 50257


def test_eval_train_batches_logs_the_books_train_loss(corpus, tmp_path, in_repo_root):
    quick = ROOT / "configs/pretrain/quickstart.yaml"
    c = cli(["fit", "--config", str(quick), *tiny_overrides(quick, corpus, tmp_path),
             f"--data.init_args.source={corpus}", "--data.init_args.tokenizer_vocab_size=300",
             "--data.init_args.eval_train_batches=2", "--trainer.max_steps=4", "--trainer.val_check_interval=2",
             "--trainer.enable_progress_bar=false"])
    metrics = c.trainer.callback_metrics
    assert {"val/loss", "val/ppl", "train_eval/loss"} <= set(metrics)
    assert torch.isfinite(metrics["train_eval/loss"])
    # The eval-mode pass covers exactly the first two training batches, in order.
    loaders = c.datamodule.val_dataloader()
    assert len(loaders) == 2 and len(loaders[1].dataset) == 2 * c.datamodule.batch_size


def test_resume_with_another_tokenizer_or_shape_is_refused(corpus, tmp_path, in_repo_root):
    from lit_llm.errors import CheckpointError, DataError

    quick = ROOT / "configs/pretrain/quickstart.yaml"
    common = [*tiny_overrides(quick, corpus, tmp_path), "--trainer.enable_progress_bar=false",
              "--trainer.max_steps=2", "--trainer.val_check_interval=2"]
    cli(["fit", "--config", str(quick), *common, "--data.init_args.tokenizer_vocab_size=300"])
    with pytest.raises(DataError, match="tokenizer mismatch"):
        cli(["fit", "--config", str(quick), *common, "--data.init_args.tokenizer_vocab_size=320",
             "--trainer.max_steps=4", "--ckpt_path=last"])
    with pytest.raises(CheckpointError, match=r"model\.init_args\.model\.n_layers \(checkpoint 2, given 3\)"):
        cli(["fit", "--config", str(quick), *common, "--data.init_args.tokenizer_vocab_size=300",
             "--model.init_args.model.n_layers=3", "--trainer.max_steps=4", "--ckpt_path=last"])


def test_validate_and_predict_from_checkpoint(corpus, tmp_path, in_repo_root):
    import json

    quick = ROOT / "configs/pretrain/quickstart.yaml"
    common = [*tiny_overrides(quick, corpus, tmp_path), "--data.init_args.tokenizer_vocab_size=300",
              "--trainer.enable_progress_bar=false"]
    fit = cli(["fit", "--config", str(quick), *common, "--trainer.max_steps=2", "--trainer.val_check_interval=2"])
    fitted = fit.trainer.callback_metrics["val/loss"].item()
    ckpt = str(tmp_path / "last.ckpt")
    val = cli(["validate", "--config", str(quick), *common, f"--ckpt_path={ckpt}"])
    assert val.trainer.callback_metrics["val/loss"].item() == pytest.approx(fitted, rel=1e-5)
    cli(["predict", "--config", str(quick), *common, f"--ckpt_path={ckpt}"])
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(val.datamodule.val_dataset)
    mean = sum(r["loss"] for r in rows) / len(rows)  # every window has the same token count
    assert mean == pytest.approx(fitted, rel=1e-4)
    assert all(r["ppl"] == pytest.approx(math.exp(r["loss"]), rel=1e-5) for r in rows)


@pytest.mark.parametrize("override,needle", [
    ("--model.init_args.optim.learning_rate=-1", "model.optim.learning_rate=-1.0 must be > 0"),
    ("--data.init_args.batch_size=0", "data.batch_size=0 must be >= 1"),
    ("--model.init_args.model.n_heads=3", "model.emb_dim=128 is not divisible by model.n_heads=3"),
])
def test_bad_values_are_one_message(override, needle, in_repo_root, capsys):
    from lit_llm.train import main

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", "configs/pretrain/quickstart.yaml", override])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ConfigError") and needle in err and "Traceback" not in err


def test_omegaconf_interpolation_within_a_file(tmp_path, in_repo_root):
    extra = tmp_path / "interp.yaml"
    extra.write_text("trainer:\n  max_steps: 7\nmodel:\n  init_args:\n    optim:\n"
                     "      schedule_steps: ${trainer.max_steps}\n")
    c = cli(["--config", "configs/pretrain/quickstart.yaml", "--config", str(extra),
             "--data.init_args.tokenizer_vocab_size=300", "--trainer.logger=false"], run=False)
    assert c.model.optim.schedule_steps == 7 == c.trainer.max_steps


def test_speed_options_parse_and_run(corpus, tmp_path, in_repo_root):
    """``sdpa_backend`` and compile modes are task options; per-step Python numbers are logged from CPU tensors
    (a number logged as-is would be copied to the GPU with a blocking copy on every step)."""
    quick = ROOT / "configs/pretrain/quickstart.yaml"
    c = cli(["fit", "--config", str(quick), *tiny_overrides(quick, corpus, tmp_path),
             "--data.init_args.tokenizer_vocab_size=300", "--model.init_args.speed.sdpa_backend=math",
             "--trainer.fast_dev_run=2"])
    assert c.model.speed.sdpa_backend == "math" and c.trainer.global_step == 2
    logged = {}
    c.model.log = lambda name, value, **kw: logged.update({name: value})  # what reaches self.log
    c.model.count_tokens(torch.zeros(2, 8, dtype=torch.long))
    c.model.log_lr()
    assert set(logged) == {"train/tokens_seen", "train/lr"}
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in logged.values())
    c = cli(["--config", str(quick), "--model.init_args.speed.compile=max-autotune"], run=False)
    assert c.config.model.init_args.speed.compile == "max-autotune"
    with pytest.raises(argparse.ArgumentError, match="fastest"):
        cli(["--config", str(quick), "--model.init_args.speed.sdpa_backend=fastest"], run=False)


def test_resume_does_not_read_init_weights(corpus, tmp_path, in_repo_root):
    """A finetune started from init_weights resumes from its own checkpoint even after the initial weights are
    gone: the checkpoint's weights replace them anyway, so they are not read."""
    quick = "configs/pretrain/quickstart.yaml"
    common = [*tiny_overrides(ROOT / quick, corpus, tmp_path / "base"), "--data.init_args.tokenizer_vocab_size=300",
              "--trainer.enable_progress_bar=false", "--trainer.val_check_interval=2"]
    cli(["fit", "--config", quick, *common, "--trainer.max_steps=2"])
    init = tmp_path / "init.ckpt"
    (tmp_path / "base" / "last.ckpt").rename(init)
    tune = [*common, f"--trainer.default_root_dir={tmp_path / 'tune'}", f"--model.init_args.init_weights={init}"]
    cli(["fit", "--config", quick, *tune, "--trainer.max_steps=2"])
    init.unlink()
    last = tmp_path / "tune" / "last.ckpt"
    resumed = cli(["fit", "--config", quick, *tune, "--trainer.max_steps=4", f"--ckpt_path={last}"])
    assert resumed.trainer.global_step == 4


def test_fit_after_validate_in_one_process(corpus, tmp_path, in_repo_root):
    """``trainer.validate`` then ``trainer.fit`` on the same module (a notebook's order): validation ran under
    inference mode and left the metrics' states as inference tensors; fit's validation must still update them."""
    quick = ROOT / "configs/pretrain/quickstart.yaml"
    c = cli(["--config", str(quick), *tiny_overrides(quick, corpus, tmp_path), "--trainer.max_steps=2",
             "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2"], run=False)
    before = c.trainer.validate(c.model, datamodule=c.datamodule)[0]["val/loss"]
    c.trainer.fit(c.model, datamodule=c.datamodule)
    assert c.trainer.global_step == 2
    assert torch.isfinite(c.trainer.callback_metrics["val/loss"]) and c.trainer.callback_metrics["val/loss"] < before
