"""Tensor parallelism for lit_llm's GPT with PyTorch's DTensor, alone (``lit_tp``) or with FSDP2 across the other
mesh dimension (``lit_tp_fsdp``: 2-D parallelism).

Within a tensor-parallel group of ``t`` processes (``parallelize_gpt``):

- **Attention and feed-forward** are split column-then-row: the fused ``qkv`` projection and the first feed-forward
  Linear keep ``1/t`` of their output columns (the attention heads ``h * H/t ...``, a quarter of the hidden units),
  so each process computes its own heads and hidden units with no communication; ``out_proj`` and the second
  feed-forward Linear keep ``1/t`` of their input rows and sum their partial outputs across the group.
- **Sequence parallelism**: between those pairs (the LayerNorms, dropout and the residual stream) each process holds
  ``1/t`` of the sequence. The column-split layers gather the sequence, the row-split ones reduce-scatter back to it.
- **Vocabulary-parallel embedding and head**: the token embedding and the output head hold ``1/t`` of the vocabulary
  rows each (a tied head shares them), and the cross-entropy is computed on the vocabulary-split logits
  (``loss_parallel``) without gathering them. The position embedding holds ``1/t`` of the positions.

The fused ``qkv`` weight stores the rows of all queries, then all keys, then all values; a contiguous ``1/t`` of it
would not be whole heads. Its rows are regrouped as ``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]`` (``group_qkv_by_rank``)
before it is split, and each attention module is told its local head count. Checkpoints keep the regrouped rows and
record ``t``; ``convert consolidate`` puts them back in the GPT's order (``canonical_qkv_order``), and a resume
needs the same ``t``.

With more processes than ``t``, the groups are replicas over the mesh's ``data_parallel`` dimension, and FSDP2
(``fully_shard``) shards every ``TransformerBlock`` and the GPT over it, as ``lit_fsdp2`` does over all ranks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import torch
from pytorch_lightning.utilities import rank_zero_info

from lit_llm.distributed.mesh import MeshStrategy
from lit_llm.errors import CheckpointError, ConfigError
from lit_llm.model.gpt import GPTModel, TransformerBlock

#: Parameter names (without the task's ``model.`` prefix) whose rows are regrouped by rank under tensor parallelism.
_QKV = re.compile(r"(^|\.)trf_blocks\.\d+\.att\.qkv\.(weight|bias)$")


def group_qkv_by_rank(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """Rows ``[q; k; v]`` (each ``C`` rows) of a fused projection regrouped as ``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]``,
    where ``q_r`` are rows ``r C/size ... (r + 1) C/size`` of ``q``: a contiguous ``1/size`` of the result holds whole
    heads of all three."""
    c = tensor.shape[0] // 3
    rest = tensor.shape[1:]
    return tensor.reshape(3, size, c // size, *rest).transpose(0, 1).reshape(tensor.shape)


def canonical_qkv_order(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """The inverse of :func:`group_qkv_by_rank`: rows back to ``[q; k; v]``."""
    c = tensor.shape[0] // 3
    rest = tensor.shape[1:]
    return tensor.reshape(size, 3, c // size, *rest).transpose(0, 1).reshape(tensor.shape)


def check_tensor_parallel(model: GPTModel, size: int) -> None:
    """One ConfigError listing every model dimension that ``size`` processes cannot split evenly."""
    c = model.config
    problems = []
    if c.n_heads % size:
        problems.append(f"model.n_heads={c.n_heads} is not a multiple of the tensor-parallel degree {size} (each "
                        "process computes whole attention heads)")
    if c.padded_vocab_size % size:
        problems.append(f"the padded vocabulary ({c.padded_vocab_size} rows, model.pad_vocab_multiple="
                        f"{c.pad_vocab_multiple}) is not a multiple of {size}: set pad_vocab_multiple to a multiple of "
                        f"{size}")
    if c.context_length % size:
        problems.append(f"model.context_length={c.context_length} is not a multiple of {size} (each process holds "
                        "an equal part of the sequence)")
    if problems:
        raise ConfigError(f"tensor parallelism over {size} processes: " + "; ".join(problems)
                          + ": choose a tensor_parallel_size that divides them")


def parallelize_gpt(model: GPTModel, mesh: Any) -> None:
    """Split ``model`` in place over the one-dimensional ``mesh`` (see the module docstring)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    size = mesh.size()
    check_tensor_parallel(model, size)
    tied = model.config.tie_weights
    with torch.no_grad():
        for block in model.trf_blocks:
            for param in (block.att.qkv.weight, block.att.qkv.bias):
                if param is not None and not param.is_meta:
                    param.copy_(group_qkv_by_rank(param, size))
    plan = {
        # Vocabulary-parallel embedding: each process looks up its rows; the partial sums are reduce-scattered
        # into sequence shards.
        "tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False),
        "pos_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(0), use_local_output=False),
        "final_norm": SequenceParallel(),
        # The logits stay split over the vocabulary for loss_parallel's cross-entropy.
        "out_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    }
    parallelize_module(model, mesh, plan)
    block_plan = {
        "norm1": SequenceParallel(),
        "att.qkv": ColwiseParallel(input_layouts=Shard(1)),
        "att.out_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "norm2": SequenceParallel(),
        "ff.layers.0": ColwiseParallel(input_layouts=Shard(1)),
        "ff.layers.2": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
    }
    for block in model.trf_blocks:
        parallelize_module(block, mesh, block_plan)
        block.att.n_heads = model.config.n_heads // size  # the heads this process computes
    if tied:
        model.out_head.weight = model.tok_emb.weight  # both Shard(0) over the vocabulary: one parameter again


def shard_data_parallel(model: GPTModel, mesh: Any, precision: str, reshard_after_forward: bool = True) -> None:
    """FSDP2 over the ``data_parallel`` mesh: each ``TransformerBlock``, then the GPT (embeddings, final norm and the
    tied or untied head in the root group)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16-mixed" else MixedPrecisionPolicy()
    for module in model.modules():
        if isinstance(module, TransformerBlock):
            fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)


def canonical_state(loaded: dict[str, Any], record: dict[str, Any] | None) -> dict[str, Any]:
    """Checkpoint entries read whole (``{"state_dict": ..., "optimizer_0": ...}``) with every regrouped ``qkv`` row
    block of a tensor-parallel run put back in the GPT's order (weights and their AdamW moments); unchanged for
    any other checkpoint. ``record`` is the checkpoint's ``model_parallel`` entry."""
    if not record or record.get("kind") != "tensor":
        return loaded
    size = int(record["tensor_parallel_size"])

    def fix(name: str, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and _QKV.search(name) and value.dim() >= 1 and value.shape[0] % 3 == 0:
            return canonical_qkv_order(value, size)
        if isinstance(value, dict):  # an optimizer's per-parameter state: moments shaped like the parameter
            return {k: fix(name, v) if isinstance(v, torch.Tensor) and v.dim() >= 1 else v for k, v in value.items()}
        return value

    out = {}
    for key, entry in loaded.items():
        if key == "state_dict" and isinstance(entry, dict):
            out[key] = {name: fix(name, v) for name, v in entry.items()}
        elif isinstance(entry, dict) and isinstance(entry.get("state"), dict):
            out[key] = {**entry, "state": {str(name): fix(str(name), v) for name, v in entry["state"].items()}}
        else:
            out[key] = entry
    return out


class GPTTensorParallelStrategy(MeshStrategy):
    """Tensor parallelism (DTensor) within groups of ``tensor_parallel_size`` processes; FSDP2 across the groups."""

    strategy_name = "lit_tp"
    model_dim = "tensor_parallel"

    def __init__(self, tensor_parallel_size: int | Literal["auto"] = "auto", reshard_after_forward: bool = True,
                 **kwargs: Any) -> None:
        """
        Args:
            tensor_parallel_size: Processes that split each layer. ``auto``: the processes of one node
                (``trainer.devices``). It must divide the processes, ``model.n_heads``, ``model.context_length``
                and the padded vocabulary. Processes beyond it form more groups, which FSDP2 shards the model
                over (2-D: ``lit_tp_fsdp``).
            reshard_after_forward: Under FSDP2 (several groups), free each block's gathered weights after its forward
                pass and gather them again for the backward; ``false`` keeps them (more memory, less traffic).
            **kwargs: Lightning's ``ModelParallelStrategy`` arguments ``process_group_backend`` and ``timeout``.
        """
        if tensor_parallel_size != "auto" and (not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1):
            raise ConfigError(f"trainer.strategy.tensor_parallel_size={tensor_parallel_size!r} must be 'auto' or a "
                              "positive number of processes")
        super().__init__(**kwargs)
        self.tensor_parallel_size = tensor_parallel_size
        self.reshard_after_forward = reshard_after_forward

    def model_parallel_size(self, world_size: int, processes_per_node: int) -> int:
        return processes_per_node if self.tensor_parallel_size == "auto" else self.tensor_parallel_size

    def parallelize_task(self, task: Any) -> None:
        """Split ``task.model`` over the tensor-parallel mesh (then shard it over the data-parallel one) and compute
        the loss on vocabulary-split logits."""
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor.parallel import loss_parallel

        name = "lit_tp" if self.data_mesh.size() == 1 else "lit_tp_fsdp"
        self.check_task(task, name)
        model: GPTModel = task.model
        parallelize_gpt(model, self.model_mesh)
        if self.data_mesh.size() > 1:
            precision = str(getattr(self.precision_plugin, "precision", "32-true"))
            shard_data_parallel(model, self.data_mesh, precision, self.reshard_after_forward)
        rank_zero_info(f"Tensor parallel over {self.model_mesh.size()} processes (sequence-parallel norms, "
                       f"vocabulary-parallel embedding and head)"
                       + (f", FSDP2 over {self.data_mesh.size()} groups" if self.data_mesh.size() > 1 else ""))
        if task.speed.compile:
            # Each block compiled in place (names unchanged), after it was split: DTensor's collectives sit
            # between the blocks' graphs.
            for block in model.trf_blocks:
                block.compile()

        def model_loss(input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            with loss_parallel():
                loss = model(input_ids, targets=targets)
            return loss.to_local() if isinstance(loss, DTensor) else loss  # replicated: the whole loss on each

        def forward(input_ids: torch.Tensor) -> torch.Tensor:
            logits = model(input_ids)
            return logits.full_tensor() if isinstance(logits, DTensor) else logits

        object.__setattr__(task, "_model_loss", model_loss)
        object.__setattr__(task, "_forward", forward)

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        from torch.distributed.tensor.parallel import loss_parallel

        with loss_parallel():  # the vocabulary-split cross-entropy's backward needs it too
            return super().backward(closure_loss, optimizer, *args, **kwargs)

    def split_record(self) -> dict[str, Any]:
        return {"kind": "tensor", "tensor_parallel_size": self.model_mesh.size(), "qkv_rows": "grouped_by_rank"}

    def check_split(self, saved: dict[str, Any], path: Path) -> None:
        size = self.model_mesh.size()
        if saved.get("kind") != "tensor":
            raise CheckpointError(f"{path} was not written under tensor parallelism: consolidate it (python -m "
                                  "lit_llm.convert consolidate) and start from the file with model.init_args."
                                  "init_weights")
        if saved.get("tensor_parallel_size") != size:
            raise CheckpointError(f"{path} was written with tensor_parallel_size={saved.get('tensor_parallel_size')}, "
                                  f"this run has {size}: resume with the same trainer.strategy.tensor_parallel_size, "
                                  "or consolidate it and start from the file with model.init_args.init_weights")


__all__ = ["GPTTensorParallelStrategy", "canonical_qkv_order", "canonical_state", "group_qkv_by_rank",
           "parallelize_gpt"]
