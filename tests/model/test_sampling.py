import pytest
import torch

from lit_llm.errors import ConfigError
from lit_llm.model.config import GPTConfig
from lit_llm.model.gpt import GPTModel, KVCache
from lit_llm.model.sampling import generate, generate_tokens, sample_next


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
    with pytest.warns(UserWarning, match=r"80 tokens.*context_length is 64") as record:
        out = generate(model, idx, 3)
    assert len(record) == 1  # once per call, not once per step
    assert out.shape == (1, 83) and torch.equal(out[:, :80], idx)
    assert torch.equal(out[:, 80:], generate(model, idx[:, -64:], 3)[:, 64:])


# --- KV cache -----------------------------------------------------------------------------------------------------


def _no_dropout_model(attention="sdpa", **kw):
    torch.manual_seed(0)
    cfg = GPTConfig.from_name("tiny", vocab_size=100, drop_rate=0.0, attention=attention, **kw)
    return GPTModel(cfg).eval()


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
def test_cached_forward_matches_full_forward(attention):
    """Prompt, then a chunk of several tokens, then single tokens: each gives the full forward's logits."""
    model = _no_dropout_model(attention)
    x = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        full = model(x)
        cache = model.new_kv_cache(20)
        parts = [model(x[:, :7], kv_cache=cache), model(x[:, 7:12], kv_cache=cache)]
        parts += [model(x[:, i : i + 1], kv_cache=cache) for i in range(12, 20)]
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_buffers_are_preallocated_once():
    model = _no_dropout_model()
    cache = model.new_kv_cache(10)
    with torch.no_grad():
        model(torch.randint(0, 100, (3, 4)), kv_cache=cache)
        k0 = cache.layers[0].k
        model(torch.randint(0, 100, (3, 1)), kv_cache=cache)
    assert k0.shape == (3, 4, 10, 16)  # (B, H, max_len, D)
    assert cache.layers[0].k is k0 and cache.pos == 5
    cache.reset()
    assert cache.pos == 0 and cache.layers[0].k is k0


def test_cache_misuse_is_reported():
    model = _no_dropout_model()
    assert model.new_kv_cache(1000).max_len == 64  # never longer than the context
    cache = model.new_kv_cache(6)
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 5)), kv_cache=cache)
        with pytest.raises(ValueError, match="holds 6 tokens"):
            model(torch.randint(0, 100, (1, 2)), kv_cache=cache)
        with pytest.raises(ValueError, match="batch size 1"):
            model(torch.randint(0, 100, (2, 1)), kv_cache=cache)
        with pytest.raises(ValueError, match="after 60 cached tokens.*context_length is 64"):
            full = model.new_kv_cache()
            model(torch.randint(0, 100, (1, 60)), kv_cache=full)
            model(torch.randint(0, 100, (1, 5)), kv_cache=full)
        with pytest.raises(ValueError, match="KVCache has 3 layers"):
            model(torch.randint(0, 100, (1, 2)), kv_cache=KVCache(3, 8))


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
def test_greedy_with_and_without_cache_match(attention):
    model = _no_dropout_model(attention)
    idx = torch.randint(0, 100, (3, 9))
    cached = generate(model, idx, 30, use_cache=True)
    plain = generate(model, idx, 30, use_cache=False)
    assert cached.shape == (3, 39)
    assert torch.equal(cached, plain)


def test_greedy_cache_matches_past_the_context_length():
    """60 prompt tokens + 20 new with a 64-token context: the last 16 steps run on a sliding window."""
    model = _no_dropout_model()
    idx = torch.randint(0, 100, (2, 60))
    cached = generate(model, idx, 20, use_cache=True)
    assert cached.shape == (2, 80)
    assert torch.equal(cached, generate(model, idx, 20, use_cache=False))
    # and the book's loop, written out: crop to the last context_length tokens every step
    expected = idx
    with torch.no_grad():
        for _ in range(20):
            nxt = model(expected[:, -64:])[:, -1, :100].argmax(-1, keepdim=True)
            expected = torch.cat([expected, nxt], 1)
    assert torch.equal(cached, expected)


def test_cache_matches_with_per_row_eos_stop():
    model = _no_dropout_model()
    idx = torch.randint(0, 100, (4, 5))
    free = generate(model, idx, 12, use_cache=False)
    eos = int(free[1, 7])  # row 1 emits it as its third new token; other rows later or never
    cached = generate(model, idx, 12, eos_id=eos, use_cache=True)
    plain = generate(model, idx, 12, eos_id=eos, use_cache=False)
    assert torch.equal(cached, plain)
    row1 = cached[1, 5:].tolist()
    assert all(t == eos for t in row1[row1.index(eos) :])
    # a batch stops once every row has emitted end-of-text
    steps = list(generate_tokens(model, idx[1:2], 12, eos_id=eos, use_cache=True))
    assert len(steps) == row1.index(eos) + 1


def test_sampling_with_a_fixed_seed_repeats():
    model = _no_dropout_model()
    idx = torch.randint(0, 100, (2, 6))

    def sample(seed, use_cache=True):
        g = torch.Generator().manual_seed(seed)
        return generate(model, idx, 25, temperature=1.0, top_k=20, top_p=0.95, generator=g, use_cache=use_cache)

    a, b = sample(7), sample(7)
    assert torch.equal(a, b)
    assert not torch.equal(a, sample(8))
    assert torch.equal(a, sample(7, use_cache=False))


def test_generate_restores_training_mode():
    model = _no_dropout_model().train()
    generate(model, torch.randint(0, 100, (1, 4)), 3)
    assert model.training


def test_zero_new_tokens_returns_the_prompt():
    model = _no_dropout_model()
    idx = torch.randint(0, 100, (2, 4))
    assert torch.equal(generate(model, idx, 0), idx)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.5), "temperature=-0.5"),
        (dict(temperature=1.0, top_p=0.0), "top_p=0.0"),
        (dict(temperature=1.0, top_p=1.5), "top_p=1.5"),
        (dict(temperature=1.0, top_k=0), "top_k=0"),
        (dict(max_new_tokens=-1), "max_new_tokens=-1"),
    ],
)
def test_bad_sampling_arguments(kwargs, match):
    model = _no_dropout_model()
    kwargs = {"max_new_tokens": 3, **kwargs}
    n = kwargs.pop("max_new_tokens")
    with pytest.raises(ConfigError, match=match):
        generate_tokens(model, torch.zeros(1, 2, dtype=torch.long), n, **kwargs)  # raised at the call, not lazily
    with pytest.raises(ValueError, match=match):  # ConfigError is a ValueError
        generate(model, torch.zeros(1, 2, dtype=torch.long), n, **kwargs)


def test_bad_arguments_are_reported_together():
    with pytest.raises(ConfigError, match=r"(?s)temperature=-1.*top_k=0.*top_p=2"):
        sample_next(torch.zeros(1, 5), temperature=-1, top_k=0, top_p=2)


def test_top_p_one_keeps_every_token():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, temperature=1.0, top_p=1.0, generator=g).flatten().tolist()) == {0, 1, 2, 3}
