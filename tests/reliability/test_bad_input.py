"""Bad input that ``python -m lit_llm.train`` reports in one line (or, for a too-long warmup, one warning): token ids
beyond the model's vocabulary, a training loader without a single batch, warmup as long as the run."""

from __future__ import annotations

import warnings

import pytest
from faults import fit_args, one_line_error

from lit_llm.train import main


@pytest.mark.parametrize("key", ["model.init_args.vocab_size", "model.init_args.model.vocab_size"])
def test_model_vocabulary_smaller_than_the_tokenizer(key, corpus, tmp_path, in_repo_root, capsys):
    """The 300-id trained tokenizer with a model vocabulary of 100 set by hand: ids 100..299 cannot be embedded."""
    short = key.replace(".init_args", "")
    err = one_line_error(capsys, fit_args(tmp_path, corpus, 2, [], f"--{key}=100"))
    assert err.startswith(f"error: ConfigError: {short}=100 is smaller than the tokenizer's 300 token ids")
    assert "data.tokenizer='train'" in err and "ids >= 100" in err
    assert not (tmp_path / "last.ckpt").exists()  # stopped before training


def test_a_loader_without_a_batch_is_a_data_error(tmp_path, in_repo_root, capsys):
    """3 samples in batches of 4 with drop_last (any DataModule): Lightning alone logs "no training batches" and
    exits 0 without training. (The 2-process case, 8 windows over 2 ranks in batches of 6, is in test_ddp.py.)"""
    err = one_line_error(capsys, [
        "fit", "--model=lit_llm.tasks.PretrainTask", "--model.model.n_layers=2", "--model.model.emb_dim=32",
        "--model.model.n_heads=2", "--model.model.context_length=16", "--data=faults.FewSamples",
        "--data.samples=3", "--data.batch_size=4", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_steps=2", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu", "--trainer.devices=1",
    ])
    assert err == (
        "error: DataError: the training loader has no batch on any of the 1 process(es): 3 training samples over 1 "
        "process(es) is 3 per process, fewer than data.batch_size=4, so nothing was trained. Lower data.batch_size, "
        "use fewer devices, set data.drop_last=false, or add data."
    )


@pytest.mark.parametrize("extra,where", [
    (["--trainer.max_steps=3"], "the 3 optimizer steps of the schedule (trainer.max_steps=3)"),
    (["--trainer.max_steps=3", "--model.init_args.optim.schedule_steps=8", "--model.init_args.optim.warmup_steps=8"],
     "the 8 optimizer steps of the schedule (model.optim.schedule_steps=8)"),
    # Bounded by epochs: known once the data is loaded, warned when the optimizer is built.
    (["--trainer.max_steps=-1", "--trainer.max_epochs=1", "--trainer.limit_train_batches=4",
      "--model.init_args.optim.warmup_steps=10"], "the 4 optimizer steps of trainer.max_epochs=1"),
])
def test_warmup_as_long_as_the_schedule_warns(extra, where, corpus, tmp_path, in_repo_root):
    """A warning, not an error (docs/decisions.md): shortening a shipped config to a few steps is a legitimate trial."""
    args = fit_args(tmp_path, corpus, 3, [], "--model.init_args.optim.warmup_steps=5", *extra)
    args.remove("--model.init_args.optim.schedule_steps=20")
    with pytest.warns(UserWarning, match="is not shorter than") as caught:
        main(args)
    messages = [str(w.message) for w in caught if "is not shorter than" in str(w.message)]
    assert len(messages) == 1 and where in messages[0]
    assert "never reaches model.optim.learning_rate=0.003" in messages[0]
    assert "Lower model.optim.warmup_steps" in messages[0]
    assert (tmp_path / "last.ckpt").is_file()  # the run itself went ahead


def test_warmup_shorter_than_the_schedule_is_quiet(corpus, tmp_path, in_repo_root):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(fit_args(tmp_path, corpus, 3, []))  # warmup 2 of a 20-step schedule
    assert not [w for w in caught if "is not shorter than" in str(w.message)]


def test_run_command_turns_user_errors_into_one_line_and_exit_codes(capsys, monkeypatch):
    from lit_llm.cli import run_command
    from lit_llm.errors import ConfigError, UsageError

    def bad() -> None:
        raise ConfigError("Invalid task config:\n  - model.optim.learning_rate=0 must be > 0\n"
                          "  - model.optim.warmup_steps=-1")

    def interrupted() -> None:
        raise KeyboardInterrupt

    def bug() -> None:
        raise KeyError("not a user mistake")

    monkeypatch.delenv("LIT_LLM_DEBUG", raising=False)
    assert run_command(lambda: None) == 0
    assert run_command(bad) == 1
    assert capsys.readouterr().err == ("error: ConfigError: Invalid task config: "
                                       "model.optim.learning_rate=0 must be > 0; "
                                       "model.optim.warmup_steps=-1\n")
    assert run_command(interrupted) == 130
    assert run_command(lambda: (_ for _ in ()).throw(UsageError("unrecognized arguments: --x"))) == 2
    assert capsys.readouterr().err.endswith("error: UsageError: unrecognized arguments: --x\n")
    with pytest.raises(KeyError):  # a bug keeps its traceback
        run_command(bug)
    monkeypatch.setenv("LIT_LLM_DEBUG", "1")
    with pytest.raises(ConfigError):  # LIT_LLM_DEBUG=1 shows the traceback of a user mistake too
        run_command(bad)
