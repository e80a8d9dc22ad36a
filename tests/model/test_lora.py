"""LoRA (lit_llm.model.lora):
exactness of fresh adapters, merging, parameter counts, the book's layer, files, training."""

from __future__ import annotations

import copy
import io
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support import ROOT, TINY_MODEL

from lit_llm.errors import CheckpointError, ConfigError, find_user_error
from lit_llm.model.config import GPTConfig
from lit_llm.model.gpt import GPTModel
from lit_llm.model.lora import (
    LoRAConfig,
    LoRALinear,
    UntiedHeadWarning,
    apply_lora,
    count_trainable,
    load_lora,
    lora_config_of,
    lora_state_dict,
    merge_lora,
    merge_lora_state,
    read_lora,
    save_lora,
)
from lit_llm.weights.readers import load_into, load_model_for_inference, load_weights

TEXT = "The quick brown fox jumps over the lazy dog, and the dog sleeps on in the sun all afternoon. " * 40


def tiny_config(**changes) -> GPTConfig:
    base = dict(vocab_size=100, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0,
                pad_vocab_multiple=1, qkv_bias=True)
    return GPTConfig(**{**base, **changes})


def base_model(seed: int = 0, **changes) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(tiny_config(**changes)).eval()


def randomize_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-zero ``lora_B`` everywhere, so every adapter changes the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0.0, 0.05)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids)


IDS = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))


# ---- exactness and merging -------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_fresh_adapters_leave_the_logits_exactly_unchanged(tie):
    model = base_model(tie_weights=tie)
    before = logits(model, IDS)
    weights = {name: p for name, p in model.named_parameters()}
    names = apply_lora(model, LoRAConfig(rank=4, targets=["all"]))
    assert len(names) == 2 * 4 + 1 and names[0] == "trf_blocks.0.att.qkv" and names[-1] == "out_head"
    assert torch.equal(logits(model, IDS), before)
    # The adapted layers adopted the very same Parameter objects (nothing copied), and a tied head stays tied.
    assert model.trf_blocks[1].ff.layers[2].weight is weights["trf_blocks.1.ff.layers.2.weight"]
    assert (model.out_head.weight is model.tok_emb.weight) == tie
    assert model.out_head.shares_weight == tie and not model.trf_blocks[0].att.qkv.shares_weight


def test_merged_and_unmerged_give_the_same_logits():
    model = base_model()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=["all"]))
    randomize_adapters(model)
    base = base_model()
    expected = logits(model, IDS)
    assert (expected - logits(base, IDS)).abs().max() > 1e-2  # the adapters do change the model

    # LoRALinear.merge / unmerge in place.
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.merge()
    torch.testing.assert_close(logits(model, IDS), expected, atol=1e-5, rtol=0)
    for layer in layers:
        layer.unmerge()
    torch.testing.assert_close(model.trf_blocks[0].att.qkv.weight, base.trf_blocks[0].att.qkv.weight, atol=1e-6,
                               rtol=0)

    # A merged layer's state dict still holds the base weight, so merging it later cannot count the adapter twice.
    layers[0].merge()
    torch.testing.assert_close(model.state_dict()["trf_blocks.0.att.qkv.weight"], base.trf_blocks[0].att.qkv.weight,
                               atol=1e-6, rtol=0)
    layers[0].unmerge()

    # merge_lora: plain Linear layers again, no lora entries, same function.
    merged = merge_lora(copy.deepcopy(model))
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged, IDS), expected, atol=1e-5, rtol=0)

    # merge_lora_state, then an ordinary GPTModel.
    state = merge_lora_state(model.state_dict())
    assert set(state) == set(base.state_dict())
    plain = GPTModel(model.config)
    load_into(plain, state)
    torch.testing.assert_close(logits(plain, IDS), expected, atol=1e-5, rtol=0)


def test_tied_head_adapter_unties_when_merged():
    model = base_model(tie_weights=True)
    apply_lora(model, LoRAConfig(rank=4, targets=["head", "qkv"]))
    randomize_adapters(model)
    expected = logits(model, IDS)
    embedding = model.tok_emb.weight.detach().clone()

    with pytest.raises(ConfigError, match="shared with another module"):
        model.out_head.merge()  # in place it would change the token embedding too

    merged = copy.deepcopy(model)
    with pytest.warns(UntiedHeadWarning, match="out_head"):
        merge_lora(merged)
    assert merged.config.tie_weights is False and merged.out_head.weight is not merged.tok_emb.weight
    assert torch.equal(merged.tok_emb.weight, embedding)
    torch.testing.assert_close(logits(merged, IDS), expected, atol=1e-5, rtol=0)

    # The lit_llm layout lists a tied head once (no out_head.weight): merging gives the head its own weight.
    state = {k: v for k, v in model.state_dict().items() if k != "out_head.weight"}
    with pytest.warns(UntiedHeadWarning, match="tie_weights: false"):
        state = merge_lora_state(state)
    assert torch.equal(state["tok_emb.weight"], embedding) and not torch.equal(state["out_head.weight"], embedding)
    with pytest.raises(CheckpointError, match="tie_weights: false"):
        load_into(GPTModel(model.config), state)  # a tied model cannot hold the merged head ...
    untied = GPTModel(model.config.replace(tie_weights=False))
    load_into(untied, state)  # ... an untied one can
    torch.testing.assert_close(logits(untied, IDS), expected, atol=1e-5, rtol=0)


def test_merge_lora_state_refuses_incomplete_adapters():
    model = base_model()
    apply_lora(model, LoRAConfig(rank=2, targets=["qkv"]))
    state = model.state_dict()
    del state["trf_blocks.1.att.qkv.lora_scaling"]
    with pytest.raises(CheckpointError, match=r"trf_blocks\.1\.att\.qkv\.lora_scaling missing"):
        merge_lora_state(state)
    state = model.state_dict()
    state["trf_blocks.0.att.qkv.lora_B"] = torch.zeros(2, 7)
    with pytest.raises(CheckpointError, match=r"trf_blocks\.0\.att\.qkv does not fit its weight"):
        merge_lora_state(state)


# ---- what trains -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("targets", "rank"),
    [(["attention", "ff"], 8), (["qkv"], 4), (["out_proj", "ff_out"], 2), (["all"], 3), (["head"], 16)],
)
def test_trainable_counts_are_the_analytic_ones(targets, rank):
    model = base_model(tie_weights=True, vocab_size=90, pad_vocab_multiple=64)  # head rows are the padded 128
    total_before = count_trainable(model)[1]
    C, V = 32, 128
    sizes = {"qkv": (C, 3 * C), "out_proj": (C, C), "ff_in": (C, 4 * C), "ff_out": (4 * C, C)}
    config = LoRAConfig(rank=rank, targets=targets)
    expected = sum(rank * (i + o) * 2 for name, (i, o) in sizes.items() if name in config.layer_names())
    expected += rank * (C + V) if "head" in config.layer_names() else 0
    apply_lora(model, config)
    trainable, total = count_trainable(model)
    assert trainable == expected and total == total_before + expected
    grads = {name for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all(name.endswith(("lora_A", "lora_B")) for name in grads)
    assert len(grads) == 2 * (2 * sum(n != "head" for n in config.layer_names()) + ("head" in config.layer_names()))


def test_dropout_applies_to_the_adapter_input_only():
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 6)
    layer = LoRALinear.from_linear(linear, rank=2, alpha=4, dropout=0.5).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 8)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    expected = linear(x) + (F.dropout(x, 0.5, training=True) @ layer.lora_A @ layer.lora_B) * 2.0
    torch.testing.assert_close(out, expected)
    assert not torch.equal(out, layer.eval()(x))  # dropout was active in training mode


def test_adapters_follow_the_weights_device_and_dtype():
    model = base_model().to(torch.bfloat16)
    apply_lora(model, LoRAConfig(rank=2))
    layer = model.trf_blocks[0].ff.layers[0]
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16 and layer.lora_A.device == layer.weight.device
    assert model(IDS).dtype == torch.bfloat16


# ---- the book's appendix E -------------------------------------------------------------------------------------


def test_same_output_as_the_books_lora_layer():
    appendix_e = pytest.importorskip("llms_from_scratch.appendix_e")
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40)
    rank, book_alpha = 4, 8.0
    torch.manual_seed(1)
    book = appendix_e.LinearWithLoRA(copy.deepcopy(linear), rank=rank, alpha=book_alpha)
    torch.manual_seed(1)
    ours = LoRALinear.from_linear(copy.deepcopy(linear), rank=rank, alpha=book_alpha * rank)  # ours: alpha / rank
    assert torch.equal(ours.lora_A, book.lora.A)  # the same Kaiming-uniform init from the same generator state
    assert torch.equal(ours.lora_B, book.lora.B) and not ours.lora_B.any()
    with torch.no_grad():
        book.lora.B.normal_()
        ours.lora_B.copy_(book.lora.B)
    x = torch.randn(5, 7, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), book(x), atol=1e-5, rtol=1e-5)


# ---- configuration ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "key", "hint"),
    [({"targets": ["attention", "attn"]}, "model.lora.targets", "valid names are qkv, out_proj, ff_in, ff_out, head"),
     ({"rank": 0}, "model.lora.rank=0", "positive integer"),
     ({"alpha": -1}, "model.lora.alpha=-1", "> 0"),
     ({"dropout": 1.0}, "model.lora.dropout=1.0", "[0, 1)")],
)
def test_bad_config_names_the_key(values, key, hint):
    with pytest.raises(ConfigError) as err:
        LoRAConfig(**values)
    assert key in str(err.value) and hint in str(err.value)


def test_bad_config_problems_are_collected_once():
    with pytest.raises(ConfigError) as err:
        LoRAConfig(rank=0, targets=["mlp"])
    assert "model.lora.rank=0" in str(err.value) and "['mlp']" in str(err.value)
    with pytest.raises(ConfigError, match=r"Unknown model.lora key\(s\) \['ranks'\]"):
        LoRAConfig.from_dict({"ranks": 4})


def test_config_groups_and_strings():
    assert LoRAConfig(targets=["ff", "qkv"]).layer_names() == ["qkv", "ff_in", "ff_out"]
    assert LoRAConfig(targets="all").layer_names() == ["qkv", "out_proj", "ff_in", "ff_out", "head"]
    assert LoRAConfig(rank=16, alpha=8).scaling == 0.5
    assert LoRAConfig.coerce({"rank": 2}) == LoRAConfig(rank=2)


def test_apply_twice_is_refused():
    model = base_model()
    apply_lora(model, LoRAConfig(rank=2))
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig(rank=2))


# ---- adapter files ---------------------------------------------------------------------------------------------


def test_save_and_load_adapters_alone(tmp_path):
    model = base_model(tie_weights=True)
    apply_lora(model, LoRAConfig(rank=4, alpha=4, dropout=0.1, targets=["attention", "head"]))
    randomize_adapters(model)
    expected = logits(model, IDS)
    path = save_lora(model, tmp_path / "adapters.safetensors", metadata={"note": "test", "step": 3})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == set(lora_state_dict(model)) and all("lora_" in k for k in keys)
    assert json.loads(meta["lora_config"]) == {"rank": 4, "alpha": 4.0, "dropout": 0.1,
                                               "targets": ["qkv", "out_proj", "head"]}
    assert json.loads(meta["model_config"])["emb_dim"] == 32 and meta["note"] == "test" and meta["step"] == "3"

    fresh = base_model(tie_weights=True)  # the same base weights, no adapters yet
    load_lora(fresh, path)
    assert lora_config_of(fresh) == LoRAConfig(rank=4, alpha=4, dropout=0.1, targets=["qkv", "out_proj", "head"])
    torch.testing.assert_close(logits(fresh, IDS), expected, atol=0, rtol=0)
    assert all(n.endswith(("lora_A", "lora_B")) for n, p in fresh.named_parameters() if p.requires_grad)

    other = base_model(tie_weights=True)
    apply_lora(other, LoRAConfig(rank=8, targets=["attention", "ff"]))
    with pytest.raises(CheckpointError) as err:
        load_lora(other, path)
    message = str(err.value)
    assert "trf_blocks.0.att.qkv.lora_A: model=(32, 8) file=(32, 4)" in message
    assert "missing" in message and "trf_blocks.0.ff.layers.0.lora_A" in message
    assert "unexpected" in message and "out_head.lora_A" in message

    # n_heads leaves no trace in the shapes; the stored model config catches it.
    with pytest.raises(CheckpointError, match="n_heads: adapters=2 model=4"):
        load_lora(base_model(n_heads=4), path)
    with pytest.raises(CheckpointError, match="holds LoRA adapters only"):
        load_weights(path)
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        save_lora(base_model(), tmp_path / "none.safetensors")


# ---- training through the CLI ----------------------------------------------------------------------------------


def _fit_args(root: Path, text: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs/pretrain/quickstart.yaml"), *TINY_MODEL,
            "--model.init_args.model.context_length=16", f"--data.init_args.source={text}",
            "--data.init_args.tokenizer_vocab_size=300", "--data.init_args.num_workers=0",
            "--data.init_args.batch_size=4", f"--trainer.default_root_dir={root}", "--trainer.logger=false",
            "--trainer.callbacks=[{class_path: lit_llm.callbacks.Checkpoint, init_args: {save_last: true}}]",
            "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
            "--model.init_args.optim.warmup_steps=0",
            *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A base run (2 steps, no LoRA), then a LoRA run (2 steps) starting from its weights; the head is tied and
    adapted too."""
    from lit_llm.train import cli

    root = tmp_path_factory.mktemp("lora_runs")
    text = root / "text.txt"
    text.write_text(TEXT)
    cli(_fit_args(root / "base", text, "--trainer.max_steps=2"))
    lora = "--model.init_args.lora={rank: 4, alpha: 8, targets: [attention, ff, head]}"
    cli(_fit_args(root / "lora", text, "--trainer.max_steps=2", lora,
                  f"--model.init_args.init_weights={root / 'base' / 'last.ckpt'}"))
    return {"base": root / "base", "lora": root / "lora", "text": text, "lora_arg": lora}


def _ckpt_state(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, weights_only=True)  # plain types only: loads without unpickling objects
    return {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}


def test_lora_training_changes_only_the_adapters(runs):
    base, lora = _ckpt_state(runs["base"] / "last.ckpt"), _ckpt_state(runs["lora"] / "last.ckpt")
    adapters = {k for k in lora if "lora_" in k}
    assert set(lora) - adapters == set(base)
    for name, value in base.items():
        rows = slice(0, 300) if name in ("tok_emb.weight", "out_head.weight") else slice(None)  # 300 tokens + padding
        assert torch.equal(lora[name][rows], value[rows]), name  # every base weight, the tied embedding/head included
    assert all(lora[k].abs().sum() > 0 for k in adapters if k.endswith("lora_B"))  # trained away from zero
    hparams = torch.load(runs["lora"] / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["attention", "ff", "head"]}


def test_lora_run_resumes_and_refuses_another_lora_setting(runs, tmp_path):
    import shutil

    from lit_llm.train import cli

    run = tmp_path / "resume"
    ckpt = str(shutil.copy(runs["lora"] / "last.ckpt", tmp_path / "step2.ckpt"))
    c = cli(_fit_args(run, runs["text"], "--trainer.max_steps=3", runs["lora_arg"], f"--ckpt_path={ckpt}"))
    assert c.trainer.global_step == 3
    before, after = _ckpt_state(runs["lora"] / "last.ckpt"), _ckpt_state(run / "last.ckpt")
    assert all(torch.equal(after[k], v) for k, v in before.items() if "lora_" not in k)
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.endswith("lora_B"))

    # The command line's LoRA setting is kept and compared with the checkpoint's (a --ckpt_path file does not bring
    # its own): another one is refused in one line that names the setting, with both values.
    for other, needle in (("--model.init_args.lora={rank: 2, targets: [attention, ff, head]}",
                           "model.init_args.lora.rank (checkpoint 4, given 2)"),
                          ("--model.init_args.lora=null", "model.init_args.lora (checkpoint {'rank': 4")):
        for root, resume in ((run, "auto"), (tmp_path / "another", ckpt)):
            with pytest.raises(Exception) as err:
                cli(_fit_args(root, runs["text"], "--trainer.max_steps=5", other, f"--ckpt_path={resume}"))
            user = find_user_error(err.value)
            assert isinstance(user, CheckpointError) and "cannot resume with these settings changed" in str(user)
            assert needle in str(user) and "\n" not in str(user), str(user)


def test_weights_readers_merge_a_lora_checkpoint(runs):
    ckpt = runs["lora"] / "last.ckpt"
    stored = torch.load(ckpt, weights_only=True)
    reference = GPTModel(GPTConfig.from_dict(stored["model_config"]))
    apply_lora(reference, LoRAConfig.from_dict(stored["hyper_parameters"]["lora"]))
    reference.load_state_dict(_ckpt_state(ckpt))
    ids = torch.randint(0, 300, (2, 16))

    model, tokenizer, meta = load_model_for_inference(str(runs["lora"]))
    assert tokenizer is not None and len(meta["lora_merged"]) == 2 * 4 + 1
    # The tied head took an adapter, so the merged model has a head of its own.
    assert model.config.tie_weights is False and not any("lora" in k for k in model.state_dict())
    torch.testing.assert_close(logits(model, ids)[..., :300], logits(reference, ids)[..., :300], atol=1e-5, rtol=0)


def test_generate_reads_a_lora_checkpoint(runs):
    from lit_llm.generate import main

    out = io.StringIO()
    rc = main(["--checkpoint", str(runs["lora"] / "last.ckpt"), "--prompt", "The quick", "--max-new-tokens", "5",
               "--no-stream"], stdout=out)
    assert rc == 0 and out.getvalue().startswith("The quick")


def test_lora_checkpoint_as_init_weights_of_a_later_finetune(runs, tmp_path):
    """init_weights merges the adapters; the merged head is separate, so the new run must untie its head."""
    from lit_llm.train import cli

    args = _fit_args(tmp_path, runs["text"], "--trainer.fast_dev_run=true")
    init = f"--model.init_args.init_weights={runs['lora'] / 'last.ckpt'}"
    with pytest.raises(Exception) as err:
        cli([*args, init])
    assert "tie_weights: false" in str(find_user_error(err.value))
    c = cli([*args, init, "--model.init_args.model.tie_weights=false", "--model.init_args.lora={rank: 2}"])
    assert c.trainer.state.finished
    merged, _, _ = load_model_for_inference(str(runs["lora"]))
    assert torch.equal(c.model.model.trf_blocks[0].ff.layers[0].weight,
                       merged.trf_blocks[0].ff.layers[0].weight)  # frozen through the step: still the merged weight


def test_cli_reports_a_bad_lora_config(runs, tmp_path, capsys):
    from lit_llm.train import main

    for bad, key in (("--model.init_args.lora.rank=0", "model.lora.rank=0"),
                     ("--model.init_args.lora={targets: [attn]}", "model.lora.targets")):
        with pytest.raises(SystemExit) as exit_info:
            main(_fit_args(tmp_path, runs["text"], "--trainer.fast_dev_run=true", bad))
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and err.startswith("error: ConfigError: Invalid LoRA config") and key in err


def test_read_lora_from_a_checkpoint_matches_the_run(runs):
    state, config, meta = read_lora(runs["lora"])
    assert config == LoRAConfig(rank=4, alpha=8, targets=["qkv", "out_proj", "ff_in", "ff_out", "head"])
    assert set(state) == {k for k in _ckpt_state(runs["lora"] / "last.ckpt") if "lora_" in k}
    assert json.loads(meta["model_config"])["emb_dim"] == 32
    with pytest.raises(CheckpointError, match="holds no LoRA adapters"):
        read_lora(runs["base"] / "last.ckpt")


def test_gpt2_124m_counts_quoted_in_the_docs():
    """docs/lora.md quotes these counts; they are computed here on a meta-device GPT-2 124M (as imported from OpenAI:
    qkv bias, tied head, 50,257 rows)."""
    doc = (ROOT / "docs" / "lora.md").read_text()
    gpt2 = GPTConfig.from_name("gpt2-124m", qkv_bias=True, tie_weights=True, pad_vocab_multiple=1)
    with torch.device("meta"):
        for rank, targets in ((8, ["attention"]), (8, ["attention", "ff"]), (16, ["attention", "ff"]),
                              (16, ["all"])):
            model = GPTModel(gpt2)
            apply_lora(model, LoRAConfig(rank=rank, targets=targets))
            trainable, total = count_trainable(model)
            row = f"| {rank} | `{', '.join(targets)}` | {trainable:,} | {total:,} | {100 * trainable / total:.2f}% |"
            assert row in doc, row

        # The book's appendix E: every Linear of GPT-2 small with a 2-class head, rank 16. The book's attention has
        # separate W_query/W_key/W_value (3 adapters of 2 * 768 * 16 per block), ours one fused qkv (768 * 4 * 16).
        model = GPTModel(gpt2)
        model.out_head = torch.nn.Linear(768, 2)
        apply_lora(model, LoRAConfig(rank=16, alpha=16, targets=["all"]))
        ours = count_trainable(model)[0]
        assert f"{ours:,}" in doc
        appendix_e = pytest.importorskip("llms_from_scratch.appendix_e")
        ch04 = pytest.importorskip("llms_from_scratch.ch04")
        book = ch04.GPTModel({"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12,
                              "n_layers": 12, "drop_rate": 0.0, "qkv_bias": True})
        book.out_head = torch.nn.Linear(768, 2)
        book.requires_grad_(False)
        appendix_e.replace_linear_with_lora(book, rank=16, alpha=16)
        book_count = sum(p.numel() for p in book.parameters() if p.requires_grad)
        assert f"{book_count:,}" in doc and book_count - ours == 12 * (3 * 2 * 768 - 4 * 768) * 16
    assert math.isclose(LoRAConfig(rank=16, alpha=16).scaling, 1.0)


def test_no_warnings_from_a_plain_roundtrip():
    model = base_model()
    apply_lora(model, LoRAConfig(rank=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_lora(model)
