"""Long videos: the UNet runs on overlapping windows of the trained length, and prompts may change over time.

A clip longer than the model's window (16 frames for text-to-video-ms-1.7b) is denoised window by window at every
step, in the manner of FreeNoise (Qiu et al. 2023), with two choices of our own:

- **Windows of the whole UNet**, not only of its temporal attention. Every layer but temporal attention and the
  3-tap temporal convolutions is per frame, so the two agree inside a window; running the whole network per window
  keeps activation memory at one window's, whatever the length, and works unchanged with any checkpoint, the fast
  modes and the starting pictures of :mod:`cinematic.generation.pictures`. The cost is the overlap: windows of ``W``
  frames every ``S`` frames evaluate about ``W / S`` times the frames (2x at the default ``S = W / 2``).
- **Fusion by the plain mean**: each frame's prediction is the mean of those of the windows holding it. Weighting
  frames by their distance from the window's edges (a FreeNoise-style tent) couples neighbouring windows less, and with
  the shapes model the object changed shape from window to window more often (measured in docs/video-to-video.md,
  "Fusion and window schedules").

**Noise rescheduling** (FreeNoise): only the first window's noise is drawn (so its frames start exactly where a
``W``-frame video of the same seed starts); each later block of ``S`` frames reuses the noise of the block ``W``
frames earlier, its frames shuffled. Windows then share long-range structure instead of each drawing an unrelated
clip.

**Prompt schedules**: ``"0: a red circle moving right | 32: a red circle moving left"`` gives every frame a prompt
(the last key at or before it). A window is conditioned on the mean of its frames' text features, so windows across
a switch blend the two prompts in proportion to their frames.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cinematic.errors import CinematicError

GuidedFn = Callable[[Tensor, Tensor], Tensor]

_ENTRY = re.compile(r"\s*(\d+)\s*:\s*(.*?)\s*$", re.DOTALL)


def parse_prompt_schedule(text: str, frames: int | None = None) -> tuple[tuple[int, str], ...]:
    """``"0: prompt a | 32: prompt b"`` -> ``((0, "prompt a"), (32, "prompt b"))``. Keys are start frames, strictly
    increasing, the first 0; with ``frames``, every key must be a frame of the clip."""
    if not isinstance(text, str) or not text.strip():
        raise CinematicError('prompt schedule must be text like "0: a red circle | 32: a blue circle"')
    entries = []
    for part in text.split("|"):
        match = _ENTRY.fullmatch(part)
        if match is None or not match.group(2):
            raise CinematicError(
                f'prompt schedule entry {part.strip()!r} is not "FRAME: prompt" (entries are separated by "|")'
            )
        entries.append((int(match.group(1)), match.group(2)))
    keys = [k for k, _ in entries]
    if keys[0] != 0:
        raise CinematicError(f"prompt schedule must start at frame 0, not {keys[0]}")
    if any(b <= a for a, b in zip(keys, keys[1:])):
        raise CinematicError(f"prompt schedule frames must increase, got {keys}")
    if frames is not None and keys[-1] >= frames:
        raise CinematicError(f"prompt schedule frame {keys[-1]} is past the clip's last frame, {frames - 1}")
    return tuple(entries)


def frame_prompts(schedule: Sequence[tuple[int, str]], frames: int) -> list[str]:
    """The prompt of each frame: that of the last key at or before it."""
    out, current = [], 0
    for f in range(frames):
        while current + 1 < len(schedule) and schedule[current + 1][0] <= f:
            current += 1
        out.append(schedule[current][1])
    return out


def window_starts(frames: int, window: int, stride: int) -> list[int]:
    """First frames of the windows covering ``frames``: every ``stride`` frames, and a last one ending on the clip's
    end. One window (at 0) when the clip fits."""
    if frames <= window:
        return [0]
    starts = list(range(0, frames - window + 1, stride))
    if starts[-1] != frames - window:
        starts.append(frames - window)
    return starts


def reschedule_noise(first: Tensor, frames: int, stride: int, generator: torch.Generator) -> Tensor:
    """FreeNoise's noise for ``frames`` frames from the first window's ``first`` [B, C, W, h, w]: block ``[i, i +
    stride)`` (``i >= W``) is block ``[i - W, i - W + stride)`` with its frames in an order drawn from ``generator``."""
    window = first.shape[2]
    if frames <= window:
        return first[:, :, :frames]
    noise = first.new_empty((*first.shape[:2], frames, *first.shape[3:]))
    noise[:, :, :window] = first
    for i in range(window, frames, stride):
        n = min(stride, frames - i)
        noise[:, :, i : i + n] = noise[:, :, i - window + torch.randperm(n, generator=generator)]
    return noise


@dataclass
class WindowedEps:
    """A guided network over a long clip: ``models[k]`` (each ``(x, t) -> eps`` for one window, with its own
    conditioning and fast-mode state) runs on frames ``[starts[k], starts[k] + window)``; each frame's output is the
    mean over the windows holding it. Frames are axis 2 of ``x`` [B, C, F, h, w]."""

    models: Sequence[GuidedFn]
    starts: Sequence[int]
    window: int

    def __post_init__(self) -> None:
        if len(self.models) != len(self.starts):
            raise ValueError(f"{len(self.models)} window models for {len(self.starts)} windows")

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        total = torch.zeros_like(x)
        count = torch.zeros((1, 1, x.shape[2], 1, 1), dtype=x.dtype, device=x.device)
        for model, s in zip(self.models, self.starts):
            total[:, :, s : s + self.window] += model(x[:, :, s : s + self.window], t)
            count[:, :, s : s + self.window] += 1
        return total / count


def window_features(features: Tensor, frame_prompt: Sequence[int], starts: Sequence[int], window: int) -> list[Tensor]:
    """Text features ``[L, D]`` of each window: the mean of its frames' features, where frame ``f`` has
    ``features[frame_prompt[f]]`` (``features`` [P, L, D], one row per distinct prompt)."""
    index = torch.as_tensor(frame_prompt)
    out = []
    for s in starts:
        share = torch.bincount(index[s : s + window], minlength=features.shape[0]).to(features.dtype)
        out.append(torch.einsum("p,pld->ld", share / share.sum(), features))
    return out
