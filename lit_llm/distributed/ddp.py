"""``lit_ddp``: DDP with gradients reduced in place in the communication buckets, and a compiled model kept in one
graph (``split_compiled_graph``): PyTorch would otherwise cut the compiled graph at every bucket to overlap each
all-reduce with the rest of the backward, which measured slower than reducing all buckets after it. Averaging inside
the collective (``average_in_collective``) is an option, off by default (it measured no faster)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
from pytorch_lightning.strategies import (
    DDPStrategy,
)

from lit_llm.errors import ConfigError


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
                and no communication competing with the backward for the GPU. Without ``model.speed.compile`` it changes
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
