"""What a resume does with the settings it is given, and one folder per run: a changed learning rate (and schedule,
weight decay) is applied and recorded, a changed shape is refused in one line, a fresh fit into a folder holding a
run is refused, ``last`` takes the highest step, leftovers of stopped runs are tidied, config.yaml records the
values in effect, and a wrong ``--ckpt_path`` is one error line."""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from faults import fit_args

from lit_llm.errors import CheckpointError
from lit_llm.tasks.optim import lr_multiplier
from lit_llm.train import cli, main
from lit_llm.weights.discovery import auto_checkpoint, check_checkpoint_path, checkpoint_step

EVERY_2 = {"filename": "step={step:06d}", "auto_insert_metric_name": False, "every_n_train_steps": 2,
           "save_top_k": -1}


def run(root: Path, corpus: Path, steps: int, *extra: str, checkpoint: dict | None = None,
        schedule_from_max_steps: bool = False):
    """The quickstart shrunk (faults.fit_args), with the CSV logger on so that train/lr lands in metrics.csv;
    ``schedule_from_max_steps`` drops fit_args' ``schedule_steps`` so that the schedule spans ``max_steps``."""
    args = fit_args(root, corpus, steps, [], "--trainer.logger=true", "--trainer.log_every_n_steps=1", *extra,
                    checkpoint=checkpoint)
    if schedule_from_max_steps:
        args = [a for a in args if not a.startswith("--model.init_args.optim.schedule_steps=")]
    return cli(args)


def one_error_line(capsys, args: list[str]) -> str:
    """``python -m lit_llm.train <args>`` in process: exit 1 and exactly one ``error:`` line, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def logged(root: Path, version: int, key: str) -> dict[int, float]:
    rows = csv.DictReader((root / "logs" / f"version_{version}" / "metrics.csv").open())
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def saved_config(root: Path, version: int) -> dict:
    return yaml.safe_load((root / "logs" / f"version_{version}" / "config.yaml").read_text())


def test_resume_with_a_new_learning_rate_applies_logs_and_records_it(corpus, tmp_path, in_repo_root, caplog):
    constant = ["--model.init_args.optim.lr_schedule=constant", "--model.init_args.optim.warmup_steps=0"]
    first = run(tmp_path / "a", corpus, 6, *constant, checkpoint=EVERY_2)
    assert first.trainer.global_step == 6
    # The same resume without a change is the reference: the first resumed step's loss is computed before its update.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    same = run(tmp_path / "b", corpus, 8, *constant, "--ckpt_path=last", checkpoint=EVERY_2)
    with caplog.at_level(logging.INFO):
        lower = run(tmp_path / "a", corpus, 8, *constant, "--model.init_args.optim.learning_rate=1e-4",
                    "--ckpt_path=last", checkpoint=EVERY_2)
    groups = lower.trainer.optimizers[0].param_groups
    assert [g["lr"] for g in groups] == [1e-4, 1e-4] and [g["initial_lr"] for g in groups] == [1e-4, 1e-4]
    assert lower.trainer.lr_scheduler_configs[0].scheduler.base_lrs == [1e-4, 1e-4]
    assert "model.init_args.optim.learning_rate 0.003 -> 0.0001" in caplog.text
    assert "learning rate 0.003 (the checkpoint's) -> 0.0001 (this run's settings)" in caplog.text
    # The logged learning rate (a float32 metric) is the one in effect, before and after the resume.
    assert logged(tmp_path / "a", 0, "train/lr") == pytest.approx({s: 3e-3 for s in range(6)}, rel=1e-6)
    assert logged(tmp_path / "a", 1, "train/lr") == pytest.approx({6: 1e-4, 7: 1e-4}, rel=1e-6)
    # The loss continues: the first resumed step sees the restored weights and data position; the next differs.
    before, after = logged(tmp_path / "b", 1, "train/loss"), logged(tmp_path / "a", 1, "train/loss")
    assert after[6] == before[6] and after[7] != before[7] and math.isfinite(after[7])
    # config.yaml records what was in effect: the new learning rate, the file `last` took, the tokenizer's vocabulary.
    config = saved_config(tmp_path / "a", 1)
    assert config["model"]["init_args"]["optim"]["learning_rate"] == 1e-4
    assert config["ckpt_path"] == str(tmp_path / "a" / "last.ckpt")
    assert same.trainer.global_step == lower.trainer.global_step == 8


def test_config_yaml_records_the_linked_vocab_size(corpus, tmp_path, in_repo_root):
    c = run(tmp_path, corpus, 1, "--model.init_args.optim.warmup_steps=0")
    recorded = saved_config(tmp_path, 0)["model"]["init_args"]["model"]["vocab_size"]
    assert recorded == c.model.config.vocab_size == c.datamodule.vocab_size
    assert recorded != 50257  # the parser's default, which config.yaml showed before


def test_explicit_ckpt_file_applies_new_settings_and_restretches_the_schedule(corpus, tmp_path, in_repo_root,
                                                                              caplog):
    """LightningCLI alone replaces the command line's model settings by the file's saved hyperparameters."""
    run(tmp_path, corpus, 6, checkpoint=EVERY_2, schedule_from_max_steps=True)
    ckpt = tmp_path / "last.ckpt"
    with caplog.at_level(logging.INFO):
        c = run(tmp_path, corpus, 10, "--model.init_args.optim.learning_rate=1e-3",
                "--model.init_args.optim.weight_decay=0.05", "--model.init_args.model.drop_rate=0.0",
                f"--ckpt_path={ckpt}", checkpoint=EVERY_2, schedule_from_max_steps=True)
    assert c.model.optim.learning_rate == 1e-3 and c.model.config.drop_rate == 0.0
    decay, no_decay = c.trainer.optimizers[0].param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    expected = {s: 1e-3 * lr_multiplier(s, warmup_steps=2, total_steps=10) for s in range(6, 10)}
    assert logged(tmp_path, 1, "train/lr") == pytest.approx(expected, rel=1e-6)  # logged as float32
    assert ("The learning-rate schedule now spans 10 optimizer steps (the checkpoint's spanned 6): the cosine decay "
            "is re-stretched from step 6 on") in caplog.text
    assert saved_config(tmp_path, 1)["model"]["init_args"]["optim"]["weight_decay"] == 0.05


@pytest.mark.parametrize("how", ["file", "last"])
def test_resume_with_a_changed_shape_is_refused_in_one_line(how, corpus, tmp_path, in_repo_root, capsys):
    main(fit_args(tmp_path, corpus, 2, []))
    before = sorted(p.name for p in tmp_path.iterdir())
    resume = str(tmp_path / "last.ckpt") if how == "file" else "last"
    line = one_error_line(capsys, fit_args(tmp_path, corpus, 4, [], "--model.init_args.model.n_layers=3",
                                           "--model.init_args.model.emb_dim=64", f"--ckpt_path={resume}"))
    assert line.startswith(f"error: CheckpointError: {tmp_path / 'last.ckpt'} cannot resume with these settings")
    assert "model.init_args.model.emb_dim (checkpoint 32, given 64)" in line
    assert "model.init_args.model.n_layers (checkpoint 2, given 3)" in line
    assert "--model.init_args.init_weights=" in line  # the other way: a new run from its weights
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_resume_with_another_task_is_refused(corpus, tmp_path, in_repo_root, capsys):
    main(fit_args(tmp_path, corpus, 2, []))
    line = one_error_line(capsys, fit_args(tmp_path, corpus, 4, [], "--model.class_path=lit_llm.tasks.InstructTask",
                                           "--ckpt_path=last"))
    assert "the task (model.class_path: checkpoint lit_llm.tasks.PretrainTask, given " in line, line


def test_fresh_fit_into_a_run_folder_is_refused_unless_overwrite(corpus, tmp_path, in_repo_root, capsys, caplog):
    main(fit_args(tmp_path, corpus, 4, []))
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.ckpt")}
    line = one_error_line(capsys, fit_args(tmp_path, corpus, 2, []))
    assert line.startswith(f"error: ConfigError: {tmp_path} already holds a run (last.ckpt")
    assert "--ckpt_path last" in line and "--trainer.default_root_dir" in line and "--overwrite true" in line
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.ckpt")} == before  # no last-v1.ckpt, nothing new
    # Resuming a checkpoint of another folder into this one would mix two runs too.
    elsewhere = tmp_path / "copy" / "other.ckpt"
    elsewhere.parent.mkdir()
    shutil.copy(tmp_path / "last.ckpt", elsewhere)
    assert "resuming " in one_error_line(capsys, fit_args(tmp_path, corpus, 6, [], f"--ckpt_path={elsewhere}"))
    # --overwrite true: the old checkpoints move aside (nothing is deleted) and the new run starts at step 0.
    with caplog.at_level(logging.INFO):
        c = cli(fit_args(tmp_path, corpus, 2, [], "--overwrite=true"))
    assert c.trainer.global_step == 2 and torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 2
    (aside,) = tmp_path.glob("replaced-*")
    assert sorted(p.name for p in aside.iterdir()) == ["last.ckpt"]
    assert torch.load(aside / "last.ckpt", weights_only=True)["global_step"] == 4
    assert f"moved last.ckpt into {aside}" in caplog.text
    assert not list(tmp_path.glob("last-v*.ckpt"))


def test_last_takes_the_highest_step_not_the_newest_file(corpus, tmp_path, in_repo_root, caplog):
    run(tmp_path, corpus, 6, checkpoint=EVERY_2)
    # A newer file of a lower step (a second run's last-v1.ckpt, a copy): Lightning's `last` would take it.
    shutil.copy(tmp_path / "step=000002.ckpt", tmp_path / "last-v1.ckpt")
    future = time.time() + 60
    os.utime(tmp_path / "last-v1.ckpt", (future, future))
    assert checkpoint_step(tmp_path / "last-v1.ckpt") == 2  # read from the file: the name has no step
    with caplog.at_level(logging.INFO):
        c = run(tmp_path, corpus, 8, "--ckpt_path=last", checkpoint=EVERY_2)
    assert f"--ckpt_path last: resuming from {tmp_path / 'last.ckpt'} (global step 6" in caplog.text
    assert c.trainer.global_step == 8 and c.model.tokens_seen == 8 * 6 * 16  # continued from 6, not 2


def test_discovery_orders_by_global_step(tmp_path):
    torch.save({"global_step": 8}, tmp_path / "last.ckpt")
    torch.save({"global_step": 3}, tmp_path / "last-v1.ckpt")  # newer, lower step
    torch.save({"global_step": 5}, tmp_path / "step=000005.ckpt")
    assert auto_checkpoint(tmp_path) == str(tmp_path / "last.ckpt")
    torch.save({"global_step": 9}, tmp_path / "epoch=0.ckpt")  # no step in the name: read from the file
    assert auto_checkpoint(tmp_path) == str(tmp_path / "epoch=0.ckpt")
    # Reading the step runs no code from the file: an object that is not plain data leaves the step unknown.
    torch.save({"global_step": 99, "x": _Opaque()}, tmp_path / "mine.ckpt")
    assert checkpoint_step(tmp_path / "mine.ckpt") is None
    assert auto_checkpoint(tmp_path) == str(tmp_path / "epoch=0.ckpt")


class _Opaque:
    pass


def test_leftover_step_files_are_pruned_when_the_run_resumes(corpus, tmp_path, in_repo_root, caplog):
    keep_one = {**EVERY_2, "save_top_k": 1}
    run(tmp_path, corpus, 4, checkpoint=keep_one)
    left = tmp_path / "step=000002.ckpt"
    assert not left.exists()  # retention pruned it when step 4 was saved
    # A kill between a save and its pruning, a partial save and a file that is not the callback's.
    shutil.copy(tmp_path / "step=000004.ckpt", left)
    (tmp_path / "step=000006.ckpt.tmp").write_bytes(b"half")
    shutil.copy(tmp_path / "step=000004.ckpt", tmp_path / "mine.ckpt")
    with caplog.at_level(logging.INFO):
        run(tmp_path, corpus, 6, "--ckpt_path=last", checkpoint=keep_one)
    assert f"removed {left}, which save_top_k=1 would have pruned" in caplog.text
    assert not left.exists() and not (tmp_path / "step=000006.ckpt.tmp").exists()
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt", "mine.ckpt", "step=000006.ckpt"]


def test_resuming_an_earlier_checkpoint_sets_its_continuation_aside(corpus, tmp_path, in_repo_root, caplog):
    """Back to step 4 (say, before a divergence) with a lower learning rate: the old steps 6 and 8 and last.ckpt
    (step 8) must not be what ``last`` resumes later; they move aside, nothing is deleted."""
    run(tmp_path, corpus, 8, checkpoint=EVERY_2)
    with caplog.at_level(logging.INFO):
        run(tmp_path, corpus, 6, "--model.init_args.optim.learning_rate=1e-4",
            f"--ckpt_path={tmp_path / 'step=000004.ckpt'}", checkpoint=EVERY_2)
    aside = tmp_path / "abandoned-after-step-4"
    assert sorted(p.name for p in aside.iterdir()) == ["last.ckpt", "step=000006.ckpt", "step=000008.ckpt"]
    assert torch.load(aside / "last.ckpt", weights_only=True)["global_step"] == 8
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt", "step=000002.ckpt", "step=000004.ckpt",
                                                              "step=000006.ckpt"]
    assert auto_checkpoint(tmp_path) == str(tmp_path / "last.ckpt")
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 6


def test_a_missing_or_wrong_ckpt_path_is_one_line(corpus, tmp_path, in_repo_root, capsys, monkeypatch):
    main(fit_args(tmp_path / "run", corpus, 2, []))
    missing = tmp_path / "run" / "nope.ckpt"
    line = one_error_line(capsys, fit_args(tmp_path / "new", corpus, 4, [], f"--ckpt_path={missing}"))
    assert line.startswith(f"error: CheckpointError: --ckpt_path {missing} does not exist")
    assert f"the furthest checkpoint in {tmp_path / 'run'} is {tmp_path / 'run' / 'last.ckpt'}" in line
    line = one_error_line(capsys, fit_args(tmp_path / "new", corpus, 4, [], f"--ckpt_path={tmp_path / 'run'}"))
    assert line.startswith(f"error: CheckpointError: --ckpt_path {tmp_path / 'run'} is a folder, not a checkpoint")
    assert f"pass --ckpt_path {tmp_path / 'run' / 'last.ckpt'}" in line
    # A file that cannot be opened (a permission this test, possibly run as root, cannot take away).
    real_open = open

    def refusing(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if str(path).endswith("last.ckpt"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing)
    with pytest.raises(CheckpointError, match=r"cannot be read \(Permission denied\): give this user read access"):
        check_checkpoint_path(str(tmp_path / "run" / "last.ckpt"))
