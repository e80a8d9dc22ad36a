"""What the tensor- and pipeline-parallel strategies share: a named device mesh, data fed per data-parallel replica,
one task check, and checkpoints in PyTorch's distributed-checkpoint layout with a record of how the model was split.

Both strategies are Lightning ``ModelParallelStrategy`` subclasses (its launcher, process group, collectives and
``torch.distributed.checkpoint`` save), with a two-dimensional mesh of their own: ``("data_parallel", <model>)``,
where ``<model>`` is ``tensor_parallel`` or ``pipeline_parallel``. Consecutive ranks form one model replica (a
tensor-parallel group or a pipeline), so on GPUs its traffic stays on the fastest links of a node.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pytorch_lightning.strategies import ModelParallelStrategy
from pytorch_lightning.strategies.parallel import ParallelStrategy
from pytorch_lightning.utilities import rank_zero_warn

from lit_llm.distributed.common import AtomicDirectorySave
from lit_llm.errors import CheckpointError, ConfigError
from lit_llm.weights.files import torch_load

#: The key of the checkpoint entry (in ``meta.pt``) that says how the model was split when it was saved.
SPLIT_KEY = "model_parallel"
_META_FILE = "meta.pt"


class MeshStrategy(ModelParallelStrategy):
    """Base of ``lit_tp``/``lit_tp_fsdp`` and ``lit_pipeline``: a ``(data_parallel, <model dim>)`` mesh over every rank.

    Subclasses name the model dimension (``model_dim``), decide its size from the world size
    (``model_parallel_size``), split the GPT in ``parallelize_task`` (called by the task at the end of
    ``configure_model``) and describe the split they saved (``split_record``).
    """

    #: Name of the mesh dimension that splits one model replica.
    model_dim = "model_parallel"
    #: Samples printed during training need the whole model's forward on one rank with a KV cache; a split model
    #: has no such forward, so ``SampleGeneration`` skips them (with one warning).
    supports_generation = False

    def __init__(self, **kwargs: Any) -> None:
        """
        Args:
            **kwargs: Lightning's ``ModelParallelStrategy`` arguments ``process_group_backend`` and ``timeout``.
        """
        super().__init__(data_parallel_size="auto", tensor_parallel_size="auto", save_distributed_checkpoint=True,
                         **kwargs)
        self._model_size: int | None = None

    # ---- the mesh --------------------------------------------------------------------------------------------------
    def model_parallel_size(self, world_size: int, processes_per_node: int) -> int:
        """Ranks that hold one replica of the model (overridden by the subclasses)."""
        raise NotImplementedError

    def setup_environment(self) -> None:
        # ModelParallelStrategy's own mesh is (data_parallel, tensor_parallel); this one names the model dimension.
        ParallelStrategy.setup_environment(self)
        self._setup_distributed()
        size = self.model_parallel_size(self.world_size, self.num_processes)
        if size < 1 or self.world_size % size:
            raise ConfigError(f"{self.model_dim}_size={size} (trainer.strategy) must divide the {self.world_size} "
                              f"processes (trainer.devices x trainer.num_nodes): choose a divisor of "
                              f"{self.world_size}, or change trainer.devices")
        self._model_size = size
        self._data_parallel_size = self.world_size // size
        self._tensor_parallel_size = size  # Lightning's name for the inner dimension
        from torch.distributed.device_mesh import init_device_mesh

        self._device_mesh = init_device_mesh(self.root_device.type, (self.world_size // size, size),
                                             mesh_dim_names=("data_parallel", self.model_dim))
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh

    @property
    def data_parallel_size(self) -> int:
        """Model replicas that see different data (the sampler's number of replicas); 1 before setup."""
        return self.world_size // self._model_size if self._model_size else 1

    @property
    def model_mesh(self) -> Any:
        """The one-dimensional mesh of the ranks that hold this rank's model replica."""
        return self.device_mesh[self.model_dim]

    @property
    def data_mesh(self) -> Any:
        """The one-dimensional mesh of the ranks that hold the same part of the model for other data."""
        return self.device_mesh["data_parallel"]

    def process_dataloader(self, dataloader: Any) -> Any:
        # lit_llm's resumable samplers shard over torch.distributed's world unless told otherwise, and Lightning
        # leaves DistributedSampler subclasses as they are: here the data is sharded over the model replicas only,
        # so that every rank of one replica gets the same batch.
        from lit_llm.data.sampler import ResumableSampler

        sampler = getattr(dataloader, "sampler", None)
        if isinstance(sampler, ResumableSampler) and self._device_mesh is not None:
            sampler._num_replicas = self.data_mesh.size()
            sampler._rank = self.data_mesh.get_local_rank()
        return dataloader

    # ---- the task --------------------------------------------------------------------------------------------------
    def check_task(self, task: Any, name: str) -> None:
        """Refuse what the split GPT does not run, in one error; turn off the head's loss variants with a warning."""
        from lit_llm.tasks.pretrain import PretrainTask

        problems = []
        if not isinstance(task, PretrainTask):
            problems.append(f"{name} (trainer.strategy) trains pretraining runs (lit_llm.tasks.PretrainTask) only, "
                            f"not {type(task).__name__}: use trainer.strategy=lit_fsdp2, lit_fsdp or lit_ddp for it")
        if getattr(task, "lora_config", None) is not None:
            problems.append(f"model.lora cannot be combined with {name} (trainer.strategy): remove one of the two")
        if problems:
            raise ConfigError("; ".join(problems))
        model = task.model
        for flag, attribute in (("chunked_loss", "loss_chunk"), ("fused_loss", "fused_loss")):
            if getattr(model, attribute, None):
                rank_zero_warn(f"model.speed.{flag} is off under {name} (trainer.strategy): the split head computes "
                               "its "
                               "own cross-entropy", category=UserWarning)
                setattr(model, attribute, None if attribute == "loss_chunk" else False)

    def parallelize_task(self, task: Any) -> None:
        """Split ``task.model`` over this rank's mesh (called by ``GPTTask.configure_model``)."""
        raise NotImplementedError

    # ---- checkpoints -----------------------------------------------------------------------------------------------
    def split_record(self) -> dict[str, Any]:
        """What a checkpoint must record of the split for consolidation and resuming (overridden)."""
        return {}

    def check_split(self, saved: dict[str, Any], path: Path) -> None:
        """Raise a CheckpointError when the saved split cannot be resumed by this run (overridden)."""

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any | None = None) -> None:

        checkpoint[SPLIT_KEY] = self.split_record()
        # Written into <path>.tmp and renamed once every rank has finished, as lit_llm's other directory checkpoints.
        AtomicDirectorySave._atomic_directory_save(self, super().save_checkpoint, checkpoint, filepath,
                                                    storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Read this rank's part of a checkpoint directory written by the same kind of split.

        Lightning's reader wants DTensor parameters; a pipeline stage's are plain tensors, so the model and
        optimizer states are read here with ``torch.distributed.checkpoint`` by their full names, whatever the
        parameters are."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        if not path.is_dir() or not (path / _META_FILE).is_file():
            raise CheckpointError(f"{path} is not a checkpoint directory of {self.strategy_label} (it needs .metadata "
                                  f"and {_META_FILE}); resume it under the strategy that wrote it")
        metadata = torch_load(path / _META_FILE)
        self.check_split(metadata.pop(SPLIT_KEY, None) or {}, path)
        assert self.model is not None
        state = {"state_dict": get_model_state_dict(self.model)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(self.model, state["state_dict"])
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optim_state = {key: self.optimizer_entry(get_optimizer_state_dict(self.model, optimizer))}
            dcp.load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer,
                                     optim_state_dict=self.from_optimizer_entry(optim_state[key]))
        return metadata

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        return self.optimizer_entry(super().optimizer_state(optimizer))

    def optimizer_entry(self, state: dict[str, Any]) -> dict[str, Any]:
        """How this rank's optimizer state is stored in the checkpoint (overridden where ranks hold different
        parameters: the distributed checkpoint takes an entry saved under the same name by several ranks for one
        replicated value)."""
        return state

    def from_optimizer_entry(self, entry: dict[str, Any]) -> dict[str, Any]:
        """The inverse of :meth:`optimizer_entry`."""
        return entry

    @property
    def strategy_label(self) -> str:
        return getattr(self, "strategy_name", type(self).__name__)


def sum_over(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """All-reduce ``tensor`` in place with a sum over ``group`` (gloo has no average) and return it."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def quiet_experimental_warnings() -> None:
    """PyTorch marks its pipelining and tensor-parallel APIs experimental in warnings at every use; once is enough."""
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.pipelining.*experimental.*")


def splits_model(strategy: Any) -> bool:
    """Tensor or pipeline parallel: the strategy splits the GPT itself once the task has built it."""
    return isinstance(strategy, MeshStrategy)
