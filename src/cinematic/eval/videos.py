"""The videos an evaluation judges: one per caption, each from the noise of the call's seed, exactly as
``cinematic generate CAPTION --seed`` makes it, but many captions per sampler run. ``cinematic eval``, the
benchmarks and the recipes in ``recipes/`` all generate through here. Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def generate(
    pipe: Any,
    captions: Sequence[str],
    seed: int,
    steps: int,
    guidance: float,
    sampler: str,
    freeu: bool = False,
    freeinit: int = 0,
    **fast: Any,
) -> list:
    """One video per caption, each from the noise of ``seed``, at the model's trained clip size: uint8 numpy
    ``[F, H, W, 3]`` each. ``fast``: the fast modes of ``Pipeline.validate`` (cache_interval, guidance_stop...)."""
    d = pipe.model.config.defaults
    request = pipe.validate(
        list(captions), num_frames=d.frames, height=d.height, width=d.width, steps=steps, guidance_scale=guidance,
        seed=seed, sampler=sampler, freeu=freeu, freeinit=freeinit, **fast,
    )  # fmt: skip
    frames = pipe.decode(pipe.sample(request, progress=False))
    return [f.cpu().numpy() for f in frames]


def same_seed_pipeline(model: str | Path, device: str) -> Any:
    """A :class:`cinematic.pipeline.Pipeline` whose prompts all start from the noise of the call's seed itself
    (``generate`` gives video ``i`` seed + i), so that a batch of captions makes for each the video that
    ``cinematic generate CAPTION --seed`` makes. The class is built per call so that importing this module does not
    import torch."""
    import dataclasses

    from cinematic.pipeline import Pipeline

    class SameSeedPipeline(Pipeline):
        def initial_noise(self, request):
            one = dataclasses.replace(request, prompts=request.prompts[:1], num_videos=1)
            noise, generator = super().initial_noise(one)  # [1,C,F,h,w]
            return noise.expand(request.count, *noise.shape[1:]).contiguous(), generator

    return SameSeedPipeline.from_pretrained(model, device=device)
