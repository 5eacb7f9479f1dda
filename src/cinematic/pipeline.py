"""Text to video: encode the prompts, sample latents with classifier-free guidance, decode the frames.

The pipeline is a thin composition of the networks (``models/``), a sampler (``diffusion/``) and the video writer
(``video.py``); its output equals diffusers' ``TextToVideoSDPipeline`` for the same weights, seed and settings.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cinematic.errors import CinematicError
from cinematic.models.components import Model

MAX_SIZE = 2048
MIN_SIZE = 64  # lowered to a model's own trained size when that is smaller (the bundled shapes model)
SIZE_MULTIPLE = 8
SEED_RANGE = 2**32  # seeds are unsigned 32-bit, as users copy them between tools


@dataclass
class Video:
    """A generated clip: uint8 frames ``[F, H, W, 3]``, its frame rate, and how it was made."""

    frames: torch.Tensor
    fps: float = 8
    metadata: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write the clip; the format follows the extension (.mp4, .webm, .gif, .webp, or a folder of PNGs)."""
        from cinematic import video

        return video.write(path, self.frames, fps=self.fps, metadata=self.metadata)


@dataclass(frozen=True)
class Request:
    """One validated call: every check happens here, before any network runs."""

    prompts: tuple[str, ...]
    negative_prompt: str | None
    num_frames: int
    height: int
    width: int
    steps: int
    guidance_scale: float
    seed: int
    sampler: str
    eta: float | None
    num_videos: int

    @property
    def count(self) -> int:
        return len(self.prompts) * self.num_videos


def random_seed() -> int:
    return random.SystemRandom().randrange(SEED_RANGE)


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"an integer from {low} to {high}" if high is not None else f"an integer of at least {low}"
        raise CinematicError(f"{name} must be {allowed}, not {value!r}")
    return value


def check_size(name: str, value: Any, minimum: int = MIN_SIZE) -> int:
    _check_int(name, value, minimum, MAX_SIZE)
    if value % SIZE_MULTIPLE:
        raise CinematicError(f"{name} must be a multiple of {SIZE_MULTIPLE} from {minimum} to {MAX_SIZE}, not {value}")
    return value


def check_guidance(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise CinematicError(f"guidance must be a finite number of at least 0, not {value!r}")
    return float(value)


def check_sampler(name: Any) -> str:
    from cinematic.diffusion import SAMPLERS

    if name not in SAMPLERS:
        raise CinematicError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
    return name


class Pipeline:
    """``Pipeline.from_pretrained(model)`` then ``pipe(prompt, ...)`` -> :class:`Video` (or a list of them)."""

    def __init__(self, model: Model, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.model, self.device, self.dtype = model, torch.device(device), dtype
        from cinematic.diffusion import alpha_bar_scaled_linear

        s = model.config.schedule
        self.alpha_bar = alpha_bar_scaled_linear(s.beta_start, s.beta_end, s.num_train_timesteps)

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path = "shapes",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        tokenizer: str | Path | None = None,
        variant: str | None = None,
    ) -> Pipeline:
        """Load any path, bundled name or hub id that :func:`cinematic.weights.load` takes."""
        from cinematic.weights import load

        return cls(load(model, device=device, dtype=dtype, tokenizer=tokenizer, variant=variant), device, dtype)

    @property
    def min_size(self) -> int:
        d = self.model.config.defaults
        return min(MIN_SIZE, d.height, d.width)

    def validate(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int = 50,
        guidance_scale: float = 9.0,
        seed: int | None = None,
        sampler: str = "ddim",
        eta: float | None = 0.0,
        num_videos: int = 1,
    ) -> Request:
        prompts = (prompt,) if isinstance(prompt, str) else tuple(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise CinematicError("prompt must be a string or a non-empty list of strings")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise CinematicError("negative prompt must be a string")
        if eta is not None and (not isinstance(eta, int | float) or not math.isfinite(eta) or not 0 <= eta <= 1):
            raise CinematicError(f"eta must be a number from 0 to 1, not {eta!r}")
        seed = random_seed() if seed is None else _check_int("seed", seed, 0, SEED_RANGE - 1)
        defaults = self.model.config.defaults  # what the model was trained on
        num_frames = defaults.frames if num_frames is None else num_frames
        height = defaults.height if height is None else height
        width = defaults.width if width is None else width
        return Request(
            prompts=prompts,
            negative_prompt=negative_prompt,
            num_frames=_check_int("frames", num_frames, 1, 1024),
            height=check_size("height", height, self.min_size),
            width=check_size("width", width, self.min_size),
            steps=_check_int("steps", steps, 1, self.model.config.schedule.num_train_timesteps),
            guidance_scale=check_guidance(guidance_scale),
            seed=seed,
            sampler=check_sampler(sampler),
            eta=None if sampler == "euler_ancestral" and eta == 0.0 else eta,
            num_videos=_check_int("num_videos", num_videos, 1, 64),
        )

    @torch.inference_mode()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text features ``[N, 77, D]``; each distinct prompt runs through the encoder once."""
        tokenizer = self.model.tokenizer
        distinct = list(dict.fromkeys(prompts))
        for p in distinct:
            if tokenizer.truncated(p):
                limit = tokenizer.context_length
                warnings.warn(f"prompt is longer than {limit} tokens and was truncated: {p[:60]!r}...", stacklevel=3)
        tokens = tokenizer(distinct).to(self.device)
        features = self.model.text_encoder(tokens)
        index = torch.tensor([distinct.index(p) for p in prompts], device=self.device)
        return features[index]

    def initial_noise(self, request: Request) -> tuple[torch.Tensor, torch.Generator]:
        """Video i of the call uses seed + i, drawn on the CPU as diffusers draws it, then moved to the device.

        Also returns the first video's generator, which goes on to feed the per-step noise of stochastic samplers
        (eta > 0, Euler ancestral), as diffusers' single generator does.
        """
        f = self.model.config.vae.downsample_factor
        shape = (1, self.model.config.unet.in_channels, request.num_frames, request.height // f, request.width // f)
        generators = [torch.Generator("cpu").manual_seed(request.seed + i) for i in range(request.count)]
        noise = torch.cat([torch.randn(shape, generator=g) for g in generators])  # [N,C,F,h,w]
        return noise.to(self.device), generators[0]

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int = 50,
        guidance_scale: float = 9.0,
        seed: int | None = None,
        sampler: str = "ddim",
        eta: float | None = 0.0,
        num_videos: int = 1,
        progress: bool = True,
        low_memory: bool = False,
        callback: Callable[[int, int], None] | None = None,
    ) -> Video | list[Video]:
        request = self.validate(
            prompt, negative_prompt, num_frames, height, width, steps, guidance_scale, seed, sampler, eta, num_videos
        )
        latents = self.sample(request, progress=progress, low_memory=low_memory, callback=callback)
        frames = self.decode(latents, chunk=1 if low_memory else 8)
        fps = self.model.config.defaults.fps
        videos = [Video(f, fps=fps, metadata=self.metadata(request, i)) for i, f in enumerate(frames)]
        return videos[0] if len(videos) == 1 else videos

    @torch.inference_mode()
    def sample(
        self,
        request: Request,
        progress: bool = True,
        low_memory: bool = False,
        callback: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """The final latents ``[N, C, F, h, w]`` (float32), N = prompts x num_videos."""
        from cinematic.diffusion import classifier_free_guidance, sample
        from cinematic.progress import Progress

        prompts = [p for p in request.prompts for _ in range(request.num_videos)]
        cond = self.encode_prompts(prompts)
        uncond = None
        if request.guidance_scale != 1.0:
            # The original encodes "" for the unconditional branch (not a zero tensor), as diffusers does.
            uncond = self.encode_prompts([request.negative_prompt or ""] * len(prompts))
        bar = Progress(request.steps, "sampling") if progress else None

        def step_done(i: int, total: int) -> None:
            if bar is not None:
                bar.update()
            if callback is not None:
                callback(i, total)

        guided = classifier_free_guidance(self._eps_model, cond, uncond, request.guidance_scale, batched=not low_memory)
        noise, generator = self.initial_noise(request)
        try:
            return sample(
                request.sampler,
                guided,
                noise,
                request.steps,
                eta=request.eta,
                generator=generator,
                callback=step_done,
                alpha_bar=self.alpha_bar,
            )
        finally:
            if bar is not None:
                bar.close()

    def _eps_model(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The UNet in its own dtype; latents and the sampler's arithmetic stay float32, as in the original."""
        unet = self.model.unet
        return unet(x.to(self.dtype), t, context.to(self.dtype)).float()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, chunk: int = 8) -> list[torch.Tensor]:
        """uint8 frames ``[F, H, W, 3]`` per video: ``(x + 1) / 2``, clamped, rounded."""
        videos = self.model.vae.decode_video(latents.to(self.dtype), chunk=chunk).float()  # [B,3,F,H,W]
        pixels = ((videos + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
        return [v.permute(1, 2, 3, 0).contiguous().cpu() for v in pixels]  # [3,F,H,W] -> [F,H,W,3]

    def metadata(self, request: Request, index: int) -> dict[str, Any]:
        prompt = request.prompts[index // request.num_videos]
        return {
            "prompt": prompt,
            "negative_prompt": request.negative_prompt,
            "seed": request.seed + index,
            "steps": request.steps,
            "sampler": request.sampler,
            "eta": request.eta,
            "guidance": request.guidance_scale,
            "size": [request.width, request.height],
            "frames": request.num_frames,
            "fps": self.model.config.defaults.fps,
            "model": self.model.source,
            "generator": "cinematic",
        }
