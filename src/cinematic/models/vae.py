"""The Stable Diffusion KL-f8 autoencoder that maps video frames to and from the UNet's latent space.

Module attribute names mirror diffusers' ``AutoencoderKL`` (``encoder.down_blocks.0.resnets.0.norm1``,
``decoder.mid_block.attentions.0.to_q``...) because they are the state-dict keys: the diffusers ``vae/`` folder loads
without renames, and ``weights/ldm_vae.py`` maps the ModelScope / LDM ``first_stage_model.*`` keys onto them.

The VAE is an image model. Videos are folded to a batch of frames, batch-major (video ``b`` frame ``f`` is image
``b * F + f``), and processed in chunks of frames so that memory does not grow with the clip length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cinematic.errors import CinematicError
from cinematic.models import sizes
from cinematic.models.checks import MAX_CHANNELS, MAX_LAYERS_PER_BLOCK, MAX_LEVELS, integer, integers, number
from cinematic.models.layers import Attention, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D

# Every norm in the KL autoencoder uses eps 1e-6 (LDM's `Normalize`), unlike the UNet's 1e-5.
NORM_EPS = 1e-6
# LDM's DiagonalGaussianDistribution clamps the log-variance to keep exp() finite.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    # Width of each resolution level, finest first; every level but the last halves the resolution.
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    # ResNet blocks per encoder level; decoder levels have one more.
    layers_per_block: int = 2
    norm_groups: int = 32
    # Latents are multiplied by this after encoding and divided by it before decoding (SD's unit-variance factor).
    scaling_factor: float = 0.18215

    def __post_init__(self) -> None:
        if isinstance(self.block_out_channels, list):
            object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        for name in ("in_channels", "out_channels", "latent_channels", "norm_groups"):
            integer(getattr(self, name), f"vae.{name}", 1, MAX_CHANNELS)
        integer(self.layers_per_block, "vae.layers_per_block", 1, MAX_LAYERS_PER_BLOCK)
        integers(self.block_out_channels, "vae.block_out_channels", 1, MAX_CHANNELS, MAX_LEVELS)
        for width in self.block_out_channels:
            if width % self.norm_groups:
                raise CinematicError(
                    f"vae.block_out_channels {self.block_out_channels} must be positive multiples of "
                    f"norm_groups={self.norm_groups}"
                )
        number(self.scaling_factor, "vae.scaling_factor", 0, 1e6, open_low=True)
        sizes.check_parameters("the VAE", self.parameter_count())

    def parameter_count(self) -> int:
        """The parameters :class:`VAE` builds for this config, counted without building."""
        widths, latent, n = self.block_out_channels, self.latent_channels, len(self.block_out_channels)
        total = sizes.conv(self.in_channels, widths[0], 9)  # encoder
        for i, width in enumerate(widths):
            chain = [widths[max(i - 1, 0)]] + [width] * self.layers_per_block
            total += sum(sizes.resnet(a, b, None) for a, b in zip(chain, chain[1:]))
            total += sizes.conv(width, width, 9) if i < n - 1 else 0
        total += _vae_mid(widths[-1]) + sizes.norm(widths[-1]) + sizes.conv(widths[-1], 2 * latent, 9)
        backwards = widths[::-1]
        total += sizes.conv(latent, backwards[0], 9) + _vae_mid(backwards[0])  # decoder
        for i, width in enumerate(backwards):
            chain = [backwards[max(i - 1, 0)]] + [width] * (self.layers_per_block + 1)
            total += sum(sizes.resnet(a, b, None) for a, b in zip(chain, chain[1:]))
            total += sizes.conv(width, width, 9) if i < n - 1 else 0
        total += sizes.norm(backwards[-1]) + sizes.conv(backwards[-1], self.out_channels, 9)
        return (
            total + sizes.conv(2 * latent, 2 * latent, 1) + sizes.conv(latent, latent, 1)
        )  # quant_conv, post_quant_conv

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each spatial axis (8 for KL-f8)."""
        return 2 ** (len(self.block_out_channels) - 1)


def _vae_mid(channels: int) -> int:
    return (
        2 * sizes.resnet(channels, channels, None)
        + sizes.norm(channels)
        + sizes.attention(channels, channels, qkv_bias=True)
    )


VAE_FULL = VAEConfig()
# Same depth as the full model, so the same 8x latent factor, with 261,079 parameters: for fast tests.
VAE_TINY = VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_groups=8)


class MidAttention(Attention):
    """Single-head self-attention over all pixels with a pre-GroupNorm and a residual (LDM's ``AttnBlock``)."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, head_dim=channels, qkv_bias=True)
        self.group_norm = GroupNorm(groups, channels, eps=NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # [N,C,H,W] -> [N,(H W),C]
        out = super().forward(tokens)
        return x + out.transpose(1, 2).reshape(n, c, h, w)  # [N,(H W),C] -> [N,C,H,W]


class MidBlock(nn.Module):
    """ResNet, attention, ResNet at the coarsest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups=groups, eps=NORM_EPS) for _ in range(2)])
        self.attentions = nn.ModuleList([MidAttention(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        return self.resnets[1](self.attentions[0](x))


class DownLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * layers
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(widths[i], widths[i + 1], groups=groups, eps=NORM_EPS) for i in range(layers)]
        )
        # The encoder pads (0,1,0,1) before a stride-2, pad-0 conv, as LDM's `Downsample` does.
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, asymmetric=True)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * layers
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(widths[i], widths[i + 1], groups=groups, eps=NORM_EPS) for i in range(layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


def _run(block: nn.Module, x: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    """Runs ``block``, recomputing its activations in the backward pass when ``checkpointed`` and training."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(block, x, use_reentrant=False)
    return block(x)


class Encoder(nn.Module):
    """Image ``[N,in,H,W]`` -> mean and log-variance moments ``[N,2*latent,H/f,W/f]`` (before ``quant_conv``)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_groups
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                DownLevel(widths[max(i - 1, 0)], width, config.layers_per_block, groups, i < len(widths) - 1)
                for i, width in enumerate(widths)
            ]
        )
        self.mid_block = MidBlock(widths[-1], groups)
        self.conv_norm_out = GroupNorm(groups, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in [*self.down_blocks, self.mid_block]:
            x = _run(block, x, self.gradient_checkpointing)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent ``[N,latent,h,w]`` (after ``post_quant_conv``) -> image ``[N,out,h*f,w*f]``."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups = config.block_out_channels[::-1], config.norm_groups  # coarsest first
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups)
        self.up_blocks = nn.ModuleList(
            [
                UpLevel(widths[max(i - 1, 0)], width, config.layers_per_block + 1, groups, i < len(widths) - 1)
                for i, width in enumerate(widths)
            ]
        )
        self.conv_norm_out = GroupNorm(groups, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        for block in [self.mid_block, *self.up_blocks]:
            x = _run(block, x, self.gradient_checkpointing)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    """KL autoencoder. ``encode``/``decode`` work on raw (unscaled) latents of images; the ``*_video`` methods fold
    frames, chunk, and apply ``scaling_factor`` so their latents are the ones the UNet sees."""

    def __init__(self, config: VAEConfig = VAE_FULL):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.encoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = enabled

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``[N,C,H,W]`` in [-1, 1] -> posterior ``(mean, logvar)``, each ``[N,latent,H/f,W/f]``."""
        weight = self.quant_conv.weight
        moments = self.quant_conv(self.encoder(images.to(weight.device, weight.dtype)))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents ``[N,latent,h,w]`` -> images ``[N,C,h*f,w*f]``, roughly in [-1, 1] but not clamped."""
        weight = self.post_quant_conv.weight
        return self.decoder(self.post_quant_conv(z.to(weight.device, weight.dtype)))

    def encode_video(
        self,
        video: torch.Tensor,
        chunk: int = 8,
        generator: torch.Generator | None = None,
        sample: bool = True,
        eps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Video ``[B,C,F,H,W]`` in [-1, 1] -> scaled latents ``[B,latent,F,H/f,W/f]`` in the model dtype.

        With ``sample`` the latent is a posterior draw ``mean + std * eps``. ``eps`` is drawn on the CPU, for all
        B*F frames at once and in the model dtype, exactly as diffusers' ``VideoToVideoSDPipeline`` draws it with
        ``DiagonalGaussianDistribution.sample(generator)``; so the chunk size does not change the result. Without
        ``sample`` the posterior mean is used. A caller may pass its own ``eps`` (``[(B F),latent,h,w]``).
        """
        _check_video(video, self.config.in_channels, chunk, "video")
        mean, logvar = self.encode_moments(video, chunk)
        return self.posterior_latents(mean, logvar, video.shape[0], generator, sample, eps)

    def encode_moments(self, video: torch.Tensor, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """Video ``[B,C,F,H,W]`` -> the posterior's mean and log-variance, each ``[(B F),latent,h,w]``, unscaled."""
        frames = video.permute(0, 2, 1, 3, 4).flatten(0, 1)  # [B,C,F,H,W] -> [(B F),C,H,W]
        moments = [self.encode(part) for part in frames.split(chunk)]
        return torch.cat([m for m, _ in moments]), torch.cat([logvar for _, logvar in moments])

    def posterior_latents(
        self,
        mean: torch.Tensor,
        logvar: torch.Tensor,
        batch: int,
        generator: torch.Generator | None = None,
        sample: bool = True,
        eps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The scaled latents ``[B,latent,F,h,w]`` of posterior moments ``[(B F),latent,h,w]`` (see encode_video)."""
        z = mean
        if sample:
            if eps is None:
                eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device="cpu")
            z = mean + logvar.mul(0.5).exp() * eps.to(mean.device, mean.dtype)
        z = z * self.config.scaling_factor
        return z.unflatten(0, (batch, -1)).permute(0, 2, 1, 3, 4)  # [(B F),c,h,w] -> [B,c,F,h,w]

    def decode_video(self, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """Scaled latents ``[B,latent,F,h,w]`` -> video ``[B,C,F,h*f,w*f]`` in the model dtype, not clamped."""
        _check_video(latents, self.config.latent_channels, chunk, "latents")
        b = latents.shape[0]
        z = latents.permute(0, 2, 1, 3, 4).flatten(0, 1)  # [B,c,F,h,w] -> [(B F),c,h,w]
        z = z / self.config.scaling_factor
        frames = torch.cat([self.decode(part) for part in z.split(chunk)])
        return frames.unflatten(0, (b, -1)).permute(0, 2, 1, 3, 4)  # [(B F),C,H,W] -> [B,C,F,H,W]


def _check_video(x: torch.Tensor, channels: int, chunk: int, name: str) -> None:
    if x.ndim != 5 or x.shape[1] != channels:
        raise CinematicError(f"{name} must be [B,{channels},F,H,W], got {list(x.shape)}")
    if not isinstance(chunk, int) or chunk < 1:
        raise CinematicError(f"chunk must be a positive number of frames, got {chunk!r}")
