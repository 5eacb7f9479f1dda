"""Parameter counts from configs, without building anything: the layers' counts here, each network's sum beside
its config (``UNet3DConfig.parameter_count`` and the others).

The configs call :func:`check_parameters` in ``__post_init__``, so a config that would build an absurd model (a
billion text-encoder layers, a billion channels) is refused in one line before a single module exists. The counts
are exact: tests/test_checked_files.py compares them with the networks built on the meta device.
"""

from __future__ import annotations

from cinematic.errors import CinematicError

# 20 billion parameters, 40 GB in fp16: ten times the published model (1.8 B) and above today's largest open
# text-to-video models (about 14 B). A config beyond it is a mistake or an attack, not a model.
MAX_PARAMETERS = 20_000_000_000


def check_parameters(what: str, count: int) -> None:
    if count > MAX_PARAMETERS:
        raise CinematicError(
            f"{what} would have {count:,} parameters, more than the {MAX_PARAMETERS:,} cinematic builds; "
            "check the config's sizes"
        )


def linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def conv(n_in: int, n_out: int, kernel: int) -> int:
    return n_in * n_out * kernel + n_out


def norm(width: int) -> int:  # GroupNorm or LayerNorm: a weight and a bias
    return 2 * width


def attention(dim: int, inner: int, context: int | None = None, qkv_bias: bool = False) -> int:
    source = context or dim
    return linear(dim, inner, qkv_bias) + 2 * linear(source, inner, qkv_bias) + linear(inner, dim)


def transformer_block(dim: int, context: int | None) -> int:
    """layers.BasicTransformerBlock: three LayerNorms, two attentions (inner = dim) and the GEGLU feed-forward."""
    feed_forward = linear(dim, 8 * dim) + linear(4 * dim, dim)
    return 3 * norm(dim) + attention(dim, dim) + attention(dim, dim, context) + feed_forward


def transformer(channels: int, inner: int, context: int | None) -> int:
    """A spatial or temporal transformer: GroupNorm, proj_in, one block, proj_out."""
    return norm(channels) + linear(channels, inner) + transformer_block(inner, context) + linear(inner, channels)


def resnet(n_in: int, n_out: int, temb: int | None) -> int:
    shortcut = conv(n_in, n_out, 1) if n_in != n_out else 0
    time = linear(temb, n_out) if temb else 0
    return norm(n_in) + conv(n_in, n_out, 9) + time + norm(n_out) + conv(n_out, n_out, 9) + shortcut
