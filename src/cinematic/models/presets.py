"""Named model presets, in one place."""

from __future__ import annotations

from cinematic.models.components import ModelConfig
from cinematic.models.text_encoder import TEXT_FULL, TEXT_TINY
from cinematic.models.unet3d import UNET_FULL, UNET_TINY
from cinematic.models.vae import VAE_FULL, VAE_TINY

PRESETS: dict[str, ModelConfig] = {
    # text-to-video-ms-1.7b as published: 1,411,233,860 + 340,387,840 + 83,653,863 parameters.
    "full": ModelConfig(unet=UNET_FULL, text_encoder=TEXT_FULL, vae=VAE_FULL),
    # A few thousand parameters per network, for tests.
    "tiny": ModelConfig(unet=UNET_TINY, text_encoder=TEXT_TINY, vae=VAE_TINY),
}
