"""The initial noise of a call: one seeded CPU generator per video, drawn as diffusers draws it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from cinematic.diffusion.windows import reschedule_noise

if TYPE_CHECKING:
    from cinematic.models.components import ModelConfig
    from cinematic.settings import Settings


def latent_shape(config: ModelConfig, settings: Settings, frames: int) -> tuple[int, int, int, int, int]:
    """``[1, C, F, h, w]``: one video's latents at ``frames`` frames."""
    f = config.vae.downsample_factor
    return (1, config.unet.in_channels, frames, settings.height // f, settings.width // f)


def video_seeds(seed: int, count: int, same_seed: bool = False) -> list[int]:
    """Video i of a call uses ``seed + i``; with ``same_seed`` every video uses ``seed`` itself (``cinematic eval``
    makes for each caption of a batch the video that ``cinematic generate CAPTION --seed`` makes)."""
    return [seed] * count if same_seed else [seed + i for i in range(count)]


def initial_noise(
    config: ModelConfig, settings: Settings, seeds: Sequence[int]
) -> tuple[torch.Tensor, torch.Generator]:
    """The noise ``[N, C, F, h, w]`` of ``settings`` for videos with ``seeds``, on the CPU, and the first video's
    generator, which goes on to feed the per-step noise of stochastic samplers (eta > 0, Euler ancestral), as
    diffusers' single generator does. A windowed (long) clip draws its first window's noise only and reschedules it
    over the clip (:func:`cinematic.diffusion.windows.reschedule_noise`)."""
    frames = settings.window if settings.windowed else settings.num_frames
    shape = latent_shape(config, settings, frames)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    noise = torch.cat([torch.randn(shape, generator=g) for g in generators])  # [N,C,F,h,w]
    if settings.windowed:
        frames, stride = settings.num_frames, settings.window_stride
        noise = torch.cat([reschedule_noise(n[None], frames, stride, g) for n, g in zip(noise, generators)])
    return noise, generators[0]
