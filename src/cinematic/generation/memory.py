"""How much memory a generation needs beyond the loaded weights, how much the machine has, and the plan that fits.

The estimate is a model of what was measured, not a bound. ``benchmarks/bench.py --preset full`` (run D, random
weights, 16 frames at 256x256, fp32 compute, 2-core EPYC; docs/performance.md) saw the resident set grow over the
loaded weights by 2.65 GiB during batched-guidance steps (batch 2), by 1.30 GiB during one conditional pass
(batch 1) and by 1.09 GiB with the feed-forwards in pieces: linear in the batch, about 83 kB per latent token and
batch row, where the first UNet level is 320 channels wide; that is 65 values of the first level per token
(:data:`STEP_VALUES`), 55 with the feed-forwards in pieces. Decoding one 256x256 frame at a time added 0.73 GiB,
about 12 kB per pixel of a chunk (:data:`DECODE_BYTES_PER_PIXEL`). A safety margin covers the allocator's
slack and what the measurement did not vary.
"""

from __future__ import annotations

import dataclasses
import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cinematic.errors import CinematicError
from cinematic.settings import ModelFacts

STEP_VALUES = 65  # activation values of the first UNet level's width, per latent token and batch row, at the peak
STEP_VALUES_CHUNKED = 55  # the same with the feed-forwards run in pieces
DECODE_BYTES_PER_PIXEL = 12_000  # per output pixel of the frames decoded in one VAE call (fp32)
MARGIN = 1.2  # the estimate times this must fit
# Below this much step memory (batched), a CPU runs the two guidance passes as one batch: small calls are dominated by
# per-call overhead (the shapes model's 20 steps: 2.6 s batched, 3.7 s one by one). The full model at 16 frames of
# 256x256 needs 3.3 GB, and is no slower one by one.
BATCH_BELOW = 256 * 2**20
# On a CPU the VAE decodes about this many output pixels per call: one frame at full size (256x256, where one frame at
# a time is no slower than eight and needs about 3 GB less, frames.py), a whole 16-frame clip at the shapes model's
# 32x32, where per-call overhead dominates. Elsewhere it decodes GPU_DECODE_CHUNK frames per call.
CPU_DECODE_PIXELS = 256 * 256
GPU_DECODE_CHUNK = 8


@dataclass(frozen=True)
class Memory:
    """How a call spends memory; none of these changes the video. ``low()`` is ``low_memory=True``: the guidance
    passes one after the other, the text encoder freed once the prompts are encoded (loaded again when next needed),
    one frame per VAE call, and the UNet's feed-forwards 4096 tokens at a time (at 16 frames of 32x32 latents, a
    step's largest live set 0.75 -> 0.50 GB, at the same speed)."""

    batched_guidance: bool | None = True  # None: batched when the step is small (see BATCH_BELOW), else one by one
    free_text_encoder: bool = False
    decode_chunk: int | None = None  # frames per VAE call; None: by the frames' size (default_decode_chunk)
    feed_forward_rows: int | None = None

    @classmethod
    def low(cls) -> Memory:
        return cls(batched_guidance=False, free_text_encoder=True, decode_chunk=1, feed_forward_rows=4096)

    @classmethod
    def for_device(cls, device: torch.device) -> Memory:
        """The default: on a CPU the guidance passes one after the other when a step is large (no slower there:
        64.9 s against 66.7 s a step at full size, docs/performance.md run D) and batched when it is small (the
        shapes model: 1.45x faster batched); elsewhere one batch. The VAE's frames per call follow the frames' size
        (:func:`default_decode_chunk`)."""
        return cls(batched_guidance=None) if device.type == "cpu" else cls()


@dataclass(frozen=True)
class Need:
    """Bytes a run adds over what is loaded: at its sampling peak and its decoding peak; ``freed``: what it frees
    before sampling (the text encoder, when the plan frees it)."""

    steps: int
    decode: int
    freed: int = 0

    @property
    def peak(self) -> int:
        return max(self.steps - self.freed, self.decode - self.freed)


def network_bytes(network: torch.nn.Module | None) -> int:
    if network is None:
        return 0
    return sum(t.numel() * t.element_size() for t in (*network.parameters(), *network.buffers()))


def estimate(
    first_channels: int,
    latent_tokens: int,
    batch: int,
    pixels: int,
    compute_bytes: int,
    chunked_feed_forward: bool,
    decode_chunk: int,
    freed: int = 0,
) -> Need:
    """The :class:`Need` of a run whose UNet's first level is ``first_channels`` wide, on ``latent_tokens`` latent
    positions (frames x h x w of one window) for ``batch`` rows per UNet call, decoding frames of ``pixels`` pixels
    ``decode_chunk`` at a time."""
    values = STEP_VALUES_CHUNKED if chunked_feed_forward else STEP_VALUES
    steps = values * first_channels * compute_bytes * latent_tokens * batch
    decode = DECODE_BYTES_PER_PIXEL * pixels * decode_chunk * compute_bytes // 4
    return Need(int(steps * MARGIN), int(decode * MARGIN), freed)


def available_bytes() -> int | None:
    """What this process may still allocate: the least of the machine's available memory, its cgroup's headroom and
    its address-space limit's headroom; None when none of them can be read."""
    figures = [f for f in (_meminfo_available(), _cgroup_headroom(), _rlimit_headroom()) if f is not None]
    return min(figures) if figures else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom() -> int | None:
    try:
        group = Path("/proc/self/cgroup").read_text().strip().split("::", 1)[1]
        folder = Path("/sys/fs/cgroup") / group.lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((folder / "memory.current").read_text())
    except (OSError, ValueError, IndexError):
        return None


def _rlimit_headroom() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return soft - pages * os.sysconf("SC_PAGE_SIZE")


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


@dataclass(frozen=True)
class Footprint:
    """What a loaded model's runs need depends on: its config, the dtype it computes in, its device, and the bytes
    of its text encoder (freed by plans that free it; 0 when it cannot be loaded again)."""

    config: Any
    dtype: torch.dtype
    device: torch.device
    text_encoder: int = 0

    @classmethod
    def of(cls, pipe: Any) -> Footprint:
        """The footprint of a ``cinematic.pipeline.Pipeline``."""
        text_encoder = network_bytes(pipe.model.text_encoder) if pipe.reload_text_encoder else 0
        return cls(pipe.model.config, pipe.dtype, pipe.device, text_encoder)

    def need(self, settings: Any, count: int, memory: Memory) -> Need:
        """What ``count`` videos of ``settings`` need beyond the loaded weights under ``memory``."""
        s, c = settings, self.config
        f = c.vae.downsample_factor
        tokens = (s.window if s.windowed else s.num_frames) * (s.height // f) * (s.width // f)
        batch = count * (2 if memory.batched_guidance and s.unconditional_pass(ModelFacts.of(c)) else 1)
        chunk = min(memory.decode_chunk or default_decode_chunk(self.device, s.height * s.width), count * s.num_frames)
        return estimate(
            c.unet.levels[0].channels, tokens, batch, s.height * s.width, torch.finfo(self.dtype).bits // 8,
            memory.feed_forward_rows is not None, chunk, self.text_encoder if memory.free_text_encoder else 0,
        )  # fmt: skip


def default_decode_chunk(device: torch.device, pixels: int) -> int:
    """Frames of ``pixels`` pixels per VAE call when a plan does not say: on a CPU as many as make
    :data:`CPU_DECODE_PIXELS` (at least one), elsewhere :data:`GPU_DECODE_CHUNK`."""
    return max(1, CPU_DECODE_PIXELS // pixels) if device.type == "cpu" else GPU_DECODE_CHUNK


def fit(
    footprint: Footprint, settings: Any, count: int, chosen: Memory | None, default: Memory
) -> tuple[Memory, str | None]:
    """The plan a run takes, and a note when it was switched: ``chosen`` if the caller named one, else ``default``,
    or :meth:`Memory.low` when only that fits what is free. Raises one line when nothing fits."""
    plan = resolve(footprint, settings, count, chosen or default)
    available = available_bytes()
    if available is None or footprint.need(settings, count, plan).peak <= available:
        return plan, None
    low = Memory.low()
    lowest = footprint.need(settings, count, low).peak
    if lowest <= available and chosen is None:
        return low, f"about {gigabytes(available)} is free, not enough for the default mode; running in low-memory mode"
    if lowest <= available:
        need = gigabytes(footprint.need(settings, count, plan).peak)
        raise CinematicError(
            f"not enough memory: this mode needs about {need} more and {gigabytes(available)} is free; low-memory "
            "mode (low_memory=True, --low-memory) would fit"
        )
    frames = _fewer_frames(footprint, settings, count, available)
    fits = f"num_frames={frames} (--num-frames {frames})" if frames else "a smaller height and width"
    raise CinematicError(
        f"not enough memory: this video needs about {gigabytes(lowest)} more even in low-memory mode, and "
        f"{gigabytes(available)} is free; {fits} would fit, or free memory first"
    )


def resolve(footprint: Footprint, settings: Any, count: int, plan: Memory) -> Memory:
    """``plan`` with an automatic ``batched_guidance`` decided for this run (batched below :data:`BATCH_BELOW`)."""
    if plan.batched_guidance is not None:
        return plan
    batched = dataclasses.replace(plan, batched_guidance=True)
    small = footprint.need(settings, count, batched).steps <= BATCH_BELOW
    return batched if small else dataclasses.replace(plan, batched_guidance=False)


def _fewer_frames(footprint: Footprint, settings: Any, count: int, available: int) -> int:
    """The most frames that would fit in low-memory mode (0: none)."""
    for frames in range(settings.num_frames - 1, 0, -1):
        smaller = dataclasses.replace(settings, num_frames=frames, window=min(settings.window, frames))
        if footprint.need(smaller, count, Memory.low()).peak <= available:
            return frames
    return 0
