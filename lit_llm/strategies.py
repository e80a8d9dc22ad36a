"""Named multi-GPU strategies, so that a config switches strategy with one line: ``trainer.strategy: lit_fsdp``.

Importing this module (``lit_llm.train`` does) registers, in Lightning's ``StrategyRegistry``:

================================  =====================================================================================
``lit_ddp``                       DDP, gradients reduced in place in the buckets; a compiled model kept in one graph
``lit_fsdp``                      FSDP full shard, a unit per ``TransformerBlock`` (one for a small model)
``lit_fsdp2``                     FSDP2 (PyTorch's ``fully_shard``): each ``TransformerBlock``, then the GPT; DTensors
``lit_fsdp_hybrid``               FSDP sharded within a node, replicated across nodes (multi-node)
``lit_fsdp_offload``              ``lit_fsdp`` with parameters, gradients and optimizer state kept in CPU memory
``lit_deepspeed_zero1``           DeepSpeed ZeRO stage 1: optimizer state sharded
``lit_deepspeed_zero2``           stage 2: optimizer state and gradients sharded
``lit_deepspeed_zero3``           stage 3: parameters sharded too (the model is built partitioned)
``lit_deepspeed_zero3_offload``   stage 3 with parameters and optimizer state in CPU memory (CPU Adam)
================================  =====================================================================================

Why lit_llm's own classes rather than Lightning's ``fsdp`` / ``deepspeed_stage_N`` names:

- **FSDP** wraps each ``TransformerBlock`` as a unit and nothing else, so the token embedding, the final norm and
  the head (tied to the embedding when ``tie_weights``) stay together in the root unit; a model that takes at most
  2 % of the GPU is one unit instead (``fits_one_unit``), gathered once per step. The model is built on the
  meta device and materialised shard by shard (``reset_parameters`` re-runs lit_llm's initialisation), so a model
  larger than one GPU's memory never exists whole. Checkpoints are sharded directories (every rank writes its part;
  ``python -m lit_llm.convert consolidate`` makes one file of them). All-gathers are rate-limited only for models
  that take a large share of the GPU (``needs_all_gather_limit``): the limit makes the host wait for the GPU.
- **DDP** reduces gradients in place in its communication buckets (no copy), and keeps a compiled model in one graph
  (``split_compiled_graph``): PyTorch would otherwise cut the compiled graph at every gradient bucket to overlap
  each all-reduce with the rest of the backward, which measured slower than reducing all buckets after it.
- **DeepSpeed** is imported only when used, and a missing install is one error naming the extra to install.
  DeepSpeed's op builder cannot parse an architecture suffix in ``TORCH_CUDA_ARCH_LIST`` (``9.0a``); it is removed
  for the run, with a log line. ``model.gradient_clip`` is passed to DeepSpeed, which clips inside its engine.
  DeepSpeed's bf16 overflow check (a wait for the GPU at every step) is off; ``NonFiniteGuard`` stops a run whose
  engine applied a non-finite step before anything from it is saved. ZeRO-2 runs without ``overlap_comm``. The
  ZeRO-1/2 step's remaining reads back to the host are replaced by the same arithmetic on the GPU
  (``make_zero_step_sync_free``).
- **Both** write directory checkpoints atomically: into ``<name>.tmp`` first, renamed once every rank has finished, so
  a run killed during a save leaves the previous checkpoint whole. Both refuse to run on the CPU with one error.

Activation checkpointing is a switch of the task (``model.init_args.activation_checkpointing: true``); it works under
every strategy.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import types
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from pytorch_lightning.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    Strategy,
    StrategyRegistry,
)
from pytorch_lightning.utilities import rank_zero_info

from lit_llm.errors import ConfigError
from lit_llm.model import TransformerBlock
from lit_llm.tensor_files import TMP_SUFFIX

DEEPSPEED_INSTALL = "pip install 'lit_llm[deepspeed]'"


def params_are_sharded(strategy: Any) -> bool:
    """Whether the strategy shards the weights over ranks (FSDP, FSDP2/ModelParallel, DeepSpeed ZeRO stage 3).

    Then every rank has to take part in each forward pass, because the full weights are gathered collectively.
    """
    names = [cls.__name__ for cls in type(strategy).__mro__]
    if any("FSDP" in n or n == "ModelParallelStrategy" for n in names):
        return True
    if any("DeepSpeed" in n for n in names):
        return is_zero3(strategy)
    return False


def is_deepspeed(strategy: Any) -> bool:
    return isinstance(strategy, DeepSpeedStrategy)


def engine_grad_norm(strategy: Any) -> Any:
    """The global gradient norm DeepSpeed's engine computed for its last step (a tensor or a number), or ``None``
    for other strategies and when the engine computed none (no clipping)."""
    get = getattr(getattr(strategy, "deepspeed_engine", None), "get_global_grad_norm", None)
    return get() if callable(get) else None


def is_zero3(strategy: Any) -> bool:
    """Whether the strategy is DeepSpeed ZeRO stage 3 (parameters partitioned as they are built, gathered in module
    hooks): Lightning's ``DeepSpeedStrategy.zero_stage_3``, False for any other strategy or none."""
    return bool(getattr(strategy, "zero_stage_3", False))


def check_ddp_options(strategy: Any, accumulate_grad_batches: int) -> None:
    """Refuse DDP options that PyTorch's DDP cannot run together, before the model is wrapped.

    ``static_graph=True`` with gradient accumulation (which runs the micro-batches under ``no_sync``) fails on the
    first accumulated micro-batch inside DDP's reducer ("expect_autograd_hooks_ INTERNAL ASSERT FAILED"), and past
    that point DDP can stop averaging gradients (pytorch/pytorch#143580, #187732).
    """
    kwargs = getattr(strategy, "_ddp_kwargs", None) or {}
    if isinstance(strategy, DDPStrategy) and kwargs.get("static_graph") and accumulate_grad_batches > 1:
        raise ConfigError(
            f"trainer.strategy.static_graph=true cannot run with trainer.accumulate_grad_batches="
            f"{accumulate_grad_batches}: PyTorch's DDP fails on the first accumulated micro-batch with a static graph "
            "(and may stop averaging gradients after it). Remove static_graph (lit_ddp leaves it off), or set "
            "trainer.accumulate_grad_batches=1 and raise data.batch_size instead."
        )


def _refuse_cpu(strategy: Strategy, name: str) -> None:
    if strategy.root_device.type != "cuda":
        raise ConfigError(
            f"{name} (trainer.strategy) needs CUDA GPUs, but this run is on {strategy.root_device.type.upper()} "
            f"(trainer.accelerator). On the CPU, use trainer.strategy=ddp with trainer.devices=N for N processes, or "
            "remove the strategy line (and the configs/trainer/<strategy>.yaml --config) for one process."
        )


def _replace_directory(tmp: Path, final: Path) -> None:
    """Put the complete directory ``tmp`` in place of ``final`` (a file or a directory, or absent)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    if final.is_dir() and not final.is_symlink():
        final.rename(old)  # a directory cannot be renamed over a non-empty one
    elif final.exists() or final.is_symlink():
        final.unlink()
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


class _AtomicDirectorySave:
    """Mixin: a strategy whose checkpoint is a directory written by every rank saves it into ``<path>.tmp`` and renames
    it once all ranks have finished (the rename happens on global rank 0, between two barriers)."""

    def _atomic_directory_save(self, save: Any, checkpoint: dict, filepath: Any, storage_options: Any) -> None:
        path = Path(str(filepath))
        if "://" in str(filepath):
            save(checkpoint, filepath, storage_options)
            return
        tmp = path.with_name(path.name + TMP_SUFFIX)
        if self.is_global_zero and tmp.exists():  # type: ignore[attr-defined]
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        self.barrier("lit_llm.save.start")  # type: ignore[attr-defined]
        save(checkpoint, tmp, storage_options)
        self.barrier("lit_llm.save.written")  # type: ignore[attr-defined]
        if self.is_global_zero:  # type: ignore[attr-defined]
            if tmp.is_dir():
                _replace_directory(tmp, path)
            elif tmp.is_file():  # a strategy configured to write one file (e.g. FSDP state_dict_type=full)
                os.replace(tmp, path)
        self.barrier("lit_llm.save.renamed")  # type: ignore[attr-defined]


def average_hook(process_group, bucket):  # unannotated on purpose: see below
    """A DDP communication hook: each gradient bucket is averaged over the ranks by the collective itself
    (``ReduceOp.AVG``), where DDP's built-in reduction first divides the bucket by the world size in a kernel of its
    own and then sums. Same result up to float rounding (NCCL scales by ``1 / world_size`` as it reduces), one kernel
    less per bucket on the GPU's compute stream.

    Its parameters are left unannotated on purpose: ``DistributedDataParallel.register_comm_hook`` compares the
    annotations with ``torch.distributed.GradBucket`` and ``torch.futures.Future``, which this module's postponed
    annotations (strings) would fail.
    """
    group = process_group if process_group is not None else torch.distributed.group.WORLD
    work = torch.distributed.all_reduce(bucket.buffer(), op=torch.distributed.ReduceOp.AVG, group=group,
                                        async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class GPTDDPStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` with lit_llm's defaults: gradients reduced in place in the buckets
    (``gradient_as_bucket_view``), a 30-minute collective timeout, and a choice of how ``torch.compile`` meets DDP."""

    strategy_name = "lit_ddp"

    def __init__(self, split_compiled_graph: bool = False, gradient_as_bucket_view: bool = True,
                 timeout: timedelta | None = timedelta(minutes=30), average_in_collective: bool = False,
                 **kwargs: Any) -> None:
        """
        Args:
            split_compiled_graph: ``torch.compile``'s DDP mode (``torch._dynamo.config.optimize_ddp``) for this run.
                ``true``: the compiled model is cut into one graph per gradient bucket, so that each bucket's
                all-reduce starts while the backward of the earlier layers still runs (PyTorch's default).
                ``false``: one graph, and the buckets are all-reduced as the backward finishes; fewer, larger kernels
                and no communication competing with the backward for the GPU. Without ``model.compile`` it changes
                nothing.
            gradient_as_bucket_view: Gradients are views into DDP's communication buckets (no copy in or out).
            timeout: How long a collective may wait for the other ranks before the run fails.
            average_in_collective: Average each gradient bucket inside the all-reduce (``average_hook``:
                ``ReduceOp.AVG``) instead of DDP's division kernel before a sum. Lightning registers communication
                hooks on GPUs only; on the CPU this changes nothing. Cannot be combined with ``ddp_comm_hook``.
            **kwargs: Lightning's ``DDPStrategy`` arguments (``bucket_cap_mb``, ``ddp_comm_hook``, ``static_graph``,
                ``process_group_backend``, ...).
        """
        if average_in_collective:
            if kwargs.get("ddp_comm_hook") is not None:
                raise ConfigError("trainer.strategy.average_in_collective=true installs its own communication hook; "
                                  "it cannot be combined with trainer.strategy.ddp_comm_hook: set one of them")
            kwargs["ddp_comm_hook"] = average_hook
        self.average_in_collective = average_in_collective
        super().__init__(gradient_as_bucket_view=gradient_as_bucket_view, timeout=timeout, **kwargs)
        self.split_compiled_graph = split_compiled_graph
        self._optimize_ddp_before: Any = None

    def setup(self, trainer: Any) -> None:
        import torch._dynamo.config as dynamo_config

        # Read by torch.compile when it first compiles a frame (inside DDP's forward), so setting it here is in time.
        self._optimize_ddp_before = dynamo_config.optimize_ddp
        dynamo_config.optimize_ddp = "ddp_optimizer" if self.split_compiled_graph else "no_optimization"
        super().setup(trainer)

    def teardown(self) -> None:
        super().teardown()
        if self._optimize_ddp_before is not None:
            import torch._dynamo.config as dynamo_config

            dynamo_config.optimize_ddp = self._optimize_ddp_before
            self._optimize_ddp_before = None


#: Under ``lit_fsdp``, all-gathers are rate-limited only when the whole model in the compute dtype takes more than this
#: share of one GPU's memory (``GPTFSDPStrategy(limit_all_gathers=None)``).
ALL_GATHER_LIMIT_SHARE = 0.05


def needs_all_gather_limit(model_bytes: int, device_bytes: int) -> bool:
    """Whether FSDP should rate-limit its all-gathers for a model of ``model_bytes`` (its parameters in the dtype they
    are gathered in) on a GPU of ``device_bytes``.

    Without the limit, the host may issue the all-gathers of every unit ahead of the GPU, so at worst the whole model
    is gathered at once: harmless when that is a few percent of the GPU, a risk of running out of memory when it is
    a large share. The limit makes the host wait for the GPU every two units, which is what it costs: for GPT-2 124M
    on 2 H200s, 62.9 % of one GPU's tokens/s per GPU with it against 71.3 % without (docs/benchmarks.md).
    """
    return model_bytes > ALL_GATHER_LIMIT_SHARE * device_bytes


#: Under ``lit_fsdp``, the whole model is one FSDP unit (``units: null``) while it takes at most this share of one GPU's
#: memory in the compute dtype.
ONE_UNIT_SHARE = 0.02


def fits_one_unit(model_bytes: int, device_bytes: int) -> bool:
    """Whether FSDP should wrap a model of ``model_bytes`` (its parameters in the dtype they are gathered in) as a
    single unit on a GPU of ``device_bytes``.

    One unit is gathered once per step and its gradients reduce-scattered once, with the compiled GPT in one graph,
    where a unit per block costs host work for every block at every step (hooks, graph breaks between the compiled
    blocks, a collective each): for GPT-2 124M on 2 H200s, 89.5 % of one GPU's tokens/s per GPU against 80.4 %
    (docs/benchmarks.md). What it costs is memory: the whole model and its gradient unsharded at once, at most
    ``2 * ONE_UNIT_SHARE`` of the GPU, where a unit per block holds about one block's worth.
    """
    return model_bytes <= ONE_UNIT_SHARE * device_bytes


class GPTFSDPStrategy(_AtomicDirectorySave, FSDPStrategy):
    """Lightning's ``FSDPStrategy`` with lit_llm's defaults: a unit per ``TransformerBlock`` (the whole model one unit
    when it is small next to the GPU), sharded checkpoints saved atomically, ``use_orig_params`` (required by
    ``torch.compile`` and by per-parameter weight decay), and all-gathers rate-limited only for models large enough
    for prefetching to run the GPU out of memory."""

    strategy_name = "lit_fsdp"

    def __init__(self, auto_wrap_policy: Any = None, state_dict_type: Literal["full", "sharded"] = "sharded",
                 use_orig_params: bool = True, forward_prefetch: bool = False, limit_all_gathers: bool | None = None,
                 units: Literal["block", "model"] | None = None, **kwargs: Any) -> None:
        """
        Args:
            auto_wrap_policy: What becomes an FSDP unit, as PyTorch's FSDP takes it (a set of module classes or a
                policy); overrides ``units``. Default (``None``): as ``units`` says.
            state_dict_type: ``sharded`` (every rank writes its part; ``convert consolidate`` makes one file) or
                ``full`` (rank 0 gathers the whole model and optimizer into one file at every save).
            use_orig_params: Keep the model's own parameters visible (``torch.compile`` and per-parameter weight
                decay need it).
            forward_prefetch: Start the next unit's all-gather before the current unit's forward compute (PyTorch
                FSDP's option), to overlap communication in the forward pass too.
            limit_all_gathers: Rate-limit all-gathers (the host waits for the GPU every two units) so that the host
                running ahead cannot run the GPU out of memory with gathered weights. ``null`` (default): only when
                the whole model in the compute dtype takes more than 5 % of the GPU's memory
                (``needs_all_gather_limit``); below that the limit only costs speed.
            units: ``block``: one FSDP unit per ``TransformerBlock`` (the root unit keeps the embeddings, the final
                norm and the head), so at most a few blocks are gathered at a time. ``model``: the whole model is one
                unit, gathered once per step and its gradients reduce-scattered once, with the compiled GPT in one
                graph; the most memory (the whole model in the compute dtype, gathered) for the least work per step.
                ``null`` (default): ``model`` when the whole model in the compute dtype takes at most 2 % of the GPU's
                memory (``fits_one_unit``: GPT-2 124M to 774M on an H200), ``block`` above that and under hybrid
                sharding (``lit_fsdp_hybrid``).
            **kwargs: Lightning's ``FSDPStrategy`` arguments (``sharding_strategy``, ``cpu_offload``, ...).

        Written out here so that a config naming the class (``class_path: lit_llm.strategies.GPTFSDPStrategy``) gets
        these defaults too, not Lightning's.
        """
        if auto_wrap_policy is not None and units is not None:
            raise ConfigError(f"trainer.strategy.units={units!r} and trainer.strategy.auto_wrap_policy both say what "
                              "becomes an FSDP unit; set one of them")
        if limit_all_gathers is not None:
            kwargs["limit_all_gathers"] = limit_all_gathers
        #: What the run wraps as units, once decided: ``block``, ``model`` or ``policy`` (``auto_wrap_policy`` given).
        self.units_chosen: str | None = "policy" if auto_wrap_policy is not None else None
        if "HYBRID" in str(kwargs.get("sharding_strategy", "")).upper() and auto_wrap_policy is None:
            # Lightning's hybrid sharding wants its wrap policy up front; multi-node runs are for large models.
            if units == "model":
                raise ConfigError("trainer.strategy.units='model' cannot be combined with hybrid sharding (Lightning "
                                  "needs a unit per block there): leave units unset or set it to 'block'")
            auto_wrap_policy, self.units_chosen = {TransformerBlock}, "block"
        super().__init__(auto_wrap_policy=auto_wrap_policy, state_dict_type=state_dict_type,
                         use_orig_params=use_orig_params, forward_prefetch=forward_prefetch, **kwargs)
        self.units = units

    def setup_environment(self) -> None:
        _refuse_cpu(self, "FSDP")
        super().setup_environment()

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        decide_units = self.units_chosen is None
        if "limit_all_gathers" not in self.kwargs or decide_units:
            dtype = getattr(self.mixed_precision_config, "param_dtype", None) or torch.float32
            model_bytes = sum(p.numel() for p in model.parameters()) * dtype.itemsize
            device_bytes = torch.cuda.get_device_properties(self.root_device).total_memory
            large = needs_all_gather_limit(model_bytes, device_bytes)
            size = (f"the model's {model_bytes / 2**30:.2f} GiB in {str(dtype).removeprefix('torch.')}, "
                    f"{model_bytes / device_bytes:.1%} of the GPU's {device_bytes / 2**30:.0f} GiB")
            if decide_units:
                self.units_chosen = self.units or ("model" if fits_one_unit(model_bytes, device_bytes) else "block")
                if self.units_chosen == "block":
                    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

                    self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy({TransformerBlock})
                how = "one unit per TransformerBlock" if self.units_chosen == "block" else "the whole model as one unit"
                why = "trainer.strategy.units" if self.units else f"{size}; one unit up to {ONE_UNIT_SHARE:.0%}"
                rank_zero_info(f"FSDP: {how} ({why})")
            if "limit_all_gathers" not in self.kwargs:
                self.kwargs["limit_all_gathers"] = large
                rank_zero_info(f"FSDP: all-gathers {'rate-limited' if large else 'not rate-limited'} ({size}; "
                               f"rate-limited above {ALL_GATHER_LIMIT_SHARE:.0%})")
        return super()._setup_model(model)

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any | None = None) -> None:
        self._atomic_directory_save(super().save_checkpoint, checkpoint, filepath, storage_options)


class GPTFSDP2Strategy(_AtomicDirectorySave, ModelParallelStrategy):
    """FSDP2 (PyTorch's ``fully_shard``) over every rank, on Lightning's ``ModelParallelStrategy``: the task shards each
    ``TransformerBlock`` and then the whole GPT (embeddings, final norm and head in the root group) over a 1-D mesh of
    all ranks. Parameters are DTensors; under ``bf16-mixed`` they are all-gathered in bf16 and gradients reduced in
    float32. Checkpoints are sharded directories, saved atomically."""

    strategy_name = "lit_fsdp2"

    def __init__(self, reshard_after_forward: bool = True, save_distributed_checkpoint: bool = True,
                 **kwargs: Any) -> None:
        """
        Args:
            reshard_after_forward: Free each block's gathered weights after its forward pass and gather them again
                for the backward (full sharding). ``false`` keeps them until the backward: less communication, more
                memory (ZeRO-2-like).
            save_distributed_checkpoint: Every rank writes its shard (a directory; ``convert consolidate`` makes one
                file of it). ``false``: rank 0 gathers everything into one file at every save.
            **kwargs: Lightning's ``ModelParallelStrategy`` arguments (``process_group_backend``, ``timeout``).
        """
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # Data parallelism over every rank, no tensor parallelism ("auto" would put one data-parallel group per node).
        self._tensor_parallel_size = 1
        self._data_parallel_size = self.world_size
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any | None = None) -> None:
        self._atomic_directory_save(super().save_checkpoint, checkpoint, filepath, storage_options)


def is_fsdp2(strategy: Any) -> bool:
    return isinstance(strategy, GPTFSDP2Strategy)


def shard_with_fsdp2(model: torch.nn.Module, strategy: GPTFSDP2Strategy, precision: str) -> None:
    """Apply ``fully_shard`` to each ``TransformerBlock`` of ``model`` and then to ``model`` itself."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = strategy.device_mesh["data_parallel"]
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16-mixed" else MixedPrecisionPolicy()
    for module in model.modules():
        if isinstance(module, TransformerBlock):
            fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=strategy.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=strategy.reshard_after_forward)


class GPTDeepSpeedStrategy(_AtomicDirectorySave, DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` with a lazy import of DeepSpeed, a sanitised ``TORCH_CUDA_ARCH_LIST``,
    ``model.gradient_clip`` handed to DeepSpeed's engine, and atomic checkpoint directories."""

    strategy_name = "lit_deepspeed"

    def __init__(self, check_grad_overflow: bool = False, synchronized_timer: bool = False, **kwargs: Any) -> None:
        """
        Args:
            check_grad_overflow: Under bf16, DeepSpeed's check of every gradient for inf/NaN before each optimizer step
                (a step with one is skipped): one small kernel per gradient tensor, an all-reduce and a wait for the
                GPU at every step. ``false`` leaves non-finite values to lit_llm's ``NonFiniteGuard``, which checks
                the loss before the step and the engine's gradient norm after it, and stops the run before anything
                from such a step is saved. Ignored when the DeepSpeed config sets ``bf16.check_grad_overflow``.
            synchronized_timer: DeepSpeed's throughput timer (``timers.throughput.synchronized``, on by default in
                DeepSpeed) waits for the GPU when each forward starts and when each optimizer step ends, so that its
                own samples/s log is exact: two waits for the GPU at every step, which leave the GPU idle while the
                host prepares the next batch. ``false`` times on the host alone (its averages stay right once the
                host runs a step ahead); lit_llm's ``Throughput`` callback measures speed without either. Ignored
                when the DeepSpeed config sets ``timers.throughput.synchronized``.
            **kwargs: Lightning's ``DeepSpeedStrategy`` arguments (``stage``, ``offload_optimizer``, ``config``, ...).
        """
        self.check_grad_overflow = check_grad_overflow
        self.synchronized_timer = synchronized_timer
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                f"DeepSpeed (trainer.strategy) is not installed: {DEEPSPEED_INSTALL} (on a machine with CUDA), or use "
                "trainer.strategy=lit_fsdp, which needs nothing extra."
            )
        sanitize_cuda_arch_list()
        super().__init__(**kwargs)

    def setup_environment(self) -> None:
        _refuse_cpu(self, "DeepSpeed")
        super().setup_environment()

    def setup(self, trainer: Any) -> None:
        # DeepSpeed clips inside its engine, from its config. Lightning fills that from trainer.gradient_clip_val only,
        # and may have done so already (with 0.0, no clipping) when it built the model under ZeRO stage 3's context.
        clip = trainer.gradient_clip_val or getattr(trainer.lightning_module, "hparams", {}).get("gradient_clip")
        if clip and not self.config.get("gradient_clipping"):
            self.config["gradient_clipping"] = float(clip)
        with contextlib.ExitStack() as stack:
            import warnings

            stack.enter_context(warnings.catch_warnings())
            # lit_llm's configure_gradient_clipping only serves the other strategies; the warning would mislead here.
            warnings.filterwarnings("ignore", message=r".*configure_gradient_clipping.*")
            super().setup(trainer)
        if make_zero_step_sync_free(getattr(self.deepspeed_engine, "optimizer", None)):
            rank_zero_info("DeepSpeed ZeRO: gradient norm and clipping run without waiting for the GPU")

    def _format_config(self) -> None:
        super()._format_config()  # Lightning adds the precision section ({"bf16": {"enabled": true}}) here
        set_bf16_overflow_check(self.config, self.check_grad_overflow)
        set_timer_sync(self.config, self.synchronized_timer)

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any | None = None) -> None:
        self._atomic_directory_save(super().save_checkpoint, checkpoint, filepath, storage_options)

    @property
    def offloads_optimizer(self) -> bool:
        zero = self.config.get("zero_optimization", {}) if isinstance(self.config, dict) else {}
        return bool(zero.get("offload_optimizer"))


def _mask_non_finite_(tensor: torch.Tensor, device: Any = None, val: float = -1.0) -> None:
    """DeepSpeed's ``mask_nan_or_inf_with_val_inplace`` (inf/NaN become ``val``) with ``val`` as a number: the original
    copies it to the GPU from pageable memory and fills with a GPU scalar, two waits for the GPU per call."""
    tensor.masked_fill_(~torch.isfinite(tensor), val)


def _unscale_and_clip_grads(self: Any, grad_groups_flat: list, total_norm: Any) -> None:
    """``DeepSpeedZeroOptimizer.unscale_and_clip_grads`` (DeepSpeed 0.19) kept on the GPU: the same scale,
    ``1 / (loss_scale * max(1, (norm / loss_scale + 1e-6) / clip))``, with a non-finite or negative (DeepSpeed's
    marker for non-finite) norm taken as infinite, without the original's ``bool`` of that test, a wait for the GPU."""
    if not torch.is_tensor(total_norm):
        return type(self).unscale_and_clip_grads(self, grad_groups_flat, total_norm)
    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return None
    scale: Any = self.loss_scale
    if self.clip_grad > 0.0:
        norm = total_norm.float()
        norm = torch.where(torch.isfinite(norm) & (norm >= 0), norm, torch.full_like(norm, float("inf")))
        scale = torch.clamp((norm / self.loss_scale + 1e-6) / self.clip_grad, min=1.0) * self.loss_scale
    for grad in grad_groups_flat:
        for part in grad if isinstance(grad, list) else [grad]:
            part.data.mul_(1.0 / scale)
    return None


def make_zero_step_sync_free(optimizer: Any) -> bool:
    """Take the host's waits for the GPU out of the optimizer step of DeepSpeed's ZeRO stage 1/2 optimizer (with
    ``check_grad_overflow`` off, the remaining ones: two per parameter group in its gradient-norm masking, one in its
    clipping). The arithmetic is DeepSpeed 0.19's; only where a number is read back to the host changes. Returns
    whether ``optimizer`` is one (nothing is changed otherwise, e.g. for ZeRO stage 3 or another DeepSpeed layout)."""
    try:
        from deepspeed.runtime.zero import stage_1_and_2
    except ImportError:
        return False
    zero_optimizer = getattr(stage_1_and_2, "DeepSpeedZeroOptimizer", None)
    if zero_optimizer is None or not isinstance(optimizer, zero_optimizer):
        return False
    if not callable(getattr(zero_optimizer, "unscale_and_clip_grads", None)):
        return False
    if callable(getattr(stage_1_and_2, "mask_nan_or_inf_with_val_inplace", None)):
        stage_1_and_2.mask_nan_or_inf_with_val_inplace = _mask_non_finite_
    optimizer.unscale_and_clip_grads = types.MethodType(_unscale_and_clip_grads, optimizer)
    return True


def set_bf16_overflow_check(config: dict[str, Any], check: bool) -> None:
    """Set DeepSpeed's ``bf16.check_grad_overflow`` to ``check`` in ``config`` when bf16 is enabled there and the
    config does not choose it already."""
    bf16 = config.get("bf16")
    if isinstance(bf16, dict) and bf16.get("enabled"):
        bf16.setdefault("check_grad_overflow", check)


def set_timer_sync(config: dict[str, Any], synchronized: bool) -> None:
    """Set DeepSpeed's ``timers.throughput.synchronized`` to ``synchronized`` in ``config`` unless the config chooses
    it already."""
    timers = config.setdefault("timers", {})
    if isinstance(timers, dict):
        throughput = timers.setdefault("throughput", {})
        if isinstance(throughput, dict):
            throughput.setdefault("synchronized", synchronized)


def sanitize_cuda_arch_list() -> None:
    """Drop architecture suffixes (``9.0a`` -> ``9.0``) from ``TORCH_CUDA_ARCH_LIST``, which DeepSpeed's op builder
    parses as plain ``major.minor`` numbers (``int('0a')`` fails when it compiles an op such as CPU Adam)."""
    value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not value:
        return
    cleaned = re.sub(r"(\d+\.\d+)[a-zA-Z]+", r"\1", value)
    if cleaned != value:
        os.environ["TORCH_CUDA_ARCH_LIST"] = cleaned
        rank_zero_info(f"TORCH_CUDA_ARCH_LIST={value!r} -> {cleaned!r} for DeepSpeed's op builder, which cannot "
                       "parse architecture suffixes")


_FSDP = "FSDP, a unit per TransformerBlock (one for a model under 2 % of the GPU), sharded checkpoints"
_ZERO = "DeepSpeed ZeRO stage {}, lazily imported"
#: (name, class, description, init arguments) of each strategy this module registers, in the order of the table above.
_ENTRIES: list[tuple[str, type, str, dict[str, Any]]] = [
    ("lit_ddp", GPTDDPStrategy, "DDP with gradients reduced in place in the buckets, a compiled model in one graph",
     {}),
    ("lit_fsdp", GPTFSDPStrategy, _FSDP + " (full shard)", {"sharding_strategy": "FULL_SHARD"}),
    ("lit_fsdp2", GPTFSDP2Strategy, "FSDP2 (fully_shard per TransformerBlock), sharded checkpoints", {}),
    ("lit_fsdp_hybrid", GPTFSDPStrategy, _FSDP + " (shard within a node, replicate across nodes)",
     {"sharding_strategy": "HYBRID_SHARD"}),
    ("lit_fsdp_offload", GPTFSDPStrategy, _FSDP + " with parameters and optimizer state in CPU memory",
     {"sharding_strategy": "FULL_SHARD", "cpu_offload": True}),
    ("lit_deepspeed_zero1", GPTDeepSpeedStrategy, _ZERO.format(1), {"stage": 1}),
    ("lit_deepspeed_zero2", GPTDeepSpeedStrategy, _ZERO.format(2), {"stage": 2, "overlap_comm": False}),
    ("lit_deepspeed_zero3", GPTDeepSpeedStrategy, _ZERO.format(3), {"stage": 3}),
    ("lit_deepspeed_zero3_offload", GPTDeepSpeedStrategy, _ZERO.format(3) + ", parameters and optimizer on the CPU",
     {"stage": 3, "offload_optimizer": True, "offload_parameters": True}),
]
#: The names this module registers.
NAMES = tuple(name for name, *_ in _ENTRIES)

# Idempotent: re-importing the module registers the same entries again.
for _name, _cls, _description, _init in _ENTRIES:
    StrategyRegistry.register(_name, _cls, description=_description, override=True, **_init)

# Tensor and pipeline parallelism live in lit_llm.distributed (one module per family) and register their names too.
from lit_llm.distributed import pipeline as _pipeline  # noqa: E402, F401
from lit_llm.distributed import tensor as _tensor  # noqa: E402, F401
