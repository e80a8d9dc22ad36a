"""``lit-llm``: the same runs as ``python -m lit_llm.<command>``, shipped configs named without a checkout, and a
built wheel that carries them."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from support import ROOT, TINY_MODEL

from lit_llm.__main__ import COMMANDS, main
from lit_llm.errors import ConfigError
from lit_llm.shipped import resolve_config, shipped_configs


def _losses(root: Path) -> list[float]:
    (metrics,) = root.rglob("metrics.csv")
    with metrics.open() as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


def _args(root: Path, config: str) -> list[str]:
    return ["--config", config, *TINY_MODEL, f"--trainer.default_root_dir={root}", "--trainer.max_steps=4",
            "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
            "--data.init_args.tokenizer_vocab_size=300", "--data.init_args.num_workers=0",
            '--trainer.callbacks=[{"class_path": "lit_llm.callbacks.Checkpoint"}]']


def test_lit_llm_fit_is_python_m_lit_llm_train(tmp_path, in_repo_root):
    """Same seed, same config: ``lit-llm fit --config pretrain/quickstart`` (the shipped name) logs the same losses
    as ``python -m lit_llm.train fit --config configs/pretrain/quickstart.yaml``."""
    from lit_llm.train import main as train_main

    train_main(["fit", *_args(tmp_path / "module", "configs/pretrain/quickstart.yaml")])
    assert main(["fit", *_args(tmp_path / "console", "pretrain/quickstart")]) == 0
    module, console = _losses(tmp_path / "module"), _losses(tmp_path / "console")
    assert len(module) == 4 and module == console


def test_every_command_has_help_and_unknown_ones_are_usage_errors(capsys):
    for command in sorted(set(COMMANDS) - {"validate", "test", "predict"}):
        try:  # argparse's --help ends the process; the trainer subcommands return the status instead
            status = main([command, "--help"])
        except SystemExit as stop:
            status = stop.code
        assert status == 0, command
    assert "usage" in capsys.readouterr().out
    assert main(["fitt"]) == 2 and "unknown command 'fitt'" in capsys.readouterr().err
    assert main([]) == 2


def test_shipped_configs_are_named_without_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    configs = shipped_configs()
    assert {"pretrain/quickstart", "trainer/ddp", "callbacks/minimal"} <= set(configs)
    for name in ("pretrain/quickstart", "pretrain/quickstart.yaml", "configs/pretrain/quickstart.yaml"):
        assert resolve_config(name) == str(configs["pretrain/quickstart"])
    with pytest.raises(ConfigError, match="no shipped config of that name.*pretrain/quickstart"):
        resolve_config("pretrain/quikstart")
    assert main(["configs", "trainer/ddp"]) == 0


@pytest.mark.slow  # builds a wheel (about half a minute)
def test_the_wheel_carries_the_configs_and_the_console_script(tmp_path):
    build = tmp_path / "src"
    shutil.copytree(ROOT, build, ignore=shutil.ignore_patterns(".git", "checkpoints", "bench", "tests", "docs",
                                                               "*.egg-info", "build", "__pycache__", ".whl"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(build)], check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("lit_llm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"lit_llm/shipped/{p.relative_to(ROOT).as_posix()}" for folder in ("configs", "callbacks")
               for p in (ROOT / folder).rglob("*.yaml")}
    assert shipped and shipped <= names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "lit-llm = lit_llm.__main__:main" in zipfile.ZipFile(wheel).read(entry).decode()
