"""A shuffling sampler and a DataLoader that resume exactly in the middle of an epoch.

The order of epoch ``e`` is a function of ``(seed, e)`` alone, so it can be recomputed after a restart;
the saved state is just ``(epoch, samples already consumed)``. :class:`ResumableLoader` is what Lightning sees:
a ``DataLoader`` with ``state_dict``/``load_state_dict``, which Lightning's fit loop saves in the checkpoint
(``loops.fit_loop.state_dict.combined_loader``) and hands back before it creates the next iterator.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ResumableSampler(DistributedSampler):
    """Seeded shuffling sampler with a resumable position, sharded over ranks like ``DistributedSampler``.

    Epoch ``e``'s order depends only on ``(seed, e)``: it is the order a ``DataLoader(shuffle=True)`` with a generator
    seeded by ``seed`` gives in its ``e``-th epoch, so the data order of runs made before this sampler is unchanged.

    It subclasses ``DistributedSampler`` so that Lightning keeps it under DDP (Lightning only replaces samplers that
    are not ``DistributedSampler`` instances); ``use_distributed_sampler`` can stay on.

    Args:
        dataset_size: Number of samples in the dataset.
        seed: Seed of the shuffle; the order of epoch ``e`` is a function of ``seed`` and ``e``.
        shuffle: Shuffle every epoch; ``False`` yields ``0..n-1`` in order.
        drop_last: Drop the tail that does not split evenly over ranks (otherwise pad by repeating samples).
        num_replicas: Number of ranks; ``None`` reads ``torch.distributed`` (1 when not initialised).
        rank: This rank; ``None`` reads ``torch.distributed`` (0 when not initialised).
    """

    def __init__(
        self,
        dataset_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        # DistributedSampler.__init__ insists on an initialised process group; the shard is resolved lazily instead.
        self.dataset_size = dataset_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self._num_replicas = num_replicas
        self._rank = rank
        self.epoch = 0
        self._start = 0  # samples of this rank's shard to skip at the next __iter__ (set by load_state_dict) ...
        self._start_epoch = 0  # ... if that iteration is of this epoch
        self._yielded = 0  # samples of this rank's shard yielded so far in the current epoch

    @property
    def num_replicas(self) -> int:  # type: ignore[override]
        return self._num_replicas if self._num_replicas is not None else _world()[0]

    @property
    def rank(self) -> int:  # type: ignore[override]
        return self._rank if self._rank is not None else _world()[1]

    def __len__(self) -> int:
        """Samples this rank yields in a whole epoch (also after a mid-epoch resume)."""
        if self.drop_last:
            return self.dataset_size // self.num_replicas
        return math.ceil(self.dataset_size / self.num_replicas)

    def indices(self, epoch: int) -> list[int]:
        """This rank's samples of ``epoch``, in order."""
        if self.shuffle:
            order = self._permutation(epoch)
        else:
            order = list(range(self.dataset_size))
        total = len(self) * self.num_replicas
        if total > len(order):  # pad by repeating, as DistributedSampler does
            order += (order * math.ceil(total / max(len(order), 1)))[: total - len(order)]
        return order[:total][self.rank : total : self.num_replicas]

    def resume_offset(self) -> int:
        """Samples the next iteration skips: the part of a resumed epoch that was already consumed."""
        return self._start if self.epoch == self._start_epoch else 0

    def _permutation(self, epoch: int) -> list[int]:
        """Epoch ``epoch``'s shuffle: the same order as ``DataLoader(shuffle=True, generator=Generator().manual_seed(
        seed))`` gives in that epoch (lit_llm's order before this sampler), so earlier runs keep their data order.

        Per epoch, that loader draws one number for its workers' base seed, then its ``RandomSampler`` draws two
        ``randperm`` (the second for an empty remainder) from the one generator. The sampler replays those draws,
        caching the generator, so moving to the next epoch costs two permutations.
        """
        cached = getattr(self, "_perm_cache", None)
        if cached is not None and cached[0] == epoch:
            return cached[2]
        generator = torch.Generator()
        if cached is not None and cached[0] < epoch:
            done = cached[0]
            generator.set_state(cached[1])
        else:
            done = -1
            generator.manual_seed(self.seed)
        while done < epoch:
            torch.empty((), dtype=torch.int64).random_(generator=generator)  # the DataLoader's base-seed draw
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
            torch.randperm(self.dataset_size, generator=generator)  # RandomSampler's (empty) remainder draw
            done += 1
        self._perm_cache = (epoch, generator.get_state(), order)
        return order

    def __iter__(self) -> Iterator[int]:
        start, self._start = self.resume_offset(), 0
        order = self.indices(self.epoch)
        self._yielded = start
        for index in order[start:]:
            self._yielded += 1
            yield index

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration uses (Lightning calls this every epoch)."""
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        """The epoch and how many of this rank's samples were yielded in it."""
        return {"epoch": self.epoch, "yielded": self._yielded, "num_replicas": self.num_replicas}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Continue from ``state_dict``: the next iteration yields the rest of that epoch, in the same order."""
        saved_replicas = state_dict.get("num_replicas", self.num_replicas)
        yielded = int(state_dict["yielded"])
        if saved_replicas != self.num_replicas:
            warnings.warn(
                f"the checkpoint's sampler state is from {saved_replicas} ranks but this run has {self.num_replicas}; "
                "the resumed epoch skips about the same number of samples but not the same ones. Resume on "
                f"{saved_replicas} ranks for an exact resume.",
                stacklevel=2,
            )
            yielded = yielded * saved_replicas // self.num_replicas
        self.epoch = int(state_dict["epoch"])
        if yielded >= len(self):  # saved at the end of an epoch: the next one starts from its beginning
            self.epoch, yielded = self.epoch + 1, 0
        self._start, self._start_epoch = yielded, self.epoch
        self._yielded = yielded


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose position is saved in Lightning checkpoints.

    The loader counts batches *consumed* (``consumed()``, called by the DataModule once per training batch), not
    batches fetched: Lightning prefetches a batch ahead and worker processes prefetch more, so the sampler's own
    count runs ahead of training. Construct it like a ``DataLoader`` without ``shuffle``/``sampler``.

    Args:
        dataset: The map-style dataset.
        sampler: The resumable sampler.
        **kwargs: Other ``DataLoader`` arguments (``batch_size``, ``drop_last``, ``num_workers``, ...).
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._batches = 0

    def __iter__(self):  # noqa: ANN204 - DataLoader's iterator type is private
        self._batches = self.sampler.resume_offset() // (self.batch_size or 1)
        return super().__iter__()

    def consumed(self, n: int = 1) -> None:
        """Record that training used ``n`` more batches of the current epoch."""
        self._batches += n

    def state_dict(self) -> dict[str, int]:
        """Epoch and samples (of this rank) consumed by training; saved by Lightning's fit loop."""
        sampler: ResumableSampler = self.sampler
        return {
            "epoch": sampler.epoch,
            "yielded": self._batches * (self.batch_size or 1),
            "num_replicas": sampler.num_replicas,
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume the sampler where training stopped; the next iterator yields the rest of that epoch."""
        self.sampler.load_state_dict(state_dict)
        self._batches = self.sampler.resume_offset() // (self.batch_size or 1)


class CountsConsumedBatches:
    """DataModule mixin: tell the training :class:`ResumableLoader` (kept in ``self._train_loader``) each batch that
    training takes, so a checkpoint saves the position of training rather than of prefetching.

    List it before ``LightningDataModule`` in the bases, so its ``on_before_batch_transfer`` is the one called.
    """

    _train_loader: ResumableLoader | None = None

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer  # type: ignore[attr-defined] - provided by LightningDataModule
        if trainer is not None and trainer.training and self._train_loader is not None:
            self._train_loader.consumed()
        return batch
