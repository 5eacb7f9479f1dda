"""The pieces of the 3D UNet: frame folding, the timestep sinusoid, temporal convs, spatial and temporal
transformers, and the down / mid / up blocks that stack them.

Everything runs on frame-folded activations ``[(B F), C, H, W]`` (frames of one video contiguous, batch-major),
so the spatial layers are plain 2-D layers; only the temporal layers unfold to ``[B, C, F, H, W]``, and they do it
themselves. Attribute names mirror diffusers' ``UNet3DConditionModel`` because they become state-dict keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cinematic.models.layers import BasicTransformerBlock, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D

if TYPE_CHECKING:
    from cinematic.models.unet3d_config import UNet3DConfig

# Both references train the temporal convs with dropout 0.1 (ModelScope's TemporalConvBlock_v2 and diffusers'
# TemporalConvLayer); it is inactive in eval mode.
TEMPORAL_CONV_DROPOUT = 0.1
# The transformers' input GroupNorm uses eps 1e-6 in both references, independent of the resnets' norm_eps;
# the temporal convs use PyTorch's default 1e-5.
TRANSFORMER_NORM_EPS = 1e-6
TEMPORAL_CONV_NORM_EPS = 1e-5


def fold_frames(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, F, H, W] -> [(B F), C, H, W]``: frames of one video stay contiguous."""
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def unfold_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """``[(B F), C, H, W] -> [B, C, F, H, W]``; the inverse of :func:`fold_frames`."""
    bf, c, h, w = x.shape
    return x.reshape(bf // frames, frames, c, h, w).permute(0, 2, 1, 3, 4)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f_i), sin(t f_i)]`` with ``f_i = max_period^(-i/half)``, cos first.

    ``t``: ``[B]`` (int or float). Returns float32 ``[B, dim]`` whatever the model dtype: the arguments ``t f_i``
    reach ~1000 rad, where half precision would lose the phase. The frequencies are computed as diffusers does
    (``exp(-ln(max_period) i / half)``, shift 0); ModelScope's ``pow`` form agrees to float32 rounding.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:  # odd widths get one zero column, as in both references
        emb = F.pad(emb, (0, 1))
    return emb


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The embedding of a guidance scale that guidance-distilled students take (LCM, Luo et al. 2023; T2V-Turbo):
    ``[sin(1000 w f_i), cos(1000 w f_i)]`` with ``f_i = exp(-ln(10000) i / (half - 1))``, sin first, and one zero
    column for an odd ``dim``. Sin-first and the ``half - 1`` are what diffusers' ``get_guidance_scale_embedding`` and
    T2V-Turbo's ``get_w_embedding`` compute (both from VDM's code), unlike :func:`timestep_embedding`.

    ``w``: ``[B]``. Returns float32 ``[B, dim]`` (the arguments reach 15000 rad at w = 15).
    """
    half = dim // 2
    # Computed as the references do, in float32 and in their order: at w * 1000 up to 15000 rad, one ulp of a
    # frequency moves the phase by about 1e-3.
    step = torch.log(torch.tensor(10000.0, device=w.device)) / max(half - 1, 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -step)
    args = (w.float() * 1000.0)[:, None] * freqs[None, :]  # [B, half]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def maybe_checkpoint(fn: Callable[..., torch.Tensor], enabled: bool, *args: object) -> torch.Tensor:
    """Run ``fn(*args)``, recomputing its activations in the backward pass when ``enabled`` (training)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear from the sinusoid width to the embedding width (keys linear_1, linear_2).

    With ``cond_dim``, a bias-free ``cond_proj`` maps a condition (the guidance embedding) onto the input first, as
    diffusers' ``TimestepEmbedding(cond_proj_dim=...)`` does. It is registered between the two linears, where
    diffusers registers it: T2V-Turbo's LoRA files list their layers in module order (weights/turbo_lora.py).
    """

    def __init__(self, in_dim: int, embed_dim: int, cond_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, embed_dim)
        # Registered even when absent, so that one added later (unet3d.add_guidance_embedding) takes this place in
        # the module order, and the parameters' order is that of a UNet built with it (optimizer states match).
        self.register_module("cond_proj", nn.Linear(cond_dim, in_dim, bias=False) if cond_dim is not None else None)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None:
            x = x + self.cond_proj(cond)  # [B,D_cond] -> [B,D_in]
        return self.linear_2(F.silu(self.linear_1(x)))


class FrameConv(nn.Conv3d):
    """A ``Conv3d`` with a ``(k, 1, 1)`` kernel (frames only), computed as a 2-D convolution over ``[B, C, F, H*W]``.

    Same parameters and keys as the ``Conv3d`` (weight ``[C_out, C_in, k, 1, 1]``), same result up to float
    rounding (about 1e-6), faster on CPUs: PyTorch runs this Conv3d through its reference ``slow_conv3d`` kernel
    (vol2col and a matmul), while the 2-D form goes to oneDNN. Measured on one thread at the published model's
    widths and 16 frames: 0.74x (320 channels at 32x32), 0.88x (640, 16x16), 0.74x (1280, 8x8) of the Conv3d's time.
    """

    def __init__(self, in_channels: int, out_channels: int, frames_kernel: int = 3):
        super().__init__(in_channels, out_channels, (frames_kernel, 1, 1), padding=(frames_kernel // 2, 0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = x.shape
        weight = self.weight.squeeze(-1)  # [C_out, C_in, k, 1, 1] -> [C_out, C_in, k, 1]
        out = F.conv2d(x.reshape(b, c, f, h * w), weight, self.bias, padding=(self.padding[0], 0))
        return out.reshape(b, -1, f, h, w)  # [B,C,F,(H W)] -> [B,C,F,H,W]


def _temporal_conv_stage(channels: int, groups: int, dropout: bool) -> nn.Sequential:
    # keys: .0 GroupNorm, then .2 Conv3d (stage 1) or .3 Conv3d after a parameter-free dropout slot (stages 2-4).
    norm = GroupNorm(groups, channels, eps=TEMPORAL_CONV_NORM_EPS)
    conv = FrameConv(channels, channels)
    if dropout:
        return nn.Sequential(norm, nn.SiLU(), nn.Dropout(TEMPORAL_CONV_DROPOUT), conv)
    return nn.Sequential(norm, nn.SiLU(), conv)


class TemporalConvLayer(nn.Module):
    """Four GN-SiLU-Conv3d(3,1,1) stages over the frame axis, added to the input.

    The GroupNorms see the 5-D tensor, so their statistics pool over all frames of a video. The last conv is
    zero-initialised, as in both references, so that an untrained layer is the identity (training only).
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.conv1 = _temporal_conv_stage(channels, groups, dropout=False)
        self.conv2 = _temporal_conv_stage(channels, groups, dropout=True)
        self.conv3 = _temporal_conv_stage(channels, groups, dropout=True)
        self.conv4 = _temporal_conv_stage(channels, groups, dropout=True)
        nn.init.zeros_(self.conv4[-1].weight)
        nn.init.zeros_(self.conv4[-1].bias)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        video = unfold_frames(x, frames)  # [(B F),C,H,W] -> [B,C,F,H,W]
        h = self.conv4(self.conv3(self.conv2(self.conv1(video))))
        return fold_frames(video + h)  # [B,C,F,H,W] -> [(B F),C,H,W]


class SpatialTransformer(nn.Module):
    """Per-frame transformer over the H*W tokens with cross-attention to the text context (linear projections)."""

    def __init__(self, channels: int, heads: int, head_dim: int, context_dim: int, groups: int):
        super().__init__()
        inner = heads * head_dim
        self.norm = GroupNorm(groups, channels, eps=TRANSFORMER_NORM_EPS)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(inner, heads, head_dim, context_dim)])
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(n, h * w, c)  # [N,C,H,W] -> [N,(H W),C]
        tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        tokens = self.proj_out(tokens)
        return x + tokens.reshape(n, h, w, c).permute(0, 3, 1, 2)  # [N,(H W),C] -> [N,C,H,W]


def frame_embedding(frames: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[frames, width]``: sin in the first half, cos in the second, at frequencies ``10000 ** (-k / half)``."""
    half = width // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=device) / max(half, 1))
    angles = torch.arange(frames, dtype=torch.float32, device=device)[:, None] * freqs[None]
    table = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(table, (0, width - 2 * half)).to(dtype)


class TemporalTransformer(nn.Module):
    """Transformer along the frame axis, one sequence of F tokens per (video, pixel).

    In the published model both attentions are self-attention over frames and there is no positional embedding: the
    temporal convs are the only source of frame order. With ``positions``, a fixed sinusoidal embedding of the
    frame index (Vaswani et al. 2017, as AnimateDiff's motion modules add one) is added after ``proj_in``; it has no
    weights, so the state dict is the same. With ``context_dim``, the second attention attends to the text instead
    (the original code's ``only_self_att=False``): each frame's query meets the caption, so a word can act
    differently on different frames. The GroupNorm sees the 5-D tensor (statistics pooled over frames).
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        groups: int,
        positions: bool = False,
        context_dim: int | None = None,
    ):
        super().__init__()
        inner = heads * head_dim
        self.positions = positions
        self.norm = GroupNorm(groups, channels, eps=TRANSFORMER_NORM_EPS)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(inner, heads, head_dim, context_dim)])
        self.proj_out = nn.Linear(inner, channels)
        self.cross = context_dim is not None

    def forward(self, x: torch.Tensor, frames: int, context: torch.Tensor | None = None) -> torch.Tensor:
        """``context``: ``[(B F), L, D]`` (every frame's copy, as the spatial transformers take it) when the
        transformer cross-attends to the text, else unused."""
        video = self.norm(unfold_frames(x, frames))  # [(B F),C,H,W] -> [B,C,F,H,W]
        b, c, f, h, w = video.shape
        seq = video.permute(0, 3, 4, 2, 1).reshape(b * h * w, f, c)  # [B,C,F,H,W] -> [(B H W),F,C]
        seq = self.proj_in(seq)
        if self.positions:
            seq = seq + frame_embedding(f, seq.shape[-1], seq.device, seq.dtype)
        text = None
        if self.cross:
            if context is None:
                raise ValueError("this temporal transformer cross-attends to the text: pass the context")
            text = context[::frames].repeat_interleave(h * w, dim=0)  # [(B F),L,D] -> [(B H W),L,D]
        for block in self.transformer_blocks:
            seq = block(seq, text)
        seq = self.proj_out(seq)
        # [(B H W),F,C] -> [(B F),C,H,W]
        return x + seq.reshape(b, h, w, f, c).permute(0, 3, 4, 1, 2).reshape(b * f, c, h, w)


class _LayerStack(nn.Module):
    """The layer loop shared by all blocks: resnet -> temporal conv [-> spatial -> temporal transformer].

    The four lists are flat ModuleLists (diffusers' key layout); an attention-free level has no
    ``attentions``/``temp_attentions`` keys at all.
    """

    def _build(self, in_chs: list[int], out_ch: int, attention_layers: int, config: UNet3DConfig) -> None:
        groups, temb = config.norm_groups, config.time_embed_dim
        self.resnets = nn.ModuleList(ResnetBlock2D(c, out_ch, temb, groups, config.norm_eps) for c in in_chs)
        self.temp_convs = nn.ModuleList(TemporalConvLayer(out_ch, groups) for _ in in_chs)
        self.attentions: nn.ModuleList | None = None
        self.temp_attentions: nn.ModuleList | None = None
        if attention_layers:
            heads, head_dim = out_ch // config.head_dim, config.head_dim
            self.attentions = nn.ModuleList(
                SpatialTransformer(out_ch, heads, head_dim, config.cross_attention_dim, groups)
                for _ in range(attention_layers)
            )
            self.temp_attentions = nn.ModuleList(
                TemporalTransformer(
                    out_ch, heads, head_dim, groups, config.options.frame_positions, config.temporal_context_dim
                )
                for _ in range(attention_layers)
            )

    def _resnet(self, i: int, x: torch.Tensor, temb: torch.Tensor, frames: int) -> torch.Tensor:
        return self.temp_convs[i](self.resnets[i](x, temb), frames)

    def _attention(self, i: int, x: torch.Tensor, context: torch.Tensor, frames: int) -> torch.Tensor:
        return self.temp_attentions[i](self.attentions[i](x, context), frames, context)

    def _layer(self, i: int, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, frames: int) -> torch.Tensor:
        x = self._resnet(i, x, temb, frames)
        return x if self.attentions is None else self._attention(i, x, context, frames)


class DownBlock3D(_LayerStack):
    """One encoder level: ``layers`` resnet(+attention) layers, then an optional stride-2 downsample.

    Returns the output and the skips it produced: each layer's output, then the downsampled tensor.
    """

    def __init__(self, in_ch: int, out_ch: int, attention: bool, downsample: bool, config: UNet3DConfig):
        super().__init__()
        layers = config.layers_per_block
        self._build([in_ch] + [out_ch] * (layers - 1), out_ch, layers if attention else 0, config)
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)]) if downsample else None

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        context: torch.Tensor,
        frames: int,
        ckpt: bool = False,
        downsample: bool = True,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``downsample=False`` stops after the layers (a cached step needs only their skips)."""
        skips = []
        for i in range(len(self.resnets)):
            x = maybe_checkpoint(self._layer, ckpt, i, x, temb, context, frames)
            skips.append(x)
        if self.downsamplers is not None and downsample:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock3D(_LayerStack):
    """Bottleneck at the last level's width: resnet, spatial + temporal transformer, resnet (always attention)."""

    def __init__(self, channels: int, config: UNet3DConfig):
        super().__init__()
        self._build([channels, channels], channels, 1, config)

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, frames: int, ckpt: bool = False
    ) -> torch.Tensor:
        x = maybe_checkpoint(self._resnet, ckpt, 0, x, temb, frames)
        x = maybe_checkpoint(self._attention, ckpt, 0, x, context, frames)
        return maybe_checkpoint(self._resnet, ckpt, 1, x, temb, frames)


class UpBlock3D(_LayerStack):
    """One decoder level: layer i first concatenates ``[x, skips[-1 - i]]`` on channels (last skip first);
    then an optional nearest upsample to the next skip's exact size, so odd latent sizes round-trip."""

    def __init__(self, in_chs: list[int], out_ch: int, attention: bool, upsample: bool, config: UNet3DConfig):
        super().__init__()
        self._build(in_chs, out_ch, len(in_chs) if attention else 0, config)
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(
        self,
        x: torch.Tensor,
        skips: list[torch.Tensor],
        temb: torch.Tensor,
        context: torch.Tensor,
        frames: int,
        size: tuple[int, int] | None = None,
        ckpt: bool = False,
    ) -> torch.Tensor:
        for i, skip in enumerate(reversed(skips)):
            x = torch.cat([x, skip], dim=1)  # [N,C,H,W] ++ [N,C_skip,H,W] -> [N,C+C_skip,H,W]
            x = maybe_checkpoint(self._layer, ckpt, i, x, temb, context, frames)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x
