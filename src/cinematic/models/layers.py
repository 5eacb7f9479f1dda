"""Building blocks shared by the 3D UNet and the VAE.

Module attribute names follow the diffusers checkpoints (``to_q``, ``to_out.0``, ``norm1``, ``conv_shortcut``...),
because they become state-dict keys: the diffusers layout then loads without renames, and LoRA adapters written
for diffusers find their layers by name.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from cinematic.models import modifications


class GroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics are computed in float32 whatever the weight dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the weight dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def multi_head_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False
) -> torch.Tensor:
    """Scaled dot-product attention over ``[N, L, heads*D]`` projections; returns ``[N, L, heads*D]``."""
    n, lq, inner = q.shape
    d = inner // heads
    # [N, L, heads*D] -> [N, heads, L, D]
    q, k, v = (t.view(n, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(n, lq, inner)  # [N, heads, L, D] -> [N, L, heads*D]


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names: to_q/to_k/to_v and to_out.0."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, qkv_bias: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = multi_head_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """Linear projection to twice the width, split into value and gate: ``value * gelu(gate)`` (exact GELU)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward. Its intermediate is 12x the input's size (the projection to 8x the width, then the gated
    4x): at 16 frames of 32x32 latents the first level's is ~0.35 GB, the largest tensor of a step. With ``rows``
    set (by :func:`chunk_feed_forwards`, never by hand) inference runs it that many tokens at a time."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # keys: net.0.proj (GEGLU), net.2 (output projection); net.1 is a parameter-free dropout slot.
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])
        self.rows: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is None or torch.is_grad_enabled() or x.numel() <= self.rows * x.shape[-1]:
            return self.net[2](self.net[0](x))
        flat = x.reshape(-1, x.shape[-1])
        pieces = [self.net[2](self.net[0](flat[i : i + self.rows])) for i in range(0, flat.shape[0], self.rows)]
        return torch.cat(pieces).view(*x.shape[:-1], -1)


def chunk_feed_forwards(module: nn.Module, rows: int) -> modifications.Modification:
    """Make every :class:`FeedForward` in ``module`` run ``rows`` tokens at a time at inference, until undone.

    Graph-safe: each row's result is computed as before (only the matrix products' blocking differs), so a compiled
    or recorded plain forward computes the same values; it just keeps the unchunked memory peak.
    """
    layers = [m for m in module.modules() if isinstance(m, FeedForward)]
    before = [layer.rows for layer in layers]
    for layer in layers:
        layer.rows = rows

    def restore() -> None:
        for layer, old in zip(layers, before):
            layer.rows = old

    return modifications.record(module, "chunked_feed_forward", f"{rows} rows", restore, graph_safe=True)


@contextmanager
def chunked_feed_forward(module: nn.Module, rows: int | None) -> Iterator[None]:
    """Within the context, the feed-forwards of ``module`` run ``rows`` tokens at a time (``None``: whole)."""
    with modifications.applied(module, None if rows is None else chunk_feed_forwards(module, rows)):
        yield


def checkpoint_gradients(network: nn.Module) -> modifications.Modification:
    """Recompute ``network``'s activations in the backward pass (its ``gradient_checkpointing``, for training), until
    undone. Graph-safe: it acts only while gradients are recorded, so the inference forward is unchanged."""
    before = network.gradient_checkpointing
    network.gradient_checkpointing = True

    def restore() -> None:
        network.gradient_checkpointing = before

    return modifications.record(network, "gradient_checkpointing", "", restore, graph_safe=True)


class BasicTransformerBlock(nn.Module):
    """Pre-LN block: self-attention, second attention (cross to ``context`` or self), GEGLU feed-forward.

    With ``context_dim=None`` the second attention is self-attention too, as in the temporal transformers.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class ResnetBlock2D(nn.Module):
    """GN-SiLU-conv twice with an optional additive time embedding; 1x1 shortcut when the width changes."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None = None,
        groups: int = 32,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. ``asymmetric`` pads (0,1,0,1) with no conv padding, as the VAE encoder does."""

    def __init__(self, channels: int, asymmetric: bool = False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling to ``size`` (or x2) followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.bfloat16:  # nearest interpolation has no bf16 kernel on some backends
            x = x.float()
        x = F.interpolate(x, size=size, mode="nearest") if size else F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x.to(dtype))
