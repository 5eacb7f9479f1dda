"""The text-conditioned 3D UNet denoiser of text-to-video-ms-1.7b (ModelScope ``UNetSD``, diffusers
``UNet3DConditionModel``).

A Stable-Diffusion-2 UNet run per frame, with a temporal conv after every resnet and a temporal transformer after
every spatial transformer, plus one temporal transformer (``transformer_in``) right after ``conv_in``.
Module names mirror diffusers so its checkpoints load with ``load_state_dict(strict=True)`` and no renames;
``cinematic.weights.modelscope_unet`` maps ModelScope's layout onto them.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from cinematic.errors import CinematicError
from cinematic.models import modifications
from cinematic.models.feature_cache import DeepCache
from cinematic.models.layers import GroupNorm
from cinematic.models.unet3d_blocks import (
    DownBlock3D,
    MidBlock3D,
    TemporalTransformer,
    TimestepEmbedding,
    UpBlock3D,
    fold_frames,
    guidance_embedding,
    timestep_embedding,
    unfold_frames,
)
from cinematic.models.unet3d_config import LAYOUT_BASIS, UNet3DConfig, UNetLevel

UNET_FULL = UNet3DConfig()
# Small enough for CPU tests in milliseconds, but every structural case: attention and attention-free levels,
# two downsamplings (so odd latent sizes exercise the skip-sized upsampling), several layers per block.
UNET_TINY = UNet3DConfig(
    levels=(UNetLevel(16, True), UNetLevel(32, True), UNetLevel(32, False)),
    layers_per_block=2,
    head_dim=8,
    cross_attention_dim=32,
    norm_groups=4,
)


class UNet3D(nn.Module):
    """``forward(x [B,C,F,H,W], t, context [B,L,D]) -> eps [B,C_out,F,H,W]``; any F, any H and W >= 1."""

    def __init__(self, config: UNet3DConfig = UNET_FULL):
        super().__init__()
        self.config = config
        # Inference-time changes made through cinematic.models.modifications (never set by hand): recompute
        # activations in the backward pass (layers.checkpoint_gradients), reuse deep features (feature_cache.caching).
        self.gradient_checkpointing = False
        self.feature_cache: DeepCache | None = None
        widths = [level.channels for level in config.levels]
        c0 = widths[0]
        self.conv_in = nn.Conv2d(config.in_channels + config.coordinate_channels, c0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(c0, config.time_embed_dim, config.time_cond_proj_dim)
        if config.options.pooled_text:
            self.text_embedding = TimestepEmbedding(config.cross_attention_dim, config.time_embed_dim)
        if config.options.text_planes:
            self.text_layout = nn.Linear(config.cross_attention_dim, config.options.text_planes * LAYOUT_BASIS)
        self.transformer_in = TemporalTransformer(
            c0,
            config.transformer_in_heads,
            config.head_dim,
            config.norm_groups,
            config.options.frame_positions,
            config.temporal_context_dim,
        )
        self.down_blocks = nn.ModuleList(self._down_blocks(config))
        self.mid_block = MidBlock3D(widths[-1], config)
        self.up_blocks = nn.ModuleList(self._up_blocks(config))
        self.conv_norm_out = GroupNorm(config.norm_groups, c0, eps=config.norm_eps)
        self.conv_out = nn.Conv2d(c0, config.out_channels, 3, padding=1)

    @staticmethod
    def _down_blocks(config: UNet3DConfig) -> list[DownBlock3D]:
        widths = [level.channels for level in config.levels]
        last = len(widths) - 1
        return [
            DownBlock3D(widths[max(i - 1, 0)], level.channels, level.attention, i < last, config)
            for i, level in enumerate(config.levels)
        ]

    @staticmethod
    def _up_blocks(config: UNet3DConfig) -> list[UpBlock3D]:
        """Decoder levels, deepest first. Layer j of a level takes its input width plus the width of the skip it
        pops; the last layer pops the skip saved before this level's downsampling, one level shallower."""
        levels = list(reversed(config.levels))
        n, blocks = len(levels), []
        for i, level in enumerate(levels):
            prev = levels[max(i - 1, 0)].channels
            shallower = levels[min(i + 1, n - 1)].channels
            skip_chs = [level.channels] * config.layers_per_block + [shallower]
            in_chs = [(prev if j == 0 else level.channels) + s for j, s in enumerate(skip_chs)]
            blocks.append(UpBlock3D(in_chs, level.channels, level.attention, i < n - 1, config))
        return blocks

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def embed_time(
        self, t: torch.Tensor | float, batch: int, device: torch.device, guidance: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        """Timesteps (scalar, ``[1]`` or ``[B]``) -> ``[B, 4*C0]``; the sinusoids stay float32 until the MLP.

        ``guidance``: the guidance scale w (scalar, ``[1]`` or ``[B]``) of a UNet with a guidance embedding
        (``config.time_cond_proj_dim``). Such a UNet called without one skips ``cond_proj``, as diffusers' does
        without ``timestep_cond``; a UNet without the embedding refuses a guidance scale.
        """
        emb = timestep_embedding(_per_video(t, batch, device), self.config.levels[0].channels)
        cond = None
        if guidance is not None:
            dim = self.config.time_cond_proj_dim
            if dim is None or self.time_embedding.cond_proj is None:
                raise CinematicError(
                    "this UNet has no guidance embedding (time_cond_proj_dim): call it without a guidance scale"
                )
            cond = guidance_embedding(_per_video(guidance, batch, device), dim).to(self.dtype)
        return self.time_embedding(emb.to(self.dtype), cond)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        context: torch.Tensor,
        guidance: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """``guidance``: the guidance scale w, for a UNet with a guidance embedding (see :meth:`embed_time`).
        With a feature cache attached (:func:`cinematic.models.feature_cache.caching`), a cached step runs only the
        first ``cache.depth`` levels of the encoder and the last of the decoder."""
        b, _, frames, _, _ = x.shape
        cache, deep = self.feature_cache, None
        if cache is not None:
            cache.check_depth(len(self.down_blocks))
            deep = cache.lookup(x, context)
        levels = len(self.down_blocks) if deep is None else cache.depth
        # Time embedding and text context are per video; every frame gets its video's copy.
        temb = self.embed_time(t, b, x.device, guidance)
        options = self.config.options
        pooled = context.mean(dim=1) if options.pooled_text or options.text_planes else None  # [B,D]
        if options.pooled_text:
            temb = temb + self.text_embedding(pooled)  # [B,D] -> [B,E]
        temb = temb.repeat_interleave(frames, dim=0)  # [B,E] -> [(B F),E]
        context_f = context.repeat_interleave(frames, dim=0)  # [B,L,D] -> [(B F),L,D]

        if options.coordinates:
            x = torch.cat([x, coordinate_planes(x)], dim=1)
        if options.text_planes:
            weights = self.text_layout(pooled).view(b, options.text_planes, LAYOUT_BASIS)
            x = torch.cat([x, torch.einsum("bpk,kfhw->bpfhw", weights, layout_basis(x))], dim=1)
        h = self.conv_in(fold_frames(x))  # [B,C,F,H,W] -> [(B F),C,H,W]
        h = self.transformer_in(h, frames, context_f)
        skips = [h]
        for i, down in enumerate(self.down_blocks[:levels]):
            # A cached step skips the last kept level's downsampler: only the deeper levels read its output.
            downsample = deep is None or i < levels - 1
            h, level_skips = down(h, temb, context_f, frames, self.gradient_checkpointing, downsample)
            skips.extend(level_skips)

        first_up = 0
        if deep is None:
            h = self.mid_block(h, temb, context_f, frames, self.gradient_checkpointing)
        else:
            h, first_up = deep, len(self.up_blocks) - cache.depth
        for i, up in enumerate(self.up_blocks[first_up:], start=first_up):
            if cache is not None and deep is None and i == len(self.up_blocks) - cache.depth:
                cache.store(x, context, h)
            level_skips, skips = skips[-len(up.resnets) :], skips[: -len(up.resnets)]
            # Upsample to the exact size of the next skip (ceil-halving in the encoder makes odd sizes lossy).
            size = tuple(skips[-1].shape[-2:]) if skips else None
            h = up(h, level_skips, temb, context_f, frames, size, self.gradient_checkpointing)

        h = self.conv_out(F.silu(self.conv_norm_out(h)))
        return unfold_frames(h, frames)  # [(B F),C,H,W] -> [B,C,F,H,W]


def layout_basis(x: torch.Tensor) -> torch.Tensor:
    """``[9, F, H, W]``: x, y, f, x*f, y*f, x*y, x^2, y^2, f^2 over ``x``'s frames and pixels (each axis from -1 to
    1), in ``x``'s dtype: enough for a bump that slides along any axis-aligned or diagonal line over time."""
    c, r, f = coordinate_planes(x[:1])[0]
    return torch.stack([c, r, f, c * f, r * f, c * r, c * c, r * r, f * f])


def coordinate_planes(x: torch.Tensor) -> torch.Tensor:
    """``[B, 3, F, H, W]`` planes of x (column), y (row) and frame position, each from -1 to 1 across ``x``'s
    extent (0 where the extent is one), in ``x``'s dtype."""
    b, _, frames, h, w = x.shape

    def axis(n: int) -> torch.Tensor:
        return torch.linspace(-1.0, 1.0, n, device=x.device) if n > 1 else torch.zeros(1, device=x.device)

    f, r, c = torch.meshgrid(axis(frames), axis(h), axis(w), indexing="ij")
    return torch.stack([c, r, f]).to(x.dtype).expand(b, 3, frames, h, w)


def _per_video(value: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """A scalar, ``[1]`` or ``[B]`` value (a timestep, a guidance scale) as ``[B]``."""
    value = torch.as_tensor(value, device=device)
    return value.reshape(-1).expand(batch) if value.numel() == 1 else value.reshape(batch)


def add_guidance_embedding(unet: UNet3D, dim: int, detail: str = "") -> modifications.Modification:
    """Give ``unet``, which has none, a guidance embedding of width ``dim`` (``config.time_cond_proj_dim``) whose
    ``cond_proj`` is zero, so that the UNet computes exactly what it did until something (a LoRA) changes that
    weight; recorded as a change of ``unet`` (kind ``"guidance_embedding"``), undone by taking it off again.

    Zero, not a random initialisation: T2V-Turbo builds its student's ``cond_proj`` at PyTorch's default random
    initialisation, unseeded, and saves only the LoRA update on top of it, so the reference adds a different random
    projection of the guidance embedding to the timestep embedding in every run. Zero is that initialisation's mean:
    the guidance scale then acts through the trained update alone, and every run gives the same video.
    """
    if unet.config.time_cond_proj_dim is not None:
        raise CinematicError(
            f"this UNet already has a guidance embedding (time_cond_proj_dim={unet.config.time_cond_proj_dim})"
        )
    before = unet.config
    ref = unet.time_embedding.linear_1.weight
    proj = nn.Linear(dim, before.levels[0].channels, bias=False, device=ref.device, dtype=ref.dtype)
    nn.init.zeros_(proj.weight)
    unet.time_embedding.cond_proj = proj
    unet.config = dataclasses.replace(before, time_cond_proj_dim=dim)

    def remove() -> None:
        unet.time_embedding.cond_proj = None  # an empty place among the submodules: out of the state dict
        unet.config = before

    return modifications.record(unet, "guidance_embedding", detail, remove, graph_safe=True)
