"""``lit_fsdp`` (and its hybrid and offload variants) and ``lit_fsdp2``.

FSDP wraps each ``TransformerBlock`` as a unit and nothing else, so the token embedding, the final norm and the head
(tied to the embedding when ``tie_weights``) stay together in the root unit; a model that takes at most 2 % of the
GPU is one unit instead (:func:`fits_one_unit`), gathered once per step. The model is built on the meta device and
materialised shard by shard (``reset_parameters`` re-runs lit_llm's initialisation), so a model larger than one GPU's
memory never exists whole. All-gathers are rate-limited only for models that take a large share of the GPU
(:func:`needs_all_gather_limit`): the limit makes the host wait for the GPU. FSDP2 (``fully_shard``) shards each
``TransformerBlock`` and then the GPT; its parameters are DTensors.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pytorch_lightning.strategies import (
    FSDPStrategy,
    ModelParallelStrategy,
)
from pytorch_lightning.utilities import rank_zero_info

from lit_llm.distributed.common import AtomicDirectorySave, refuse_cpu
from lit_llm.errors import ConfigError
from lit_llm.model.gpt import TransformerBlock

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


class GPTFSDPStrategy(AtomicDirectorySave, FSDPStrategy):
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

        Written out here so that a config naming the class (``class_path:
        lit_llm.distributed.fsdp.GPTFSDPStrategy``) gets
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
        refuse_cpu(self, "FSDP")
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


class GPTFSDP2Strategy(AtomicDirectorySave, ModelParallelStrategy):
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


def is_fsdp2(strategy: Any) -> bool:
    """lit_llm's FSDP2 strategy (parameters are DTensors, sharded by ``fully_shard``)."""
    return isinstance(strategy, GPTFSDP2Strategy)


def is_fsdp1(strategy: Any) -> bool:
    """FSDP of the first generation (Lightning's ``FSDPStrategy`` or lit_llm's): the wrapped module clips itself."""
    return isinstance(strategy, FSDPStrategy)


def is_fsdp(strategy: Any) -> bool:
    """FSDP of either generation."""
    return is_fsdp1(strategy) or is_fsdp2(strategy)
