"""Parameter counts of the three networks, computed from their configs without building anything.

The configs call :func:`check_parameters` in ``__post_init__``, so a config that would build an absurd model (a
billion text-encoder layers, a billion channels) is refused in one line before a single module exists. The counts
are exact: tests/test_checked_files.py compares them with the networks built on the meta device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cinematic.errors import CinematicError
from cinematic.models.unet3d_config import LAYOUT_BASIS

if TYPE_CHECKING:
    from cinematic.models.text_encoder import TextEncoderConfig
    from cinematic.models.unet3d_config import UNet3DConfig
    from cinematic.models.vae import VAEConfig

# 20 billion parameters, 40 GB in fp16: ten times the published model (1.8 B) and above today's largest open
# text-to-video models (about 14 B). A config beyond it is a mistake or an attack, not a model.
MAX_PARAMETERS = 20_000_000_000


def check_parameters(what: str, count: int) -> None:
    if count > MAX_PARAMETERS:
        raise CinematicError(
            f"{what} would have {count:,} parameters, more than the {MAX_PARAMETERS:,} cinematic builds; "
            "check the config's sizes"
        )


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _conv(n_in: int, n_out: int, kernel: int) -> int:
    return n_in * n_out * kernel + n_out


def _norm(width: int) -> int:  # GroupNorm or LayerNorm: a weight and a bias
    return 2 * width


def _attention(dim: int, inner: int, context: int | None = None, qkv_bias: bool = False) -> int:
    source = context or dim
    return _linear(dim, inner, qkv_bias) + 2 * _linear(source, inner, qkv_bias) + _linear(inner, dim)


def _transformer_block(dim: int, context: int | None) -> int:
    """layers.BasicTransformerBlock: three LayerNorms, two attentions (inner = dim) and the GEGLU feed-forward."""
    feed_forward = _linear(dim, 8 * dim) + _linear(4 * dim, dim)
    return 3 * _norm(dim) + _attention(dim, dim) + _attention(dim, dim, context) + feed_forward


def _transformer(channels: int, inner: int, context: int | None) -> int:
    """A spatial or temporal transformer: GroupNorm, proj_in, one block, proj_out."""
    return _norm(channels) + _linear(channels, inner) + _transformer_block(inner, context) + _linear(inner, channels)


def _resnet(n_in: int, n_out: int, temb: int | None) -> int:
    shortcut = _conv(n_in, n_out, 1) if n_in != n_out else 0
    time = _linear(temb, n_out) if temb else 0
    return _norm(n_in) + _conv(n_in, n_out, 9) + time + _norm(n_out) + _conv(n_out, n_out, 9) + shortcut


def _unet_stack(config: UNet3DConfig, in_chs: list[int], out_ch: int, attention_layers: int) -> int:
    """unet3d_blocks._LayerStack: a resnet and a temporal conv per input, and the attention layers."""
    temporal_conv = 4 * (_norm(out_ch) + _conv(out_ch, out_ch, 3))
    total = sum(_resnet(c, out_ch, config.time_embed_dim) + temporal_conv for c in in_chs)
    heads = out_ch // config.head_dim
    inner = heads * config.head_dim
    spatial = _transformer(out_ch, inner, config.cross_attention_dim)
    temporal = _transformer(out_ch, inner, config.temporal_context_dim)
    return total + attention_layers * (spatial + temporal)


def unet_parameters(config: UNet3DConfig) -> int:
    widths = [level.channels for level in config.levels]
    c0, temb, n = widths[0], config.time_embed_dim, len(widths)
    total = _conv(config.in_channels + config.coordinate_channels, c0, 9) + _linear(c0, temb) + _linear(temb, temb)
    if config.options.pooled_text:
        total += _linear(config.cross_attention_dim, temb) + _linear(temb, temb)
    if config.options.text_planes:
        total += _linear(config.cross_attention_dim, config.options.text_planes * LAYOUT_BASIS)
    total += _transformer(c0, config.transformer_in_heads * config.head_dim, config.temporal_context_dim)
    layers = config.layers_per_block
    for i, level in enumerate(config.levels):  # encoder: UNet3D._down_blocks
        in_chs = [widths[max(i - 1, 0)]] + [level.channels] * (layers - 1)
        total += _unet_stack(config, in_chs, level.channels, layers if level.attention else 0)
        total += _conv(level.channels, level.channels, 9) if i < n - 1 else 0
    total += _unet_stack(config, [widths[-1]] * 2, widths[-1], 1)  # the middle block
    levels = list(reversed(config.levels))
    for i, level in enumerate(levels):  # decoder: UNet3D._up_blocks
        prev, shallower = levels[max(i - 1, 0)].channels, levels[min(i + 1, n - 1)].channels
        skips = [level.channels] * layers + [shallower]
        in_chs = [(prev if j == 0 else level.channels) + s for j, s in enumerate(skips)]
        total += _unet_stack(config, in_chs, level.channels, len(in_chs) if level.attention else 0)
        total += _conv(level.channels, level.channels, 9) if i < n - 1 else 0
    return total + _norm(c0) + _conv(c0, config.out_channels, 9)


def text_encoder_parameters(config: TextEncoderConfig) -> int:
    width = config.width
    layer = 2 * _norm(width) + 4 * _linear(width, width) + _linear(width, config.mlp_width)
    layer += _linear(config.mlp_width, width)
    embeddings = (config.vocab_size + config.context_length) * width
    return embeddings + config.layers * layer + _norm(width)


def _vae_mid(channels: int) -> int:
    return 2 * _resnet(channels, channels, None) + _norm(channels) + _attention(channels, channels, qkv_bias=True)


def vae_parameters(config: VAEConfig) -> int:
    widths, latent, n = config.block_out_channels, config.latent_channels, len(config.block_out_channels)
    total = _conv(config.in_channels, widths[0], 9)  # encoder
    for i, width in enumerate(widths):
        chain = [widths[max(i - 1, 0)]] + [width] * config.layers_per_block
        total += sum(_resnet(a, b, None) for a, b in zip(chain, chain[1:]))
        total += _conv(width, width, 9) if i < n - 1 else 0
    total += _vae_mid(widths[-1]) + _norm(widths[-1]) + _conv(widths[-1], 2 * latent, 9)
    backwards = widths[::-1]
    total += _conv(latent, backwards[0], 9) + _vae_mid(backwards[0])  # decoder
    for i, width in enumerate(backwards):
        chain = [backwards[max(i - 1, 0)]] + [width] * (config.layers_per_block + 1)
        total += sum(_resnet(a, b, None) for a, b in zip(chain, chain[1:]))
        total += _conv(width, width, 9) if i < n - 1 else 0
    total += _norm(backwards[-1]) + _conv(backwards[-1], config.out_channels, 9)
    return total + _conv(2 * latent, 2 * latent, 1) + _conv(latent, latent, 1)  # quant_conv, post_quant_conv
