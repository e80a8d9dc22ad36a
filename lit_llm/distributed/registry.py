"""Named multi-GPU strategies, so that a config switches strategy with one line: ``trainer.strategy: lit_fsdp``.

Importing this module (``import lit_llm.distributed`` does) registers, in Lightning's ``StrategyRegistry``:

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
``lit_tp``                        tensor parallelism (DTensor) over the processes of a node, sequence-parallel norms
``lit_tp_fsdp``                   2-D: tensor parallelism over pairs of processes, FSDP2 across the pairs
``lit_pipeline``                  pipeline parallelism: stages by layer ranges, GPipe / 1F1B micro-batches
================================  =====================================================================================

Each family's module says why lit_llm has its own class rather than Lightning's ``ddp`` / ``fsdp`` /
``deepspeed_stage_N``: :mod:`~lit_llm.distributed.ddp`, :mod:`~lit_llm.distributed.fsdp`,
:mod:`~lit_llm.distributed.deepspeed`, :mod:`~lit_llm.distributed.tensor`, :mod:`~lit_llm.distributed.pipeline`.
FSDP and DeepSpeed write directory checkpoints atomically and refuse to run on
the CPU with one error. Activation checkpointing is a switch of the task
(``model.init_args.speed.activation_checkpointing: true``); it works under every strategy.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.strategies import (
    StrategyRegistry,
)

from lit_llm.distributed.ddp import GPTDDPStrategy
from lit_llm.distributed.deepspeed import GPTDeepSpeedStrategy
from lit_llm.distributed.fsdp import GPTFSDP2Strategy, GPTFSDPStrategy
from lit_llm.distributed.pipeline import GPTPipelineStrategy
from lit_llm.distributed.tensor import GPTTensorParallelStrategy

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
    ("lit_tp", GPTTensorParallelStrategy,
     "Tensor parallelism (DTensor) over the processes of a node, sequence-parallel", {}),
    ("lit_tp_fsdp", GPTTensorParallelStrategy,
     "2-D: tensor parallelism over pairs of processes, FSDP2 across the pairs", {"tensor_parallel_size": 2}),
    ("lit_pipeline", GPTPipelineStrategy, "Pipeline parallelism: stages by layer ranges, 1F1B micro-batches", {}),
]
#: The names this module registers.
NAMES = tuple(name for name, *_ in _ENTRIES)

# Idempotent: re-importing the module registers the same entries again.
for _name, _cls, _description, _init in _ENTRIES:
    StrategyRegistry.register(_name, _cls, description=_description, override=True, **_init)
