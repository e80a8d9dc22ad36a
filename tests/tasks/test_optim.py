import math

import pytest
import torch

from lit_llm.model.config import GPTConfig
from lit_llm.model.gpt import GPTModel
from lit_llm.tasks.optim import lr_multiplier, parameter_groups


def test_warmup_then_cosine_to_floor():
    kw = dict(warmup_steps=10, total_steps=110, schedule="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, **kw) == pytest.approx(1 / 11)
    assert lr_multiplier(9, **kw) == pytest.approx(10 / 11)
    assert lr_multiplier(10, **kw) == pytest.approx(1.0)
    assert lr_multiplier(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lr_multiplier(110, **kw) == pytest.approx(0.1)
    assert lr_multiplier(500, **kw) == pytest.approx(0.1)
    values = [lr_multiplier(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_and_constant():
    assert lr_multiplier(55, warmup_steps=5, total_steps=105, schedule="linear", min_lr_ratio=0.0) == pytest.approx(0.5)
    assert lr_multiplier(1000, warmup_steps=0, total_steps=10, schedule="constant") == 1.0
    assert not math.isnan(lr_multiplier(0, warmup_steps=0, total_steps=0))


def test_parameter_groups_split_and_ties():
    model = GPTModel(GPTConfig.from_name("tiny", tie_weights=True))
    decay, no_decay = parameter_groups(model, 0.1)
    n = sum(p.numel() for p in decay["params"]) + sum(p.numel() for p in no_decay["params"])
    assert n == model.num_parameters()  # the tied matrix appears once
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    (everything,) = parameter_groups(model, 0.1, decay_all=True)
    assert sum(p.numel() for p in everything["params"]) == n


def test_frozen_parameters_left_out():
    model = GPTModel(GPTConfig.from_name("tiny"))
    model.tok_emb.weight.requires_grad_(False)
    groups = parameter_groups(model, 0.1)
    assert not any(p is model.tok_emb.weight for g in groups for p in g["params"])
    torch.optim.AdamW(groups)  # the groups are valid optimizer input


def _adamw_with_schedule(lr: float, weight_decay: float, total: int):
    from lit_llm.tasks.optim import StepSchedule

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_()
    optimizer = torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr)
    schedule = StepSchedule(optimizer, lambda s: lr_multiplier(s, warmup_steps=2, total_steps=total), total_steps=total)
    return model, optimizer, schedule


def test_step_schedule_restores_the_position_and_applies_new_settings(caplog):
    model, optimizer, schedule = _adamw_with_schedule(3e-3, 0.1, total=10)
    for _ in range(4):
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
        schedule.step()
    saved_optimizer, saved_schedule = optimizer.state_dict(), schedule.state_dict()
    saved_lrs = [g["lr"] for g in optimizer.param_groups]

    # Unchanged settings: the restored rates are exactly the saved ones (exact resumes stay exact).
    _, same_opt, same = _adamw_with_schedule(3e-3, 0.1, total=10)
    same_opt.load_state_dict(saved_optimizer)
    same.load_state_dict(saved_schedule)
    assert [g["lr"] for g in same_opt.param_groups] == saved_lrs and same.last_epoch == 4

    # A new peak rate, weight decay and a longer schedule: the position stays, the settings are this run's.
    _, new_opt, new = _adamw_with_schedule(1e-4, 0.05, total=20)
    new_opt.load_state_dict(saved_optimizer)
    assert new_opt.param_groups[0]["weight_decay"] == 0.1  # what torch's restore alone leaves
    with caplog.at_level("INFO"):
        new.load_state_dict(saved_schedule)
    expected = 1e-4 * lr_multiplier(4, warmup_steps=2, total_steps=20)
    assert [g["lr"] for g in new_opt.param_groups] == [expected, expected] == new.get_last_lr()
    assert [g["initial_lr"] for g in new_opt.param_groups] == [1e-4, 1e-4] and new.base_lrs == [1e-4, 1e-4]
    assert [g["weight_decay"] for g in new_opt.param_groups] == [0.05, 0.0]
    assert new.last_epoch == 4 and new.total_steps == 20 and new.state_dict()["total_steps"] == 20
    assert "now spans 20 optimizer steps (the checkpoint's spanned 10)" in caplog.text
    assert set(saved_schedule) >= {"total_steps", "base_lrs", "last_epoch"}
    assert "_configured" not in saved_schedule  # plain values only: checkpoints load with weights_only=True
