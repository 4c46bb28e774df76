"""The position in the data as training state: a resumable, shuffling sampler."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler[int]):
    """Shuffled indices whose position is checkpointed, so a resume continues mid-epoch.

    Epoch ``e`` is a permutation drawn by the sampler's own ``torch.Generator`` seeded with
    ``seed + e`` (the global RNG is never touched, so dropout draws stay where they were).
    ``state_dict()`` is ``{"seed", "epoch", "position"}``: ``position`` counts the samples
    of this epoch's order that training has received. After ``load_state_dict()`` the next
    pass over the loader starts at the next index, and once an epoch is used up the next
    pass starts the next epoch.

    The pattern, with any number of workers::

        sampler = aiockpt.ResumableSampler(dataset, seed=0)
        loader = DataLoader(dataset, batch_size=32, sampler=sampler, num_workers=2,
                            generator=torch.Generator())              # (1)
        trainer = aiockpt.Trainer(model, opt, loss_fn, config=cfg, sampler=sampler)
        await trainer.resume()
        while trainer.step < total_steps:
            for batch in sampler.track(loader):                       # (2)
                await trainer.train_step(batch)

    (1) Give the DataLoader a ``generator``: each ``iter(loader)`` draws a worker base seed
    from it, and without one it draws from torch's global RNG, so a resumed run (which
    makes one more iterator) would see different dropout masks.
    (2) ``track`` counts the batches training has received. A DataLoader with workers
    pulls indices ahead (``prefetch_factor * num_workers`` batches), so what the sampler
    has handed out is not what training has consumed. With ``num_workers=0`` the loader
    pulls indices only when a batch is asked for, and ``for batch in loader`` is exact too.

    ``set_epoch(e)`` (the DistributedSampler convention) starts epoch ``e`` from its first
    index, unless ``e`` is the current epoch: a loop that calls it at the top of every
    epoch keeps a restored mid-epoch position. Start such a loop at ``sampler.epoch``.
    Randomness inside workers (augmentation) is not covered: seed it from the epoch and
    the sample index if it must be exact.

    Args:
        data_source: the data set (anything with ``len()``), or its size.
        seed: epoch ``e`` is shuffled by a generator seeded with ``seed + e``.
        shuffle: False hands out ``0, 1, 2, ...`` in order (the position is still saved).

    Raises:
        ValueError: a negative size.
        TypeError: a ``seed`` that is not an int.
    """

    def __init__(self, data_source: Sized | int, *, seed: int = 0, shuffle: bool = True) -> None:
        length = data_source if isinstance(data_source, int) else len(data_source)
        if isinstance(length, bool) or length < 0:
            raise ValueError(f"ResumableSampler needs a data set size >= 0, got {length!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._tracked = False

    def __len__(self) -> int:
        return self.length

    def order(self, epoch: int) -> torch.Tensor:
        """The indices of ``epoch`` in the order they are drawn.

        Args:
            epoch: the epoch, from 0.

        Returns:
            A permutation of ``range(len(self))`` (in order when ``shuffle`` is False).
        """
        if not self.shuffle:
            return torch.arange(self.length)
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        return torch.randperm(self.length, generator=generator)

    def __iter__(self) -> Iterator[int]:
        # A plain function, not a generator: the mode is fixed when the DataLoader asks
        # for the iterator, not when it first pulls from it.
        indices = self.order(self.epoch)[self.position :].tolist()
        if self._tracked:
            return iter(indices)  # track() owns the position; run-ahead must not move it
        return self._counting(self.epoch, self.position, indices)

    def _counting(self, epoch: int, start: int, indices: list[int]) -> Iterator[int]:
        for offset, index in enumerate(indices, start + 1):
            self.position = offset
            yield index
        self.epoch, self.position = epoch + 1, 0

    def track(self, loader: DataLoader[Any]) -> Iterator[Any]:
        """Iterate ``loader`` (built on this sampler), advancing the position per batch.

        Args:
            loader: a DataLoader whose ``sampler`` is this one.

        Yields:
            The loader's batches; the position counts each one once it is handed over.
        """
        if not isinstance(loader, DataLoader) or loader.sampler is not self:
            raise ValueError(
                "track() needs a torch DataLoader built with sampler=this sampler "
                "(DataLoader(dataset, batch_size=..., sampler=sampler))"
            )
        if loader.batch_size is None:
            raise ValueError(
                "track() needs DataLoader(batch_size=...) to count samples per batch; "
                "with a batch_sampler, iterate the loader directly with num_workers=0"
            )
        if loader.generator is None:
            raise ValueError(
                "give the DataLoader its own generator (DataLoader(..., "
                "generator=torch.Generator())): otherwise every iter(loader) draws from "
                "torch's global RNG and a resumed run's dropout masks differ"
            )
        return self._tracking(loader, loader.batch_size)

    def _tracking(self, loader: DataLoader[Any], batch_size: int) -> Iterator[Any]:
        epoch, start = self.epoch, self.position
        # The DataLoader asks for iter(sampler) lazily (at its first batch, or while
        # prefetching), so the mode holds for as long as this pass runs.
        self._tracked = True
        try:
            for count, batch in enumerate(loader, 1):
                # In-order delivery: batch k holds indices [start + (k-1)B, start + kB).
                self.epoch, self.position = epoch, min(start + count * batch_size, self.length)
                yield batch
            self.epoch, self.position = epoch + 1, 0
        finally:
            self._tracked = False

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first index; no-op if it is the current epoch.

        Args:
            epoch: the epoch to start.
        """
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        """Where the data stands.

        Returns:
            ``{"seed", "epoch", "position"}``: ``position`` counts the samples of this
            epoch's order that training has received.
        """
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position: the next pass starts at the next index.

        Args:
            state: what :meth:`state_dict` returned.

        Raises:
            ValueError: the position lies outside the data set (its size changed).
        """
        position = int(state["position"])
        if not 0 <= position <= self.length:
            raise ValueError(
                f"sampler position {position} is outside a data set of {self.length} "
                "samples: the data set changed size since the checkpoint"
            )
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), position
