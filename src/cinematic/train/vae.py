"""The VAE stage: the KL autoencoder on single frames, with an L1 + L2 reconstruction loss and a small KL term.

No perceptual or adversarial term (LDM's LPIPS + patch GAN): LPIPS needs pretrained VGG weights that cinematic does
not ship, and on the flat-coloured clips this stage is meant for (shapes, small fine-tunes) L1 + L2 already gives
sharp edges; fine-tuning the published VAE's decoder only (``--train decoder``) keeps its latent space intact.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from cinematic.models.components import Model
from cinematic.train.distributed import Draws

SCALE_BATCHES = 4  # batches whose latents set a fresh VAE's scaling factor


def vae_loss(
    model: Model,
    batch: dict[str, Any],
    draws: Draws,
    kl_weight: float,
    autocast: Callable[[], AbstractContextManager],
) -> tuple[torch.Tensor, dict[str, float]]:
    """``mean |x - x'| + mean (x - x')^2 + kl_weight * mean KL(q(z|x) || N(0, I))`` over every frame of the batch,
    the latent drawn from the posterior with ``draws`` (``train/distributed.py``); the networks run under
    ``autocast``, the losses in float32."""
    vae = model.vae
    weight = vae.quant_conv.weight
    video = batch["video"].to(weight.device)
    images = video.permute(0, 2, 1, 3, 4).flatten(0, 1)  # [B,3,F,H,W] -> [(B F),3,H,W]
    with autocast():
        mean, logvar = vae.encode(images)
        frames, tail = mean.shape[0] // video.shape[0], mean.shape[1:]
        eps = draws.take(lambda g, n: torch.randn((n * frames, *tail), generator=g).unflatten(0, (n, -1)))
        z = mean + (0.5 * logvar).exp() * eps.flatten(0, 1).to(mean.device, mean.dtype)
        recon = vae.decode(z)
    error = recon.float() - images
    l1, l2 = error.abs().mean(), error.square().mean()
    mean, logvar = mean.float(), logvar.float()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
    return l1 + l2 + kl_weight * kl, {"l1": l1.item(), "l2": l2.item(), "kl": kl.item()}


@torch.no_grad()
def latent_scale(model: Model, batches: list[dict[str, Any]], rng: torch.Generator) -> float:
    """``1 / std`` of posterior samples (LDM's rescaling, Rombach et al. 2022, section 4.3.2), so the UNet sees
    latents of unit variance. Set only for a fresh VAE: a fine-tuned one keeps the factor its UNet was trained on."""
    weight = model.vae.quant_conv.weight
    samples = []
    for batch in batches:
        images = batch["video"].to(weight.device).permute(0, 2, 1, 3, 4).flatten(0, 1)  # [(B F),3,H,W]
        mean, logvar = model.vae.encode(images)
        eps = torch.randn(mean.shape, generator=rng).to(mean.device, mean.dtype)
        samples.append((mean + (0.5 * logvar).exp() * eps).float().flatten())
    std = torch.cat(samples).std().item()
    return 1.0 / std if std > 0 else 1.0


@torch.no_grad()
def write_reconstructions(model: Model, batch: dict[str, Any], path: Path, fps: float) -> Path:
    """Originals and reconstructions side by side (posterior means), as one video."""
    from cinematic import video

    vae = model.vae
    clips = batch["video"].to(vae.quant_conv.weight.device)  # [B,3,F,H,W]
    images = clips.permute(0, 2, 1, 3, 4).flatten(0, 1)  # [(B F),3,H,W]
    recon = vae.decode(vae.encode(images)[0]).float().unflatten(0, clips.shape[:1] + clips.shape[2:3])
    pairs = torch.cat([clips.permute(0, 2, 1, 3, 4), recon], dim=-1)  # [B,F,3,H,2W]: original | reconstruction
    grid = torch.cat(list(pairs), dim=-2)  # [F,3,B*H,2W]: the batch stacked vertically
    frames = ((grid + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1)  # [F,B*H,2W,3]
    return video.write(path, frames.cpu(), fps=fps, metadata={"kind": "vae reconstruction"})
