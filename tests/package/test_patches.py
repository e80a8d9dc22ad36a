"""Every private internal of Lightning, DeepSpeed, PyTorch and other dependencies that lit_llm relies on (listed in
``docs/patches.md``) still exists with the shape lit_llm relies on.

Each test checks one entry of that list without running a training: the attribute is there, is callable where lit_llm
calls or replaces it, takes the parameters lit_llm passes, and (where lit_llm replaces it) is still looked up where the
replacement takes effect. A failure here means a dependency release moved an internal: the entry's "When it stops
applying" says what the user would see, and the code named in its "Where" needs a look. DeepSpeed's tests skip where
DeepSpeed is not installed and run on the GPU machines. :func:`test_every_listed_patch_has_its_test` keeps the list and
these tests in step.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

PATCHES_DOC = Path(__file__).resolve().parents[2] / "docs" / "patches.md"
ENTRY = re.compile(r"^### (\d+)\. ", re.MULTILINE)
TEST_FIELD = re.compile(r"^- \*\*Test:\*\* `tests/package/test_patches\.py::(test_\w+)`", re.MULTILINE)


def _parameters(function: object) -> list[str]:
    """Parameter names of ``function`` (``self`` included for a function defined in a class)."""
    return list(inspect.signature(function).parameters)


def _source(obj: object) -> str:
    return inspect.getsource(obj)


# ---- the list and the tests stay in step -------------------------------------------------------------------------
def _listed_entries() -> list[tuple[str, str | None]]:
    """``(heading number, test named in the entry or None)`` for every entry of docs/patches.md."""
    text = PATCHES_DOC.read_text(encoding="utf-8")
    starts = [m.start() for m in ENTRY.finditer(text)] + [len(text)]
    entries = []
    for start, end in zip(starts, starts[1:]):
        body = text[start:end]
        number = ENTRY.match(body).group(1)  # type: ignore[union-attr]
        test = TEST_FIELD.search(body)
        entries.append((number, test.group(1) if test else None))
    return entries


def test_every_listed_patch_has_its_test() -> None:
    entries = _listed_entries()
    assert len(entries) >= 20, "docs/patches.md lost its entries (or their '### N. ' headings)"
    numbers = [int(n) for n, _ in entries]
    assert numbers == list(range(1, len(numbers) + 1)), f"entries are not numbered 1..N in order: {numbers}"
    missing = [n for n, test in entries if test is None]
    assert not missing, f"entries {missing} of docs/patches.md name no test (a '- **Test:** `...::test_x`' line)"
    named = [test for _, test in entries]
    assert len(set(named)) == len(named), "two entries of docs/patches.md name the same test"
    module = sys.modules[__name__]
    absent = [test for test in named if not callable(getattr(module, test, None))]
    assert not absent, f"docs/patches.md names tests that do not exist here: {absent}"
    checks = {name for name in dir(module) if name.startswith("test_")} - {"test_every_listed_patch_has_its_test"}
    unlisted = sorted(checks - set(named))
    assert not unlisted, f"tests of private internals that docs/patches.md does not list: {unlisted}"


# ---- PyTorch Lightning ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trainer() -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)


def test_epoch_loop_broadcast_sigterm_tensor(trainer: pl.Trainer) -> None:
    from pytorch_lightning.loops.training_epoch_loop import _TrainingEpochLoop

    loop = trainer.fit_loop.epoch_loop
    assert isinstance(loop, _TrainingEpochLoop)
    assert callable(getattr(loop, "_broadcast_sigterm_tensor", None))
    assert _parameters(_TrainingEpochLoop._broadcast_sigterm_tensor) == ["self"]  # replaced by a no-argument callable
    # Looked up on the instance at each batch start, so replacing the instance's attribute takes effect.
    assert "self._broadcast_sigterm_tensor()" in _source(_TrainingEpochLoop)


def test_signal_connector_sigterm_notifier_fn(trainer: pl.Trainer) -> None:
    from pytorch_lightning.trainer.connectors.signal_connector import _SignalConnector

    connector = trainer._signal_connector
    assert isinstance(connector, _SignalConnector)
    assert callable(getattr(connector, "_sigterm_notifier_fn", None))
    assert len(_parameters(_SignalConnector._sigterm_notifier_fn)) == 3  # self, signum, frame (a signal handler)
    # Read from the instance when the handlers are registered (after lit_llm replaced it at task setup).
    assert "self._sigterm_notifier_fn" in _source(_SignalConnector.register_signal_handlers)


def test_trainer_signal_connector_received_sigterm(trainer: pl.Trainer) -> None:
    from lit_llm.callbacks.signals import SigtermStop

    connector = trainer._signal_connector
    assert connector.received_sigterm is False
    assert SigtermStop._connector(trainer) is connector
    connector.received_sigterm = True
    try:
        assert trainer.received_sigterm is True  # the flag Lightning's loops read is this one
    finally:
        connector.received_sigterm = False


def test_lightning_cli_run_subcommand() -> None:
    from pytorch_lightning.cli import LightningCLI

    assert callable(getattr(LightningCLI, "_run_subcommand", None))
    assert _parameters(LightningCLI._run_subcommand) == ["self", "subcommand"]
    assert "self._run_subcommand(" in _source(LightningCLI.__init__)


def test_lightning_cli_parse_ckpt_path() -> None:
    from pytorch_lightning.cli import LightningCLI

    assert callable(getattr(LightningCLI, "_parse_ckpt_path", None))
    assert _parameters(LightningCLI._parse_ckpt_path) == ["self"]
    assert "self._parse_ckpt_path()" in _source(LightningCLI)


def test_fit_loop_combined_loader() -> None:
    from pytorch_lightning.loops.fit_loop import _FitLoop
    from pytorch_lightning.utilities.combined_loader import CombinedLoader

    assert re.search(r"self\._combined_loader\s*=", _source(_FitLoop))
    assert isinstance(inspect.getattr_static(CombinedLoader, "flattened"), property)
    loader = CombinedLoader([[1, 2], [3]], mode="max_size_cycle")
    assert loader.flattened == [[1, 2], [3]]


def test_model_checkpoint_overridden_methods() -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.trainer.connectors.checkpoint_connector import _CheckpointConnector

    assert _parameters(ModelCheckpoint._find_last_checkpoints) == ["self", "trainer"]
    assert _parameters(ModelCheckpoint._save_checkpoint) == ["self", "trainer", "filepath"]
    # --ckpt_path last asks the callback (the override); every kind of save goes through _save_checkpoint.
    assert "_find_last_checkpoints(" in _source(_CheckpointConnector)
    source = _source(ModelCheckpoint)
    for caller in ("_save_last_checkpoint", "_save_topk_checkpoint", "_save_none_monitor_checkpoint"):
        assert re.search(rf"def {caller}\b[\s\S]*?self\._save_checkpoint\(", source), caller
    # Checkpoint._use_root_dir sets dirpath: the private directory resolution must return it unchanged.
    resolve = getattr(ModelCheckpoint, "_ModelCheckpoint__resolve_ckpt_dir", None)
    assert callable(resolve)
    assert re.search(r"if self\.dirpath is not None:\s*(#.*\s*)?return self\.dirpath", _source(resolve))


def test_model_checkpoint_private_helpers(tmp_path: Path) -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    expected = {
        "_should_skip_saving_checkpoint": ["self", "trainer"],
        "_should_save_on_exception": ["self", "trainer"],
        "_monitor_candidates": ["self", "trainer"],
        "_save_last_checkpoint": ["self", "trainer", "monitor_candidates"],
    }
    for name, params in expected.items():
        assert callable(getattr(ModelCheckpoint, name, None)), name
        assert _parameters(getattr(ModelCheckpoint, name)) == params, name
    callback = ModelCheckpoint(dirpath=tmp_path)
    assert callback._last_global_step_saved == 0
    assert callback._last_checkpoint_saved == ""
    assert hasattr(callback._fs, "ls")  # an fsspec filesystem; Checkpoint lists the run folder with it


def test_rich_progress_bar_private_methods() -> None:
    from pytorch_lightning.callbacks import RichProgressBar

    assert _parameters(RichProgressBar._update_metrics) == ["self", "trainer", "pl_module"]
    assert _parameters(RichProgressBar._get_train_description) == ["self", "current_epoch"]
    source = _source(RichProgressBar)
    assert "self._update_metrics(" in source
    assert "self._get_train_description(" in source


def test_lightning_module_trainer_attribute() -> None:
    module = pl.LightningModule()
    assert module._trainer is None  # unattached: the public property raises here
    with pytest.raises(RuntimeError):
        _ = module.trainer


def test_hparams_initial() -> None:
    class Task(pl.LightningModule):
        def __init__(self, prompt_template: str | None = None) -> None:
            super().__init__()
            self.save_hyperparameters()

    task = Task()
    assert task._hparams_initial["prompt_template"] is None
    task._hparams_initial["prompt_template"] = "alpaca"  # what InstructTask.setup does
    assert task.hparams_initial["prompt_template"] == "alpaca"  # what Lightning logs and compares


def test_ddp_strategy_ddp_kwargs() -> None:
    from pytorch_lightning.strategies import DDPStrategy

    from lit_llm.distributed.ddp import GPTDDPStrategy

    assert DDPStrategy(static_graph=True)._ddp_kwargs.get("static_graph") is True
    assert GPTDDPStrategy(static_graph=True)._ddp_kwargs.get("static_graph") is True


def test_fsdp_strategy_setup_model() -> None:
    from pytorch_lightning.strategies import FSDPStrategy

    assert _parameters(FSDPStrategy._setup_model) == ["self", "model"]
    assert "self._setup_model(" in _source(FSDPStrategy)
    # lit_llm writes its choices into the keyword arguments that _setup_model hands to FSDP.
    assert "**self.kwargs" in _source(FSDPStrategy._setup_model)
    strategy = FSDPStrategy(limit_all_gathers=True)
    assert strategy.kwargs["limit_all_gathers"] is True
    assert hasattr(strategy, "mixed_precision_config")


def test_model_parallel_strategy_sizes() -> None:
    from pytorch_lightning.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size="auto", tensor_parallel_size=1)
    assert strategy._tensor_parallel_size == 1
    assert strategy._data_parallel_size == "auto"
    source = _source(ModelParallelStrategy)
    assert "self._data_parallel_size" in source and "self._tensor_parallel_size" in source
    # The sizes set in GPTFSDP2Strategy.setup_environment are read when the mesh is built, during setup_environment.
    assert "_setup_device_mesh" in _source(ModelParallelStrategy.setup_environment)


def test_deepspeed_strategy_format_config() -> None:
    from pytorch_lightning.strategies import DeepSpeedStrategy

    assert _parameters(DeepSpeedStrategy._format_config) == ["self"]
    assert "self._format_config()" in _source(DeepSpeedStrategy)


def test_lightning_forward_module_prefix() -> None:
    import pytorch_lightning.utilities.deepspeed as lightning_deepspeed

    from lit_llm.weights.consolidate import _WRAPPER_PREFIX

    assert _WRAPPER_PREFIX == "_forward_module."
    # Lightning's own consolidation strips the same prefix from old checkpoints.
    assert '"_forward_module."' in _source(lightning_deepspeed.convert_zero_checkpoint_to_fp32_state_dict)


# ---- PyTorch -------------------------------------------------------------------------------------------------------
def test_dynamo_optimize_ddp() -> None:
    import torch._dynamo.config as dynamo_config

    before = dynamo_config.optimize_ddp
    try:
        for value in ("no_optimization", "ddp_optimizer"):  # the two values GPTDDPStrategy.setup sets
            dynamo_config.optimize_ddp = value
            assert dynamo_config.optimize_ddp == value
    finally:
        dynamo_config.optimize_ddp = before


def test_distributed_checkpoint_private_loader() -> None:
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    params = _parameters(_load_state_dict)
    assert params[:2] == ["state_dict", "storage_reader"]
    assert {"planner", "no_dist"} <= set(params)
    assert "keys" in _parameters(_EmptyStateDictLoadPlanner.__init__)
    _EmptyStateDictLoadPlanner(keys={"model"})


def test_torch_wrapper_prefixes() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp._common_utils import FSDP_WRAPPED_MODULE

    from lit_llm.weights.consolidate import _WRAPPER_PARTS

    compiled = torch.compile(torch.nn.Linear(2, 2))  # lazy: nothing is compiled until it is called
    compiled_name = next(iter(compiled.state_dict())).split(".")[0]
    checkpointed_name = next(name for name, _ in checkpoint_wrapper(torch.nn.Linear(2, 2)).named_children())
    assert {f"{compiled_name}.", f"{FSDP_WRAPPED_MODULE}.", f"{checkpointed_name}."} == set(_WRAPPER_PARTS)


def test_module_state_dict_hooks() -> None:
    from lit_llm.model.lora import LoRALinear

    assert _parameters(torch.nn.Module._save_to_state_dict) == ["self", "destination", "prefix", "keep_vars"]
    assert _parameters(torch.nn.Module._load_from_state_dict)[:3] == ["self", "state_dict", "prefix"]
    source = _source(torch.nn.Module)
    assert "self._save_to_state_dict(" in source
    assert "._load_from_state_dict(" in source
    assert "weight" in torch.nn.Linear(2, 2)._parameters
    assert "_save_to_state_dict" in vars(LoRALinear) and "_load_from_state_dict" in vars(LoRALinear)


def test_torch_dynamo_module_name() -> None:
    torch.compile(torch.nn.Linear(2, 2))  # imports the compiler, under the name lit_llm looks for
    assert "torch._dynamo" in sys.modules
    assert "stance" in _parameters(torch.compiler.set_stance)
    with torch.compiler.set_stance("force_eager"):
        pass


# ---- DeepSpeed (runs where DeepSpeed is installed: the GPU machines) ------------------------------------------------
def test_deepspeed_mask_nan_or_inf_with_val_inplace() -> None:
    stage_1_and_2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    from deepspeed.runtime import utils as deepspeed_utils

    original = deepspeed_utils.mask_nan_or_inf_with_val_inplace
    assert _parameters(original) == ["input", "device", "val"]
    assert callable(getattr(stage_1_and_2, "mask_nan_or_inf_with_val_inplace", None))
    source = _source(stage_1_and_2)
    # Imported into stage_1_and_2's namespace and called by that bare name: replacing it there takes effect.
    assert re.search(r"from deepspeed\.runtime\.utils import \([^)]*\bmask_nan_or_inf_with_val_inplace\b", source)
    assert re.search(r"(?<![.\w])mask_nan_or_inf_with_val_inplace\(", source)


def test_deepspeed_unscale_and_clip_grads() -> None:
    stage_1_and_2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")

    zero_optimizer = stage_1_and_2.DeepSpeedZeroOptimizer
    assert _parameters(zero_optimizer.unscale_and_clip_grads) == ["self", "grad_groups_flat", "total_norm"]
    source = _source(zero_optimizer)
    assert "self.unscale_and_clip_grads(" in source  # looked up on the instance, where lit_llm replaces it
    assert "self.clip_grad = " in source
    assert isinstance(inspect.getattr_static(zero_optimizer, "loss_scale"), property)


def test_deepspeed_ds_numel() -> None:
    partition_parameters = pytest.importorskip("deepspeed.runtime.zero.partition_parameters")

    assert re.search(r"\.ds_numel\s*=", _source(partition_parameters))


# ---- other libraries -----------------------------------------------------------------------------------------------
def test_argument_parser_option_string_actions() -> None:
    from lit_llm.lightning_cli import StrictArgumentParser

    parser = StrictArgumentParser()
    parser.add_argument("--max_steps", type=int)
    assert "--max_steps" in parser._option_string_actions
    assert _parameters(type(parser).__mro__[1].error)[:3] == ["self", "message", "ex"]
    with pytest.raises(Exception, match=r"did you mean --max_steps"):
        parser.parse_args(["--max_step", "3"])


def test_datasets_fingerprint() -> None:
    datasets = pytest.importorskip("datasets")

    one = datasets.Dataset.from_dict({"text": ["a"]})
    other = datasets.Dataset.from_dict({"text": ["b"]})
    assert isinstance(one._fingerprint, str) and one._fingerprint
    assert one._fingerprint != other._fingerprint


def test_datasets_download_counter_settings() -> None:
    import inspect

    datasets = pytest.importorskip("datasets")
    from datasets import load

    assert isinstance(datasets.config.HF_UPDATE_DOWNLOAD_COUNTS, bool)
    assert isinstance(datasets.config.HF_HUB_OFFLINE, bool)
    counter = inspect.getsource(load.increase_load_count)
    assert "config.HF_HUB_OFFLINE" in counter and "config.HF_UPDATE_DOWNLOAD_COUNTS" in counter
