"""lit_llm's named strategies on the CPU: what can be checked without GPUs (GPU runs: test_gpu_strategies.py)."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch
from pytorch_lightning.strategies import FSDPStrategy, StrategyRegistry
from support import ROOT

from lit_llm.callbacks.checkpoint import Checkpoint
from lit_llm.distributed import common as dist_common
from lit_llm.distributed import ddp as dist_ddp
from lit_llm.distributed import deepspeed as dist_deepspeed
from lit_llm.distributed import fsdp as dist_fsdp
from lit_llm.distributed import registry as dist_registry
from lit_llm.distributed.deepspeed import sanitize_cuda_arch_list
from lit_llm.distributed.fsdp import GPTFSDPStrategy
from lit_llm.errors import ConfigError
from lit_llm.model.config import GPTConfig
from lit_llm.model.gpt import GPTModel, TransformerBlock
from lit_llm.train import cli
from lit_llm.weights.discovery import auto_checkpoint, looks_complete

QUICK = ROOT / "configs/pretrain/quickstart.yaml"
TINY = ["--model.init_args.model.n_layers=2", "--model.init_args.model.emb_dim=32", "--model.init_args.model.n_heads=2",
        "--model.init_args.speed.compile=false", "--data.init_args.tokenizer_vocab_size=300",
        "--data.init_args.num_workers=0", "--trainer.accelerator=cpu", "--trainer.precision=32-true"]


def test_every_name_is_registered_with_its_settings():
    for name in dist_registry.NAMES:
        assert name in StrategyRegistry, name
    fsdp = StrategyRegistry["lit_fsdp"]
    assert fsdp["strategy"] is GPTFSDPStrategy
    strategy = GPTFSDPStrategy(**fsdp["init_params"])
    # What becomes a unit is decided when the model is wrapped (test_fsdp_units_and_all_gather_limit_follow_...).
    assert strategy.units is None and "auto_wrap_policy" not in strategy.kwargs
    assert strategy.kwargs["use_orig_params"] is True and strategy._state_dict_type == "sharded"
    assert StrategyRegistry["lit_fsdp_hybrid"]["init_params"]["sharding_strategy"] == "HYBRID_SHARD"
    assert StrategyRegistry["lit_fsdp_offload"]["init_params"]["cpu_offload"] is True
    assert {StrategyRegistry[f"lit_deepspeed_zero{s}"]["init_params"]["stage"] for s in (1, 2, 3)} == {1, 2, 3}


def test_fsdp_on_the_cpu_is_one_clear_error(corpus, tmp_path, in_repo_root):
    with pytest.raises(ConfigError, match=r"FSDP \(trainer.strategy\) needs CUDA GPUs.*trainer.strategy=ddp"):
        cli(["fit", "--config", str(QUICK), *TINY, "--trainer.strategy=lit_fsdp", "--trainer.devices=1",
             f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1",
             "--model.init_args.optim.warmup_steps=0"])


def test_deepspeed_missing_is_one_clear_error(monkeypatch, tmp_path, in_repo_root):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match=r"DeepSpeed .* not installed: pip install 'lit_llm\[deepspeed\]'"):
        cli(["--config", str(QUICK), *TINY, "--trainer.strategy=lit_deepspeed_zero2",
             f"--trainer.default_root_dir={tmp_path}"], run=False)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_on_the_cpu_is_one_clear_error(tmp_path, in_repo_root):
    with pytest.raises(ConfigError, match=r"DeepSpeed \(trainer.strategy\) needs CUDA GPUs"):
        cli(["fit", "--config", str(QUICK), *TINY, "--trainer.strategy=lit_deepspeed_zero2", "--trainer.devices=1",
             f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1"])


@pytest.mark.parametrize(("given", "expected"), [
    ("9.0a", "9.0"), ("8.0;9.0a", "8.0;9.0"), ("9.0a+PTX", "9.0+PTX"), ("10.0f 12.0a", "10.0 12.0"),
    ("9.0", "9.0"), ("8.6;9.0+PTX", "8.6;9.0+PTX"),
])
def test_cuda_arch_suffixes_are_removed_for_deepspeed(given, expected, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", given)
    sanitize_cuda_arch_list()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == expected


class _OneRank(dist_common.AtomicDirectorySave):
    is_global_zero = True

    def __init__(self) -> None:
        self.barriers: list[str] = []

    def barrier(self, name: str) -> None:
        self.barriers.append(name)


def _write_shards(checkpoint: dict, path: Path, storage_options=None) -> None:
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_text(checkpoint["payload"])
    if checkpoint.get("fail"):
        raise OSError("disk full")
    (path / ".metadata").write_text("index")
    (path / "meta.pt").write_text("meta")


def test_directory_checkpoints_are_replaced_atomically(tmp_path):
    target = tmp_path / "last.ckpt"
    saver = _OneRank()
    saver._atomic_directory_save(_write_shards, {"payload": "one"}, target, None)
    assert (target / "__0_0.distcp").read_text() == "one" and looks_complete(target)
    assert saver.barriers == ["lit_llm.save.start", "lit_llm.save.written", "lit_llm.save.renamed"]
    saver._atomic_directory_save(_write_shards, {"payload": "two"}, target, None)
    assert (target / "__0_0.distcp").read_text() == "two"
    # A save that fails half way leaves the previous checkpoint whole under its name, and only a .tmp leftover.
    with pytest.raises(OSError, match="disk full"):
        saver._atomic_directory_save(_write_shards, {"payload": "three", "fail": True}, target, None)
    assert (target / "__0_0.distcp").read_text() == "two" and looks_complete(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.tmp"]
    assert not looks_complete(tmp_path / "last.ckpt.tmp")  # no index: an interrupted save
    # The next run's checkpoint callback clears the leftover.
    callback = Checkpoint(dirpath=str(tmp_path))
    callback._remove_partial_saves()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_resume_auto_finds_directory_checkpoints(tmp_path):
    for step in (10, 20):
        _write_shards({"payload": str(step)}, tmp_path / f"step={step:06d}.ckpt")
    deepspeed_like = tmp_path / "step=000030.ckpt"
    (deepspeed_like / "checkpoint").mkdir(parents=True)
    (deepspeed_like / "latest").write_text("checkpoint")
    broken = tmp_path / "step=000040.ckpt"  # a directory without its index
    broken.mkdir()
    assert looks_complete(deepspeed_like) and not looks_complete(broken)
    assert auto_checkpoint(tmp_path) == str(deepspeed_like)


def _materialise_like_fsdp(model: torch.nn.Module) -> None:
    """What FSDP does with a module built on the meta device: allocate each module's own tensors, then let the module
    initialise them with ``reset_parameters``."""
    for module in model.modules():
        module.to_empty(device="cpu", recurse=False)
        if callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()


def test_a_model_built_on_meta_materialises_with_lit_llms_initialisation():
    config = GPTConfig(vocab_size=512, context_length=64, emb_dim=256, n_heads=4, n_layers=4, drop_rate=0.0)
    torch.manual_seed(0)
    eager = GPTModel(config)
    with torch.device("meta"):
        lazy = GPTModel(config)
    assert all(p.is_meta for p in lazy.parameters())
    assert lazy.num_parameters() == eager.num_parameters() and lazy.flops_per_token() == eager.flops_per_token()
    _materialise_like_fsdp(lazy)
    eager_params, lazy_params = dict(eager.named_parameters()), dict(lazy.named_parameters())
    assert eager_params.keys() == lazy_params.keys()
    for name, p in eager_params.items():
        q = lazy_params[name]
        assert not q.is_meta and q.shape == p.shape
        if name.endswith("bias"):
            assert torch.count_nonzero(q) == 0, name
        elif "norm" in name:
            assert torch.equal(q, torch.ones_like(q)), name
        else:  # normal(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers): same spread as the eager build
            assert abs(q.std().item() - p.std().item()) < 0.1 * p.std().item(), name


class _FakeFSDPStrategy(FSDPStrategy):
    """Stands in for an FSDP strategy where ``configure_model`` only asks whether it is FSDP and reads its process
    count (nothing of Lightning's strategy is set up)."""

    num_processes = 2
    root_device = torch.device("cpu")

    def __init__(self) -> None:  # noqa: D107 - no set-up: only the type and the two attributes above are read
        pass


def _configure_under_fsdp(config: GPTConfig) -> torch.nn.Module:
    from types import SimpleNamespace

    from lit_llm.tasks import PretrainTask

    task = PretrainTask(model=config.to_dict())
    task._trainer = SimpleNamespace(strategy=_FakeFSDPStrategy(), ckpt_path=None)
    task.configure_model()
    return task.model


def test_under_fsdp_a_model_that_fits_starts_from_a_one_device_runs_weights():
    config = GPTConfig(vocab_size=300, context_length=32, emb_dim=32, n_heads=2, n_layers=2, tie_weights=False)
    torch.manual_seed(7)
    one_device = GPTModel(config)
    torch.manual_seed(7)
    sharded = _configure_under_fsdp(config)
    assert not any(p.is_meta for p in sharded.parameters())
    for (name, p), (_, q) in zip(one_device.named_parameters(), sharded.named_parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("share", [0.25, 0.0], ids=["fits", "too_big"])
def test_under_fsdp_a_tied_model_is_built_whole_and_stays_tied(share, monkeypatch):
    from lit_llm.tasks import base

    monkeypatch.setattr(base, "WHOLE_MODEL_SHARE", share)  # too big: the meta path would untie the head
    config = GPTConfig(vocab_size=300, context_length=32, emb_dim=32, n_heads=2, n_layers=2, tie_weights=True)
    torch.manual_seed(5)
    one_device = GPTModel(config)
    torch.manual_seed(5)
    sharded = _configure_under_fsdp(config)
    assert sharded.out_head.weight is sharded.tok_emb.weight
    assert not any(p.is_meta for p in sharded.parameters())
    assert all(torch.equal(p, q) for p, q in zip(one_device.parameters(), sharded.parameters(), strict=True))


def test_under_fsdp_a_model_too_big_for_host_memory_is_built_on_meta(monkeypatch):
    from lit_llm.tasks import base

    monkeypatch.setattr(base, "WHOLE_MODEL_SHARE", 0.0)
    config = GPTConfig(vocab_size=300, context_length=32, emb_dim=32, n_heads=2, n_layers=2, tie_weights=False)
    assert all(p.is_meta for p in _configure_under_fsdp(config).parameters())


def test_parameter_counts_survive_sharding():
    model = GPTModel(GPTConfig(vocab_size=300, context_length=32, emb_dim=32, n_heads=2, n_layers=2))
    full, flops = model.num_parameters(), model.flops_per_token()
    model.record_parameter_counts()
    with torch.no_grad():
        for p in model.parameters():  # what a shard looks like on a rank that owns none of the tensor
            p.data = torch.empty(0)
    assert model.num_parameters() == full and model.flops_per_token() == flops


def test_activation_checkpointing_gives_the_same_gradients():
    config = GPTConfig(vocab_size=300, context_length=32, emb_dim=32, n_heads=2, n_layers=3, drop_rate=0.0)
    torch.manual_seed(0)
    model = GPTModel(config)
    ids = torch.randint(0, 300, (2, 32))
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        model.activation_checkpointing = recompute
        model(ids).float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_activation_checkpointing_is_a_task_switch(corpus, tmp_path, in_repo_root):
    c = cli(["fit", "--config", str(QUICK), *TINY, "--model.init_args.speed.activation_checkpointing=true",
             f"--trainer.default_root_dir={tmp_path}", "--trainer.fast_dev_run=true"])
    assert c.model.model.activation_checkpointing is True
    assert torch.isfinite(c.trainer.callback_metrics["train/loss"])



def test_init_weights_under_zero3_is_one_clear_error(tmp_path):
    from types import SimpleNamespace

    from lit_llm.tasks import PretrainTask

    config = GPTConfig(vocab_size=300, context_length=16, emb_dim=24, n_heads=2, n_layers=1, tie_weights=False)
    task = PretrainTask(model=config.to_dict(), init_weights=str(tmp_path / "weights.ckpt"))
    task._trainer = SimpleNamespace(strategy=SimpleNamespace(zero_stage_3=True), ckpt_path=None)
    with pytest.raises(ConfigError, match=r"cannot be loaded under DeepSpeed ZeRO stage 3.*trainer.strategy=lit_fsdp"):
        task.configure_model()


def test_a_config_naming_the_fsdp_class_gets_lit_llms_defaults_and_takes_fsdp_options(tmp_path, in_repo_root):
    c = cli(["--config", str(QUICK), *TINY, f"--trainer.default_root_dir={tmp_path}",
             "--trainer.strategy=lit_llm.distributed.fsdp.GPTFSDPStrategy", "--trainer.strategy.forward_prefetch=true",
             "--trainer.strategy.sharding_strategy=SHARD_GRAD_OP", "--trainer.strategy.limit_all_gathers=false",
             "--trainer.strategy.units=block"],
            run=False)
    strategy = c.trainer.strategy
    assert isinstance(strategy, GPTFSDPStrategy)
    assert strategy.kwargs["limit_all_gathers"] is False and strategy.units == "block"
    assert strategy.sharding_strategy.name == "SHARD_GRAD_OP" and strategy._state_dict_type == "sharded"
    assert strategy.kwargs["forward_prefetch"] is True and strategy.kwargs["use_orig_params"] is True
    assert "auto_wrap_policy" not in strategy.kwargs  # units=block sets it when the model is wrapped


def test_ddp_static_graph_with_accumulation_is_one_clear_error(corpus, tmp_path, in_repo_root):
    """PyTorch's DDP fails inside its reducer when a static graph meets accumulated (``no_sync``) micro-batches; lit_llm
    refuses the pair before the model is wrapped, and takes static_graph without accumulation."""
    ddp = ["--trainer.strategy=pytorch_lightning.strategies.DDPStrategy", "--trainer.strategy.static_graph=true",
           "--trainer.devices=1", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2",
           "--model.init_args.optim.warmup_steps=0", "--trainer.limit_val_batches=0"]
    with pytest.raises(ConfigError, match=r"static_graph=true cannot run with trainer.accumulate_grad_batches=2.*"
                                          r"Remove static_graph"):
        cli(["fit", "--config", str(QUICK), *TINY, *ddp, "--trainer.accumulate_grad_batches=2"])
    c = cli(["fit", "--config", str(QUICK), *TINY, *ddp, "--trainer.accumulate_grad_batches=1"])
    assert c.trainer.global_step == 2 and c.trainer.strategy._ddp_kwargs["static_graph"] is True


_TORCH_COMPILE = torch.compile


def _compiled_graphs(monkeypatch, tmp_path, strategy_args: list[str]) -> tuple[int, object]:
    """Train 2 steps of the compiled tiny GPT through the CLI and count the graphs ``torch.compile`` hands to its
    backend (a counting eager backend stands in for inductor, so only Dynamo's graph capture and splitting run)."""
    import torch._dynamo

    graphs: list[torch.fx.GraphModule] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda model, **kw: _TORCH_COMPILE(model, backend=counting_backend))
    torch._dynamo.reset()
    # 2 blocks of width 256: 3 MB of float32 weights, several of DDP's smallest (1 MB) buckets
    args = [a for a in TINY if "compile" not in a] + ["--model.init_args.speed.compile=true",
                                                     "--model.init_args.model.emb_dim=256"]
    c = cli(["fit", "--config", str(QUICK), *args, *strategy_args, f"--trainer.default_root_dir={tmp_path}",
             "--trainer.max_steps=2", "--model.init_args.optim.warmup_steps=0", "--trainer.limit_val_batches=0",
             "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false"])
    torch._dynamo.reset()
    return len(graphs), c.trainer.strategy


def test_lit_ddp_keeps_a_compiled_model_in_one_graph(corpus, tmp_path, monkeypatch, in_repo_root):
    """``lit_ddp`` compiles the GPT and its loss as one graph, as on one device; ``split_compiled_graph: true`` lets
    PyTorch cut it at the gradient buckets (1 MB buckets of a 3 MB model here, so it must cut); both leave the global
    setting as they found it."""
    import torch._dynamo.config as dynamo_config

    before = dynamo_config.optimize_ddp
    alone, _ = _compiled_graphs(monkeypatch, tmp_path / "one", [])
    one_graph, strategy = _compiled_graphs(monkeypatch, tmp_path / "ddp", [
        "--trainer.strategy=lit_ddp", "--trainer.devices=1"])
    assert isinstance(strategy, dist_ddp.GPTDDPStrategy) and strategy.split_compiled_graph is False
    split, strategy = _compiled_graphs(monkeypatch, tmp_path / "split", [
        "--trainer.strategy=lit_llm.distributed.ddp.GPTDDPStrategy", "--trainer.strategy.split_compiled_graph=true",
        "--trainer.strategy.bucket_cap_mb=1", "--trainer.devices=1"])
    assert strategy._ddp_kwargs["gradient_as_bucket_view"] is True  # the class keeps lit_ddp's defaults
    assert one_graph == alone >= 1
    assert split > one_graph
    assert dynamo_config.optimize_ddp == before


def _ddp_gradients(rank: int, port: int, hook: bool, out: str) -> None:
    """One rank of a 2-process gloo job: a DDP model whose ranks see different inputs, one backward; rank 0 saves the
    averaged gradients. ``hook``: the buckets are reduced by ``dist_ddp.average_hook``."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 3))
    # buckets of 1 KB: the 4.4k parameters take several, so the hook's future is chained per bucket
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.001, gradient_as_bucket_view=True)
    if hook:
        ddp.register_comm_hook(None, dist_ddp.average_hook)
    torch.manual_seed(1 + rank)
    ddp(torch.randn(8, 64)).square().mean().backward()
    if rank == 0:
        torch.save([p.grad.clone() for p in model.parameters()], out)
    dist.barrier()
    # Out without tearing gloo down: its teardown at exit aborted ("terminate called without an active exception") or
    # hung in about one start in five on the CPU, which would fail or stall a test that has already made its point.
    os._exit(0)


def test_average_hook_gives_ddps_average_and_is_accepted_by_ddp(tmp_path):
    """``average_in_collective``'s hook passes DDP's check of a hook's signature (postponed annotations would fail it)
    and averages the ranks' gradients as DDP's own reduction does, over gloo (under NCCL the hook has run in
    ``bench/strategies.py``'s cells only). The two ranks' gradients differ, so a sum or one rank's own gradient would
    not match."""
    import socket

    import torch.multiprocessing as mp

    grads = {}
    for hook in (False, True):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = tmp_path / f"hook{hook}.pt"
        job = mp.spawn(_ddp_gradients, args=(port, hook, str(out)), nprocs=2, join=False)
        deadline = time.monotonic() + 120
        while not job.join(timeout=5):  # raises if a rank failed
            if time.monotonic() > deadline:
                for process in job.processes:
                    process.kill()
                pytest.fail("the 2-process gloo job did not finish within 120 s")
        grads[hook] = torch.load(out)
    torch.manual_seed(0)  # rank 0's gradient alone, to show that the ranks' gradients differed
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 3))
    torch.manual_seed(1)
    model(torch.randn(8, 64)).square().mean().backward()
    for plain, hooked, own in zip(grads[False], grads[True], (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(hooked, plain, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(plain, own)


def test_average_in_collective_installs_the_hook_and_refuses_a_second_one():
    assert dist_ddp.GPTDDPStrategy(average_in_collective=True)._ddp_comm_hook is dist_ddp.average_hook
    assert dist_ddp.GPTDDPStrategy()._ddp_comm_hook is None
    with pytest.raises(ConfigError, match="average_in_collective.*ddp_comm_hook"):
        dist_ddp.GPTDDPStrategy(average_in_collective=True, ddp_comm_hook=dist_ddp.average_hook)


def test_fsdp_units_and_all_gather_limit_follow_the_models_share_of_the_gpu(monkeypatch):
    from types import SimpleNamespace

    from pytorch_lightning.strategies import FSDPStrategy
    from torch.distributed.fsdp import MixedPrecision

    gib = 2**30
    assert not dist_fsdp.needs_all_gather_limit(124_000_000 * 2, 80 * gib)  # GPT-2 124M in bf16: 0.3 % of 80 GB
    assert not dist_fsdp.needs_all_gather_limit(1_558_000_000 * 2, 80 * gib)  # GPT-2 XL: 3.6 %
    assert dist_fsdp.needs_all_gather_limit(6_700_000_000 * 2, 80 * gib)  # 6.7B: 16 %
    assert dist_fsdp.fits_one_unit(124_000_000 * 2, 80 * gib)  # 0.3 %: one unit
    assert dist_fsdp.fits_one_unit(774_000_000 * 2, 141 * gib)  # GPT-2 large on an H200: 1.0 %
    assert not dist_fsdp.fits_one_unit(1_558_000_000 * 2, 141 * gib)  # GPT-2 XL on an H200: 2.1 %, a unit per block
    assert "limit_all_gathers" not in GPTFSDPStrategy().kwargs  # decided when the model is wrapped
    assert GPTFSDPStrategy(limit_all_gathers=True).kwargs["limit_all_gathers"] is True

    monkeypatch.setattr(FSDPStrategy, "_setup_model", lambda self, model: model)  # no process group on the CPU
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * gib))

    def decided(config: GPTConfig, **kwargs) -> tuple[bool, str, object]:
        strategy = GPTFSDPStrategy(parallel_devices=[torch.device("cuda", 0)],
                                   mixed_precision=MixedPrecision(param_dtype=torch.bfloat16), **kwargs)
        with torch.device("meta"):
            strategy._setup_model(GPTModel(config))
        policy = strategy.kwargs.get("auto_wrap_policy")
        return strategy.kwargs["limit_all_gathers"], strategy.units_chosen, getattr(policy, "_module_classes", policy)

    small = GPTConfig(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12)
    large = small.replace(emb_dim=4096, n_heads=32, n_layers=32)  # 6.6B parameters, 13 GB in bf16
    # Small: the whole model one unit (no policy: FSDP wraps only the root), all-gathers not rate-limited.
    assert decided(small) == (False, "model", None)
    # Large: one unit per block (the embeddings, final norm and tied head share the root unit), rate-limited.
    assert decided(large) == (True, "block", {TransformerBlock})
    assert decided(small, limit_all_gathers=True)[0] is True  # a choice in the config is kept
    assert decided(small, units="block") == (False, "block", {TransformerBlock})
    assert decided(large, units="model") == (True, "model", None)
    policy = {torch.nn.Linear}
    assert decided(small, auto_wrap_policy=policy)[1:] == ("policy", policy)
    with pytest.raises(ConfigError, match=r"units='block' and trainer.strategy.auto_wrap_policy both say"):
        GPTFSDPStrategy(units="block", auto_wrap_policy={TransformerBlock})
    # Hybrid sharding (several nodes): a unit per block whatever the size, as Lightning needs the policy up front.
    hybrid = GPTFSDPStrategy(**StrategyRegistry["lit_fsdp_hybrid"]["init_params"])
    assert hybrid.units_chosen == "block" and hybrid.kwargs["auto_wrap_policy"]._module_classes == {TransformerBlock}
    with pytest.raises(ConfigError, match=r"units='model' cannot be combined with hybrid sharding"):
        GPTFSDPStrategy(sharding_strategy="HYBRID_SHARD", units="model")


def test_deepspeed_presets_skip_deepspeeds_bf16_overflow_check_unless_the_config_asks():
    import inspect

    assert inspect.signature(dist_deepspeed.GPTDeepSpeedStrategy.__init__).parameters["check_grad_overflow"].default \
        is False
    assert StrategyRegistry["lit_deepspeed_zero2"]["init_params"]["overlap_comm"] is False
    config = {"bf16": {"enabled": True}}
    dist_deepspeed.set_bf16_overflow_check(config, False)
    assert config == {"bf16": {"enabled": True, "check_grad_overflow": False}}
    asked = {"bf16": {"enabled": True, "check_grad_overflow": True}}  # a DeepSpeed config that chooses
    dist_deepspeed.set_bf16_overflow_check(asked, False)
    assert asked["bf16"]["check_grad_overflow"] is True
    fp32 = {"zero_optimization": {"stage": 2}}
    dist_deepspeed.set_bf16_overflow_check(fp32, False)
    assert fp32 == {"zero_optimization": {"stage": 2}}


def test_deepspeed_presets_leave_out_deepspeeds_timer_waits_unless_the_config_asks():
    """DeepSpeed's throughput timer waits for the GPU twice a step unless ``timers.throughput.synchronized`` is
    false; the presets set it false, and a DeepSpeed config that chooses keeps its choice."""
    import inspect

    assert inspect.signature(dist_deepspeed.GPTDeepSpeedStrategy.__init__).parameters["synchronized_timer"].default \
        is False
    config = {"zero_optimization": {"stage": 2}}
    dist_deepspeed.set_timer_sync(config, False)
    assert config == {"zero_optimization": {"stage": 2}, "timers": {"throughput": {"synchronized": False}}}
    asked = {"timers": {"throughput": {"enabled": True, "synchronized": True}}}
    dist_deepspeed.set_timer_sync(asked, False)
    assert asked == {"timers": {"throughput": {"enabled": True, "synchronized": True}}}
    other_timer = {"timers": {"throughput": {"enabled": False}}}
    dist_deepspeed.set_timer_sync(other_timer, False)
    assert other_timer == {"timers": {"throughput": {"enabled": False, "synchronized": False}}}


def test_deepspeed_reads_the_timer_setting_where_lit_llm_writes_it():
    timers_config = pytest.importorskip("deepspeed.utils.config")
    config: dict = {}
    dist_deepspeed.set_timer_sync(config, False)
    assert timers_config.get_timers_config(config).synchronized is False
    assert timers_config.get_timers_config({}).synchronized is True  # DeepSpeed's own default: the waits


def _clip_case(norm: float, clip: float = 1.0, loss_scale: float = 1.0):
    from types import SimpleNamespace

    fake = SimpleNamespace(clip_grad=clip, loss_scale=loss_scale, device=torch.device("cpu"))
    grads = [torch.full((4,), 2.0), [torch.full((3,), -1.0), torch.full((2,), 0.5)]]
    return fake, grads, torch.tensor(norm)


@pytest.mark.parametrize("norm", [0.5, 1.0, 8.0, float("inf"), float("nan"), -1.0])
def test_zero_clipping_kept_on_the_gpu_scales_gradients_as_deepspeed_does(norm):
    """The sync-free clipping: 1 / max(1, (norm + 1e-6) / clip); a non-finite or negative norm zeroes the step."""
    fake, grads, total = _clip_case(norm)
    dist_deepspeed._unscale_and_clip_grads(fake, grads, total)
    factor = 0.0 if not (norm == norm and 0 <= norm < float("inf")) else 1.0 / max(1.0, (norm + 1e-6) / 1.0)
    assert torch.allclose(grads[0], torch.full((4,), 2.0 * factor))
    assert torch.allclose(grads[1][0], torch.full((3,), -1.0 * factor))
    assert torch.allclose(grads[1][1], torch.full((2,), 0.5 * factor))

    no_clip = _clip_case(norm, clip=0.0)
    dist_deepspeed._unscale_and_clip_grads(*no_clip)
    assert torch.equal(no_clip[1][0], torch.full((4,), 2.0))  # no clipping, no loss scale: untouched


def test_zero_step_without_host_waits_matches_deepspeeds_own():
    """Against DeepSpeed's own clipping and norm masking (where DeepSpeed is installed): the same numbers."""
    stage_1_and_2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace

    for norm in (0.5, 8.0, float("inf"), float("nan"), -1.0):
        for loss_scale in (1.0, 4.0):
            ours, theirs = _clip_case(norm, loss_scale=loss_scale), _clip_case(norm, loss_scale=loss_scale)
            dist_deepspeed._unscale_and_clip_grads(*ours)
            stage_1_and_2.DeepSpeedZeroOptimizer.unscale_and_clip_grads(*theirs)
            for a, b in zip((ours[1][0], *ours[1][1]), (theirs[1][0], *theirs[1][1])):
                torch.testing.assert_close(a, b, equal_nan=True)
        mine, original = torch.tensor([norm, 2.0]), torch.tensor([norm, 2.0])
        dist_deepspeed._mask_non_finite_(mine)
        mask_nan_or_inf_with_val_inplace(original, device="cpu")
        assert torch.equal(mine, original)

    optimizer = object.__new__(stage_1_and_2.DeepSpeedZeroOptimizer)  # not set up: only its methods are swapped
    assert dist_deepspeed.make_zero_step_sync_free(optimizer)
    assert optimizer.unscale_and_clip_grads.__func__ is dist_deepspeed._unscale_and_clip_grads
    assert stage_1_and_2.mask_nan_or_inf_with_val_inplace is dist_deepspeed._mask_non_finite_
    assert not dist_deepspeed.make_zero_step_sync_free(object())
