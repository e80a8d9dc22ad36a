"""The static KV cache and its decode step give the tokens of the model's own loop (lit_llm.model.decoding)."""

from __future__ import annotations

import pytest
import torch

from lit_llm.errors import ConfigError
from lit_llm.model.config import GPTConfig
from lit_llm.model.decoding import Decoder, StaticKVCache, generate_tokens_static
from lit_llm.model.gpt import GPTModel
from lit_llm.model.sampling import generate


def tiny(attention: str = "sdpa", context: int = 48, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=300, context_length=context, emb_dim=32, n_layers=2, n_heads=2, drop_rate=0.0,
                       attention=attention, pad_vocab_multiple=64)
    return GPTModel(config).eval()


def static(model: GPTModel, idx: torch.Tensor, n: int, **kw) -> torch.Tensor:
    steps = list(generate_tokens_static(model, idx, n, **kw))
    return torch.cat([idx, *steps], dim=1)


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
def test_greedy_tokens_equal_the_model_loop(attention):
    model = tiny(attention)
    idx = torch.randint(0, 300, (3, 9))
    # 9 + 70 tokens pass the 48-token context: the steps after it re-run the window, as the book's loop does.
    expected = generate(model, idx, 70)
    assert torch.equal(static(model, idx, 70), expected)
    assert torch.equal(static(model, idx, 20), expected[:, : 9 + 20])


def test_sampling_with_the_same_generator_gives_the_same_tokens():
    model = tiny()
    idx = torch.randint(0, 300, (2, 5))
    kw = dict(temperature=0.9, top_k=50, top_p=0.9)
    expected = generate(model, idx, 30, generator=torch.Generator().manual_seed(7), **kw)
    got = static(model, idx, 30, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(got, expected)


def test_end_of_text_stops_each_row_as_the_model_loop_does():
    model = tiny()
    idx = torch.randint(0, 300, (4, 6))
    free = generate(model, idx, 12)
    eos = int(free[0, 6 + 3])  # row 0 stops after 4 tokens; other rows keep going (or stop at their own)
    assert torch.equal(static(model, idx, 12, eos_id=eos), generate(model, idx, 12, eos_id=eos))


def test_rows_of_different_lengths_decode_as_if_alone():
    """Slots hold prompts of different lengths; one batched step per token gives each row its own greedy tokens."""
    model = tiny()
    prompts = [torch.randint(0, 300, (1, n)) for n in (3, 11, 7)]
    decoder = Decoder(model, slots=4, mode="eager")
    tokens, positions, out = [], [], [[] for _ in prompts]
    for slot, p in enumerate(prompts):
        tokens.append(int(decoder.prefill(slot, p)[0, :300].argmax()))
        positions.append(p.shape[1])
        out[slot].append(tokens[slot])
    for _ in range(15):
        logits = decoder.decode(tokens, positions)
        tokens = logits[:, :300].argmax(-1).tolist()
        positions = [q + 1 for q in positions]
        for slot, t in enumerate(tokens):
            out[slot].append(t)
    for slot, p in enumerate(prompts):
        assert out[slot] == generate(model, p, 16)[0, p.shape[1]:].tolist()


def test_a_refilled_slot_forgets_its_previous_sequence():
    model = tiny()
    decoder = Decoder(model, slots=2, mode="eager")
    long, short = torch.randint(0, 300, (1, 20)), torch.randint(0, 300, (1, 4))
    decoder.prefill(1, long)
    first = int(decoder.prefill(1, short)[0, :300].argmax())
    logits = decoder.decode([0, first], [0, 4])  # slot 0 is idle: any token at position 0
    expected = generate(model, short, 2)[0, 4:].tolist()
    assert [first, int(logits[1, :300].argmax())] == expected


def test_decode_checks_its_arguments():
    model = tiny()
    decoder = Decoder(model, slots=2, max_len=10, mode="eager")
    with pytest.raises(ValueError, match="positions must be in"):
        decoder.decode([1], [10])
    with pytest.raises(ValueError, match="1 to 2 rows"):
        decoder.decode([1, 2, 3], [0, 0, 0])
    with pytest.raises(ValueError, match="does not fit"):
        decoder.prefill(0, torch.zeros(1, 11, dtype=torch.long))
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        Decoder(model, slots=1, mode="cuda-graph")
    with pytest.raises(ConfigError, match="slots=0"):
        StaticKVCache(model, 0)


def test_buckets_are_powers_of_two_up_to_the_slots():
    decoder = Decoder(tiny(), slots=6, mode="eager")
    assert [decoder.bucket(n) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens():
    model = tiny()
    idx = torch.randint(0, 300, (2, 5))
    assert torch.equal(static(model, idx, 25, mode="compile"), generate(model, idx, 25))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["cuda-graph", "compile"])
def test_cuda_graph_decode_gives_the_same_tokens_on_gpu(mode):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = tiny(context=64).cuda()
    idx = torch.randint(0, 300, (3, 8), device="cuda")
    assert torch.equal(static(model, idx, 50, mode=mode), generate(model, idx, 50))


def test_generate_command_fast_prints_the_same_text(tiny_checkpoint):
    import io

    from lit_llm.generate import main

    outputs = []
    for flag in ("--fast", "--no-fast"):
        out = io.StringIO()
        rc = main(["--checkpoint", str(tiny_checkpoint), "--prompt", "The import", "--prompt", "def f",
                   "--max-new-tokens", "40", flag, "--device", "cpu"], stdout=out)
        assert rc == 0
        outputs.append(out.getvalue())
    assert outputs[0] == outputs[1] and len(outputs[0]) > 20
