"""Packed documents on a CUDA GPU: FlexAttention (compiled, with its backward pass) equals the dense-mask SDPA path,
on its own and inside the compiled model of the task, and a packed fit trains.

Run on a CUDA machine with ``python -m pytest -m gpu tests/model/test_document_mask_gpu.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

from lit_llm.model.config import GPTConfig
from lit_llm.model.gpt import GPTModel, flex_attention_available
from lit_llm.tasks import InstructTask
from lit_llm.train import cli

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not flex_attention_available(), reason="needs torch.nn.attention.flex_attention"),
]

V, T = 1000, 256


def random_documents(B: int, seed: int) -> torch.Tensor:
    """``(B, T)`` rows of 2 to 9 documents of random lengths, then padding (-1)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        n = int(torch.randint(2, 10, (1,), generator=g))
        cuts = torch.randint(1, T - 8, (n - 1,), generator=g).unique().sort().values.tolist()
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, T - 8])]
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).tolist() + [-1] * 8)
    return torch.tensor(rows, device="cuda")


def loss_and_grads(model: GPTModel, ids, targets, docs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    loss = model(ids, targets=targets, documents=docs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("autocast", [False, True])
def test_flex_attention_equals_the_dense_mask(autocast):
    cfg = GPTConfig.from_name("small", drop_rate=0.0, vocab_size=V, context_length=T)
    torch.manual_seed(0)
    model = GPTModel(cfg).cuda().train()
    assert model._uses_flex(torch.device("cuda"))  # the default on CUDA
    ids = torch.randint(0, V, (4, T), device="cuda")
    targets = torch.randint(0, V, (4, T), device="cuda")
    docs = random_documents(4, seed=0)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            mask = model.document_mask(docs)
            assert mask.block is not None and mask.dense is None
            flex = loss_and_grads(model, ids, targets, mask)
            model.document_attention = "dense"
            dense = loss_and_grads(model, ids, targets, docs)
            with torch.no_grad():
                logits_dense = model(ids, documents=docs).float()
                model.document_attention = "flex"
                logits_flex = model(ids, documents=docs).float()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    tol = 0.05 if autocast else 5e-3
    assert (logits_flex - logits_dense).abs().max().item() <= tol * logits_dense.abs().max().item()
    torch.testing.assert_close(flex[0], dense[0], rtol=tol, atol=tol)
    for g, h in zip(flex[1], dense[1], strict=True):
        assert (g - h).abs().max().item() <= 5 * tol * h.abs().max().item() + 1e-6


def test_flex_inside_the_compiled_task_equals_the_dense_mask():
    """``speed.compile``: the block mask is built outside the compiled model and FlexAttention traced into it; new
    document layouts (one mask each) keep working."""
    torch.manual_seed(0)
    task = InstructTask(model=dict(context_length=T, emb_dim=128, n_heads=2, n_layers=2, drop_rate=0.0,
                                   vocab_size=V), speed={"compile": True}, generate_after_fit=False)
    task.configure_model()
    task.cuda()
    for seed in range(3):
        ids = torch.randint(0, V, (4, T), device="cuda")
        targets = torch.randint(0, V, (4, T), device="cuda")
        docs = random_documents(4, seed)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            task.model.document_attention = "auto"
            flex = task.loss(ids, targets, docs)
            task.model.document_attention = "dense"
            dense = task.loss(ids, targets, docs)
        torch.testing.assert_close(flex.float(), dense.float(), rtol=0.02, atol=0.02)


def test_packed_fit_on_gpu(tmp_path, in_repo_root):
    callbacks = [{"class_path": "lit_llm.callbacks.NonFiniteGuard", "init_args": {"policy": "stop"}}]
    c = cli([
        "fit", "--config", "configs/instruct/quickstart.yaml", "--trainer.accelerator=gpu", "--trainer.devices=1",
        "--trainer.precision=bf16-mixed", "--model.init_args.speed.compile=true",
        "--model.init_args.model.context_length=256", "--data.init_args.packing=true", "--data.init_args.batch_size=8",
        "--model.init_args.generate_after_fit=false", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false", "--trainer.max_steps=60", "--trainer.val_check_interval=30",
        "--trainer.callbacks=" + json.dumps(callbacks),
    ])
    assert c.trainer.global_step == 60
    assert torch.isfinite(c.trainer.callback_metrics["train/loss"])
    assert c.trainer.callback_metrics["val/loss"] < 5.0  # ln(1,086) = 7.0 untrained
