"""A resumable loader: batch order is a function of (seed, epoch), and any epoch can start at any batch."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, default_collate

from .._rng import derive_seed
from ..distributed._group import dist_info

__all__ = ["Loader"]


class Loader:
    """Batches of a map-style dataset in an order fixed by ``(seed, epoch)``, resumable at any batch.

    The fold asks for ``loader.iter_epoch(epoch, start)`` with the epoch and batch offset
    held in ``state.data``, so a resumed run continues with exactly the next batch —
    without loading the batches before it. Shuffling is a pure function of
    ``(seed, epoch)``; it never reads torch's global random state.

    Args:
        dataset: a tuple of tensors sharing their first dimension (indexed in one
            operation per batch — the fast path), or any map-style dataset
            (``__getitem__`` and ``__len__``, e.g. a ``torch.utils.data.Dataset``).
        batch_size: samples per batch.
        shuffle: permute the samples each epoch (default: dataset order).
        seed: the seed of the permutation and of the augmentations' random draws.
        drop_last: drop a final batch smaller than ``batch_size``.
        collate_fn: builds a batch from a list of samples (map-style datasets only;
            default ``torch.utils.data.default_collate``).
        num_workers: worker processes for map-style datasets (``torch.utils.data.DataLoader``).
            With or without workers, batch ``b`` of a map-style dataset is fetched and collated after
            seeding torch's (CPU), Python's and NumPy's global generators from ``(seed, epoch,
            rank, b)`` (in this process they are restored afterwards), so random
            augmentations (a ``collate_fn``'s too) are the same whether the epoch started at batch 0
            or resumed at ``b``.
        rank, world_size: this process's share of the data (default: the current process
            group's, see :func:`fnlight.init_distributed`). Ranks serve disjoint strided
            shares of the same ``(seed, epoch)`` order; use ``drop_last=True`` for training
            so every rank makes the same number of steps. Evaluation with
            ``drop_last=False`` serves every sample exactly once (no padding duplicates).

    Raises:
        TypeError, ValueError: a dataset of the wrong kind, tensors of unequal lengths,
            or an option out of range.

    >>> import torch, fnlight as fl
    >>> loader = fl.Loader((torch.arange(10),), batch_size=4, shuffle=True, seed=0)
    >>> len(loader), [b[0].tolist() for b in loader.iter_epoch(0, start=2)] == [list(loader.iter_epoch(0))[2][0].tolist()]
    (3, True)
    """

    def __init__(
        self,
        dataset: Sequence[Any] | tuple[Tensor, ...],
        *,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Loader: batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"Loader: seed must be an int, got {seed!r}")
        if not -(2**63) <= seed < 2**63:  # as TrainStep.init: wider seeds would wrap onto others' orders
            raise ValueError(f"Loader: seed must fit in int64, in [-2**63, 2**63), got {seed!r}")
        for flag, value in (("shuffle", shuffle), ("drop_last", drop_last)):
            if not isinstance(value, bool):
                raise TypeError(f"Loader: {flag} must be a bool, got {value!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"Loader: num_workers must be an int >= 0, got {num_workers!r}")
        self.tensors: tuple[Tensor, ...] | None = None
        if isinstance(dataset, tuple) and any(isinstance(t, Tensor) for t in dataset):
            # a tuple mixing tensors with arrays or lists was read as a map-style dataset of len(dataset) samples
            others = [(i, type(t).__name__) for i, t in enumerate(dataset) if not isinstance(t, Tensor)]
            if others:
                raise TypeError(
                    f"Loader: a tuple dataset must hold only tensors sharing their first dimension (x, y, ...), got "
                    f"{others[0][1]} at position {others[0][0]}; convert it with torch.as_tensor(...)"
                )
            scalars = [i for i, t in enumerate(dataset) if t.dim() == 0]
            if scalars:
                raise ValueError(
                    "Loader: the dataset's tensors must have a first (sample) dimension, "
                    f"got a 0-d tensor at position {scalars[0]}"
                )
        if isinstance(dataset, tuple) and dataset and all(isinstance(t, Tensor) for t in dataset):
            lengths = {len(t) for t in dataset}
            if len(lengths) != 1:
                raise ValueError(f"Loader: the dataset's tensors must share their first dimension, got lengths {sorted(lengths)}")
            self.tensors = dataset
            if collate_fn is not None or num_workers:
                raise ValueError("Loader: collate_fn and num_workers apply to map-style datasets, not to a tuple of tensors")
        elif isinstance(dataset, Mapping) and any(isinstance(k, str) for k in dataset):
            raise TypeError(
                f"Loader: got a mapping keyed by name ({sorted(map(str, dataset))[:4]}), which is read as a dataset "
                f"indexed 0..{len(dataset) - 1}; for named tensors pass a tuple, e.g. Loader((x, y), batch_size=...)"
            )
        elif (
            isinstance(dataset, list)
            and collate_fn is None
            and all(isinstance(t, Tensor) for t in dataset)
            and len({t.shape for t in dataset}) > 1
        ):
            raise TypeError(
                f"Loader: got a list of {len(dataset)} tensors of different shapes, which the default collate cannot "
                f"batch as samples; for a dataset of several tensors (inputs, targets) pass a tuple, e.g. "
                f"Loader((x, y), batch_size=...); for samples of different sizes pass a collate_fn"
            )
        elif isinstance(dataset, IterableDataset):  # has Dataset's __getitem__, which raises NotImplementedError
            raise TypeError(
                f"Loader: got an IterableDataset ({type(dataset).__name__}), which has no indexed access to shuffle or "
                f"resume from; pass it (or a DataLoader over it) to fold as data directly, or use a map-style dataset"
            )
        elif not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError(
                f"Loader: dataset must be a tuple of tensors or a map-style dataset (__getitem__ and __len__), "
                f"got {type(dataset).__name__}"
            )
        info = dist_info()
        rank = info.rank if rank is None else rank
        world_size = info.world_size if world_size is None else world_size
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"Loader: world_size must be an int >= 1, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"Loader: rank must be an int in [0, {world_size}), got {rank!r}")
        self.rank, self.world_size = rank, world_size
        self.dataset = dataset
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.collate_fn = collate_fn or default_collate
        self.num_workers = num_workers

    @property
    def num_samples(self) -> int:
        """Samples in the dataset."""
        return len(self.tensors[0]) if self.tensors is not None else len(self.dataset)

    @property
    def shard_size(self) -> int:
        """Samples this rank serves per epoch (all of them in one process)."""
        return self._shard_size(self.rank)

    def _shard_size(self, rank: int) -> int:
        n, w = self.num_samples, self.world_size
        return n // w if self.drop_last else len(range(rank, n, w))

    def batches_on(self, rank: int) -> int:
        """Batches rank ``rank`` serves per epoch (``len(loader)`` for this process's rank).

        >>> import torch, fnlight as fl
        >>> loader = fl.Loader((torch.arange(9),), batch_size=2, rank=0, world_size=2)
        >>> [loader.batches_on(r) for r in range(2)]  # 5 and 4 samples
        [3, 2]
        """
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"Loader.batches_on: rank must be an int in [0, {self.world_size}), got {rank!r}")
        n, b = self._shard_size(rank), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __len__(self) -> int:
        return self.batches_on(self.rank)

    def order(self, epoch: int) -> Tensor:
        """The sample indices this rank serves in ``epoch``, in order.

        Every rank computes the same global order from ``(seed, epoch)`` and takes every
        ``world_size``-th sample from its ``rank`` on: no sample is served twice. With
        ``drop_last`` the global order is first cut to a multiple of ``world_size`` so every
        rank serves as many samples (needed for training, where ranks step together).
        """
        if not self.shuffle:
            order = torch.arange(self.num_samples)
        else:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            order = torch.randperm(self.num_samples, generator=generator)
        if self.world_size == 1:
            return order
        if self.drop_last:
            order = order[: self.shard_size * self.world_size]
        return order[self.rank :: self.world_size]

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """The batches of ``epoch`` from batch number ``start`` on.

        Raises:
            ValueError: ``epoch`` is not an int >= 0, or ``start`` not an int in ``[0, len(self)]``.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"Loader.iter_epoch: epoch must be an int >= 0, got {epoch!r}")
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= len(self):
            hint = ""
            if isinstance(start, int) and not isinstance(start, bool) and start > len(self):  # a fold resuming a state
                hint = (
                    f" (a resumed state's position, state.data.batch = {start}, past this loader's {len(self)} batches "
                    "per epoch: the state was saved by a run with other data or another batch size)"
                )
            raise ValueError(f"Loader.iter_epoch: start must be an int in [0, {len(self)}], got {start!r}{hint}")
        order = self.order(epoch)
        chunks = [
            order[i : i + self.batch_size] for i in range(start * self.batch_size, len(self) * self.batch_size, self.batch_size)
        ]
        if self.tensors is not None:
            tensors = self.tensors
            return (tuple(t[idx] for t in tensors) for idx in chunks)
        # batch b's samples are drawn after seeding the random generators from (seed, epoch, rank, b), so
        # augmentations do not depend on which batches came before (a resumed epoch draws what it drew)
        base = derive_seed(self.seed, epoch, self.rank)
        keyed = [[(b, i) for i in idx.tolist()] for b, idx in enumerate(chunks, start)]
        if not self.num_workers:
            seeded, collate = _SeededBatches(self.dataset, base), self.collate_fn
            return (seeded.draw(batch, collate) for batch in keyed)
        loader = DataLoader(
            _SeededBatches(self.dataset, base),  # type: ignore[arg-type]
            batch_sampler=keyed,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            generator=torch.Generator().manual_seed(base),  # the workers' base seed; torch's global state is left alone
        )
        return iter(loader)

    def __iter__(self) -> Iterator[Any]:
        return self.iter_epoch(0)


class _SeededBatches:
    """A map-style dataset whose batches are drawn under generators seeded from the batch's number.

    Given one batch as ``(batch number, index)`` pairs (the ``batch_sampler`` of
    ``Loader.iter_epoch``), :meth:`__getitems__` seeds torch's, Python's and NumPy's global
    generators (torch's CPU one) from ``derive_seed(base, batch number)`` and fetches the samples. In a
    ``DataLoader`` worker it runs in the worker's process; :meth:`draw` does the same in this
    process and then restores the generators' states.
    """

    def __init__(self, dataset: Any, base: int) -> None:
        self.dataset, self.base = dataset, base

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, keyed: list[tuple[int, int]]) -> list[Any]:
        seed = derive_seed(self.base, keyed[0][0])
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it seeds (or queues) CUDA's too, unrestored
        random.seed(seed)
        np.random.seed(seed % 2**32)
        indices = [i for _, i in keyed]
        getitems = getattr(self.dataset, "__getitems__", None)
        return list(getitems(indices)) if getitems else [self.dataset[i] for i in indices]

    def draw(self, keyed: list[tuple[int, int]], collate: Callable[[list[Any]], Any]) -> Any:
        """:meth:`__getitems__` and ``collate`` of its samples in this process, as a worker runs them (a collate_fn
        that draws, MixUp's, draws from the batch's seed), leaving torch's, Python's and NumPy's generators as they were."""
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            try:
                return collate(self.__getitems__(keyed))
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)
