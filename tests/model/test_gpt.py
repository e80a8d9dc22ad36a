import pytest
import torch

from lit_llm.errors import ConfigError
from lit_llm.model.config import PRESETS, GPTConfig
from lit_llm.model.gpt import GPTModel

# Parameter counts of the book's shapes (vocab 50,257, no padding, no qkv bias), untied and tied.
BOOK_COUNTS = {
    "gpt2-124m": 163_009_536,
    "gpt2-355m": 406_212_608,
    "gpt2-774m": 838_220_800,
    "gpt2-1558m": 1_637_792_000,
}


@pytest.mark.parametrize("name", list(BOOK_COUNTS))
def test_preset_parameter_counts(name):
    cfg = GPTConfig.from_name(name, pad_vocab_multiple=1)
    with torch.device("meta"):
        untied = GPTModel(cfg)
        tied = GPTModel(cfg.replace(tie_weights=True))
        padded = GPTModel(cfg.replace(pad_vocab_multiple=64))
    assert untied.num_parameters() == BOOK_COUNTS[name]
    assert tied.num_parameters() == BOOK_COUNTS[name] - 50257 * cfg.emb_dim
    assert padded.config.padded_vocab_size == 50304
    assert padded.num_parameters() == BOOK_COUNTS[name] + 2 * (50304 - 50257) * cfg.emb_dim


def test_124m_tied_matches_book():
    with torch.device("meta"):
        m = GPTModel(GPTConfig.from_name("gpt2-124m", pad_vocab_multiple=1, tie_weights=True))
    assert m.num_parameters() == 124_412_160
    assert m.out_head.weight is m.tok_emb.weight


def test_all_presets_build():
    for name in PRESETS:
        with torch.device("meta"):
            GPTModel(GPTConfig.from_name(name))


def _pair(**kw):
    cfg = GPTConfig.from_name("tiny", drop_rate=0.0, **kw)
    torch.manual_seed(0)
    fast = GPTModel(cfg).eval()
    ref = GPTModel(cfg.replace(attention="reference")).eval()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_sdpa_matches_book_reference_attention(qkv_bias):
    fast, ref = _pair(qkv_bias=qkv_bias)
    x = torch.randint(0, 512, (3, 64))
    with torch.no_grad():
        diff = (fast(x) - ref(x)).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
def test_causality(attention):
    cfg = GPTConfig.from_name("tiny", drop_rate=0.0, attention=attention)
    torch.manual_seed(0)
    m = GPTModel(cfg).eval()
    x = torch.randint(0, 512, (2, 40))
    y = x.clone()
    y[:, 25:] = (y[:, 25:] + 7) % 512
    with torch.no_grad():
        a, b = m(x), m(y)
    assert torch.equal(a[:, :25], b[:, :25])
    assert not torch.allclose(a[:, 25:], b[:, 25:])


def test_too_long_sequence_names_both_lengths():
    m = GPTModel(GPTConfig.from_name("tiny"))
    with pytest.raises(ValueError, match=r"65 tokens.*context_length is 64"):
        m(torch.zeros(1, 65, dtype=torch.long))


def test_output_shape_and_padding():
    cfg = GPTConfig.from_name("tiny", vocab_size=500)
    m = GPTModel(cfg)
    assert cfg.padded_vocab_size == 512
    assert m(torch.zeros(2, 8, dtype=torch.long)).shape == (2, 8, 512)


def test_gpt2_init_survives_reset_parameters():
    cfg = GPTConfig.from_name("gpt2-124m", n_layers=2)
    m = GPTModel(cfg)
    for module in m.modules():
        if hasattr(module, "reset_parameters") and module is not m:
            module.reset_parameters()
    std = m.trf_blocks[0].att.qkv.weight.std().item()
    assert abs(std - 0.02) < 1e-3
    proj_std = m.trf_blocks[0].ff.layers[2].weight.std().item()
    assert abs(proj_std - 0.02 / 2) < 1e-3  # 0.02 / sqrt(2 * n_layers)


def test_bias_free_option():
    m = GPTModel(GPTConfig.from_name("tiny", bias=False))
    names = [n for n, _ in m.named_parameters()]
    assert not any(n.endswith("bias") for n in names)


def test_invalid_config_lists_every_problem():
    with pytest.raises(ConfigError) as e:
        GPTConfig(emb_dim=-1, n_heads=0, drop_rate=1.5)
    msg = str(e.value)
    assert "model.emb_dim=-1" in msg and "model.n_heads=0" in msg and "model.drop_rate=1.5" in msg


def test_unknown_preset():
    with pytest.raises(ConfigError, match="gpt2-124m"):
        GPTConfig.from_name("gpt-5")


def test_low_precision_residual_carries_the_stream_in_the_autocast_dtype():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=100, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0))
    ids = torch.randint(0, 100, (2, 16))
    seen = []
    model.trf_blocks[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    exact = model(ids)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(ids).float()
        model.autocast_residual = True
        low = model(ids).float()
    assert seen == [torch.float32, torch.bfloat16]  # the first block's output: float32, then bf16
    # Autocast's bf16 matmuls already move the logits off the float32 ones (mean 3e-4 of logits ~0.09 here); the bf16
    # stream adds about half as much again, the size of bf16 rounding, not of an error.
    autocast_error = (reference - exact).abs().mean()
    assert (low - exact).abs().mean() < 2.5 * autocast_error
    seen.clear()
    assert torch.equal(model(ids), model(ids)) and seen == [torch.float32] * 2  # no autocast: the flag does nothing
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay float32


def test_compile_options_need_compile_true():
    from lit_llm.tasks import PretrainTask

    with pytest.raises(ConfigError, match=r"compile_options needs model.speed.compile: true.*'max-autotune'"):
        PretrainTask(speed={"compile": "max-autotune", "compile_options": {"coordinate_descent_tuning": True}})
    task = PretrainTask(model=dict(vocab_size=100, context_length=16, emb_dim=32, n_heads=2, n_layers=1),
                        speed={"compile": True, "compile_options": {"coordinate_descent_tuning": True}})
    assert task.hparams.speed["compile_options"] == {"coordinate_descent_tuning": True}
