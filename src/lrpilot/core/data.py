"""In-memory mini-batching and the checks that turn bad data into errors naming the problem."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, Subset

__all__ = ["TensorLoader", "carve", "check_batch", "num_samples", "split_batch"]


class TensorLoader:
    """Mini-batches over tensors held in memory, much faster than a ``DataLoader`` on small data.

    The shuffle order of epoch ``e`` is a pure function of ``(seed, e)``: the loop calls
    :meth:`set_epoch` (the ``DistributedSampler`` convention), so a resumed or rolled-back run sees
    exactly the data order it would have seen, with no iterator state to save. Under
    ``torch.distributed`` each rank takes every ``world_size``-th sample of the same permutation.

    Args:
        inputs, targets: tensors with the same first dimension.
        batch_size: samples per batch (per rank when sharded).
        shuffle: reshuffle every epoch.
        seed: base seed of the shuffle.
        drop_last: drop the last incomplete batch.
        rank, world_size: shard for distributed training.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"inputs have {len(inputs)} samples but targets have {len(targets)}")
        if not (isinstance(batch_size, int) and batch_size > 0):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.inputs = inputs
        self.targets = targets
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (every rank sees the same number)."""
        return len(self.inputs) // self.world_size if self.world_size > 1 else len(self.inputs)

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        n = len(self.inputs)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            # Equal shards (drop the remainder) so every rank takes the same number of steps.
            order = order[: self.num_samples * self.world_size][self.rank :: self.world_size]
        return order

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            if self.drop_last and len(idx) < self.batch_size:
                break
            yield self.inputs[idx], self.targets[idx]

    def split(self, fraction: float, *, seed: int) -> tuple[TensorLoader, TensorLoader]:
        """``(rest, held_out)``: a seeded ``fraction`` of the samples held out (at least one, at most all but
        one), e.g. the decision split a pilot decides from. ``rest`` keeps this loader's settings and the
        original order of its samples; ``held_out`` is unshuffled and unsharded (an evaluation set)."""
        n = len(self.inputs)
        if not (0 < fraction < 1):
            raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction!r}")
        if n < 2:
            raise ValueError(f"cannot hold out part of {n} sample(s)")
        k = min(max(1, round(fraction * n)), n - 1)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        held, kept = perm[:k].sort().values, perm[k:].sort().values
        rest = TensorLoader(
            self.inputs[kept], self.targets[kept], self.batch_size, shuffle=self.shuffle, seed=self.seed,
            drop_last=self.drop_last, rank=self.rank, world_size=self.world_size,
        )  # fmt: skip
        rest.epoch = self.epoch
        return rest, TensorLoader(self.inputs[held], self.targets[held], self.batch_size, shuffle=False)

    def to(self, device: torch.device | str) -> TensorLoader:
        """The same loader with its tensors moved to ``device`` (once, not per batch)."""
        moved = TensorLoader(
            self.inputs.to(device),
            self.targets.to(device),
            self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            drop_last=self.drop_last,
            rank=self.rank,
            world_size=self.world_size,
        )
        moved.epoch = self.epoch
        return moved


def split_batch(batch: Any, *, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` from a loader's batch, or a ``TypeError`` saying what was expected."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            return x, y
    kind = type(batch).__name__
    detail = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
    raise TypeError(f"{where} must yield (inputs, targets) pairs of tensors; got a {kind}{detail}")


def check_batch(x: torch.Tensor, y: torch.Tensor, *, where: str) -> None:
    """Raise ``ValueError`` naming the problem for a batch the loop cannot train on."""
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(f"{where}: inputs and targets need a batch dimension (got shapes {tuple(x.shape)}, {tuple(y.shape)})")
    if len(x) != len(y):
        raise ValueError(f"{where}: a batch has {len(x)} inputs but {len(y)} targets")
    if len(x) == 0:
        raise ValueError(f"{where}: yielded an empty batch")
    if y.is_floating_point() and not bool(torch.isfinite(y).all()):
        raise ValueError(f"{where}: targets contain NaN or inf; clean the data (e.g. drop or impute those rows)")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{where}: inputs contain NaN or inf; clean the data (e.g. drop or impute those rows)")


def carve(loader: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """``(rest, held_out)``: ``loader`` less a seeded ``fraction`` of its samples, and those samples as an
    unshuffled evaluation loader (:meth:`TensorLoader.split`; a ``DataLoader`` over a sized dataset becomes
    two over ``Subset`` objects with its settings). A decision split: data a method decides from that no result is
    scored on. Raises ``TypeError`` for a loader whose samples cannot be indexed (an iterable dataset)."""
    if isinstance(loader, TensorLoader):
        return loader.split(fraction, seed=seed)
    dataset = getattr(loader, "dataset", None)
    if isinstance(loader, DataLoader) and not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__"):
        n = len(dataset)
        k = min(max(1, round(fraction * n)), n - 1)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        held, kept = perm[:k].sort().values.tolist(), perm[k:].sort().values.tolist()
        common = {"batch_size": loader.batch_size, "num_workers": loader.num_workers,
                  "collate_fn": loader.collate_fn, "pin_memory": loader.pin_memory}  # fmt: skip
        shuffle = isinstance(loader.sampler, RandomSampler)
        rest = DataLoader(Subset(dataset, kept), shuffle=shuffle, drop_last=loader.drop_last,
                          generator=loader.generator, **common)  # fmt: skip
        return rest, DataLoader(Subset(dataset, held), shuffle=False, **common)
    what = type(loader).__name__ + ("" if dataset is None else f" over a {type(dataset).__name__}")
    raise TypeError(
        f"lrpilot carves a split out of the training data only from a TensorLoader or a DataLoader over a "
        f"sized dataset, not a {what}"
    )


def num_samples(loader: Any) -> int:
    """The number of samples a :class:`TensorLoader` or a ``DataLoader`` over a sized dataset holds."""
    if isinstance(loader, TensorLoader):
        return loader.num_samples
    return len(loader.dataset)
