"""``model.speed.float8``: the GPT's Linear layers as torchao ``Float8Linear`` (emulated on the CPU; GPU speed:
bench/)."""

from __future__ import annotations

import builtins
import math
from types import SimpleNamespace

import pytest
import torch
from support import ROOT

from lit_llm.tasks.options import grouped

pytest.importorskip("torchao.float8", reason="torchao is part of the dev extra (pip install -e '.[dev]')")

from torchao.float8.float8_linear import Float8Linear  # noqa: E402

from lit_llm.errors import ConfigError  # noqa: E402
from lit_llm.model.float8 import EMULATE_ENV, convert_to_float8  # noqa: E402
from lit_llm.model.gpt import GPTModel  # noqa: E402
from lit_llm.tasks import PretrainTask  # noqa: E402

SHAPE = dict(vocab_size=96, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
QUICK = ROOT / "configs/pretrain/quickstart.yaml"


def _model(**overrides) -> GPTModel:
    from lit_llm.model.config import GPTConfig

    torch.manual_seed(0)
    return GPTModel(GPTConfig(**{**SHAPE, **overrides}))


def _task(**kwargs) -> PretrainTask:
    torch.manual_seed(0)
    task = PretrainTask(model=dict(SHAPE), **grouped(kwargs))
    task.configure_model()
    return task


def test_the_blocks_linears_are_converted_and_the_head_only_when_asked():
    model = _model()
    keys = list(model.state_dict())
    converted = convert_to_float8(model, "tensorwise", emulate=True)
    per_block = ["att.qkv", "att.out_proj", "ff.layers.0", "ff.layers.2"]
    assert converted == [f"trf_blocks.{i}.{name}" for i in range(2) for name in per_block]
    assert all(isinstance(model.get_submodule(n), Float8Linear) for n in converted)
    assert not isinstance(model.out_head, Float8Linear)
    assert list(model.state_dict()) == keys  # checkpoints keep their keys

    tied = _model(tie_weights=True)
    assert "out_head" in convert_to_float8(tied, "rowwise", head=True, emulate=True)
    assert isinstance(tied.out_head, Float8Linear)
    assert tied.out_head.weight is tied.tok_emb.weight  # still one tied parameter


def test_a_layer_whose_size_is_not_a_multiple_of_16_stays_as_it_is():
    model = _model(vocab_size=100, pad_vocab_multiple=1)  # the head: 100 rows
    assert "out_head" not in convert_to_float8(model, head=True, emulate=True)
    assert not isinstance(model.out_head, Float8Linear)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_training_step_stays_close_to_the_plain_one(recipe):
    """The same weights and batch: FP8 (emulated) gives the loss to within FP8's rounding and gradients pointing the
    same way, on every parameter."""
    plain, fp8 = _model(), _model()
    convert_to_float8(fp8, recipe, emulate=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (4, 16), generator=g)
    targets = torch.randint(0, 96, (4, 16), generator=g)
    losses = []
    for model in (plain, fp8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, targets=targets)
        loss.backward()
        losses.append(loss.detach().float())
    assert torch.isfinite(losses[1])
    torch.testing.assert_close(losses[1], losses[0], atol=0.05, rtol=0.01)
    for (name, p), q in zip(plain.named_parameters(), fp8.parameters()):
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
        assert cos > 0.97, (name, float(cos))
        assert q.grad.dtype == p.grad.dtype == torch.float32  # float32 weights keep float32 gradients


def test_the_task_option_converts_and_logs(monkeypatch):
    monkeypatch.setenv(EMULATE_ENV, "1")
    task = _task(float8="tensorwise")
    assert sum(isinstance(m, Float8Linear) for m in task.model.modules()) == 8
    assert not isinstance(task.model.out_head, Float8Linear)
    assert isinstance(_task(float8="tensorwise", float8_head=True).model.out_head, Float8Linear)


def test_without_fp8_hardware_it_is_one_clear_error(monkeypatch):
    monkeypatch.delenv(EMULATE_ENV, raising=False)
    with pytest.raises(ConfigError, match=r"model.speed.float8 needs an NVIDIA GPU with FP8 tensor cores.*on CPU.*"
                                          r"LIT_LLM_FLOAT8_EMULATE=1"):
        _task(float8="tensorwise")


def test_torchao_missing_is_one_clear_error(monkeypatch):
    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(ConfigError, match=r"model.speed.float8 needs torchao.*pip install 'lit_llm\[float8\]'"):
        convert_to_float8(_model(), emulate=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(float8="e4m3"), r"model.speed.float8='e4m3' must be one of tensorwise, rowwise"),
    (dict(float8="tensorwise", lora={"rank": 2, "targets": ["attention"]}), r"float8 cannot be combined with "
                                                                            r"model.lora"),
    (dict(float8_head=True), r"float8_head needs model.speed.float8"),
    (dict(float8="tensorwise", float8_head=True, chunked_loss=64), r"float8_head cannot be combined with "
                                                                   r"model.speed.chunked_loss"),
])
def test_bad_combinations_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PretrainTask(model=dict(SHAPE), **grouped(kwargs))


def test_the_converter_refuses_an_unknown_recipe_with_the_tasks_message():
    with pytest.raises(ConfigError, match=r"model.speed.float8='e4m3' must be one of tensorwise, rowwise, or null"):
        convert_to_float8(_model(), "e4m3", emulate=True)


def test_sharded_strategies_are_refused(monkeypatch):
    monkeypatch.setenv(EMULATE_ENV, "1")

    class GPTFSDPStrategy:  # what the check looks at: the class's name, as for Lightning's FSDP strategies
        root_device = torch.device("cpu")

    task = PretrainTask(model=dict(SHAPE), speed={"float8": "tensorwise"})
    task._trainer = SimpleNamespace(strategy=GPTFSDPStrategy(), ckpt_path=None, accumulate_grad_batches=1)
    with pytest.raises(ConfigError,
                       match=r"model.speed.float8 runs on one GPU or under DDP, not under GPTFSDPStrategy"):
        task.configure_model()


def test_a_run_trains_and_its_checkpoint_loads_without_float8(tmp_path, monkeypatch, corpus, in_repo_root):
    """Through the CLI (emulated): the loss goes down, the checkpoint's weights load into a plain model and generate,
    and a run with float8 resumes from it."""
    from lit_llm.train import cli

    monkeypatch.setenv(EMULATE_ENV, "1")
    args = ["fit", "--config", str(QUICK), "--model.init_args.model.n_layers=2", "--model.init_args.model.emb_dim=32",
            "--model.init_args.model.n_heads=2", "--data.init_args.tokenizer_vocab_size=300",
            "--data.init_args.num_workers=0", "--trainer.accelerator=cpu", "--trainer.precision=bf16-mixed",
            "--model.init_args.speed.float8=tensorwise", "--model.init_args.optim.warmup_steps=0",
            "--model.init_args.optim.learning_rate=0.01", "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={tmp_path}"]
    c = cli([*args, "--trainer.max_steps=12"])
    assert sum(isinstance(m, Float8Linear) for m in c.model.model.modules()) == 8
    final = float(c.trainer.callback_metrics["train/loss"])
    assert final < 0.9 * math.log(300), final  # below a uniform guess over the 300 tokens: it learned
    ckpts = sorted(tmp_path.rglob("*.ckpt"))
    assert ckpts, "no checkpoint written"
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)["state_dict"]
    plain = PretrainTask(model=c.model.hparams.model)
    plain.configure_model()
    plain.load_state_dict(state)  # strict: the same keys as a plain model
    torch.testing.assert_close(plain.model.trf_blocks[0].att.qkv.weight, c.model.model.trf_blocks[0].att.qkv.weight)
    from lit_llm.model.sampling import generate
    from lit_llm.weights.readers import load_model_for_inference

    model, tokenizer, _ = load_model_for_inference(str(ckpts[-1]))  # what python -m lit_llm.generate reads
    assert not any(isinstance(m, Float8Linear) for m in model.modules())
    ids = torch.tensor([tokenizer.encode("The import statement")])
    assert generate(model, ids, 5).shape == (1, ids.shape[1] + 5)
    resumed = cli([*args, "--trainer.max_steps=14", f"--ckpt_path={ckpts[-1]}"])
    assert resumed.trainer.global_step == 14


def test_the_options_are_config_keys(tmp_path, in_repo_root):
    from lit_llm.train import cli

    c = cli(["--config", str(QUICK), "--data.init_args.tokenizer_vocab_size=300",
             "--model.init_args.speed.float8=rowwise", "--model.init_args.speed.float8_head=true",
             f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert c.model.speed.float8 == "rowwise" and c.model.speed.float8_head is True
