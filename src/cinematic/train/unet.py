"""The UNet stage: ε- or v-prediction on frozen VAE latents (DDPM, Ho et al. 2020, eq. 14), and sample videos.

``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps`` at ``t`` uniform over the training schedule (or
logit-normal, see :func:`draw_timesteps`), and the loss is ``mean (eps_theta(x_t, t, text) - eps)^2``, or, for a
model whose schedule says ``"v_prediction"``, the same against ``v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t)
x0`` (Salimans & Ho 2022). Per step that is the ε loss weighted by ``1 / alpha_bar_t``: the noisiest steps, where
only the caption tells what the clip holds, weigh most. Captions are dropped to "" at random so the same network also
learns the unconditional prediction that classifier-free guidance needs (Ho & Salimans 2022).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cinematic.diffusion.denoisers import prediction_target
from cinematic.models.components import Model
from cinematic.train.distributed import Draws

SampleFn = Callable[[Model, int], None]


def unet_loss(
    model: Model,
    batch: dict[str, Any],
    draws: Draws,
    alpha_bar: torch.Tensor,
    caption_dropout: float,
    autocast: Callable[[], AbstractContextManager],
    timesteps: tuple[str, float, float] = ("uniform", 0.0, 1.0),
) -> tuple[torch.Tensor, dict[str, float]]:
    """The ε- (or v-) prediction loss of one batch. Every draw (dropped captions, posterior sample, ``t``, ``eps``)
    comes from ``draws`` (this batch's rows of its step's draws, ``train/distributed.py``), on the CPU, in that
    order. The frozen VAE encodes in float32 (or the batch brings cached posterior moments, ``train/cache.py``);
    text encoder and UNet run under ``autocast``. ``timesteps`` is ``(sampling, mean, std)``, see
    :func:`draw_timesteps`."""
    device = model.unet.conv_in.weight.device
    b = len(batch["caption"])
    dropped = (draws.take(lambda g, n: torch.rand(n, generator=g)) < caption_dropout).tolist()
    captions = ["" if drop else caption for caption, drop in zip(batch["caption"], dropped)]
    x0 = clean_latents(model, batch, draws, device)  # [B,4,F,h,w], scaled
    t = draws.take(lambda g, n: draw_timesteps(n, alpha_bar.shape[0], g, *timesteps))
    eps = draws.take(lambda g, n: torch.randn((n, *x0.shape[1:]), generator=g))
    signal = alpha_bar[t].sqrt().float().view(b, 1, 1, 1, 1)  # coefficients in float64, applied in float32
    noise = (1.0 - alpha_bar[t]).sqrt().float().view(b, 1, 1, 1, 1)
    eps = eps.to(device)
    x_t = signal.to(device) * x0 + noise.to(device) * eps
    text_trains = any(p.requires_grad for p in model.text_encoder.parameters())
    with autocast():
        if "context" in batch and not text_trains:  # cached features of the captions and of ""
            keep = torch.tensor(dropped, device=device).view(b, 1, 1)
            context = torch.where(keep, batch["empty_context"].to(device), batch["context"].to(device))
        else:
            with torch.set_grad_enabled(text_trains):
                context = model.text_encoder(model.tokenizer(captions).to(device))
        pred = model.unet(x_t, t.to(device, torch.float32), context)
    target = prediction_target(model.config.schedule.prediction_type, x0, eps, signal.to(device), noise.to(device))
    return F.mse_loss(pred.float(), target), {}


@torch.no_grad()
def clean_latents(model: Model, batch: dict[str, Any], draws: Draws, device: torch.device) -> torch.Tensor:
    """``x0``: posterior samples ``[B,4,F,h,w]`` of the batch's clips (or of its cached moments ``[B,F,4,h,w]``)."""
    b = len(batch["caption"])
    if "mean" in batch:
        mean, logvar = (batch[key].to(device).flatten(0, 1) for key in ("mean", "logvar"))  # [(B F),4,h,w]
    else:
        mean, logvar = model.vae.encode_moments(batch["video"].to(device))
    frames, tail = mean.shape[0] // b, mean.shape[1:]
    eps = draws.take(lambda g, n: torch.randn((n * frames, *tail), generator=g, dtype=mean.dtype).unflatten(0, (n, -1)))
    return model.vae.posterior_latents(mean, logvar, b, eps=eps.flatten(0, 1)).float()


def draw_timesteps(n: int, steps: int, rng: torch.Generator, sampling: str, mean: float, std: float) -> torch.Tensor:
    """``n`` training timesteps in ``[0, steps)``: uniform, or logit-normal (``t / steps`` is the sigmoid of a normal
    draw, so ``mean = 0`` centres them on the middle of the schedule and a larger ``std`` spreads them out)."""
    if sampling == "uniform":
        return torch.randint(0, steps, (n,), generator=rng)
    u = torch.sigmoid(mean + std * torch.randn(n, generator=rng, dtype=torch.float64))
    return (u * steps).long().clamp_(0, steps - 1)


def prompt_sampler(
    folder: Path,
    prompts: Sequence[str],
    clip: tuple[int, int, int],
    steps: int,
    guidance: float,
    seed: int,
    **settings: Any,
) -> SampleFn | None:
    """A ``sample_fn`` writing ``folder/step-<step>-<i>.mp4`` for each prompt with ``cinematic.pipeline`` (and any
    other generation ``settings``, e.g. a sampler); None (with a note on stderr) when that module is not available."""
    try:
        from cinematic.pipeline import Pipeline
    except ImportError as e:
        print(f"note: no sample videos during training: cinematic.pipeline is not available ({e})", file=sys.stderr)
        return None
    frames, height, width = clip

    def sample(model: Model, step: int) -> None:
        from cinematic import video

        folder.mkdir(parents=True, exist_ok=True)
        pipe = Pipeline(model, device=model.unet.conv_in.weight.device, dtype=torch.float32)
        for i, prompt in enumerate(prompts):
            out = pipe(
                prompt,
                num_frames=frames,
                height=height,
                width=width,
                steps=steps,
                guidance_scale=guidance,
                seed=seed,
                progress=False,
                **settings,
            )
            path = folder / f"step-{step:06d}-{i:02d}.mp4"
            video.write(path, out.frames, fps=out.fps, metadata={**out.metadata, "training_step": step})

    return sample
