"""The order of a training run: which item the n-th sample is, and the seed of every random stream.

Every random choice is a pure function of ``(seed, position)``: which item the n-th sample of the run is (a fresh
permutation per epoch), and where a clip starts inside its video (the seed handed to the dataset's ``sample``). A
resumed run therefore sees exactly the batches an uninterrupted run would have seen, with no sampler state to save.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from cinematic.data.dataset import VideoDataset
from cinematic.errors import CinematicError

# Independent random streams, one per use (see derive_seed).
ORDER, SAMPLE, STEP, MODULES, INIT, PREVIEW = range(1, 7)


def derive_seed(seed: int, *words: int) -> int:
    """A 63-bit seed for the stream ``(seed, *words)``; different word tuples give independent streams."""
    state = np.random.SeedSequence([seed, *words]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def generator(seed: int, *words: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(derive_seed(seed, *words))


class BatchPlan:
    """The keys of every micro-batch from ``start_step`` to ``end_step``, as a ``batch_sampler``.

    Sample ``p`` of the run (counting every micro-batch of every step) is item ``perm_e[p % N]`` of a dataset of
    ``N`` items, ``perm_e`` being the permutation of epoch ``e = p // N``; its key also carries the seed of its own
    augmentation stream.

    Under data parallelism (``rank`` of ``world`` processes) a step's global batch is ``batch_size x world x
    accum`` consecutive samples, and this rank's micro-batch ``a`` of it starts at row ``(a * world + rank) *
    batch_size`` (``train/distributed.py``); one process sees every row, in the order it always did.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        accum: int,
        seed: int,
        start_step: int,
        end_step: int,
        rank: int = 0,
        world: int = 1,
    ):
        self.size, self.batch_size, self.accum, self.seed = size, batch_size, accum, seed
        self.start_step, self.end_step, self.rank, self.world = start_step, end_step, rank, world
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return (self.end_step - self.start_step) * self.accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.end_step):
            for positions in self.step_positions(step):
                yield [self.key(p) for p in positions]

    def step_positions(self, step: int) -> list[range]:
        """The sample positions of this rank's micro-batches of ``step``."""
        per_step = self.batch_size * self.world * self.accum
        firsts = [step * per_step + (a * self.world + self.rank) * self.batch_size for a in range(self.accum)]
        return [range(first, first + self.batch_size) for first in firsts]

    def key(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.size)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=generator(self.seed, ORDER, epoch))
        return int(self._perm[offset]), derive_seed(self.seed, SAMPLE, position)


class Keyed:
    """A dataset indexed by ``BatchPlan`` keys: ``(index, sample_seed) -> item``."""

    def __init__(self, dataset: VideoDataset):
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        sample = getattr(self.dataset, "sample", None)
        if sample is not None:
            return sample(index, torch.Generator("cpu").manual_seed(seed))
        return self.dataset[index]


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Tensors stacked (``video``, or cached latents and features, ``train/cache.py``), captions listed."""
    if "video" in items[0]:
        shapes = {tuple(item["video"].shape) for item in items}
        if len(shapes) > 1:
            raise CinematicError(f"the clips of one batch differ in shape: {sorted(shapes)}")
    tensors = [key for key, value in items[0].items() if isinstance(value, torch.Tensor)]
    return {
        **{key: torch.stack([item[key] for item in items]) for key in tensors},
        "caption": [i["caption"] for i in items],
    }


def loader(dataset: VideoDataset, plan: BatchPlan, workers: int = 0, pin: bool = False) -> Iterator[dict[str, Any]]:
    from torch.utils.data import DataLoader

    return iter(DataLoader(Keyed(dataset), batch_sampler=plan, num_workers=workers, collate_fn=collate, pin_memory=pin))
