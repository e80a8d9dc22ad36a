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
