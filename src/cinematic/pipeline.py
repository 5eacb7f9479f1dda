"""Text to video: prompt -> tokens -> text features -> initial noise or starting point -> guided denoiser -> sampler
-> latents -> frames -> :class:`Video`.

Each step is one function of :mod:`cinematic.generation`; this class holds the loaded model and runs them in order.
Its output equals diffusers' ``TextToVideoSDPipeline`` for the same weights, seed and settings. The settings
themselves are declared once, in :class:`cinematic.settings.Settings`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from cinematic import lora_loading as adapters
from cinematic.allocator import release_free_memory
from cinematic.diffusion import sample
from cinematic.diffusion.freeinit import free_init
from cinematic.diffusion.windows import window_starts
from cinematic.errors import CinematicError
from cinematic.generation.denoiser import UNetCall, video_eps
from cinematic.generation.frames import decode_frames
from cinematic.generation.loading import load_model, load_text_encoder, resolve_dtypes
from cinematic.generation.memory import Footprint, Memory, default_decode_chunk
from cinematic.generation.memory import fit as fit_memory
from cinematic.generation.memory import resolve as resolve_memory
from cinematic.generation.noise import initial_noise, video_seeds
from cinematic.generation.pictures import PathOrFrames, Pictures, load_pictures, starting_point
from cinematic.generation.prompts import encode_prompts, text_features
from cinematic.models.components import Model
from cinematic.models.cuda_graphs import CUDAGraphs
from cinematic.models.freeu import FREEU_VIDEO, freeu
from cinematic.models.layers import chunked_feed_forward
from cinematic.models.modifications import graph_safe
from cinematic.progress import Progress
from cinematic.settings import ModelFacts, SettingError, Settings, check_prompts, settings_from, with_old_names
from cinematic.video import write as write_video

log = logging.getLogger("cinematic")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


@dataclass
class Video:
    """A generated clip: uint8 frames ``[F, H, W, 3]``, its frame rate, and how it was made."""

    frames: torch.Tensor
    fps: float = 8
    metadata: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write the clip; the format follows the extension (.mp4, .webm, .gif, .webp, or a folder of PNGs)."""
        return write_video(path, self.frames, fps=self.fps, metadata=self.metadata)


class Videos(list):
    """The videos of one call, in order (prompt by prompt, ``num_videos`` each). When it holds one video it also
    answers for it: ``pipe(prompt).save("clip.mp4")``, ``.frames``, ``.fps``, ``.metadata``."""

    def _one(self) -> Video:
        if len(self) != 1:
            raise CinematicError(f"this call made {len(self)} videos; index them, e.g. videos[0]")
        return self[0]

    frames = property(lambda self: self._one().frames)
    fps = property(lambda self: self._one().fps)
    metadata = property(lambda self: self._one().metadata)

    def save(self, path: str | Path) -> Path:
        return self._one().save(path)


@dataclass(frozen=True)
class Request:
    """One checked call: its prompts, its resolved settings, and the seed of each of its videos."""

    prompts: tuple[str, ...]
    settings: Settings
    num_videos: int
    seeds: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.prompts) * self.num_videos


class Pipeline:
    """``Pipeline.from_pretrained(model)`` then ``pipe(prompt, **settings)`` -> :class:`Videos`."""

    def __init__(self, model: Model, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        """``dtype``: what the networks compute in (their weights may be stored in another)."""
        self.model, self.device, self.dtype = model, torch.device(device), dtype
        self.alpha_bar = model.config.schedule.alpha_bar()
        self.reload_text_encoder: Callable[[], torch.nn.Module] | None = None  # set by from_pretrained
        self._fast_unet: Callable[..., torch.Tensor] | None = None  # compiled and/or recorded (accelerate)
        self._graphs: CUDAGraphs | None = None
        self.memory = Memory.for_device(self.device)  # unless a call says; the CLI also frees the text encoder
        self.check_memory = True  # a call that would not fit goes low-memory or is refused before it starts
        self.defaults_before: dict[str, Any] = {}  # by LoRA name: the defaults a few-step LoRA replaced

    @classmethod
    def from_pretrained(
        cls, model: str | Path = "shapes", device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
        tokenizer: str | Path | None = None, variant: str | None = None, compute_dtype: torch.dtype | None = None,
        int8: bool = False, loras: Sequence[tuple[str | Path, float]] = (), merge_loras: bool = False,
        winograd: bool = True, compile: str | None = None, cuda_graphs: bool = False,
    ) -> Pipeline:  # fmt: skip
        """Load any path, bundled name or hub id that :func:`cinematic.weights.load` takes. ``dtype``: what the
        weights are stored in; ``compute_dtype`` (default ``dtype``): what the networks compute in (fp16 storage with
        fp32 compute halves the weights' memory on CPUs and, from fp16 files, gives the fp32 results). Without
        ``dtype``: :func:`cinematic.generation.loading.default_dtypes` (on a CPU, half-precision files stay half
        precision and compute in fp32; on a GPU, fp16). ``int8`` and
        ``winograd``: see :func:`cinematic.generation.loading.load_model`; ``loras``: ``[(path, scale)]`` (see
        :meth:`load_lora`); ``compile`` and ``cuda_graphs``: see :meth:`accelerate`."""
        device = torch.device(device)
        changes_weights = int8 or bool(loras and merge_loras)  # stored as computed
        dtype, compute_dtype = resolve_dtypes(model, device, dtype, compute_dtype, variant, changes_weights)
        loaded = load_model(model, device, dtype, compute_dtype, tokenizer, variant, int8, winograd)
        pipe = cls(loaded, device, compute_dtype)
        pipe.reload_text_encoder = lambda: load_text_encoder(model, device, dtype, compute_dtype, variant)
        for path, scale in loras:
            pipe.load_lora(path, scale, merge=merge_loras)
        if compile is not None or cuda_graphs:
            pipe.accelerate(compile=compile, cuda_graphs=cuda_graphs)
        return pipe

    def accelerate(self, compile: str | None = None, cuda_graphs: bool = False) -> None:
        """Run the UNet's plain steps through ``torch.compile`` (``compile``: one of :data:`COMPILE_MODES`) and/or
        replay them as CUDA graphs (:mod:`cinematic.models.cuda_graphs`). Steps with feature caching or FreeU run
        eagerly. ``accelerate()`` turns both off."""
        check_acceleration(compile, cuda_graphs, self.device)
        unet: Callable[..., torch.Tensor] = self.model.unet
        if compile is not None:
            unet = torch.compile(unet, mode=None if compile == "default" else compile, dynamic=False)
        self._graphs = CUDAGraphs(unet) if cuda_graphs else None
        self._fast_unet = self._graphs or (unet if compile is not None else None)

    def load_lora(self, path: str | Path, scale: float = 1.0, merge: bool = False) -> str:
        """Apply the LoRA adapter at ``path`` (a file, folder or hub id) with strength ``scale`` (see
        :func:`load_lora_into`); returns its name for :meth:`unload_lora`."""
        if self._graphs is not None:
            self._graphs.reset()  # the recordings would run the layers as they were
        return load_lora_into(self.model, self.defaults_before, path, scale, merge)

    def unload_lora(self, name: str | None = None) -> None:
        """Take off the adapter ``name`` (default: all of them), restoring the base weights bit for bit."""
        if self._graphs is not None:
            self._graphs.reset()
        unload_lora_from(self.model, self.defaults_before, name)

    @property
    def facts(self) -> ModelFacts:
        """What this model's settings default to and are bounded by."""
        return ModelFacts.of(self.model.config)

    def validate(
        self, prompt: str | Sequence[str] | None = None, num_videos: int = 1, same_seed: bool = False,
        pictures: Pictures | None = None, **settings: Any,
    ) -> Request:  # fmt: skip
        """A :class:`Request` with every setting of :class:`~cinematic.settings.Settings` checked and resolved.
        ``same_seed``: every video starts from the noise of the seed itself, not seed + i."""
        prompts = check_prompts(prompt, settings.get("prompt_schedule"))
        if isinstance(num_videos, bool) or not isinstance(num_videos, int) or not 1 <= num_videos <= 64:
            raise SettingError("num_videos", f"must be an integer from 1 to 64, not {num_videos!r}")
        video = pictures.video if pictures is not None else None
        given = settings_from({"prompt": prompts[0], **settings})
        resolved = given.resolve(self.facts, None if video is None else len(video), restyling=video is not None)
        if video is not None and len(video) < resolved.num_frames:  # refused here, not once the model has run
            raise SettingError("num_frames", f"the init video has {len(video)} frames, fewer than the "
                                             f"{resolved.num_frames} requested")  # fmt: skip
        seeds = video_seeds(resolved.seed, len(prompts) * num_videos, same_seed)
        return Request(prompts, resolved, num_videos, tuple(seeds))

    def __call__(
        self, prompt: str | Sequence[str] | None = None, *, num_videos: int = 1, init_video: PathOrFrames | None = None,
        init_image: PathOrFrames | None = None, loras: Sequence[tuple[str | Path, float]] | None = None,
        progress: bool = True, low_memory: bool = False, memory: Memory | None = None,
        callback: Callable[[int, int], None] | None = None, same_seed: bool = False, **settings: Any,
    ) -> Videos:  # fmt: skip
        """Generate ``num_videos`` videos of each prompt. ``settings``: any of :class:`cinematic.settings.Settings`
        (``num_frames``, ``num_inference_steps``, ``guidance_scale``, ``seed``, ``sampler``...). ``init_video`` (a
        path or uint8 ``[F, H, W, 3]``) is restyled with ``strength``; ``init_image`` (a path or uint8 ``[H, W, 3]``)
        is animated from the first frame. ``loras``: ``[(path, scale)]`` for this call only. ``low_memory`` (or a
        :class:`Memory`): how memory is spent, never what is made."""
        pictures = load_pictures(init_video, init_image)
        request = self.validate(prompt, num_videos, same_seed, pictures, **settings)
        memory = self.fit(request, memory or (Memory.low() if low_memory else None))
        with adapters.loras_applied(self.model.unet, loras):
            latents = self.sample(request, progress, callback=callback, pictures=pictures, memory=memory)
        frames = self.decode(latents, memory.decode_chunk)
        return Videos(Video(f, request.settings.fps, self.metadata(request, i)) for i, f in enumerate(frames))

    @torch.inference_mode()
    def sample(
        self, request: Request, progress: bool = True, low_memory: bool = False,
        callback: Callable[[int, int], None] | None = None, pictures: Pictures | None = None,
        memory: Memory | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """The final latents ``[N, C, F, h, w]`` (float32) of ``request``; ``pictures``: what it starts from."""
        memory = memory or (Memory.low() if low_memory else Memory())
        s = request.settings
        starts = window_starts(s.num_frames, s.window, s.window_stride) if s.windowed else [0]
        text = text_features(self.encode_prompts, s, request.prompts, request.num_videos, starts,
                             s.unconditional_pass(self.facts))  # fmt: skip
        if memory.free_text_encoder:
            self.release_text_encoder()
        start = starting_point(self.model, s, request.count, request.seeds, pictures, self.dtype)
        if start.init is not None and start.start == s.num_inference_steps:
            return start.init  # a strength that leaves no step: the encoded clip itself
        steps = s.num_inference_steps - start.start
        bar = Progress(steps * (s.freeinit + 1), "sampling") if progress else None

        def step_done(i: int, total: int) -> None:
            if bar is not None:
                bar.update()
            if callback is not None:
                callback(i, total)

        def run(noise: torch.Tensor) -> torch.Tensor:
            # The compiled or recorded UNet serves plain steps only: no feature caching, and no modification that a
            # recorded forward would not run (FreeU, unmerged adapters), which are in place for the whole run.
            fast = self._fast_unet if s.cache_interval == 1 and graph_safe(self.model.unet) else None
            unet = UNetCall(self.model.unet, self.dtype, self.device, fast, s.guidance_scale)
            pin = start.pin(noise)
            latents = sample(
                s.sampler, video_eps(unet, s, text, starts, steps, memory.batched_guidance), noise,
                s.num_inference_steps, eta=None if s.sampler == "euler_ancestral" and s.eta == 0 else s.eta,
                generator=start.generator, callback=step_done, alpha_bar=self.alpha_bar, init=start.init,
                start=start.start, wrap=None if pin is None else pin.wrap,
                prediction=self.model.config.schedule.prediction_type,
                spacing=self.model.config.schedule.timestep_spacing,
                steps_offset=self.model.config.schedule.steps_offset, timestep_scaling=s.timestep_scaling,
            )  # fmt: skip
            return latents if pin is None else pin.finish(latents)

        try:
            unet = self.model.unet
            with freeu(unet, FREEU_VIDEO if s.freeu else None), chunked_feed_forward(unet, memory.feed_forward_rows):
                return free_init(run, start.noise, s.freeinit, self.alpha_bar, start.generator)
        finally:
            if bar is not None:
                bar.close()
            release_free_memory()

    def fit(self, request: Request, memory: Memory | None = None) -> Memory:
        """The memory plan of ``request``, checked against what is free: :func:`cinematic.generation.memory.fit`."""
        if not self.check_memory:
            return resolve_memory(Footprint.of(self), request.settings, request.count, memory or self.memory)
        plan, note = fit_memory(Footprint.of(self), request.settings, request.count, memory, self.memory)
        if note:
            log.warning("note: %s", note)
        return plan

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text features ``[N, L, D]`` (the text encoder is loaded again if it was freed)."""
        if self.model.text_encoder is None:
            self.model.text_encoder = self.reload_text_encoder()
        return encode_prompts(self.model.tokenizer, self.model.text_encoder, prompts, self.device)

    def initial_noise(self, request: Request) -> tuple[torch.Tensor, torch.Generator]:
        """The request's initial noise on this device, and its first video's generator."""
        noise, generator = initial_noise(self.model.config, request.settings, request.seeds)
        return noise.to(self.device), generator

    def release_text_encoder(self) -> bool:
        """Free the text encoder's weights, if it can be loaded again (a pipeline made by :meth:`from_pretrained`)."""
        if self.reload_text_encoder is None or self.model.text_encoder is None:  # nothing to free, or no way back
            return False
        self.model.text_encoder = None
        release_free_memory()
        return True

    def decode(self, latents: torch.Tensor, chunk: int | None = None) -> list[torch.Tensor]:
        """uint8 frames ``[F, H, W, 3]`` per video; ``chunk``: frames per VAE call (default: by the frames' size,
        :func:`cinematic.generation.memory.default_decode_chunk`)."""
        factor = self.model.config.vae.downsample_factor
        chunk = chunk or default_decode_chunk(self.device, latents.shape[-2] * latents.shape[-1] * factor**2)
        return decode_frames(self.model.vae, latents, self.dtype, chunk)

    def metadata(self, request: Request, index: int) -> dict[str, Any]:
        """Video ``index``'s settings, by their names, with its prompt and seed and the model it came from."""
        prompt = request.prompts[index // request.num_videos]
        values = replace(request.settings, prompt=prompt, seed=request.seeds[index]).values()
        return {**with_old_names(values), "model": self.model.source, "generator": "cinematic"}


def load_lora_into(model: Model, before: dict[str, Any], path: str | Path, scale: float, merge: bool) -> str:
    """Load a LoRA onto ``model``'s UNet (:func:`cinematic.lora_loading.load_lora`); returns its name. A few-step
    student's sampler settings (``lora_loading.FEW_STEP_DEFAULTS``) become the model's defaults until it is unloaded
    (``before`` keeps the ones they replaced; settings a call names still win), and the model's config takes the
    UNet's (a T2V-Turbo LoRA gives it a guidance embedding)."""
    few_step = adapters.few_step_defaults(path)
    name = adapters.load_lora(model.unet, path, scale, merge)
    if few_step is not None:
        before[name] = model.config.defaults
        model.config = replace(model.config, defaults=replace(model.config.defaults, **few_step))
    model.config = replace(model.config, unet=model.unet.config)
    return name


def unload_lora_from(model: Model, before: dict[str, Any], name: str | None) -> None:
    """Take LoRA ``name`` (None: all) off ``model``'s UNet; the defaults each few-step student replaced come back."""
    adapters.unload_lora(model.unet, name)
    for each in [name] if name is not None else reversed(list(before)):
        if each in before:
            model.config = replace(model.config, defaults=before.pop(each))
    model.config = replace(model.config, unet=model.unet.config)


def check_acceleration(compile: Any, cuda_graphs: bool, device: torch.device | str) -> None:
    if compile is not None and compile not in COMPILE_MODES:
        raise CinematicError(f"unknown compile mode {compile!r}; allowed: {', '.join(COMPILE_MODES)}")
    if cuda_graphs and torch.device(device).type != "cuda":
        raise CinematicError(f"CUDA graphs need a CUDA device, not {device}; allowed: --device cuda")
