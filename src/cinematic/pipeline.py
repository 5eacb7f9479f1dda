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
from typing import TYPE_CHECKING, Any

import torch

from cinematic.allocator import keep_freed_memory, release_free_memory
from cinematic.errors import CinematicError
from cinematic.models.components import Model

if TYPE_CHECKING:
    from cinematic.conditioning import Pictures
    from cinematic.models.cuda_graphs import CUDAGraphs
    from cinematic.models.feature_cache import DeepCache

MAX_SIZE = 2048
MIN_SIZE = 64  # lowered to a model's own trained size when that is smaller (the bundled shapes model)
SIZE_MULTIPLE = 8
SEED_RANGE = 2**32  # seeds are unsigned 32-bit, as users copy them between tools
# Low-memory mode runs the UNet's feed-forwards this many tokens at a time (cinematic.models.layers.FeedForward): at
# 16 frames of 32x32 latents, a step's largest live set 0.75 -> 0.50 GB, at the same speed.
LOW_MEMORY_FF_ROWS = 4096
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


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
    # Fast modes, off by default (see README, "Memory and speed"): DeepCache-style feature caching (a full UNet step
    # every ``cache_interval`` steps, the first ``cache_depth`` levels recomputed in between), and guidance
    # truncation (the unconditional pass stops at fraction ``guidance_stop`` of sampling).
    cache_interval: int = 1
    cache_depth: int = 1
    guidance_stop: float = 1.0
    # Starting from pictures (see cinematic.conditioning): the strength of video-to-video (1: text-to-video), and
    # whether the last frame is pinned to the first. FreeU and FreeInit (see README, "FreeU and FreeInit").
    strength: float = 1.0
    loop: bool = False
    freeu: bool = False
    freeinit: int = 0
    # Long videos (see cinematic.diffusion.windows): frames per UNet window (0: the whole clip in one) and the
    # stride between windows; per-frame prompts ``((start_frame, prompt), ...)`` replace ``prompts`` when given.
    window: int = 0
    window_stride: int = 0
    prompt_schedule: tuple[tuple[int, str], ...] | None = None

    @property
    def windowed(self) -> bool:
        return 0 < self.window < self.num_frames

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


def check_guidance_stop(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise CinematicError(f"guidance stop must be a number from 0 to 1, not {value!r}")
    return float(value)


def check_acceleration(compile: Any, cuda_graphs: bool, device: torch.device | str) -> None:
    if compile is not None and compile not in COMPILE_MODES:
        raise CinematicError(f"unknown compile mode {compile!r}; allowed: {', '.join(COMPILE_MODES)}")
    if cuda_graphs and torch.device(device).type != "cuda":
        raise CinematicError(f"CUDA graphs need a CUDA device, not {device}; allowed: --device cuda")


def check_sampler(name: Any) -> str:
    from cinematic.diffusion import SAMPLERS

    if name not in SAMPLERS:
        raise CinematicError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
    return name


class Pipeline:
    """``Pipeline.from_pretrained(model)`` then ``pipe(prompt, ...)`` -> :class:`Video` (or a list of them)."""

    def __init__(self, model: Model, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        """``dtype``: what the networks compute in (their weights may be stored in another, see
        :func:`cinematic.models.precision.compute_in`)."""
        self.model, self.device, self.dtype = model, torch.device(device), dtype
        self.alpha_bar = model.config.schedule.alpha_bar()
        # How to load the text encoder again after low-memory mode freed it; set by from_pretrained.
        self._reload_text_encoder: Callable[[], torch.nn.Module] | None = None
        # The UNet as a plain step calls it: compiled and/or replayed from CUDA graphs (see accelerate).
        self._fast_unet: Callable[..., torch.Tensor] | None = None
        self._graphs: CUDAGraphs | None = None

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path = "shapes",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        tokenizer: str | Path | None = None,
        variant: str | None = None,
        compute_dtype: torch.dtype | None = None,
        int8: bool = False,
        loras: Sequence[tuple[str | Path, float]] = (),
        merge_loras: bool = False,
        winograd: bool = True,
        compile: str | None = None,
        cuda_graphs: bool = False,
    ) -> Pipeline:
        """Load any path, bundled name or hub id that :func:`cinematic.weights.load` takes.

        ``dtype`` is what the weights are stored in; ``compute_dtype`` (default: ``dtype``) what the networks compute
        in. ``dtype=torch.float16, compute_dtype=torch.float32`` halves the weights' memory on CPUs without fast
        half precision and, from fp16 files, gives the fp32 results. ``int8`` quantizes the UNet's Linear layers
        (CPU, fp32 compute only). ``winograd`` runs the large 3x3 convolutions of the UNet and VAE with
        Winograd's F(2x2, 3x3) on the CPU in fp32 (:mod:`cinematic.models.winograd`: fewer multiplications, fp32-level
        differences); ``False`` keeps PyTorch's own convolution everywhere. On the CPU, loading also sets the C
        allocator to keep freed memory for the next tensor (:mod:`cinematic.allocator`; ``CINEMATIC_MALLOC=system``
        leaves it alone). ``compile`` and ``cuda_graphs``: see :meth:`accelerate`.
        """
        from cinematic.weights import load

        if torch.device(device).type == "cpu":
            keep_freed_memory()  # the step's tensors reuse the heap instead of fresh pages (cinematic.allocator)
        compute_dtype = compute_dtype or dtype
        if int8 and (torch.device(device).type != "cpu" or compute_dtype != torch.float32):
            raise CinematicError("int8 runs on the CPU with float32 compute only; allowed: --device cpu --compute fp32")
        loaded = load(model, device=device, dtype=dtype, tokenizer=tokenizer, variant=variant)
        if compute_dtype != dtype:
            from cinematic.models.precision import compute_in

            for network in (loaded.unet, loaded.text_encoder, loaded.vae):
                compute_in(network, compute_dtype)
        if int8:
            from cinematic.models.precision import quantize_int8

            quantize_int8(loaded.unet)
        if winograd and torch.device(device).type == "cpu" and compute_dtype == torch.float32:
            from cinematic.models import winograd as fast_conv

            for network in (loaded.unet, loaded.vae):
                fast_conv.enable(network)
        pipe = cls(loaded, device, compute_dtype)
        pipe._reload_text_encoder = lambda: _load_text_encoder(model, device, dtype, compute_dtype, variant)
        for path, scale in loras:  # LoRA adapters, e.g. [("purple-lora", 1.0)]: see load_lora
            pipe.load_lora(path, scale, merge=merge_loras)
        if compile is not None or cuda_graphs:
            pipe.accelerate(compile=compile, cuda_graphs=cuda_graphs)
        return pipe

    def accelerate(self, compile: str | None = None, cuda_graphs: bool = False) -> None:
        """Run the UNet's plain steps through ``torch.compile`` (``compile``: a mode, ``"default"``,
        ``"reduce-overhead"``, ``"max-autotune"`` or ``"max-autotune-no-cudagraphs"``) and/or replay them as CUDA
        graphs (``cuda_graphs``, CUDA devices only: :mod:`cinematic.models.cuda_graphs`). Steps with feature caching
        or FreeU run eagerly. The first step at each shape pays for compiling or recording. ``accelerate()`` turns
        both off."""
        check_acceleration(compile, cuda_graphs, self.device)
        unet: Callable[..., torch.Tensor] = self.model.unet
        if compile is not None:
            unet = torch.compile(unet, mode=None if compile == "default" else compile, dynamic=False)
        self._graphs = None
        if cuda_graphs:
            from cinematic.models.cuda_graphs import CUDAGraphs

            unet = self._graphs = CUDAGraphs(unet)
        self._fast_unet = unet if compile is not None or cuda_graphs else None

    def load_lora(self, path: str | Path, scale: float = 1.0, merge: bool = False) -> str:
        """Apply the LoRA adapter at ``path`` (a .safetensors file or a folder holding one, in cinematic's,
        diffusers' PEFT or diffusers' older UNet layout) with strength ``scale``; returns its name for
        :meth:`unload_lora`. Unmerged, the adapted layers add ``scale * alpha / rank * up(down(x))``; merged, that
        update is folded into their weights (and taken out exactly again by :meth:`unload_lora`)."""
        from cinematic.lora_loading import load_lora

        if self._graphs is not None:
            self._graphs.reset()  # the recordings would run the layers as they were
        return load_lora(self.model.unet, path, scale, merge)

    def unload_lora(self, name: str | None = None) -> None:
        """Take off the adapter ``name`` (default: all of them), restoring the base weights bit for bit."""
        from cinematic.lora_loading import unload_lora

        if self._graphs is not None:
            self._graphs.reset()
        unload_lora(self.model.unet, name)

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
        cache_interval: int = 1,
        cache_depth: int = 1,
        guidance_stop: float = 1.0,
        strength: float = 1.0,
        loop: bool = False,
        freeu: bool = False,
        freeinit: int = 0,
        prompt_schedule: str | None = None,
        window: int | None = None,
        window_stride: int | None = None,
    ) -> Request:
        from cinematic.conditioning import check_loop, check_strength
        from cinematic.diffusion.windows import parse_prompt_schedule

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
        num_frames = _check_int("frames", num_frames, 1, 1024)
        window = defaults.frames if window is None else _check_int("window", window, 0, 1024)
        if 0 < window < 2:
            raise CinematicError(f"window must be 0 (the whole clip at once) or at least 2 frames, not {window}")
        stride = max(1, window // 2) if window_stride is None else window_stride
        stride = _check_int("window stride", stride, 1, max(window, 1))
        schedule = None
        if prompt_schedule is not None:
            schedule = parse_prompt_schedule(prompt_schedule, num_frames)
            if len(prompts) != 1:
                raise CinematicError("a prompt schedule takes the place of one prompt; give one prompt, not a list")
        return Request(
            prompts=prompts,
            negative_prompt=negative_prompt,
            num_frames=num_frames,
            height=check_size("height", height, self.min_size),
            width=check_size("width", width, self.min_size),
            steps=_check_int("steps", steps, 1, self.model.config.schedule.num_train_timesteps),
            guidance_scale=check_guidance(guidance_scale),
            seed=seed,
            sampler=check_sampler(sampler),
            eta=None if sampler == "euler_ancestral" and eta == 0.0 else eta,
            num_videos=_check_int("num_videos", num_videos, 1, 64),
            cache_interval=_check_int("cache interval", cache_interval, 1, 1000),
            cache_depth=_check_int("cache depth", cache_depth, 1, len(self.model.config.unet.levels)),
            guidance_stop=check_guidance_stop(guidance_stop),
            strength=check_strength(strength),
            loop=check_loop(loop, num_frames),
            freeu=bool(freeu),
            freeinit=_check_int("freeinit iterations", freeinit, 0, 10),
            window=window,
            window_stride=stride,
            prompt_schedule=schedule,
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
        if self.model.text_encoder is None:  # freed by low-memory mode
            self.model.text_encoder = self._reload_text_encoder()
        features = self.model.text_encoder(tokens)
        index = torch.tensor([distinct.index(p) for p in prompts], device=self.device)
        return features[index]

    def initial_noise(self, request: Request) -> tuple[torch.Tensor, torch.Generator]:
        """Video i of the call uses seed + i, drawn on the CPU as diffusers draws it, then moved to the device.

        Also returns the first video's generator, which goes on to feed the per-step noise of stochastic samplers
        (eta > 0, Euler ancestral), as diffusers' single generator does. A windowed (long) request draws its first
        window's noise only and reschedules it over the clip (:func:`cinematic.diffusion.windows.reschedule_noise`).
        """
        from cinematic.diffusion.windows import reschedule_noise

        f = self.model.config.vae.downsample_factor
        frames = request.window if request.windowed else request.num_frames
        shape = (1, self.model.config.unet.in_channels, frames, request.height // f, request.width // f)
        generators = [torch.Generator("cpu").manual_seed(request.seed + i) for i in range(request.count)]
        noise = torch.cat([torch.randn(shape, generator=g) for g in generators])  # [N,C,F,h,w]
        if request.windowed:
            noise = torch.cat(
                [
                    reschedule_noise(n[None], request.num_frames, request.window_stride, g)
                    for n, g in zip(noise, generators)
                ]
            )
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
        cache_interval: int = 1,
        cache_depth: int = 1,
        guidance_stop: float = 1.0,
        init_video: str | Path | torch.Tensor | None = None,
        strength: float = 0.6,
        init_image: str | Path | torch.Tensor | None = None,
        loop: bool = False,
        freeu: bool = False,
        freeinit: int = 0,
        loras: Sequence[tuple[str | Path, float]] | None = None,
        prompt_schedule: str | None = None,
        window: int | None = None,
        window_stride: int | None = None,
    ) -> Video | list[Video]:
        """Generate; see :meth:`validate` for the settings. ``low_memory`` runs the two guidance passes one after the
        other, frees the text encoder once the prompts are encoded (it is loaded again when next needed) and decodes
        one frame at a time. ``cache_interval``/``cache_depth`` and ``guidance_stop`` are the fast modes of
        :class:`Request`; each changes the result a little, and all are off by default.

        ``init_video`` (a path or uint8 ``[F, H, W, 3]`` frames) is restyled with ``strength`` (ignored without it;
        the frame count defaults to the clip's); ``init_image`` (a path or uint8 ``[H, W, 3]``) is animated from the
        first frame; ``loop`` pins the last frame to the first (see :mod:`cinematic.conditioning`). ``freeu`` and
        ``freeinit`` (iterations) are FreeU and FreeInit.

        Clips longer than ``window`` frames (default: the model's trained length; 0 runs the whole clip at once) are
        denoised in overlapping windows every ``window_stride`` frames (default ``window // 2``), and
        ``prompt_schedule`` (``"0: ... | 32: ..."``) changes the prompt over time, in place of ``prompt`` (see
        :mod:`cinematic.diffusion.windows`)."""
        from cinematic.conditioning import load_pictures

        pictures = load_pictures(init_video, init_image)
        if num_frames is None and pictures is not None and pictures.video is not None:
            num_frames = len(pictures.video)
        request = self.validate(
            prompt, negative_prompt, num_frames, height, width, steps, guidance_scale, seed, sampler, eta, num_videos,
            cache_interval, cache_depth, guidance_stop, strength if init_video is not None else 1.0, loop, freeu,
            freeinit, prompt_schedule, window, window_stride,
        )  # fmt: skip
        from cinematic.lora_loading import loras_applied

        with loras_applied(self.model.unet, loras):  # ``[(path, scale), ...]`` for this call only (see load_lora)
            latents = self.sample(
                request, progress=progress, low_memory=low_memory, callback=callback, pictures=pictures
            )
        frames = self.decode(latents, chunk=1 if low_memory else None)
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
        pictures: Pictures | None = None,
    ) -> torch.Tensor:
        """The final latents ``[N, C, F, h, w]`` (float32), N = prompts x num_videos. ``pictures``: what
        video-to-video or first-frame animation starts from (:func:`cinematic.conditioning.load_pictures`)."""
        from cinematic.conditioning import starting_point
        from cinematic.diffusion import sample
        from cinematic.diffusion.freeinit import free_init
        from cinematic.models.freeu import FREEU_VIDEO, freeu
        from cinematic.models.layers import chunked_feed_forward
        from cinematic.progress import Progress

        starts = self.window_starts(request)
        conds = self.window_conditions(request, starts)  # one [N, L, D] per window
        uncond = None
        if request.guidance_scale != 1.0:
            # The original encodes "" for the unconditional branch (not a zero tensor), as diffusers does.
            uncond = self.encode_prompts([request.negative_prompt or ""] * request.count)
        if low_memory:
            self.release_text_encoder()
        start = starting_point(self, request, pictures)
        if start.init is not None and start.start == request.steps:
            return start.init  # a strength that leaves no step: the encoded clip itself
        runs = (request.steps - start.start) * (request.freeinit + 1)
        bar = Progress(runs, "sampling") if progress else None

        def step_done(i: int, total: int) -> None:
            if bar is not None:
                bar.update()
            if callback is not None:
                callback(i, total)

        def run(noise: torch.Tensor) -> torch.Tensor:
            # Guidance is built per run and per window: the fast modes count steps, and FreeInit samples more than
            # once.
            from cinematic.diffusion.windows import WindowedEps

            steps = request.steps - start.start
            models = [self.guided_eps(request, c, uncond, batched=not low_memory, steps=steps) for c in conds]
            guided = models[0] if len(models) == 1 else WindowedEps(models, starts, request.window)
            pin = start.pin(noise)
            latents = sample(
                request.sampler,
                guided,
                noise,
                request.steps,
                eta=request.eta,
                generator=start.generator,
                callback=step_done,
                alpha_bar=self.alpha_bar,
                init=start.init,
                start=start.start,
                wrap=None if pin is None else pin.wrap,
                prediction=self.model.config.schedule.prediction_type,
                spacing=self.model.config.schedule.timestep_spacing,
            )
            return latents if pin is None else pin.finish(latents)

        try:
            with (
                freeu(self.model.unet, FREEU_VIDEO if request.freeu else None),
                chunked_feed_forward(self.model.unet, LOW_MEMORY_FF_ROWS if low_memory else None),
            ):
                return free_init(run, start.noise, request.freeinit, self.alpha_bar, start.generator)
        finally:
            if bar is not None:
                bar.close()
            release_free_memory()

    def window_starts(self, request: Request) -> list[int]:
        """First frames of the UNet windows of ``request`` (``[0]`` when it runs in one piece)."""
        from cinematic.diffusion.windows import window_starts

        if not request.windowed:
            return [0]
        return window_starts(request.num_frames, request.window, request.window_stride)

    def window_conditions(self, request: Request, starts: Sequence[int]) -> list[torch.Tensor]:
        """Text features ``[N, L, D]`` for each window: the request's prompts, or, with a prompt schedule, the mean
        of the window's frames' prompt features (one window: the whole clip's mean)."""
        from cinematic.diffusion.windows import frame_prompts, window_features

        if request.prompt_schedule is None:
            cond = self.encode_prompts([p for p in request.prompts for _ in range(request.num_videos)])
            return [cond] * len(starts)
        per_frame = frame_prompts(request.prompt_schedule, request.num_frames)
        distinct = list(dict.fromkeys(per_frame))
        features = self.encode_prompts(distinct)  # [P, L, D]
        index = [distinct.index(p) for p in per_frame]
        window = request.window if request.windowed else request.num_frames
        return [w.expand(request.count, *w.shape) for w in window_features(features, index, starts, window)]

    def guided_eps(
        self,
        request: Request,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        batched: bool = True,
        steps: int | None = None,
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The network as the sampler sees it, ``eps(x, t)``: classifier-free guidance around the UNet, with the
        request's fast modes (guidance truncation, feature caching) when they are on. ``steps``: the steps this
        sampling run takes (default ``request.steps``; fewer when video-to-video skips the first ones), of which
        guidance truncation keeps the first ``guidance_stop`` fraction guided."""
        from functools import partial

        from cinematic.diffusion import TruncatedGuidance, classifier_free_guidance, guided_steps
        from cinematic.models.feature_cache import DeepCache
        from cinematic.models.modifications import graph_safe

        cache = DeepCache(request.cache_interval, request.cache_depth) if request.cache_interval > 1 else None
        # The compiled or recorded UNet, for steps whose forward is the plain one: no feature caching, and no change
        # a recording would miss (FreeU, unmerged LoRA adapters), which are in place for the whole sampling run and
        # checked once here.
        fast = self._fast_unet if cache is None and graph_safe(self.model.unet) else None
        eps_model = partial(self._eps_model, cache=cache, fast=fast)
        guided = classifier_free_guidance(eps_model, cond, uncond, request.guidance_scale, batched=batched)
        if uncond is not None and request.guidance_stop < 1.0:
            guided = TruncatedGuidance(guided, guided_steps(steps or request.steps, request.guidance_stop))
        if cache is None:
            return guided

        def step(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            cache.next_step()  # samplers evaluate the network once per step
            return guided(x, t)

        return step

    def _eps_model(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        cache: DeepCache | None = None,
        fast: Callable[..., torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The UNet in its own dtype; latents and the sampler's arithmetic stay float32, as in the original. ``fast``:
        the compiled or recorded UNet (:meth:`accelerate`), which takes tensors only."""
        if fast is not None:
            t = torch.as_tensor(t, device=self.device, dtype=torch.float32).reshape(-1)
            return fast(x.to(self.dtype), t, context.to(self.dtype)).float()
        from cinematic.models.feature_cache import caching

        with caching(self.model.unet, cache):
            return self.model.unet(x.to(self.dtype), t, context.to(self.dtype)).float()

    def release_text_encoder(self) -> bool:
        """Free the text encoder's weights; it is loaded again from the model when next needed. Only a pipeline
        made by :meth:`from_pretrained` knows how to load it again: otherwise nothing is freed (returns False)."""
        if self._reload_text_encoder is None or self.model.text_encoder is None:
            return False
        self.model.text_encoder = None
        release_free_memory()
        return True

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, chunk: int | None = None) -> list[torch.Tensor]:
        """uint8 frames ``[F, H, W, 3]`` per video: ``(x + 1) / 2``, clamped, rounded. ``chunk``: frames per VAE call
        (default: 1 on the CPU, 8 elsewhere). On the CPU one frame at a time is no slower: the full model's 16 frames
        at 256x256 decoded in 55-63 s one by one and 62-67 s eight at a time, and eight at a time needed about 3 GB more
        (bench.py, 2026-11-26)."""
        if chunk is None:
            chunk = 1 if self.device.type == "cpu" else 8
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
            **({"cache_interval": request.cache_interval, "cache_depth": request.cache_depth}
               if request.cache_interval > 1 else {}),
            **({"guidance_stop": request.guidance_stop} if request.guidance_stop < 1.0 else {}),
            **({"strength": request.strength} if request.strength < 1.0 else {}),
            **({"loop": True} if request.loop else {}),
            **({"freeu": True} if request.freeu else {}),
            **({"freeinit": request.freeinit} if request.freeinit else {}),
            **({"window": request.window, "window_stride": request.window_stride} if request.windowed else {}),
            **({"prompt_schedule": " | ".join(f"{k}: {p}" for k, p in request.prompt_schedule)}
               if request.prompt_schedule else {}),
        }  # fmt: skip


def _load_text_encoder(
    model: str | Path, device: torch.device | str, dtype: torch.dtype, compute_dtype: torch.dtype, variant: str | None
) -> torch.nn.Module:
    """The text encoder of ``model`` alone, as :meth:`Pipeline.from_pretrained` loaded it."""
    from cinematic.weights import build_networks, open_source
    from cinematic.weights.files import load_into

    source = open_source(model, variant=variant)
    network = build_networks(source.config)["text_encoder"]
    load_into(network, source.readers["text_encoder"](dtype), f"{source.files['text_encoder']}", dtype, device)
    if compute_dtype != dtype:
        from cinematic.models.precision import compute_in

        compute_in(network, compute_dtype)
    return network.eval()
