"""Feature caching across denoising steps, after DeepCache (Ma, Fang and Wang, CVPR 2024).

Between neighbouring denoising steps the UNet's deep features change little, while its shallow layers carry the
detail that changes. On a *full* step the UNet runs whole and remembers the input of its decoder level
``-depth``: the upsampled output of everything deeper (the bottleneck and the deeper decoder levels). On a *cached*
step it runs only ``conv_in``, ``transformer_in`` and the first ``depth`` encoder levels (for their skips, with the
new timestep and input), then the last ``depth`` decoder levels on the remembered deep features. With the published
config and ``depth=1`` that is one of four levels: the 320-channel level at full resolution.

``DeepCache`` is the state the UNet reads and writes while :func:`caching` holds it attached to the UNet (a change
recorded by :mod:`cinematic.models.modifications`, never safe for a compiled or recorded forward, whose kernels
cannot follow the cache's Python state); a sampling loop calls :meth:`DeepCache.next_step` once before each step.
Step ``i`` is full when ``i % interval == 0``; so ``interval=1`` is the plain computation. A call reuses features
only if its input shape and its text context equal those of a call of the last full step; otherwise it runs whole
and remembers its features (for example the first step after guidance truncation, where the batch changes from
``[uncond, cond]`` to ``cond`` alone).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from cinematic.errors import CinematicError
from cinematic.models import modifications


@dataclass
class _Entry:
    shape: tuple[int, ...]
    context: torch.Tensor
    deep: torch.Tensor  # [(B F), C, h, w]: the input of decoder level -depth


@dataclass
class DeepCache:
    """Reuse the deep UNet features for ``interval - 1`` steps out of every ``interval``; see the module docstring.

    ``full_calls`` and ``cached_calls`` count the UNet calls of each kind.
    """

    interval: int = 3
    depth: int = 1
    step: int = -1
    full_calls: int = 0
    cached_calls: int = 0
    entries: list[_Entry] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("interval", "depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CinematicError(f"cache {name} must be an integer of at least 1, not {value!r}")

    @property
    def full_step(self) -> bool:
        return self.step % self.interval == 0

    def next_step(self) -> None:
        """Called once before each denoising step; a full step forgets the features of the previous one."""
        self.step += 1
        if self.full_step:
            self.entries.clear()

    def check_depth(self, levels: int) -> None:
        if self.depth > levels:
            raise CinematicError(f"cache depth must be from 1 to {levels} (the UNet's levels), not {self.depth}")

    def lookup(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor | None:
        """The deep features to reuse for this call, or None when it must run whole (full step, or no match)."""
        if not self.full_step:
            for entry in self.entries:
                if entry.shape == tuple(x.shape) and entry.context.shape == context.shape:
                    if torch.equal(entry.context, context):
                        self.cached_calls += 1
                        return entry.deep
        self.full_calls += 1
        return None

    def store(self, x: torch.Tensor, context: torch.Tensor, deep: torch.Tensor) -> None:
        self.entries = [e for e in self.entries if not (e.shape == tuple(x.shape) and torch.equal(e.context, context))]
        self.entries.append(_Entry(tuple(x.shape), context, deep))


def attach(unet: nn.Module, cache: DeepCache) -> modifications.Modification:
    """Make ``unet`` (a :class:`~cinematic.models.unet3d.UNet3D`) read and write ``cache`` at every call."""
    if unet.feature_cache is not None:
        raise CinematicError("this UNet already has a feature cache attached")
    unet.feature_cache = cache

    def detach() -> None:
        unet.feature_cache = None

    detail = f"interval {cache.interval}, depth {cache.depth}"
    return modifications.record(unet, "feature_cache", detail, detach, graph_safe=False)


@contextmanager
def caching(unet: nn.Module, cache: DeepCache | None) -> Iterator[None]:
    """``cache`` attached to ``unet`` for the block (None: nothing changes)."""
    with modifications.applied(unet, None if cache is None else attach(unet, cache)):
        yield
