import torch

from lit_llm.config import GPTConfig
from lit_llm.generation import generate, generate_tokens, sample_next
from lit_llm.model import GPTModel


def _model(**kw):
    torch.manual_seed(0)
    return GPTModel(GPTConfig.from_name("tiny", vocab_size=100, **kw)).eval()


def test_greedy_matches_manual_argmax_loop():
    model = _model()
    idx = torch.randint(0, 100, (2, 5))
    out = generate(model, idx, 6)
    expected = idx
    with torch.no_grad():
        for _ in range(6):
            nxt = model(expected)[:, -1, :100].argmax(-1, keepdim=True)
            expected = torch.cat([expected, nxt], 1)
    assert torch.equal(out, expected)


def test_padding_ids_never_sampled():
    model = _model()
    assert model.config.padded_vocab_size == 128
    logits = torch.full((4, 128), -10.0)
    logits[:, 100:] = 10.0  # padding columns hold the largest logits
    assert (sample_next(logits, vocab_size=100) < 100).all()
    g = torch.Generator().manual_seed(0)
    assert (sample_next(logits, vocab_size=100, temperature=1.0, generator=g) < 100).all()


def test_top_k_and_top_p_restrict_choices():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, temperature=1.0, top_k=2, generator=g).flatten().tolist()) <= {0, 1}
    # softmax of [5, 4, ...]: p0 ~ 0.71, p0 + p1 ~ 0.97, so top_p=0.9 keeps exactly tokens 0 and 1.
    picks = sample_next(logits, temperature=1.0, top_p=0.9, generator=g).flatten().tolist()
    assert set(picks) == {0, 1}


def test_eos_stops_each_row_and_pads_with_eos():
    model = _model()
    idx = torch.randint(0, 100, (3, 4))
    free = generate(model, idx, 8)
    eos = int(free[0, 5])  # row 0 emits this id as its second new token
    out = generate(model, idx, 8, eos_id=eos)
    row0 = out[0, 4:].tolist()
    first = row0.index(eos)
    assert all(t == eos for t in row0[first:])
    steps = list(generate_tokens(model, idx[:1], 8, eos_id=eos))
    assert len(steps) == first + 1  # a single row stops right after its end-of-text


def test_prompt_longer_than_context_is_cropped():
    model = _model()
    idx = torch.randint(0, 100, (1, 80))  # context is 64
    out = generate(model, idx, 3)
    assert out.shape == (1, 83)
