"""Everything strategy-specific: lit_llm's named strategies and the questions the rest of the package asks about them.

Tasks and callbacks never look at a strategy's class; they ask here (is the model sharded? is it ZeRO-3? what
gradient norm did DeepSpeed's engine compute?). Importing this package registers the ``lit_*`` strategy names in
Lightning's ``StrategyRegistry`` (:mod:`lit_llm.distributed.registry`), one module per family:
:mod:`~lit_llm.distributed.ddp`, :mod:`~lit_llm.distributed.fsdp` (FSDP and FSDP2),
:mod:`~lit_llm.distributed.deepspeed`, :mod:`~lit_llm.distributed.tensor` (tensor parallel) and
:mod:`~lit_llm.distributed.pipeline` (pipeline parallel), the last two over :mod:`~lit_llm.distributed.mesh`.
"""

from lit_llm.distributed.common import engine_grad_norm, is_deepspeed, is_zero3, params_are_sharded
from lit_llm.distributed.ddp import check_ddp_options
from lit_llm.distributed.fsdp import is_fsdp, is_fsdp1, is_fsdp2, shard_with_fsdp2
from lit_llm.distributed.mesh import splits_model
from lit_llm.distributed.registry import NAMES

__all__ = [
    "NAMES",
    "check_ddp_options",
    "engine_grad_norm",
    "is_deepspeed",
    "is_fsdp",
    "is_fsdp1",
    "is_fsdp2",
    "is_zero3",
    "params_are_sharded",
    "shard_with_fsdp2",
    "splits_model",
]
