"""Packed documents in the GPT (``forward(ids, documents=...)``): positions restart at each document, no token sees
another document, and ``documents=None`` is the book's forward exactly. Checked on the three attention paths this
CPU runs: SDPA with the dense mask, the book's reference attention with the same mask, and FlexAttention (eager;
PyTorch has no FlexAttention backward on CPU, so that path is checked without gradients here and with them in
test_document_mask_gpu.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lit_llm.model.config import GPTConfig
from lit_llm.model.gpt import GPTModel, document_segments, flex_attention_available

V, CTX = 97, 48
PATHS = [("sdpa", "dense"), ("reference", "dense"), ("sdpa", "flex")]
GRAD_PATHS = [p for p in PATHS if p[1] == "dense"]


def make_model(attention: str = "sdpa", mode: str = "auto", **kw) -> GPTModel:
    if mode == "flex" and not flex_attention_available():
        pytest.skip("this PyTorch has no FlexAttention")
    torch.manual_seed(0)
    config = dict(vocab_size=V, context_length=CTX, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0,
                  attention=attention)
    model = GPTModel(GPTConfig(**{**config, **kw}))
    model.document_attention = mode
    return model


def run(model: GPTModel, ids: torch.Tensor, grad: bool, **kw) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is not compiled
        with torch.set_grad_enabled(grad):
            return model(ids, **kw)


def packed_row(a: torch.Tensor, b: torch.Tensor, pad: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """One row holding ``a`` then ``b`` then padding; documents 0, 1 and -1 (padding)."""
    ids = torch.cat([a, b, torch.zeros(pad, dtype=torch.long)])[None]
    docs = torch.tensor([0] * len(a) + [1] * len(b) + [-1] * pad)[None]
    return ids, docs


def test_segments_and_positions_restart_wherever_the_document_changes():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [5, 5, 5, 5, 5, 5, 5, 5], [0, 1, 1, 0, 0, 0, 7, 7]])
    segments, positions = document_segments(docs)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8)), [0, 0, 1, 0, 1, 2, 0, 1]]
    assert segments.tolist() == [[1, 1, 1, 2, 2, 3, 4, 4], [1] * 8, [1, 2, 2, 3, 3, 3, 4, 4]]  # a reused id: new


@pytest.mark.parametrize("attention,mode", PATHS)
def test_each_packed_example_gets_its_logits_alone(attention, mode):
    model = make_model(attention, mode).eval()
    a, b = torch.randint(0, V, (11,)), torch.randint(0, V, (17,))
    ids, docs = packed_row(a, b)
    packed = run(model, ids, grad=False, documents=docs)
    alone_a, alone_b = run(model, a[None], grad=False), run(model, b[None], grad=False)
    torch.testing.assert_close(packed[0, :11], alone_a[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[0, 11:28], alone_b[0], rtol=1e-5, atol=1e-5)
    # Without the mask the second example would see the first and take positions 11..27: its logits would differ.
    assert not torch.allclose(run(model, ids, grad=False)[0, 11:28], alone_b[0], atol=1e-3)


@pytest.mark.parametrize("attention,mode", PATHS)
def test_changing_one_example_leaves_the_others_logits_unchanged(attention, mode):
    model = make_model(attention, mode).eval()
    a, b = torch.randint(0, V, (13,)), torch.randint(0, V, (20,))
    ids, docs = packed_row(a, b)
    other = ids.clone()
    other[0, 13:33] = torch.randint(0, V, (20,))
    assert not torch.equal(other, ids)
    first, second = run(model, ids, grad=False, documents=docs), run(model, other, grad=False, documents=docs)
    assert torch.equal(first[0, :13], second[0, :13])
    assert not torch.allclose(first[0, 13:33], second[0, 13:33])  # the changed example's own logits did change


@pytest.mark.parametrize("attention,mode", GRAD_PATHS)
@pytest.mark.parametrize("head", ["plain", "chunked"])
def test_changing_one_example_leaves_the_others_loss_and_gradients_unchanged(attention, mode, head):
    """The loss on the first example only, and its gradient on every weight, whatever the second example holds."""
    model = make_model(attention, mode).train()
    model.loss_chunk = 7 if head == "chunked" else None
    a, b = torch.randint(0, V, (13,)), torch.randint(0, V, (20,))
    ids, docs = packed_row(a, b)
    targets = torch.full_like(ids, -100)
    targets[0, :12] = a[1:]

    def loss_and_grads(row: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = model(row, targets=targets, documents=docs)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = loss_and_grads(ids)
    other = ids.clone()
    other[0, 13:33] = torch.randint(0, V, (20,))
    other_loss, other_grads = loss_and_grads(other)
    assert torch.equal(other_loss, loss)
    for g, h in zip(grads, other_grads, strict=True):
        assert torch.equal(h, g)


@pytest.mark.parametrize("attention,mode", GRAD_PATHS)
def test_packed_loss_and_gradients_equal_the_padded_batchs(attention, mode):
    """Three examples in one packed row, and the same examples padded one per row: one mean over the trained
    tokens, the same gradients."""
    model = make_model(attention, mode).train()
    lengths = [9, 14, 6]
    examples = [torch.randint(0, V, (n,)) for n in lengths]
    width = max(lengths)
    padded = torch.zeros(len(lengths), width, dtype=torch.long)
    padded_targets = torch.full((len(lengths), width), -100)
    for row, x in enumerate(examples):
        padded[row, : len(x)] = x
        padded_targets[row, 1 : len(x)] = x[1:]  # first target ignored, as a masked prompt token would be
    packed = torch.cat(examples)[None]
    packed_targets = torch.cat([padded_targets[row, : len(x)] for row, x in enumerate(examples)])[None]
    docs = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]

    def loss_and_grads(**kw) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = model(**kw)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = loss_and_grads(in_idx=padded, targets=padded_targets)
    packed_loss, packed_grads = loss_and_grads(in_idx=packed, targets=packed_targets, documents=docs)
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-6)
    for g, h in zip(grads, packed_grads, strict=True):
        torch.testing.assert_close(h, g, rtol=1e-4, atol=1e-6)


def test_documents_none_is_the_books_forward_bit_for_bit():
    model = make_model().eval()
    ids = torch.randint(0, V, (3, 20))
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids, documents=None))
        # One document per row is plain causal attention (through the mask instead of is_causal).
        one = model(ids, documents=torch.zeros_like(ids))
    torch.testing.assert_close(one, model(ids), rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_with_documents_gives_the_same_gradients():
    model = make_model().train()
    ids = torch.randint(0, V, (2, 30))
    docs = torch.tensor([[0] * 10 + [1] * 20, [0] * 25 + [-1] * 5])
    targets = torch.randint(0, V, (2, 30))
    grads = []
    for recompute in (False, True):
        model.activation_checkpointing = recompute
        model.zero_grad()
        model(ids, targets=targets, documents=docs).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g, h in zip(*grads, strict=True):
        torch.testing.assert_close(h, g, rtol=0, atol=1e-6)


def test_a_prebuilt_mask_and_a_compiled_model_give_the_same_loss():
    """The tasks build the mask once per batch outside the compiled model and pass it in."""
    model = make_model().train()
    ids = torch.randint(0, V, (2, 24))
    docs = torch.tensor([[0] * 10 + [1] * 14, [0] * 20 + [-1] * 4])
    targets = torch.randint(0, V, (2, 24))
    eager = model(ids, targets=targets, documents=docs)
    compiled = torch.compile(model, backend="aot_eager")
    mask = model.document_mask(docs)
    assert mask.dense is not None and mask.block is None  # CPU: the dense mask
    torch.testing.assert_close(compiled(ids, targets=targets, documents=mask), eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled(ids, targets=targets, documents=docs), eager, rtol=1e-6, atol=1e-6)


def test_flex_is_chosen_on_cuda_only_and_not_with_attention_dropout():
    model = make_model()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert not model._uses_flex(cpu)
    assert model._uses_flex(cuda) == flex_attention_available()
    dropout = make_model(drop_rate=0.1)
    assert not dropout.train()._uses_flex(cuda)  # FlexAttention has no attention dropout
    assert dropout.eval()._uses_flex(cuda) == flex_attention_available()
    assert not make_model("reference")._uses_flex(cuda)


def test_bad_documents_are_refused():
    model = make_model().eval()
    ids = torch.randint(0, V, (2, 8))
    with pytest.raises(ValueError, match=r"documents has shape \(2, 7\) but the ids have \(2, 8\)"):
        model(ids, documents=torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="not with a KV cache"):
        model(ids, kv_cache=model.new_kv_cache(), documents=torch.zeros_like(ids))
