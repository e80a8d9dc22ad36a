"""``python -m lit_llm.evaluate``: a checkpoint scored on a local task, results as a table and JSON; mistakes as one
line."""

from __future__ import annotations

import io
import json
import random

import pytest
import torch

pytest.importorskip("lm_eval")

from eval_helpers import sentence, write_task  # noqa: E402

from lit_llm.evaluate import main  # noqa: E402
from lit_llm.model.config import GPTConfig  # noqa: E402
from lit_llm.model.gpt import GPTModel  # noqa: E402
from lit_llm.weights.export import save_weights  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, eval_tokenizer):
    """A converted lit_llm weights directory (model.safetensors, model_config.json, tokenizer.json)."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=eval_tokenizer.vocab_size, context_length=32, emb_dim=32, n_heads=2,
                               n_layers=2, drop_rate=0.0))
    return save_weights(model.config, model.state_dict(), tmp_path_factory.mktemp("run"), eval_tokenizer)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    rng = random.Random(3)
    rows = [{"query": sentence(rng, 5), "choices": [sentence(rng, 1) for _ in range(3)], "gold": rng.randrange(3)}
            for _ in range(10)]
    folder = tmp_path_factory.mktemp("tasks")
    write_task(folder, "cli_mc", rows, ["output_type: multiple_choice", 'doc_to_text: "{{query}}"',
                                        'doc_to_choice: "{{choices}}"', 'doc_to_target: "{{gold}}"',
                                        "metric_list:", "  - metric: acc"])
    return folder


def test_a_checkpoint_is_scored_on_a_local_task(run_dir, task_dir, capsys):
    out = io.StringIO()
    status = main(["--checkpoint", str(run_dir), "--tasks", "cli_mc", "--include_path", str(task_dir), "--device",
                   "cpu", "--batch_size", "4", "--limit", "6", "--log_samples"], stdout=out)
    assert status == 0, capsys.readouterr().err
    text = out.getvalue()
    assert "|cli_mc|" in text.replace(" ", "") and "acc" in text  # the harness's table
    files = sorted((run_dir / "eval").iterdir())  # the run folder's eval/
    results_file = next(f for f in files if f.name.startswith("results-"))
    assert str(results_file) in text
    results = json.loads(results_file.read_text())
    assert 0.0 <= results["results"]["cli_mc"]["acc,none"] <= 1.0
    assert results["lit_llm"]["checkpoint"] == str(run_dir) and results["lit_llm"]["dtype"] == "float32"
    samples = next(f for f in files if f.name.startswith("samples-cli_mc-")).read_text().splitlines()
    assert len(samples) == 6  # --limit
    assert len(json.loads(samples[0])["resps"]) == 3  # one log-likelihood per choice


def test_unknown_tasks_and_bad_arguments_are_one_line(run_dir, capsys):
    assert main(["--checkpoint", str(run_dir), "--tasks", "hellaswagg"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "unknown task: 'hellaswagg' (did you mean hellaswag" in err and "--list_tasks" in err
    assert main(["--tasks", "x", "--batch_size", "0"]) == 1
    err = capsys.readouterr().err
    assert "--checkpoint is required" in err and "--batch_size 0 must be >= 1" in err
    assert main(["--checkpoint", str(run_dir), "--tasks", "x", "--include_path", "no/such/dir"]) == 1
    assert "no/such/dir' does not exist" in capsys.readouterr().err
