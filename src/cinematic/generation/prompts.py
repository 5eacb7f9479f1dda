"""Prompts to text features: tokens through the text encoder, per window of a long clip, and the unguided branch."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from cinematic.diffusion.windows import frame_prompts, parse_prompt_schedule, window_features
from cinematic.settings import Settings
from cinematic.tokenizer import Tokenizer

Encoder = Callable[[torch.Tensor], torch.Tensor]


@torch.inference_mode()
def encode_prompts(
    tokenizer: Tokenizer, encoder: Encoder, prompts: Sequence[str], device: torch.device
) -> torch.Tensor:
    """Text features ``[N, L, D]``; each distinct prompt runs through the encoder once. A prompt longer than the
    tokenizer's context is truncated, with a warning."""
    distinct = list(dict.fromkeys(prompts))
    for p in distinct:
        if tokenizer.truncated(p):
            limit = tokenizer.context_length
            warnings.warn(f"prompt is longer than {limit} tokens and was truncated: {p[:60]!r}...", stacklevel=4)
    features = encoder(tokenizer(distinct).to(device))
    index = torch.tensor([distinct.index(p) for p in prompts], device=device)
    return features[index]


@dataclass(frozen=True)
class TextFeatures:
    """What guidance needs: the conditional features ``[N, L, D]`` of each UNet window, and the unconditional ones
    (None when there is no unconditional pass: guidance off, or given to the UNet as an input)."""

    windows: list[torch.Tensor]
    uncond: torch.Tensor | None


def text_features(
    encode: Callable[[Sequence[str]], torch.Tensor],
    settings: Settings,
    prompts: Sequence[str],
    num_videos: int,
    starts: Sequence[int],
    unconditional: bool | None = None,
) -> TextFeatures:
    """The features of a call's ``prompts`` (each made ``num_videos`` times) for the windows starting at ``starts``.
    With a prompt schedule, each window's features are the mean of its frames' prompt features. ``unconditional``:
    whether sampling runs the unconditional pass (:meth:`cinematic.settings.Settings.unconditional_pass`; default:
    when ``guidance_scale`` is not 1)."""
    count = len(prompts) * num_videos
    if settings.prompt_schedule is None:
        cond = encode([p for p in prompts for _ in range(num_videos)])
        windows = [cond] * len(starts)
    else:
        per_frame = frame_prompts(parse_prompt_schedule(settings.prompt_schedule), settings.num_frames)
        distinct = list(dict.fromkeys(per_frame))
        features = encode(distinct)  # [P, L, D]
        index = [distinct.index(p) for p in per_frame]
        window = settings.window if settings.windowed else settings.num_frames
        windows = [w.expand(count, *w.shape) for w in window_features(features, index, starts, window)]
    uncond = None
    if settings.guidance_scale != 1.0 if unconditional is None else unconditional:
        # The original encodes "" for the unconditional branch (not a zero tensor), as diffusers does.
        uncond = encode([settings.negative_prompt or ""] * count)
    return TextFeatures(windows, uncond)
