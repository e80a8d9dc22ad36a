"""``fused_head_loss`` (the Triton cross-entropy kernel) against the plain head, run with Triton's CPU interpreter.

``tests/conftest.py`` switches the interpreter on (``TRITON_INTERPRET=1``) on machines without a GPU, before Triton is
imported. The GPU run of the same kernel is in ``tests/model/test_gpu.py``.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU tensors through Triton's interpreter; on a GPU see tests/model/test_gpu.py")

from loss_helpers import (  # noqa: E402
    C,
    N,
    V,
    assert_close,
    assert_trains_like_the_plain_head,
    bf16_autocast,
    build_task,
    loss_and_grads,
    make_inputs,
    reference_loss,
    tied_weight_run,
)

from lit_llm.model.fused_loss import _loss_and_gradient_in_place, fused_head_loss  # noqa: E402


def test_float32_matches_reference_with_ignored_targets():
    hidden, weight, targets = make_inputs()
    got = loss_and_grads(fused_head_loss, hidden, weight, targets)
    want = loss_and_grads(reference_loss, hidden, weight, targets)
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    assert_close(got, want)
    assert got[1][targets == -100].abs().sum() == 0  # ignored rows get no gradient


def test_leading_batch_dims_and_grad_output_scale():
    hidden, weight, targets = make_inputs(seed=1, shape=(3, 7))
    got = loss_and_grads(fused_head_loss, hidden, weight, targets, scale=0.125)  # 1 / accumulation steps
    want = loss_and_grads(reference_loss, hidden, weight, targets, scale=0.125)
    assert got[1].shape == (3, 7, C)
    assert_close(got, want)


@pytest.mark.parametrize("launch", [{"block": 16}, {"block": 16, "programs": 1}, {"block": 64, "programs": 5},
                                    {"block": 4096}])
def test_launch_settings_do_not_change_the_result(launch):
    """Blocks smaller than a row (several loop iterations, a partial last one) and fewer programs than rows (each
    walking several rows) give the reference's loss and logits gradient."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(N, V, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::4] = -100
    want = F.cross_entropy(logits, targets, ignore_index=-100)
    want.backward()
    work = logits.detach().clone()
    got = _loss_and_gradient_in_place(work, targets, -100, **launch)
    torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(work, logits.grad, atol=1e-7, rtol=1e-5)


def test_tied_weight_gradients_add_up():
    run = tied_weight_run(seed=3)
    assert_close(run(fused_head_loss), run(reference_loss))


def test_all_targets_ignored_gives_zero_loss_and_zero_gradients():
    hidden, weight, _ = make_inputs()
    loss, grad_h, grad_w = loss_and_grads(fused_head_loss, hidden, weight, torch.full((N,), -100))
    assert loss.item() == 0.0
    assert grad_h.abs().sum() == 0 and grad_w.abs().sum() == 0


def test_a_target_outside_the_vocabulary_makes_the_loss_nan():
    """No host synchronisation to check the ids: the loss becomes NaN, which NonFiniteGuard reports."""
    hidden, weight, targets = make_inputs(ignored=0)
    for bad in (V, V + 7, -3):
        t = targets.clone()
        t[5] = bad
        assert torch.isnan(fused_head_loss(hidden, weight, t))


def test_custom_ignore_index():
    hidden, weight, targets = make_inputs(ignored=0)
    targets = targets.clone()
    targets[:4] = 7
    got = fused_head_loss(hidden, weight, targets, ignore_index=7)
    torch.testing.assert_close(got, F.cross_entropy(F.linear(hidden, weight), targets, ignore_index=7),
                               atol=1e-5, rtol=1e-5)


def test_bf16_autocast_matches_reference_under_the_same_autocast():
    hidden, weight, targets = make_inputs(seed=4)

    got = loss_and_grads(bf16_autocast(fused_head_loss), hidden, weight, targets)
    want = loss_and_grads(bf16_autocast(reference_loss), hidden, weight, targets)
    assert got[1].dtype == hidden.dtype and got[2].dtype == weight.dtype  # gradients in the inputs' dtypes
    torch.testing.assert_close(got[0], want[0], rtol=1e-3, atol=0)
    for g, w in zip(got[1:], want[1:]):
        assert F.cosine_similarity(g.flatten(), w.flatten(), dim=0) > 0.999
    fp32 = fused_head_loss(hidden, weight, targets).detach()
    assert (got[0] - fp32).abs() > 1e-6  # it really computed the matmul in bf16


def test_without_gradients_the_loss_alone_and_frozen_inputs():
    hidden, weight, targets = make_inputs(seed=5)
    want = loss_and_grads(reference_loss, hidden, weight, targets)
    with torch.no_grad():
        loss = fused_head_loss(hidden, weight, targets)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, want[0], atol=1e-5, rtol=1e-5)
    hidden.grad = None
    fused_head_loss(hidden, weight.detach(), targets).backward()
    torch.testing.assert_close(hidden.grad, want[1], atol=1e-5, rtol=1e-5)


def test_torch_compile_keeps_it_out_of_the_graph_and_matches_eager():
    torch._dynamo.reset()
    hidden, weight, targets = make_inputs(seed=6)
    compiled = torch.compile(lambda h, w, t: fused_head_loss(torch.tanh(h), w, t), backend="aot_eager")
    got = loss_and_grads(compiled, hidden, weight, targets)
    want = loss_and_grads(lambda h, w, t: reference_loss(torch.tanh(h), w, t), hidden, weight, targets)
    assert_close(got, want)


def test_on_the_cpu_without_the_interpreter_it_names_the_problem(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    hidden, weight, targets = make_inputs()
    with pytest.raises(RuntimeError, match="Triton kernel on CUDA GPUs.*TRITON_INTERPRET=1"):
        fused_head_loss(hidden, weight, targets)


# ---- the task option ``fused_loss`` --------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_the_task_option_trains_like_the_plain_head(tied):
    fused = assert_trains_like_the_plain_head(tied, fused_loss=True)
    assert fused.model.fused_loss is True


def test_the_task_option_refuses_what_it_cannot_combine_with():
    from lit_llm.errors import ConfigError

    with pytest.raises(ConfigError, match="fused_loss cannot be combined with model.speed.chunked_loss"):
        build_task(fused_loss=True, chunked_loss=64)
    with pytest.raises(ConfigError, match="fused_loss cannot be combined with a LoRA adapter on the head"):
        build_task(fused_loss=True, lora={"rank": 2, "targets": ["head"]})
    with pytest.raises(ConfigError, match="fused_loss cannot be combined with model.speed.float8_head"):
        build_task(fused_loss=True, float8="tensorwise", float8_head=True)


def test_the_task_option_on_a_cpu_run_is_one_clear_error(monkeypatch):
    from lit_llm.errors import ConfigError

    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError,
                       match="model.speed.fused_loss runs a Triton kernel on CUDA GPUs, but this run is on CPU"):
        build_task(fused_loss=True)


def test_the_task_option_without_triton_names_the_install(monkeypatch):
    from lit_llm.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install triton"):
        build_task(fused_loss=True)


def test_under_zero3_the_plain_head_is_used():
    from types import SimpleNamespace

    from lit_llm.tasks import PretrainTask

    task = PretrainTask(model=dict(vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=1),
                        speed={"fused_loss": True})
    task._trainer = SimpleNamespace(strategy=SimpleNamespace(zero_stage_3=True), ckpt_path=None,
                                    accumulate_grad_batches=1)
    task.configure_model()
    assert task.model.fused_loss is False


def test_a_cli_run_trains_with_it(tmp_path, in_repo_root):
    """Through ``python -m lit_llm.train fit``: two optimizer steps of the quickstart model with the fused loss
    (kernel interpreted on the CPU), ending with a finite logged loss."""
    from lit_llm.train import cli

    c = cli(["fit", "--config", "configs/pretrain/quickstart.yaml", "--model.init_args.speed.fused_loss=true",
             "--model.init_args.model.n_layers=1", "--model.init_args.model.emb_dim=32",
             "--model.init_args.model.n_heads=2", "--model.init_args.model.context_length=16",
             "--data.init_args.batch_size=2", "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
             "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]",
             "--trainer.logger=false", "--trainer.enable_checkpointing=false",
             f"--trainer.default_root_dir={tmp_path}"])
    assert c.model.model.fused_loss is True
    assert c.trainer.global_step == 2
    assert torch.isfinite(c.trainer.callback_metrics["val/loss"])


@pytest.mark.parametrize(("kwargs", "message"), [({"targets": torch.zeros(N + 1, dtype=torch.long)}, "targets' shape"),
                                                 ({"weight": torch.zeros(V, C + 1)}, "weight must be")])
def test_bad_arguments_raise_a_clear_value_error(kwargs, message):
    hidden, weight, targets = make_inputs()
    args = {"hidden": hidden, "weight": weight, "targets": targets, **kwargs}
    with pytest.raises(ValueError, match=message):
        fused_head_loss(**args)
