"""The network as a sampler sees it: the UNet in its own dtype, classifier-free guidance around it (or, for a UNet
with a guidance embedding, the guidance scale as its input), and the fast modes (guidance truncation, feature
caching) wrapped around that, one window of a long clip each."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from cinematic.diffusion import TruncatedGuidance, classifier_free_guidance, guided_steps
from cinematic.diffusion.windows import WindowedEps
from cinematic.generation.prompts import TextFeatures
from cinematic.models.feature_cache import DeepCache, caching
from cinematic.settings import Settings

Eps = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guidance_embedded(unet: torch.nn.Module) -> bool:
    """Whether ``unet`` takes the guidance scale as an input: its config's ``time_cond_proj_dim`` (the width of the
    guidance embedding, T2V-Turbo's and diffusers' name) is set. Configs from before it existed have none."""
    return getattr(unet.config, "time_cond_proj_dim", None) is not None


@dataclass(frozen=True)
class UNetCall:
    """How to run the UNet: the network, the dtype it computes in, its compiled or recorded form (``fast``,
    tensors only, valid for steps whose forward is the plain one), and the guidance scale ``w`` that a UNet with a
    guidance embedding is given at every call (a UNet without one is called without it)."""

    unet: torch.nn.Module
    dtype: torch.dtype
    device: torch.device
    fast: Callable[..., torch.Tensor] | None = None
    guidance: float = 1.0

    @property
    def embedded(self) -> bool:
        return guidance_embedded(self.unet)

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, cache: DeepCache | None = None
    ) -> torch.Tensor:
        """eps ``[B, C, F, h, w]``; latents and the sampler's arithmetic stay float32, as in the original."""
        # w per video [B], float32 like the timesteps: the UNet embeds w * 1000 sinusoidally.
        w = torch.full((x.shape[0],), float(self.guidance), device=self.device) if self.embedded else None
        if self.fast is not None and cache is None:
            t = torch.as_tensor(t, device=self.device, dtype=torch.float32).reshape(-1)
            tensors = (x.to(self.dtype), t, context.to(self.dtype)) + (() if w is None else (w,))
            return self.fast(*tensors).float()  # tensors only, positionally: CUDA graphs record them
        guidance = {} if w is None else {"guidance": w}
        with caching(self.unet, cache):
            return self.unet(x.to(self.dtype), t, context.to(self.dtype), **guidance).float()


def guided_eps(
    unet: UNetCall, settings: Settings, cond: torch.Tensor, uncond: torch.Tensor | None, steps: int, batched: bool
) -> Eps:
    """``eps(x, t)`` of one window: guidance with ``settings.guidance_scale``, truncated after the first
    ``guidance_stop`` of the ``steps`` this run takes, and feature caching when ``cache_interval > 1``. A UNet
    given the scale as an input (:attr:`UNetCall.embedded`) runs the conditional pass alone."""
    s = settings
    cache = DeepCache(s.cache_interval, s.cache_depth) if s.cache_interval > 1 else None
    scale = 1.0 if unet.embedded else s.guidance_scale
    guided = classifier_free_guidance(partial(unet, cache=cache), cond, uncond, scale, batched=batched)
    if uncond is not None and s.guidance_stop < 1.0:
        guided = TruncatedGuidance(guided, guided_steps(steps, s.guidance_stop))
    if cache is None:
        return guided

    def step(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cache.next_step()  # samplers evaluate the network once per step
        return guided(x, t)

    return step


def video_eps(
    unet: UNetCall, settings: Settings, text: TextFeatures, starts: Sequence[int], steps: int, batched: bool
) -> Eps:
    """The whole clip's ``eps(x, t)``: one guided network per window (built per sampling run, since the fast modes
    count steps), fused by :class:`~cinematic.diffusion.windows.WindowedEps` when there are several."""
    models = [guided_eps(unet, settings, cond, text.uncond, steps, batched) for cond in text.windows]
    return models[0] if len(models) == 1 else WindowedEps(models, starts, settings.window)
