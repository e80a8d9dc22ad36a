"""Seeds: the same seed gives the same run, another seed other initial weights, and the seed used (also one that
``seed_everything: true`` picked at random) is in the run's saved config.yaml."""

from __future__ import annotations

from pathlib import Path

import yaml
from faults import fit_args, losses_by_batch, read_losses, same_tree, training_state

from lit_llm.train import cli


def fit(root: Path, corpus: Path, *extra: str) -> object:
    log = {"class_path": "faults.LossLog", "init_args": {"folder": str(root / "log")}}
    return cli(fit_args(root, corpus, 4, [log], *extra))


def initial_weights(corpus: Path, root: Path, seed: int) -> dict:
    c = cli(fit_args(root, corpus, 4, [], f"--seed_everything={seed}")[1:], run=False)  # built, not run
    c.model.configure_model()
    return c.model.state_dict()


def test_same_seed_same_run(corpus, tmp_path, in_repo_root):
    a = fit(tmp_path / "a", corpus, "--seed_everything=7")
    b = fit(tmp_path / "b", corpus, "--seed_everything=7")
    rows_a, rows_b = read_losses(tmp_path / "a" / "log"), read_losses(tmp_path / "b" / "log")
    assert len(rows_a) == 4 and rows_a == rows_b  # every step's loss (bit for bit) and windows
    assert same_tree(training_state(tmp_path / "a" / "last.ckpt"), training_state(tmp_path / "b" / "last.ckpt"))
    assert a.trainer.global_step == b.trainer.global_step == 4


def test_other_seed_other_initial_weights(corpus, tmp_path, in_repo_root):
    one, again, two = (initial_weights(corpus, tmp_path / name, seed) for name, seed in
                       (("one", 1), ("again", 1), ("two", 2)))
    assert same_tree(one, again)
    differing = [name for name, value in one.items() if value.is_floating_point() and value.std() > 0
                 and not (value == two[name]).all()]
    assert differing and "model.tok_emb.weight" in differing


def test_random_seed_is_recorded_in_the_saved_config(corpus, tmp_path, in_repo_root, monkeypatch):
    """``seed_everything: true`` picks a seed; config.yaml holds that number, and rerunning with it repeats the run."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # restored after the test: seed_everything sets it
    c = fit(tmp_path / "random", corpus, "--seed_everything=true")
    saved = yaml.safe_load((tmp_path / "random" / "config.yaml").read_text())
    seed = saved["seed_everything"]
    assert isinstance(seed, int) and not isinstance(seed, bool) and seed == c.config.fit.seed_everything
    fit(tmp_path / "again", corpus, f"--seed_everything={seed}")
    assert read_losses(tmp_path / "random" / "log") == read_losses(tmp_path / "again" / "log")
    fit(tmp_path / "other", corpus, f"--seed_everything={seed + 1}")  # the seed matters: another one differs
    assert losses_by_batch(read_losses(tmp_path / "other" / "log")) != losses_by_batch(
        read_losses(tmp_path / "random" / "log"))
