"""Import and export of weights (lit_llm.weights):
Hugging Face GPT-2, the book's models, lit_llm checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from support import ROOT, SHARED_DATA
from weights_helpers import TEXT, logits, lora_models, randomize, save_lora_checkpoint

from lit_llm.data.tokenizer import Tokenizer, load_tokenizer
from lit_llm.errors import CheckpointError
from lit_llm.model.config import GPTConfig
from lit_llm.model.gpt import GPTModel
from lit_llm.weights.export import export_hf, save_weights
from lit_llm.weights.readers import (
    build_model,
    load_book_state_dict,
    load_hf_gpt2,
    load_into,
    load_lit_checkpoint,
    load_model_for_inference,
    load_weights,
)

SAMPLE = "The sketch of the donkey,  questioned\n\nby those who never <|endoftext|> understood 123 it!"










@pytest.fixture(scope="module")
def lit_run(tmp_path_factory) -> Path:
    """A run directory from a two-step `lit_llm.train fit` of a tiny GPT (last.ckpt + tokenizer.json)."""
    from support import TINY_MODEL

    from lit_llm.train import cli

    root = tmp_path_factory.mktemp("lit_run")
    text = root / "text.txt"
    text.write_text(TEXT * 30)
    cli(["fit", "--config", str(ROOT / "configs/pretrain/quickstart.yaml"), *TINY_MODEL,
         "--model.init_args.model.context_length=16", f"--data.init_args.source={text}",
         "--data.init_args.tokenizer_vocab_size=300", "--data.init_args.num_workers=0", "--data.init_args.batch_size=4",
         f"--trainer.default_root_dir={root}", "--trainer.max_steps=2", "--trainer.logger=false",
         "--trainer.callbacks=[{class_path: lit_llm.callbacks.Checkpoint, init_args: {save_last: true}}]",
         "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0"])
    assert (root / "last.ckpt").is_file()
    return root


def _ckpt_model(run: Path) -> tuple[GPTModel, dict]:
    """The GPT exactly as the checkpoint stores it, read with plain torch.load (the reference)."""
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    model = GPTModel(GPTConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()})
    return model.eval(), ckpt


# ---- Hugging Face GPT-2 ----------------------------------------------------------------------------------------


def test_hf_import_gives_transformers_logits(hf_dir, tokenizer):
    transformers = pytest.importorskip("transformers")
    reference = transformers.GPT2LMHeadModel.from_pretrained(hf_dir)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 40))
    model, tok, meta = load_model_for_inference(str(hf_dir))
    assert meta["format"] == "hf" and tok.fingerprint == tokenizer.fingerprint
    assert not model.training
    cfg = model.config
    assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads, cfg.context_length) == (64, 2, 4, 64)
    assert cfg.qkv_bias and cfg.bias and cfg.tie_weights and cfg.vocab_size == tokenizer.vocab_size
    assert model.out_head.weight is model.tok_emb.weight
    assert (logits(model, ids) - logits(reference, ids)).abs().max().item() <= 1e-4

    # Into a padded model (a finetuning config): same logits on the real vocabulary, zero padding rows.
    config, state = load_hf_gpt2(hf_dir)
    padded = GPTModel(config.replace(pad_vocab_multiple=64))
    load_into(padded, state)
    assert padded.tok_emb.weight.shape[0] == 320 and padded.tok_emb.weight[tokenizer.vocab_size:].abs().sum() == 0
    diff = logits(padded, ids)[..., : tokenizer.vocab_size] - logits(reference, ids)
    assert diff.abs().max().item() <= 1e-4


def test_hf_export_roundtrip_through_transformers(hf_dir, tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, _ = build_model(hf_dir)
    export_hf(model, tmp_path, tokenizer)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["activation_function"] == "gelu_new" and config["tie_word_embeddings"] is True
    assert config["eos_token_id"] == tokenizer.eos_id
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 40))
    assert (logits(reloaded, ids) - logits(model, ids)).abs().max().item() <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok(SAMPLE)["input_ids"] == tokenizer.encode(SAMPLE)
    assert hf_tok.eos_token_id == tokenizer.eos_id


def test_export_untied_biasless_padded_model(tmp_path):
    """GPT-2's layout has every bias: a bias-free model gets zero biases and computes the same logits."""
    transformers = pytest.importorskip("transformers")
    cfg = GPTConfig(vocab_size=200, context_length=32, emb_dim=32, n_heads=2, n_layers=2, bias=False,
                    qkv_bias=False, tie_weights=False, pad_vocab_multiple=64)
    model = GPTModel(cfg)
    randomize(model)
    with pytest.warns(UserWarning, match="no tokenizer"):
        export_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["vocab_size"] == 200
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight.shape == (200, 32)
    ids = torch.randint(0, 200, (2, 32))
    assert (logits(reloaded, ids) - logits(model, ids)[..., :200]).abs().max().item() <= 1e-4


@pytest.mark.skipif(not (SHARED_DATA / "gpt2" / "encoder.json").is_file(), reason="GPT-2 BPE files not present")
def test_exported_gpt2_tokenizer_matches_ours(tmp_path):
    transformers = pytest.importorskip("transformers")
    gpt2 = load_tokenizer(SHARED_DATA / "gpt2")
    model = GPTModel(GPTConfig(vocab_size=50257, context_length=16, emb_dim=8, n_heads=2, n_layers=1,
                               pad_vocab_multiple=1, tie_weights=True))
    export_hf(model, tmp_path, gpt2)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = SAMPLE + " Every effort moves you, naïvely — 東京 'll've   \t tabs"
    assert hf_tok(text)["input_ids"] == gpt2.encode(text)
    assert hf_tok.eos_token_id == 50256 and json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == 50256


# ---- the book's models -----------------------------------------------------------------------------------------

BOOK_CFG = {"vocab_size": 300, "context_length": 32, "emb_dim": 64, "n_heads": 4, "n_layers": 2, "drop_rate": 0.1}


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("cls_name", ["GPTModel", "GPTModelFast"])
def test_book_model_gives_same_logits(cls_name, qkv_bias, tmp_path):
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    if not hasattr(ch04, cls_name):
        pytest.skip(f"llms_from_scratch.ch04 has no {cls_name}")
    book = getattr(ch04, cls_name)({**BOOK_CFG, "qkv_bias": qkv_bias})
    randomize(book)
    ids = torch.randint(0, 300, (2, 32))
    config, state = load_book_state_dict(book.state_dict(), n_heads=4)
    assert (config.emb_dim, config.n_layers, config.vocab_size, config.context_length) == (64, 2, 300, 32)
    assert config.qkv_bias is qkv_bias and not config.tie_weights
    model = GPTModel(config)
    load_into(model, state)
    assert (logits(model, ids) - logits(book, ids)).abs().max().item() <= 1e-5

    # The same weights as files: a wrapped .pth and a .safetensors, through load_weights, into a padded model.
    from safetensors.torch import save_file

    torch.save({"model_state_dict": book.state_dict()}, tmp_path / "book.pth")
    save_file({k: v.contiguous() for k, v in book.state_dict().items()}, tmp_path / "book.safetensors")
    for name in ("book.pth", "book.safetensors"):
        config, state = load_weights(tmp_path / name, GPTConfig(**{**BOOK_CFG, "qkv_bias": qkv_bias}))
        model = GPTModel(config)  # pad_vocab_multiple=64 -> 320 rows
        load_into(model, state)
        assert (logits(model, ids)[..., :300] - logits(book, ids)).abs().max().item() <= 1e-5


def test_book_gpt2_shapes_take_n_heads_from_the_preset():
    """The book's GPT-2 124M files (context 1024 or the chapter-5 256) need no n_heads: the preset gives 12."""
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    with torch.device("meta"):  # shapes only: nothing is allocated
        book = ch04.GPTModel({"vocab_size": 50257, "context_length": 256, "emb_dim": 768, "n_heads": 12,
                              "n_layers": 12, "drop_rate": 0.0, "qkv_bias": True})
        config, state = load_book_state_dict(book.state_dict())
    assert (config.n_heads, config.context_length, config.vocab_size, config.qkv_bias) == (12, 256, 50257, True)
    assert state["trf_blocks.11.att.qkv.weight"].shape == (2304, 768)


def test_book_unknown_n_heads_says_how_to_fix():
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    book = ch04.GPTModel({**BOOK_CFG, "qkv_bias": False})
    with pytest.raises(CheckpointError, match=r"n_heads cannot be read .*emb_dim=64, n_layers=2.*--n-heads"):
        load_book_state_dict(book.state_dict())


# ---- lit_llm checkpoints ---------------------------------------------------------------------------------------


def test_lit_checkpoint_roundtrip(lit_run, tmp_path):
    reference, ckpt = _ckpt_model(lit_run)
    ids = torch.randint(0, 300, (2, 16))
    expected = logits(reference, ids)
    stored_tok = Tokenizer.from_json(ckpt["PretrainDataModule"]["tokenizer_json"])
    for source in (lit_run / "last.ckpt", lit_run):  # the file, and the run directory
        model, tok, meta = load_model_for_inference(str(source))
        assert meta["format"] == "lit" and meta["global_step"] == 2 and meta["config"] == ckpt["model_config"]
        assert tok.fingerprint == stored_tok.fingerprint
        assert torch.equal(logits(model, ids)[..., :300], expected[..., :300])
    # Converted weights directory (what `lit_llm.convert from-*` writes) and back.
    config, state = load_lit_checkpoint(lit_run / "last.ckpt")
    assert "out_head.weight" not in state and state["tok_emb.weight"].shape[0] == 300  # tied, unpadded
    save_weights(config, state, tmp_path / "converted", stored_tok)
    model, tok, meta = load_model_for_inference(str(tmp_path / "converted"))
    assert meta["format"] == "lit" and tok.fingerprint == stored_tok.fingerprint
    assert torch.equal(logits(model, ids)[..., :300], expected[..., :300])
    # Export to Hugging Face straight from the checkpoint: padding dropped, tokenizer included.
    transformers = pytest.importorskip("transformers")
    export_hf(lit_run / "last.ckpt", tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert (logits(reloaded, ids) - expected[..., :300]).abs().max().item() <= 1e-4
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")(SAMPLE)["input_ids"] == stored_tok.encode(SAMPLE)


def test_build_model_casts_and_ties(lit_run):
    model, config = build_model(lit_run / "last.ckpt", dtype=torch.bfloat16)
    assert config.tie_weights and model.out_head.weight is model.tok_emb.weight
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())


def test_built_model_survives_its_checkpoint_being_overwritten(lit_run, tmp_path):
    """build_model memory-maps the checkpoint but the model must not keep reading it: training rewrites last.ckpt."""
    ckpt = tmp_path / "last.ckpt"
    shutil.copy(lit_run / "last.ckpt", ckpt)
    model, _ = build_model(ckpt)
    ids = torch.randint(0, 300, (2, 16))
    before = logits(model, ids)
    with ckpt.open("r+b") as f:  # in place, as a cross-filesystem save does (a crash here would be a bus error)
        f.truncate(0)
        f.write(b"\0" * 4096)
    assert torch.equal(logits(model, ids), before)


def test_init_weights_through_the_cli(lit_run, tmp_path):
    from support import TINY_MODEL

    from lit_llm.train import cli

    reference, _ = _ckpt_model(lit_run)
    args = ["--config", str(ROOT / "configs/pretrain/quickstart.yaml"), *TINY_MODEL,
            "--model.init_args.model.context_length=16", f"--data.init_args.source={lit_run / 'text.txt'}",
            "--data.init_args.tokenizer_vocab_size=300", "--data.init_args.num_workers=0",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar=false", f"--model.init_args.init_weights={lit_run / 'last.ckpt'}"]
    c = cli(args, run=False)
    c.model.configure_model()
    loaded = c.model.model.state_dict()
    for name, value in reference.state_dict().items():
        if name in ("tok_emb.weight", "out_head.weight"):  # vocabulary padding rows start at zero
            assert loaded[name][300:].abs().sum() == 0
            loaded[name], value = loaded[name][:300], value[:300]
        assert torch.equal(loaded[name], value), name

    # The config must describe the checkpoint's architecture: a wider model gets the listing, from inside `fit`.
    with pytest.raises(CheckpointError) as err:
        cli(["fit", *args, "--model.init_args.model.emb_dim=48", "--trainer.fast_dev_run=true"])
    assert "trf_blocks.0.att.qkv.weight: model=(144, 48) checkpoint=(96, 32)" in str(err.value)
    assert "last.ckpt" in str(err.value)

    with pytest.raises(CheckpointError, match=r"weights file nope/missing\.ckpt does not exist"):
        cli(["fit", *args, "--model.init_args.init_weights=nope/missing.ckpt", "--trainer.fast_dev_run=true"])


# ---- bad input -------------------------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing\.ckpt does not exist"):
        load_weights(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match=r"holds no weights"):
        load_weights(tmp_path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_truncated_and_garbage_files_are_named(lit_run, hf_dir, tmp_path):
    data = (lit_run / "last.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pth").write_bytes(b"\x80\x04 this is not a checkpoint" * 10)
    st = (hf_dir / "model.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(st[: len(st) // 2])
    (tmp_path / "not_json.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    for name in ("truncated.ckpt", "garbage.pth", "truncated.safetensors", "not_json.safetensors"):
        with pytest.raises(CheckpointError, match=r"truncated or corrupt") as err:
            load_weights(tmp_path / name)
        assert str(tmp_path / name) in str(err.value)


def test_shape_mismatch_and_unknown_keys_are_listed(lit_run):
    config, state = load_lit_checkpoint(lit_run / "last.ckpt")
    wider = GPTModel(config.replace(emb_dim=48))
    with pytest.raises(CheckpointError) as err:
        load_into(wider, state, source="run/last.ckpt")
    message = str(err.value)
    assert "run/last.ckpt" in message and "shape mismatches" in message
    assert "trf_blocks.0.att.qkv.weight: model=(144, 48) checkpoint=(96, 32)" in message
    assert "trf_blocks.1.norm2.bias: model=(48) checkpoint=(32)" in message

    extra = {**state, "trf_blocks.0.att.W_query.weight": torch.zeros(32, 32)}
    del extra["trf_blocks.1.ff.layers.2.bias"]
    model = GPTModel(config)
    with pytest.raises(CheckpointError) as err:
        load_into(model, extra)
    message = str(err.value)
    assert "missing keys" in message and "trf_blocks.1.ff.layers.2.bias" in message
    assert "unexpected keys" in message and "trf_blocks.0.att.W_query.weight" in message
    load_into(model, extra, strict=False)  # tolerated on request; shapes are still checked

    deeper = GPTModel(config.replace(n_layers=3))
    with pytest.raises(CheckpointError, match=r"missing keys[\s\S]*trf_blocks\.2\.att\.qkv\.weight"):
        load_into(deeper, state)


def test_tied_model_refuses_a_different_head(lit_run):
    config, state = load_lit_checkpoint(lit_run / "last.ckpt")
    state = {**state, "out_head.weight": torch.randn_like(state["tok_emb.weight"])}
    with pytest.raises(CheckpointError, match="tie_weights: false"):
        load_into(GPTModel(config), state)
    untied = GPTModel(config.replace(tie_weights=False))
    load_into(untied, state)
    assert torch.equal(untied.out_head.weight[:300], state["out_head.weight"])


def test_offline_hub_id_says_pass_a_local_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"could not download 'lit-llm-tests/no-such-gpt2'.*local directory"):
        load_weights("lit-llm-tests/no-such-gpt2")


def test_not_gpt2_and_sharded_directories_are_refused(hf_dir, tmp_path):
    other = tmp_path / "llama"
    shutil.copytree(hf_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llama", "activation_function": "silu"}))
    with pytest.raises(CheckpointError, match=r"model_type='llama'[\s\S]*activation_function='silu'"):
        load_weights(other)
    sharded = tmp_path / "last.ckpt"
    (sharded / "checkpoint").mkdir(parents=True)
    (sharded / "latest").write_text("checkpoint")
    with pytest.raises(CheckpointError, match="sharded"):
        load_weights(sharded)
    (tmp_path / "other.pth").parent.mkdir(exist_ok=True)
    torch.save({"encoder.layer.0.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a weights file lit_llm knows"):
        load_weights(tmp_path / "other.pth")


# ---- LoRA ------------------------------------------------------------------------------------------------------






@pytest.mark.parametrize("tie", [False, True])
def test_lora_weights_are_merged_wherever_they_are_read(tie, tmp_path):
    base, adapted = lora_models(tie)
    ids = torch.randint(0, 300, (2, 16))
    expected = logits(adapted, ids)[..., :300]
    assert (expected - logits(base, ids)[..., :300]).abs().max() > 1e-3  # the adapters matter
    state = adapted.state_dict()
    lit_layout = {k: v for k, v in state.items() if not (tie and k == "out_head.weight")}  # a tied head listed once
    sources = {
        "ckpt": save_lora_checkpoint(adapted, tmp_path / "lora.ckpt"),
        "converted": save_weights(adapted.config, state, tmp_path / "converted"),
        "file": tmp_path / "converted" / "state.pth",  # a state-dict file, its config beside it
    }
    torch.save(lit_layout, sources["file"])
    for name, source in sources.items():
        config, loaded = load_weights(source)
        assert not any("lora" in k for k in loaded), name
        # The adapted head was tied: merged, it is a matrix of its own (the embedding is unchanged).
        assert config.tie_weights is False, name
        assert torch.equal(loaded["tok_emb.weight"][:300], base.tok_emb.weight[:300]), name
        plain = GPTModel(config)
        load_into(plain, loaded, source=str(source))
        assert (logits(plain, ids)[..., :300] - expected).abs().max().item() <= 1e-5, name
        model, _, meta = load_model_for_inference(str(source))
        assert len(meta["lora_merged"]) == 2 * 4 + 1 and "out_head" in meta["lora_merged"], name
        assert (logits(model, ids)[..., :300] - expected).abs().max().item() <= 1e-5, name


def test_lora_reading_errors_are_named(tmp_path):
    from lit_llm.model.lora import save_lora

    _, adapted = lora_models(tie=False)
    with pytest.raises(CheckpointError, match=r"holds LoRA adapters only[\s\S]*load_lora"):
        load_weights(save_lora(adapted, tmp_path / "adapters.safetensors"))
    state = adapted.state_dict()
    del state["trf_blocks.0.ff.layers.2.lora_B"]
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "model_config": adapted.config.to_dict()},
               tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointError, match=r"broken\.ckpt: the LoRA adapter of trf_blocks\.0\.ff\.layers\.2 is "
                                              r"incomplete: trf_blocks\.0\.ff\.layers\.2\.lora_B missing"):
        load_weights(tmp_path / "broken.ckpt")


def test_load_into_across_lora_and_plain_models():
    base, adapted = lora_models(tie=False)
    ids = torch.randint(0, 300, (2, 16))
    # An adapted model's own state dict into a plain model: merged on the way in.
    plain = GPTModel(base.config)
    load_into(plain, adapted.state_dict())
    assert (logits(plain, ids) - logits(adapted, ids)).abs().max().item() <= 1e-5
    # Base weights into an adapted model: the base changes, the adapters keep their values.
    adapters = {k: v.clone() for k, v in adapted.state_dict().items() if "lora_" in k}
    fresh = GPTModel(base.config)
    load_into(adapted, fresh.state_dict())
    assert torch.equal(adapted.trf_blocks[0].att.qkv.weight, fresh.trf_blocks[0].att.qkv.weight)
    assert all(torch.equal(adapted.state_dict()[k], v) for k, v in adapters.items())
