"""The videos an evaluation judges: one per caption, each from the noise of the call's seed, exactly as
``cinematic generate CAPTION --seed`` makes it, but many captions per sampler run. ``cinematic eval``, the
benchmarks and the recipes in ``recipes/`` all generate through here. Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def generate(pipe: Any, captions: Sequence[str], seed: int, **settings: Any) -> list:
    """One video per caption, each from the noise of ``seed`` itself (as ``cinematic generate CAPTION --seed seed``
    makes it), at the model's trained clip size: uint8 numpy ``[F, H, W, 3]`` each. ``settings``: those of
    :class:`cinematic.settings.Settings`."""
    request = pipe.validate(list(captions), same_seed=True, seed=seed, **settings)
    frames = pipe.decode(pipe.sample(request, progress=False))
    return [f.cpu().numpy() for f in frames]
