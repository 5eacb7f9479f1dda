"""Starting from pictures: video-to-video (an encoded clip noised to the step ``strength`` picks) and first-frame
animation (a known frame pinned through sampling, as latent inpainting does), plus looping.

Video-to-video follows diffusers' ``VideoToVideoSDPipeline`` (and Stable Diffusion's img2img): sampling skips the
first ``steps - int(steps * strength)`` steps of the sampler's grid and starts from ``x0 + sigma * noise``, the VE
form of ``scheduler.add_noise(x0, noise, t)``. Each video's generator draws the VAE posterior sample first, then
the noise, as diffusers' does. Two ends are special-cased so that they mean what they say: ``strength=1`` ignores
the clip and is text-to-video from the same seed (diffusers would still keep ``sqrt(alpha_bar[981])`` = 7% of the
clip in its first latent), and a strength that leaves no step returns the encoded clip itself.

Pinning wraps the denoiser (``denoiser(x, sigma) -> x0``): before every network call the pinned frame of ``x`` is
set to the known latent re-noised to the current level, ``z + sigma * n`` with a fixed ``n``, and its ``x0`` to
``z``; every sampler's update then carries ``z + sigma_next * n`` to the next step exactly, so the known frame
follows the forward process while the others denoise around it (RePaint-style latent inpainting without
resampling). The final latent's pinned frames are set to ``z`` itself, so they decode to the VAE round-trip.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from cinematic.budget import DEFAULT as DEFAULT_BUDGET
from cinematic.budget import Budget
from cinematic.errors import CinematicError
from cinematic.generation.noise import initial_noise, latent_shape

if TYPE_CHECKING:
    from cinematic.models.components import Model
    from cinematic.settings import Settings

Denoiser = Callable[[Tensor, Tensor], Tensor]
PathOrFrames = str | os.PathLike[str] | np.ndarray | Tensor


def start_step(steps: int, strength: float) -> int:
    """Index of the first step that runs: diffusers' ``get_timesteps``, ``steps - min(int(steps * strength), steps)``
    (``int`` truncates, so 50 x 0.6 runs 30 steps and 10 x 0.25 runs 2)."""
    return steps - min(int(steps * strength), steps)


def _as_uint8(value: np.ndarray | Tensor, what: str, ndim: int) -> Tensor:
    frames = torch.as_tensor(np.asarray(value) if not isinstance(value, Tensor) else value)
    if frames.dtype != torch.uint8 or frames.ndim != ndim or frames.shape[-1] != 3 or 0 in frames.shape:
        layout = "[F, H, W, 3]" if ndim == 4 else "[H, W, 3]"
        raise CinematicError(f"{what} must be uint8 RGB {layout}, got {frames.dtype} {list(frames.shape)}")
    return frames.cpu()


def load_video(source: PathOrFrames, num_frames: int | None = None, budget: Budget = DEFAULT_BUDGET) -> Tensor:
    """uint8 ``[F, H, W, 3]`` from a file or folder :func:`cinematic.video.read` reads, or from frames as given. Of a
    file, only the first ``num_frames`` frames (None: all) are decoded, within ``budget`` (:mod:`cinematic.budget`)."""
    if isinstance(source, str | os.PathLike):
        from cinematic import video

        path = Path(source).expanduser()
        if not path.exists():
            raise CinematicError(f"no such init video: {path}")
        try:
            return _as_uint8(video.read(path, num_frames, budget).frames, "init video", 4)
        except CinematicError as error:
            detail = str(error).removeprefix(f"cannot read video {path}: ")
            raise CinematicError(f"cannot read init video {path}: {detail}") from error
    return _as_uint8(source, "init video", 4)


def load_image(source: PathOrFrames, budget: Budget = DEFAULT_BUDGET) -> Tensor:
    """uint8 ``[H, W, 3]`` from an image file (PNG, JPEG, anything FFmpeg decodes; the first frame of a video), its
    declared size checked against ``budget`` before it is decoded, or from an array as given."""
    if isinstance(source, str | os.PathLike):
        path = Path(source).expanduser()
        if not path.is_file():
            raise CinematicError(f"no such init image: {path}")
        from cinematic import video

        try:
            rgb = video.read_image(path, budget)  # the reader of PNG-folder frames: the first picture FFmpeg decodes
        except Exception as error:  # FFmpeg's errors, StopIteration for a file without a picture, missing PyAV
            detail = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CinematicError(f"cannot read init image {path}: {detail}") from error
        return _as_uint8(rgb, "init image", 3)
    return _as_uint8(source, "init image", 3)


def fit_frames(frames: Tensor, num_frames: int, height: int, width: int) -> Tensor:
    """uint8 ``[F, h, w, 3]`` -> float32 ``[1, 3, num_frames, height, width]`` in [-1, 1]: the first ``num_frames``
    frames, scaled to cover the requested size and centre-cropped (as the training data is)."""
    from cinematic.data.frames import resize_and_crop

    if len(frames) < num_frames:
        raise CinematicError(f"the init video has {len(frames)} frames, fewer than the {num_frames} requested")
    return resize_and_crop(frames[:num_frames], height, width)[None]  # [3,F,H,W] -> [1,3,F,H,W]


@torch.inference_mode()
def encode_video_start(
    vae: Any, pixels: Tensor, generators: list[torch.Generator], latent_shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """The clean latents ``x0`` and the noise ``[N, C, F, h, w]`` of a video-to-video call, one video per generator.

    Generator i draws the posterior sample of all frames, then the noise ``[F, C, h, w]`` (frames first, then
    permuted, as diffusers draws it for ``[(B F), C, h, w]`` latents). Each video encodes the clip again: the
    posterior draw comes from its own generator, and calls usually make one video.
    """
    x0, noise = [], []
    _, c, f, h, w = latent_shape
    for g in generators:
        x0.append(vae.encode_video(pixels.to(dtype), generator=g).float())
        noise.append(torch.randn((f, c, h, w), generator=g).permute(1, 0, 2, 3)[None])  # [F,C,h,w] -> [1,C,F,h,w]
    device = x0[0].device
    return torch.cat(x0), torch.cat(noise).to(device)


@torch.inference_mode()
def encode_image(vae: Any, pixels: Tensor, dtype: torch.dtype) -> Tensor:
    """The posterior mean ``[1, C, h, w]`` (scaled) of a still ``[1, 3, 1, H, W]``: deterministic, so a pinned
    frame decodes to the same picture whatever the seed."""
    return vae.encode_video(pixels.to(dtype), sample=False).float()[:, :, 0]  # [1,C,1,h,w] -> [1,C,h,w]


@dataclass(frozen=True)
class Pin:
    """Frames held fixed through sampling (see the module docstring).

    ``known``: the known first-frame latent ``[N, C, h, w]``, or None to pin nothing but the loop. ``noise``: the
    noise that re-noises it, ``[N, C, h, w]``. ``loop``: the last frame is pinned to the first (to ``known``, or,
    without one, to whatever the first frame becomes: both frames share one trajectory).
    """

    known: Tensor | None
    noise: Tensor
    loop: bool = False

    def _frames(self) -> list[int]:
        return [0, -1] if self.loop else [0]

    def _apply(self, x: Tensor, value: Tensor) -> Tensor:
        x = x.clone()
        for i in self._frames():
            x[:, :, i] = value
        return x

    def wrap(self, denoiser: Denoiser) -> Denoiser:
        def pinned(x: Tensor, sigma: Tensor) -> Tensor:
            if self.known is None:
                x = self._apply(x, x[:, :, 0])
                x0 = denoiser(x, sigma)
                return self._apply(x0, x0[:, :, 0])
            known = self.known.to(x.device, x.dtype)
            x = self._apply(x, known + float(sigma) * self.noise.to(x.device, x.dtype))
            return self._apply(denoiser(x, sigma), known)

        return pinned

    def finish(self, latents: Tensor) -> Tensor:
        """The final latent ``[N, C, F, h, w]`` with its pinned frames set exactly."""
        value = latents[:, :, 0] if self.known is None else self.known.to(latents.device, latents.dtype)
        return self._apply(latents, value)


@dataclass(frozen=True)
class Pictures:
    """What a call starts from, loaded and checked before any network runs: a clip (uint8 ``[F, H, W, 3]``) or a
    still (uint8 ``[H, W, 3]``), not both."""

    video: Tensor | None = None
    image: Tensor | None = None


def load_pictures(
    init_video: PathOrFrames | None,
    init_image: PathOrFrames | None,
    num_frames: int | None = None,
    budget: Budget = DEFAULT_BUDGET,
) -> Pictures | None:
    """The pictures a call starts from, read within ``budget``; of an init video only the first ``num_frames``
    frames (None: all), since no call uses more."""
    if init_video is not None and init_image is not None:
        raise CinematicError("give an init video or an init image, not both")
    if init_video is None and init_image is None:
        return None
    if init_video is not None:
        return Pictures(video=load_video(init_video, num_frames, budget))
    return Pictures(image=load_image(init_image, budget))


@dataclass(frozen=True)
class Start:
    """Where sampling begins: ``noise`` and the generator that continues after it, the clean latent ``init`` and
    first step ``start`` of video-to-video, and what :class:`Pin` holds (``known``, ``loop``)."""

    noise: Tensor
    generator: torch.Generator
    init: Tensor | None = None
    start: int = 0
    known: Tensor | None = None
    loop: bool = False

    def pin(self, noise: Tensor) -> Pin | None:
        """The pin for a run from ``noise`` ``[N, C, F, h, w]``: the known frame is re-noised with frame 0's noise."""
        if self.known is None and not self.loop:
            return None
        return Pin(self.known, noise[:, :, 0], self.loop)


def starting_point(
    model: Model, settings: Settings, count: int, seeds: Sequence[int], pictures: Pictures | None, dtype: torch.dtype
) -> Start:
    """Where sampling of ``count`` videos of ``settings`` begins. Text-to-video and first-frame animation start from
    the seeds' noise (:func:`cinematic.generation.noise.initial_noise`); video-to-video from the encoded clip."""
    device = next(model.unet.parameters()).device
    s = settings
    if pictures is None or pictures.video is not None and s.strength == 1.0:
        noise, generator = initial_noise(model.config, s, seeds)
        return Start(noise.to(device), generator, loop=s.loop)
    if pictures.image is not None:
        noise, generator = initial_noise(model.config, s, seeds)
        still = fit_frames(pictures.image[None], 1, s.height, s.width).to(device)  # [1,3,1,H,W]
        known = encode_image(model.vae, still, dtype).expand(count, -1, -1, -1)
        return Start(noise.to(device), generator, known=known, loop=s.loop)
    clip = fit_frames(pictures.video, s.num_frames, s.height, s.width).to(device)  # [1,3,F,H,W]
    shape = latent_shape(model.config, s, s.num_frames)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    init, noise = encode_video_start(model.vae, clip, generators, shape, dtype)
    start = start_step(s.num_inference_steps, s.strength)
    return Start(noise, generators[0], init=init, start=start, loop=s.loop)
