"""The comparison behind every resume (lit_llm.tasks.resume): which changed settings apply, which refuse."""

from __future__ import annotations

import pytest

from lit_llm.errors import CheckpointError
from lit_llm.tasks.base import GPTTask
from lit_llm.tasks.classify import ClassifyTask
from lit_llm.tasks.dpo import DPOTask
from lit_llm.tasks.resume import FIXED, check_resume_settings


def hparams(**changes):
    values = {
        "_class_path": "lit_llm.tasks.PretrainTask", "vocab_size": 300, "init_weights": None,
        "model": {"vocab_size": 300, "n_layers": 2, "emb_dim": 32, "drop_rate": 0.1, "init": "gpt2"},
        "optim": {"learning_rate": 3e-3, "weight_decay": 0.1, "betas": (0.9, 0.95), "decay_all": False},
        "lora": None,
    }
    for key, value in changes.items():
        node = values
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return values


TASK = "lit_llm.tasks.pretrain.PretrainTask"


def test_applied_changes_are_listed_and_nothing_else():
    saved = hparams()
    current = hparams(**{"optim.learning_rate": 1e-4, "optim.betas": [0.9, 0.99], "model.drop_rate": 0.0,
                         "model.init": "pytorch", "init_weights": "x.ckpt"})
    changes = check_resume_settings(saved, current, FIXED, TASK, "run/last.ckpt")
    assert changes == ["model.drop_rate 0.1 -> 0.0", "optim.betas [0.9, 0.95] -> [0.9, 0.99]",
                       "optim.learning_rate 0.003 -> 0.0001"]  # init and init_weights have no effect on a resume
    assert check_resume_settings(saved, hparams(), FIXED, TASK, "f") == []  # tuples and lists compare equal


@pytest.mark.parametrize("changes,needle", [
    ({"model.n_layers": 3}, "model.init_args.model.n_layers (checkpoint 2, given 3)"),
    ({"vocab_size": 320, "model.vocab_size": 320}, "model.init_args.vocab_size (checkpoint 300, given 320)"),
    ({"optim.decay_all": True}, "model.init_args.optim.decay_all (checkpoint false, given true)"),
    ({"lora": {"rank": 8, "alpha": 16.0}}, "model.init_args.lora (checkpoint null, given {'rank': 8"),
])
def test_refused_changes_are_one_line(changes, needle):
    with pytest.raises(CheckpointError) as err:
        check_resume_settings(hparams(), hparams(**changes), FIXED, TASK, "run/last.ckpt")
    message = str(err.value)
    assert message.startswith("run/last.ckpt cannot resume with these settings changed: ") and needle in message
    assert "\n" not in message and "--model.init_args.init_weights=run/last.ckpt" in message


def test_lora_fields_and_the_task():
    saved = hparams(lora={"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["attention"]})
    more_dropout = hparams(lora={"rank": 8, "alpha": 16.0, "dropout": 0.1, "targets": ["attention"]})
    assert check_resume_settings(saved, more_dropout, FIXED, TASK, "f") == ["lora.dropout 0.0 -> 0.1"]
    other_alpha = hparams(lora={"rank": 8, "alpha": 8.0, "dropout": 0.0, "targets": ["attention"]})
    with pytest.raises(CheckpointError, match=r"lora\.alpha \(checkpoint 16\.0, given 8\.0\)"):
        check_resume_settings(saved, other_alpha, FIXED, TASK, "f")
    with pytest.raises(CheckpointError, match=r"the task \(model\.class_path: checkpoint lit_llm\.tasks\.PretrainTask"):
        check_resume_settings(hparams(), hparams(), FIXED, "lit_llm.tasks.classify.ClassifyTask", "f")


def test_a_checkpoint_without_a_setting_is_not_refused_for_it():
    old = hparams()
    del old["optim"]["decay_all"], old["_class_path"]
    assert check_resume_settings(old, hparams(**{"optim.decay_all": True}), FIXED, TASK, "f") == []


def test_tasks_add_their_own_fixed_settings():
    assert set(GPTTask.FIXED_ON_RESUME) == set(FIXED)
    assert {"num_classes", "label_names", "pooling", "trainable"} <= set(ClassifyTask.FIXED_ON_RESUME)
    assert "class_weights" not in ClassifyTask.FIXED_ON_RESUME
    assert "reference" in DPOTask.FIXED_ON_RESUME and "beta" not in DPOTask.FIXED_ON_RESUME
