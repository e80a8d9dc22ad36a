"""What the head-loss tests share: inputs, the reference cross-entropy, a tiny task with a loss option, and the
check that an option trains like the plain head."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lit_llm.tasks.options import grouped

N, C, V = 37, 16, 50


def make_inputs(seed: int = 0, shape: tuple[int, ...] = (N,), ignored: int = 5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, C, generator=g, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(V, C, generator=g) * 0.5)
    targets = torch.randint(0, V, shape, generator=g)
    flat = targets.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:ignored]] = -100
    return hidden, weight, targets


def reference_loss(hidden, weight, targets):
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-100)


def loss_and_grads(fn, hidden, weight, targets, scale: float = 1.0):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, targets)
    (loss * scale).backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


def assert_close(got, want, atol=1e-5, rtol=1e-5):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


# ---- the task option ``chunked_loss`` ------------------------------------------------------------------------------
def build_task(**kwargs):
    from lit_llm.tasks import PretrainTask

    shape = dict(vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
    torch.manual_seed(0)
    task = PretrainTask(model={**shape, "tie_weights": kwargs.pop("tie_weights", True)}, **grouped(kwargs))
    task.configure_model()
    return task


def assert_trains_like_the_plain_head(tied: bool, **option):
    """A task with ``option`` (a way of computing the head's loss) gives the plain head's loss and the same gradient
    on every parameter (float32), tied or untied head, with ignored targets; returns that task."""
    plain, other = build_task(tie_weights=tied), build_task(tie_weights=tied, **option)
    other.model.load_state_dict(plain.model.state_dict())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 16), generator=g)
    targets = torch.randint(0, 97, (3, 16), generator=g)
    targets[0, :5] = -100
    losses = []
    for task in (plain, other):
        loss = task.loss(ids, targets)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    grads = [{n: p.grad for n, p in t.model.named_parameters()} for t in (plain, other)]
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():  # validation: the loss alone
        torch.testing.assert_close(other.loss(ids, targets), plain.loss(ids, targets), atol=1e-6, rtol=1e-6)
    return other


def tied_weight_run(seed: int):
    """``run(head)``: a model whose one weight is both the embedding and ``head``'s weight; returns the loss and that
    weight's gradient, the sum of both uses."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.Parameter(torch.randn(V, C, generator=g) * 0.5)
    idx = torch.randint(0, V, (N,), generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::6] = -100
    proj = torch.randn(C, C, generator=g) * 0.3

    def run(head):
        emb.grad = None
        hidden = torch.tanh(F.embedding(idx, emb) @ proj)  # the same weight as embedding and as head
        loss = head(hidden, emb, targets)
        loss.backward()
        return loss.detach(), emb.grad.clone()

    return run


def bf16_autocast(fn):
    """``fn(h, w, t)`` run under CPU bf16 autocast."""

    def wrapped(h, w, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(h, w, t)

    return wrapped
