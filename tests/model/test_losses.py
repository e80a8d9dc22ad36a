"""``chunked_head_loss`` against the plain head: ``F.cross_entropy(F.linear(h, w).float(), targets)``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from loss_helpers import (
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

from lit_llm.model.losses import chunked_head_loss


def test_float32_matches_reference_with_partial_last_chunk_and_ignored_targets():
    hidden, weight, targets = make_inputs()
    assert (targets == -100).sum() == 5
    got = loss_and_grads(lambda h, w, t: chunked_head_loss(h, w, t, chunk_size=8), hidden, weight, targets)
    want = loss_and_grads(reference_loss, hidden, weight, targets)
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    assert_close(got, want)
    assert got[1][targets == -100].abs().sum() == 0  # ignored rows get no gradient


def test_leading_batch_dims_are_flattened():
    hidden, weight, targets = make_inputs(shape=(3, 7))
    got = loss_and_grads(lambda h, w, t: chunked_head_loss(h, w, t, chunk_size=4), hidden, weight, targets)
    want = loss_and_grads(reference_loss, hidden, weight, targets)
    assert got[1].shape == (3, 7, C)
    assert_close(got, want)


@pytest.mark.parametrize("chunk_size", [1, N, N + 100])
def test_chunk_size_does_not_change_the_result(chunk_size):
    hidden, weight, targets = make_inputs(seed=1)
    got = loss_and_grads(lambda h, w, t: chunked_head_loss(h, w, t, chunk_size=chunk_size), hidden, weight, targets)
    want = loss_and_grads(reference_loss, hidden, weight, targets)
    assert_close(got, want)




def test_tied_weight_gradients_add_up():
    run = tied_weight_run(seed=2)
    got = run(lambda h, w, t: chunked_head_loss(h, w, t, chunk_size=8))
    want = run(reference_loss)
    assert_close(got, want)
    # the embedding's part is really there: rows of tokens not in idx get only the head's gradient
    head_only = run(lambda h, w, t: chunked_head_loss(h.detach(), w, t, chunk_size=8))[1]
    assert not torch.allclose(head_only, want[1], atol=1e-4)


def test_all_targets_ignored_gives_zero_loss_and_zero_gradients():
    hidden, weight, _ = make_inputs()
    targets = torch.full((N,), -100)
    loss, grad_h, grad_w = loss_and_grads(
        lambda h, w, t: chunked_head_loss(h, w, t, chunk_size=8), hidden, weight, targets
    )
    assert loss.item() == 0.0
    assert torch.isfinite(grad_h).all() and torch.isfinite(grad_w).all()
    assert grad_h.abs().sum() == 0 and grad_w.abs().sum() == 0


def test_custom_ignore_index():
    hidden, weight, targets = make_inputs(ignored=0)
    targets = targets.clone()
    targets[:4] = 7
    got = chunked_head_loss(hidden, weight, targets, chunk_size=8, ignore_index=7)
    want = F.cross_entropy(F.linear(hidden, weight), targets, ignore_index=7)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)




def test_bf16_autocast_matches_reference_under_the_same_autocast():
    hidden, weight, targets = make_inputs(seed=3)

    chunked = bf16_autocast(lambda h, w, t: chunked_head_loss(h, w, t, chunk_size=8))
    got = loss_and_grads(chunked, hidden, weight, targets)
    want = loss_and_grads(bf16_autocast(reference_loss), hidden, weight, targets)
    assert got[0].dtype == torch.float32
    assert got[1].dtype == hidden.dtype and got[2].dtype == weight.dtype  # gradients in the inputs' dtypes
    torch.testing.assert_close(got[0], want[0], rtol=1e-2, atol=0)
    for g, w in zip(got[1:], want[1:]):
        assert F.cosine_similarity(g.flatten(), w.flatten(), dim=0) > 0.999
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-3)
    # it really computed in bf16: the float32 result differs by more than float32 round-off
    fp32 = chunked_head_loss(hidden, weight, targets, chunk_size=8).detach()
    assert (got[0] - fp32).abs() > 1e-6


def test_bf16_weights_without_autocast_compute_in_bf16():
    hidden, weight, targets = make_inputs(seed=4)
    h = hidden.detach().bfloat16().requires_grad_()
    w = torch.nn.Parameter(weight.detach().bfloat16())
    got = loss_and_grads(lambda h, w, t: chunked_head_loss(h, w, t, chunk_size=8), h, w, targets)
    want = loss_and_grads(reference_loss, h, w, targets)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], want[0], rtol=1e-2, atol=0)
    for g, r in zip(got[1:], want[1:]):
        assert F.cosine_similarity(g.float().flatten(), r.float().flatten(), dim=0) > 0.999


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_matches_eager(backend):
    torch._dynamo.reset()
    hidden, weight, targets = make_inputs(seed=5)
    compiled = torch.compile(lambda h, w, t: chunked_head_loss(h, w, t, chunk_size=8), backend=backend, fullgraph=True)
    got = loss_and_grads(compiled, hidden, weight, targets)
    want = loss_and_grads(lambda h, w, t: chunked_head_loss(h, w, t, chunk_size=8), hidden, weight, targets)
    assert_close(got, want)
    assert_close(want, loss_and_grads(reference_loss, hidden, weight, targets))


def test_grad_output_scales_the_gradients():
    hidden, weight, targets = make_inputs(seed=6)
    got = loss_and_grads(lambda h, w, t: chunked_head_loss(h, w, t, chunk_size=8), hidden, weight, targets, scale=3.0)
    want = loss_and_grads(reference_loss, hidden, weight, targets, scale=3.0)
    assert_close(got, want)
    unscaled = loss_and_grads(lambda h, w, t: chunked_head_loss(h, w, t, chunk_size=8), hidden, weight, targets)
    torch.testing.assert_close(got[1], 3.0 * unscaled[1])
    torch.testing.assert_close(got[2], 3.0 * unscaled[2])


def test_frozen_weight_or_hidden_gets_no_gradient():
    hidden, weight, targets = make_inputs(seed=7)
    want = loss_and_grads(reference_loss, hidden, weight, targets)

    hidden.grad = None
    loss = chunked_head_loss(hidden, weight.detach(), targets, chunk_size=8)
    loss.backward()
    torch.testing.assert_close(hidden.grad, want[1], atol=1e-5, rtol=1e-5)

    weight.grad = None
    loss = chunked_head_loss(hidden.detach(), weight, targets, chunk_size=8)
    loss.backward()
    torch.testing.assert_close(weight.grad, want[2], atol=1e-5, rtol=1e-5)

    with torch.no_grad():
        loss = chunked_head_loss(hidden, weight, targets, chunk_size=8)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, want[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"targets": torch.zeros(N + 1, dtype=torch.long)}, "targets' shape"),
        ({"weight": torch.zeros(V, C + 1)}, "weight must be"),
    ],
)
def test_bad_arguments_raise_a_clear_value_error(kwargs, message):
    hidden, weight, targets = make_inputs()
    args = {"hidden": hidden, "weight": weight, "targets": targets, **kwargs}
    with pytest.raises(ValueError, match=message):
        chunked_head_loss(**args)






@pytest.mark.parametrize("tied", [True, False])
def test_the_task_option_trains_like_the_plain_head(tied):
    chunked = assert_trains_like_the_plain_head(tied, chunked_loss=7)
    assert chunked.model.loss_chunk == 7


def test_the_task_option_rejects_bad_values_and_a_lora_head():
    from lit_llm.errors import ConfigError

    for bad in (0, -8, True):
        with pytest.raises(ConfigError, match=r"model.speed.chunked_loss=.* must be a positive number of tokens"):
            build_task(chunked_loss=bad)
    with pytest.raises(ConfigError, match=r"chunked_loss cannot be combined with a LoRA adapter on the head"):
        build_task(chunked_loss=64, lora={"rank": 2, "targets": ["head"]})
    assert build_task(chunked_loss=64, lora={"rank": 2, "targets": ["attention"]}).model.loss_chunk == 64


def test_under_zero3_the_plain_head_is_used():
    from types import SimpleNamespace

    from lit_llm.tasks import PretrainTask

    task = PretrainTask(model=dict(vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=1),
                        speed={"chunked_loss": 64})
    task._trainer = SimpleNamespace(strategy=SimpleNamespace(zero_stage_3=True), ckpt_path=None,
                                    accumulate_grad_batches=1)
    task.configure_model()
    assert task.model.loss_chunk is None


def test_the_option_is_a_config_key(tmp_path, in_repo_root):
    from lit_llm.train import cli

    c = cli(["--config", "configs/pretrain/quickstart.yaml", "--data.init_args.tokenizer_vocab_size=300",
             "--model.init_args.speed.chunked_loss=64", f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert c.model.speed.chunked_loss == 64
