"""Pipeline parallelism: the GPT cut into stages by layer ranges ("layers 1-10 on one device, 11-20 on the next"),
each batch run as micro-batches through ``torch.distributed.pipelining``'s schedules, as a Lightning strategy.

``trainer.strategy: lit_pipeline`` (preset ``configs/trainer/pipeline.yaml``) puts one stage on each process of a
node by default, with the layers split evenly; ``stages: [[0, 10], [10, 20]]`` says which blocks each stage holds
(first included, last excluded, counting from 0). The first stage also holds the token and position embeddings, the
last one the final norm and the output head. Processes beyond one pipeline hold more pipelines that see different
data (data parallelism): their gradients are averaged (``data_parallel: replicate``) or each stage is sharded over
them with FSDP2 (``data_parallel: shard``).

How a step runs, and why it is exact:

- The task's loss call runs the schedule (``GPipe``, ``1F1B``, ``interleaved_1f1b`` with ``stages_per_rank`` >= 2,
  ``looped_bfs``): the rank's batch is cut into ``microbatches`` equal parts; each part's cross-entropy on the last
  stage is divided by ``microbatches x trainer.accumulate_grad_batches`` before its backward pass, so the summed
  gradients are those of the whole batch's mean loss. The mean loss is sent from the last stage to every stage, so
  every rank logs and returns it; Lightning's own backward pass is skipped (the schedule ran it).
- Before the optimizer step, gradients are summed between the first and last stage for a tied embedding and head
  (``tie_weights``: each stage holds a copy, kept equal), and averaged over the pipelines (``replicate``).
- Clipping uses the norm of the whole model: each stage's sum of squares, summed over the pipeline, the tied copy
  counted once.
- Checkpoints are ``torch.distributed.checkpoint`` directories (every stage writes its parameters under their full
  names) with ``meta.pt``, like ``lit_fsdp2``'s: ``--ckpt_path`` resumes them under the same split and
  ``python -m lit_llm.convert consolidate`` makes the one file that ``generate``, ``to-hf`` and finetuning read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torch.utils.checkpoint import checkpoint

from lit_llm.distributed.mesh import MeshStrategy, quiet_experimental_warnings, sum_over
from lit_llm.errors import CheckpointError, ConfigError
from lit_llm.model.gpt import GPTModel
from lit_llm.model.losses import next_token_loss

Schedule = Literal["gpipe", "1f1b", "interleaved_1f1b", "looped_bfs"]
DataParallel = Literal["replicate", "shard"]
#: Schedules that run several stages per rank (``stages_per_rank`` >= 2).
MULTI_STAGE = ("interleaved_1f1b", "looped_bfs")


def split_layers(n_layers: int, n_stages: int, stages: Sequence[Sequence[int]] | None = None) -> list[tuple[int, int]]:
    """The ``[start, end)`` block range of each stage: ``stages`` checked, or an even split (earlier stages take the
    remainder's extra blocks).

    Raises:
        ConfigError: ``stages`` does not cover blocks ``0 .. n_layers - 1`` once, in order, with ``n_stages`` non-empty
            ranges; or there are fewer blocks than stages.
    """
    if stages is None:
        if n_layers < n_stages:
            raise ConfigError(f"the model's {n_layers} layers cannot fill {n_stages} pipeline stages (one layer each "
                              "at least): use fewer stages (trainer.devices or trainer.strategy.stages_per_rank) or "
                              "more layers")
        base, extra = divmod(n_layers, n_stages)
        bounds = [0]
        for i in range(n_stages):
            bounds.append(bounds[-1] + base + (1 if i < extra else 0))
        return list(zip(bounds[:-1], bounds[1:]))
    ranges = [tuple(int(v) for v in r) for r in stages]
    even = [list(r) for r in split_layers(n_layers, n_stages)] if n_layers >= n_stages else "none"
    how = (f"give {n_stages} [start, end) ranges that cover layers 0 to {n_layers} in order, e.g. {even}, "
           "or remove trainer.strategy.stages for an even split")
    if len(ranges) != n_stages:
        raise ConfigError(f"trainer.strategy.stages={[list(r) for r in ranges]} has {len(ranges)} stages but the "
                          f"pipeline has {n_stages} (processes per pipeline x stages_per_rank): {how}")
    expected_start = 0
    for r in ranges:
        if len(r) != 2 or r[0] != expected_start or r[1] <= r[0]:
            raise ConfigError(f"trainer.strategy.stages={[list(r) for r in ranges]} does not cover the model's "
                              f"{n_layers} layers (stage {list(r)} should start at {expected_start} and hold at "
                              f"least one layer): {how}")
        expected_start = r[1]
    if expected_start != n_layers:
        raise ConfigError(f"trainer.strategy.stages={[list(r) for r in ranges]} does not cover the model's {n_layers} "
                          f"layers (it ends at {expected_start}): {how}")
    return [(a, b) for a, b in ranges]


def bubble_share(stages: int, microbatches: int) -> float:
    """The idle share of a GPipe/1F1B step in theory, ``(p - 1) / (m + p - 1)``: ``p`` stages, ``m`` micro-batches."""
    return (stages - 1) / (microbatches + stages - 1)


class GPTStage(nn.Module):
    """One pipeline stage of a :class:`~lit_llm.model.gpt.GPTModel`: its blocks ``[start, end)``, with the embeddings
    when it is the first stage and the final norm and head when it is the last.

    It holds the GPT's own modules (a module may have two parents), so the task's parameter names stay the GPT's
    (``model.trf_blocks.7.att.qkv.weight``) and checkpoints of every stage merge into one GPT. ``forward`` is
    ``GPTModel.forward`` restricted to these modules (without a KV cache): token ids in on the first stage, the
    residual stream between stages, logits out of the last.
    """

    def __init__(self, model: GPTModel, start: int, end: int, first: bool, last: bool) -> None:
        super().__init__()
        self.config = model.config
        self.start, self.end, self.first, self.last = start, end, first, last
        self.gpt = [model]  # a list: the GPT is not a child (its other stages' modules are not this stage's)
        if first:
            self.tok_emb, self.pos_emb, self.drop_emb = model.tok_emb, model.pos_emb, model.drop_emb
        self.trf_blocks = nn.ModuleDict({str(i): model.trf_blocks[i] for i in range(start, end)})
        if last:
            self.final_norm, self.out_head = model.final_norm, model.out_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self.gpt[0]
        if self.first:
            T = x.shape[1]
            if T > self.config.context_length:
                raise ValueError(f"Input sequence has {T} tokens but the model's context_length is "
                                 f"{self.config.context_length}")
            pos = torch.arange(T, device=x.device)
            x = self.drop_emb(self.tok_emb(x) + self.pos_emb(pos))
            if model.autocast_residual and torch.is_autocast_enabled(x.device.type):
                x = x.to(torch.get_autocast_dtype(x.device.type))
        recompute = model.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.trf_blocks.values():
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        if self.last:
            x = self.out_head(self.final_norm(x))
        return x


def cut_to_stages(model: GPTModel, ranges: list[tuple[int, int]], owned: list[int]) -> list[GPTStage]:
    """Keep in ``model`` only the modules of the stages ``owned`` (indices into ``ranges``) and return those stages.

    The other blocks become ``None`` in ``trf_blocks`` (indices, hence names, are kept); the embeddings leave a
    model without the first stage, the final norm and head one without the last. A tied head keeps its own
    reference to the embedding's weight, so a last stage holds it as ``out_head.weight``.
    """
    n = len(ranges)
    stages = [GPTStage(model, *ranges[s], first=s == 0, last=s == n - 1) for s in owned]
    kept = {i for s in owned for i in range(*ranges[s])}
    for i in range(len(model.trf_blocks)):
        if i not in kept:
            model.trf_blocks[i] = None
    if 0 not in owned:
        model.tok_emb = model.pos_emb = model.drop_emb = None
    if n - 1 not in owned:
        model.final_norm = model.out_head = None
    return stages


def materialize(module: nn.Module, device: torch.device) -> bool:
    """Give a module built on the meta device real memory on ``device`` and lit_llm's initialisation; returns
    whether it had meta parameters."""
    if not any(p.is_meta for p in module.parameters()):
        return False
    module.to_empty(device=device)
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
    return True


class GPTPipelineStrategy(MeshStrategy):
    """Pipeline parallelism for lit_llm's GPT: stages by layer ranges, micro-batches through a schedule of
    ``torch.distributed.pipelining``, pipelines side by side for data parallelism."""

    strategy_name = "lit_pipeline"
    model_dim = "pipeline_parallel"

    def __init__(
        self,
        pipeline_parallel_size: int | Literal["auto"] = "auto",
        stages: list[list[int]] | None = None,
        microbatches: int | None = None,
        schedule: Schedule = "1f1b",
        stages_per_rank: int = 1,
        data_parallel: DataParallel = "replicate",
        **kwargs: Any,
    ) -> None:
        """
        Args:
            pipeline_parallel_size: Processes of one pipeline (one stage each, or ``stages_per_rank``). ``auto``: the
                processes of one node (``trainer.devices``); more nodes run more pipelines side by side.
            stages: The ``[start, end)`` transformer blocks of each stage, in order, counting from 0, e.g.
                ``[[0, 10], [10, 20]]`` (layers 1-10 on the first process, 11-20 on the second). ``null``: even.
            microbatches: Parts each batch (``data.batch_size``, per pipeline) is cut into; it must divide the batch.
                More parts leave less of the step idle (``bubble_share``) for smaller matmuls. ``null``: twice the
                number of stages (at least the stages, which 1F1B needs).
            schedule: ``1f1b`` (one forward, one backward in turn: activations of at most as many micro-batches as
                stages), ``gpipe`` (all forwards, then all backwards: activations of every micro-batch),
                ``interleaved_1f1b`` or ``looped_bfs`` (several stages per process, ``stages_per_rank`` >= 2: a
                smaller idle share).
            stages_per_rank: Stages on each process (virtual stages), placed round-robin: with 2 processes and 2,
                process 0 holds stages 0 and 2. Only with ``interleaved_1f1b`` or ``looped_bfs``.
            data_parallel: Over pipelines side by side (processes beyond one pipeline): ``replicate`` (every pipeline
                holds its stages whole; gradients averaged before the step) or ``shard`` (FSDP2 shards each stage
                over them, for models whose stages do not fit).
            **kwargs: Lightning's ``ModelParallelStrategy`` arguments ``process_group_backend`` and ``timeout``.
        """
        problems = []
        if schedule not in ("gpipe", "1f1b", *MULTI_STAGE):
            problems.append(f"trainer.strategy.schedule={schedule!r} must be gpipe, 1f1b, interleaved_1f1b or "
                            "looped_bfs")
        elif schedule in MULTI_STAGE and stages_per_rank < 2:
            problems.append(f"trainer.strategy.schedule={schedule} runs several stages per process: set "
                            "trainer.strategy.stages_per_rank to 2 or more")
        elif schedule not in MULTI_STAGE and stages_per_rank != 1:
            problems.append(f"trainer.strategy.stages_per_rank={stages_per_rank} needs schedule interleaved_1f1b or "
                            f"looped_bfs, not {schedule}")
        if microbatches is not None and microbatches < 1:
            problems.append(f"trainer.strategy.microbatches={microbatches} must be a positive number")
        if data_parallel not in ("replicate", "shard"):
            problems.append(f"trainer.strategy.data_parallel={data_parallel!r} must be replicate or shard")
        if pipeline_parallel_size != "auto" and (not isinstance(pipeline_parallel_size, int)
                                                 or pipeline_parallel_size < 2):
            problems.append(f"trainer.strategy.pipeline_parallel_size={pipeline_parallel_size!r} must be 'auto' or at "
                            "least 2 (one process holds the whole model: use lit_ddp)")
        if problems:
            raise ConfigError("; ".join(problems))
        super().__init__(**kwargs)
        self.pipeline_parallel_size = pipeline_parallel_size
        self.stages = stages
        self.microbatches = microbatches
        self.schedule = schedule
        self.stages_per_rank = stages_per_rank
        self.data_parallel = data_parallel
        self.ranges: list[tuple[int, int]] = []
        self._stage_modules: list[GPTStage] = []
        self._schedules: dict[tuple, Any] = {}
        self._loss_divisor = 1.0
        self._ran_schedule = False
        self._pending_grads: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._tie_group: Any = None
        self._tied = False
        quiet_experimental_warnings()

    def model_parallel_size(self, world_size: int, processes_per_node: int) -> int:
        size = processes_per_node if self.pipeline_parallel_size == "auto" else self.pipeline_parallel_size
        if size < 2:
            raise ConfigError(f"lit_pipeline (trainer.strategy) needs at least 2 processes per pipeline, got {size}: "
                              "set trainer.devices to 2 or more (on the CPU too: --trainer.accelerator=cpu)")
        return size

    # ---- the split -------------------------------------------------------------------------------------------------
    @property
    def n_stages(self) -> int:
        return self.model_mesh.size() * self.stages_per_rank

    @property
    def owned_stages(self) -> list[int]:
        """This rank's stages: ``rank, rank + p, rank + 2p, ...`` for ``p`` processes per pipeline."""
        p, r = self.model_mesh.size(), self.model_mesh.get_local_rank()
        return [r + k * p for k in range(self.stages_per_rank)]

    def parallelize_task(self, task: Any) -> None:
        """Cut ``task.model`` to this rank's stages and route the task's loss and forward through the schedule."""
        self.check_task(task, "lit_pipeline")
        model: GPTModel = task.model
        config = model.config
        self.ranges = split_layers(config.n_layers, self.n_stages, self.stages)
        owned = self.owned_stages
        self._stage_modules = cut_to_stages(model, self.ranges, owned)
        self._tied = bool(config.tie_weights)
        for stage in self._stage_modules:
            materialize(stage, self.root_device)
        if self.data_parallel == "shard" and self.data_mesh.size() > 1:
            self._shard_stages(task)
        blocks = ", ".join(f"block {a}" if b - a == 1 else f"blocks {a}-{b - 1}" for a, b in self.ranges)
        rank_zero_info(f"Pipeline: {self.n_stages} stages over {self.model_mesh.size()} processes "
                       f"({blocks}), schedule {self.schedule}, "
                       f"{self.data_mesh.size()} pipeline(s) side by side ({self.data_parallel})")
        if task.speed.compile:
            for stage in self._stage_modules:
                for block in stage.trf_blocks.values():
                    block.compile()
        object.__setattr__(task, "_model_loss", self.pipeline_loss)
        object.__setattr__(task, "_forward", self.pipeline_logits)

    def _shard_stages(self, task: Any) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        precision = str(getattr(self.precision_plugin, "precision", "32-true"))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if precision == "bf16-mixed" else MixedPrecisionPolicy()
        for stage in self._stage_modules:
            for block in stage.trf_blocks.values():
                fully_shard(block, mesh=self.data_mesh, mp_policy=policy)
            fully_shard(stage, mesh=self.data_mesh, mp_policy=policy)

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        self._setup_ties_and_replicas()

    def _setup_ties_and_replicas(self) -> None:
        """Groups for the tied embedding (first and last stage of each pipeline), and the same starting weights on
        every pipeline and in both copies of a tied weight."""
        mesh = self.device_mesh.mesh  # (data_parallel, pipeline_parallel) global ranks
        p = mesh.shape[1]
        first_rank, last_rank = 0, (self.n_stages - 1) % p
        self._tie_group = None
        if self._tied and first_rank != last_rank:
            for row in mesh.tolist():  # every rank takes part in creating every group
                group = dist.new_group([row[first_rank], row[last_rank]])
                if self.global_rank in (row[first_rank], row[last_rank]):
                    self._tie_group = group
            with torch.no_grad():
                for weight in self._tied_weights():
                    local = weight.to_local() if hasattr(weight, "to_local") else weight
                    dist.broadcast(local, group=self._tie_group, group_src=0)
        if self.data_parallel == "replicate" and self.data_mesh.size() > 1:
            group = self.data_mesh.get_group()
            with torch.no_grad():
                for param in self._stage_parameters():
                    dist.broadcast(param.data, group=group, group_src=0)

    def _stage_parameters(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for stage in self._stage_modules:
            for param in stage.parameters():
                seen.setdefault(id(param), param)
        return list(seen.values())

    def _tied_weights(self) -> list[torch.Tensor]:
        """This rank's copy of a tied embedding/head weight when the first and last stage are on different ranks."""
        weights = []
        for stage in self._stage_modules:
            if stage.first:
                weights.append(stage.tok_emb.weight)
            if stage.last:
                weights.append(stage.out_head.weight)
        return weights

    # ---- running a batch -------------------------------------------------------------------------------------------
    def _schedule_for(self, batch_size: int, seq_len: int, train: bool) -> Any:
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import (
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
            ScheduleLoopedBFS,
        )

        m = self.microbatches or 2 * self.n_stages
        if batch_size % m:
            raise ConfigError(f"data.batch_size={batch_size} (per pipeline) is not a multiple of the "
                              f"{m} micro-batches of lit_pipeline (trainer.strategy.microbatches): make the batch "
                              f"a multiple of {m} or set microbatches to a divisor of {batch_size}")
        key = (batch_size, seq_len, train)
        if key not in self._schedules:
            # A schedule (and its stages) learns its activations' shapes at its first step, so each batch shape
            # (the last, smaller validation batch) and mode gets its own.
            group = self.model_mesh.get_group()
            stages = [PipelineStage(module, s, self.n_stages, self.root_device, group=group)
                      for module, s in zip(self._stage_modules, self.owned_stages)]
            kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B,
                    "looped_bfs": ScheduleLoopedBFS}[self.schedule]
            if self.schedule == "1f1b" and m < self.n_stages:
                raise ConfigError(f"trainer.strategy.microbatches={m} is fewer than the {self.n_stages} stages, which "
                                  "1F1B needs at least: raise microbatches or use schedule gpipe")
            # scale_grads=False: the loss is divided here (micro-batches x accumulation), since PyTorch's scaling
            # would also divide gradients accumulated over earlier batches.
            self._schedules[key] = kind(stages if self.schedule in MULTI_STAGE else stages[0], m,
                                        loss_fn=self._microbatch_loss, scale_grads=False)
        return self._schedules[key]

    def _microbatch_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return next_token_loss(logits, targets) / self._loss_divisor

    def pipeline_loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean next-token loss of the batch, on every rank; in training also its gradients (the schedule's
        backward passes), which Lightning's backward then leaves alone."""
        train = torch.is_grad_enabled()
        schedule = self._schedule_for(input_ids.shape[0], input_ids.shape[1], train)
        m = schedule._n_microbatches
        accumulate = getattr(self.lightning_module.trainer, "accumulate_grad_batches", 1) if train else 1
        self._loss_divisor = float(m * accumulate)
        owned = self.owned_stages
        args = (input_ids,) if 0 in owned else ()
        has_last = self.n_stages - 1 in owned
        losses: list[torch.Tensor] = []
        run = schedule.step if train else schedule.eval
        if train:
            # Lightning zeroes the gradients between the training step and its backward call, so this batch's
            # gradients are held aside and added in backward(); earlier micro-batches' (accumulation) stay in place.
            params = self._stage_parameters()
            earlier = [p.grad for p in params]
            for p in params:
                p.grad = None
        run(*args, target=targets if has_last else None, losses=losses if has_last else None)
        if train:
            self._pending_grads = [(p, p.grad) for p in params if p.grad is not None]
            for p, grad in zip(params, earlier):
                p.grad = grad
        if has_last:
            loss = (torch.stack([x.detach().float() for x in losses]).sum() * accumulate).reshape(())
        else:
            loss = torch.zeros((), dtype=torch.float32, device=self.root_device)
        last_rank = (self.n_stages - 1) % self.model_mesh.size()
        dist.broadcast(loss, group=self.model_mesh.get_group(), group_src=last_rank)
        self._ran_schedule = train
        return loss

    def pipeline_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, T, V)`` of the batch on every rank (forward passes only; for prediction, not training)."""
        with torch.no_grad():
            logits = self._forward_only(input_ids)
        return logits

    def _forward_only(self, input_ids: torch.Tensor) -> torch.Tensor:
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import ScheduleGPipe

        group = self.model_mesh.get_group()
        if self.stages_per_rank != 1:
            raise ConfigError("lit_pipeline computes logits (prediction) with one stage per process only; use "
                              "stages_per_rank: 1, or consolidate the checkpoint and predict on one device")
        key = ("logits", *input_ids.shape)
        if key not in self._schedules:
            stage = PipelineStage(self._stage_modules[0], self.owned_stages[0], self.n_stages, self.root_device,
                                  group=group)
            self._schedules[key] = ScheduleGPipe(stage, 1)
        owned = self.owned_stages
        out = self._schedules[key].step(*((input_ids,) if 0 in owned else ()))
        shape = (*input_ids.shape, self.lightning_module.model.config.padded_vocab_size)
        logits = out if out is not None else torch.empty(shape, device=self.root_device)
        dist.broadcast(logits, group=group, group_src=(self.n_stages - 1) % self.model_mesh.size())
        return logits

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self._ran_schedule:
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        # The schedule ran this batch's backward passes: its gradients are added here, between the hooks around a
        # backward pass (NonFiniteGuard reads the loss in on_before_backward).
        self._ran_schedule = False
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        for param, grad in self._pending_grads:
            if param.grad is None:
                param.grad = grad
            else:
                param.grad += grad
        self._pending_grads = []
        closure_loss = self.precision_plugin.post_backward(closure_loss, self.lightning_module)
        self.post_backward(closure_loss)
        return closure_loss

    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        def closure_then_reduce() -> Any:
            result = closure()
            self.reduce_gradients()
            return result

        return super().optimizer_step(optimizer, closure_then_reduce, model, **kwargs)

    def reduce_gradients(self) -> None:
        """Sum the two copies' gradients of a tied weight; average the gradients over replicated pipelines."""
        if self._tie_group is not None:
            for weight in self._tied_weights():
                if weight.grad is None:
                    weight.grad = torch.zeros_like(weight)
                grad = weight.grad.to_local() if hasattr(weight.grad, "to_local") else weight.grad
                sum_over(grad, self._tie_group)
        replicas = self.data_mesh.size()
        if self.data_parallel == "replicate" and replicas > 1:
            grads = [p.grad for p in self._stage_parameters() if p.grad is not None]
            if grads:
                flat = torch._utils._flatten_dense_tensors(grads)
                sum_over(flat, self.data_mesh.get_group()).div_(replicas)
                for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                    grad.copy_(reduced)

    def clip_grad_norm_(self, parameters: Any, max_norm: float) -> torch.Tensor:
        """Clip to the whole model's gradient norm: each stage's sum of squares summed over the pipeline (a tied
        weight's second copy left out); returns that norm (before clipping)."""
        params = [p for p in self._stage_parameters() if p.grad is not None]
        skip = {id(stage.out_head.weight) for stage in self._stage_modules if stage.last and self._tie_group}
        grads = [p.grad for p in params if id(p) not in skip]
        local = torch.nn.utils.get_total_norm(grads, norm_type=2.0) if grads else torch.zeros(())
        if hasattr(local, "full_tensor"):
            local = local.full_tensor()
        squares = (local.float() ** 2).to(self.root_device).reshape(())
        total = sum_over(squares, self.model_mesh.get_group()).sqrt()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    # ---- checkpoints -----------------------------------------------------------------------------------------------
    def optimizer_entry(self, state: dict[str, Any]) -> dict[str, Any]:
        # Each stage's optimizer lists other parameters in its param_groups: one entry per position in the pipeline.
        return {f"pipeline_rank_{self.model_mesh.get_local_rank()}": state}

    def from_optimizer_entry(self, entry: dict[str, Any]) -> dict[str, Any]:
        return entry[f"pipeline_rank_{self.model_mesh.get_local_rank()}"]

    def split_record(self) -> dict[str, Any]:
        return {"kind": "pipeline", "stages": [list(r) for r in self.ranges],
                "pipeline_parallel_size": self.model_mesh.size(), "stages_per_rank": self.stages_per_rank}

    def check_split(self, saved: dict[str, Any], path: Path) -> None:
        if saved.get("kind") != "pipeline":
            raise CheckpointError(f"{path} was not written by lit_pipeline (its split record: "
                                  f"{saved.get('kind') or 'none'}): consolidate it (python -m lit_llm.convert "
                                  "consolidate) and start from the file with model.init_args.init_weights")
        mine = self.split_record()
        if saved.get("stages") != mine["stages"] or saved.get("pipeline_parallel_size") != mine[
                "pipeline_parallel_size"]:
            raise CheckpointError(f"{path} holds pipeline stages {saved.get('stages')} over "
                                  f"{saved.get('pipeline_parallel_size')} processes, this run {mine['stages']} over "
                                  f"{mine['pipeline_parallel_size']}: resume with the same trainer.strategy.stages "
                                  "and processes per pipeline, or consolidate it and start from the file with "
                                  "model.init_args.init_weights")



