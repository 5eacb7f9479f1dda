"""The 3D UNet's configuration: its levels, and the options only the bundled shapes model uses. Apart from
``unet3d.py`` so that the blocks in ``unet3d_blocks.py`` can name it without an import cycle."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from cinematic.errors import CinematicError
from cinematic.models import sizes
from cinematic.models.checks import MAX_CHANNELS, MAX_LAYERS_PER_BLOCK, MAX_LEVELS, boolean, integer, number

# Input planes per caption-drawn layout plane (ShapesOptions.text_planes): the quadratic basis of unet3d.layout_basis.
LAYOUT_BASIS = 9
MAX_TEXT_PLANES = 64


@dataclass(frozen=True)
class UNetLevel:
    """One resolution of the UNet: its width and whether its layers carry spatial+temporal transformers."""

    channels: int
    attention: bool

    def __post_init__(self) -> None:
        integer(self.channels, "unet.levels[].channels", 1, MAX_CHANNELS)
        boolean(self.attention, "unet.levels[].attention")


@dataclass(frozen=True)
class ShapesOptions:
    """Research additions to the published architecture that only the small bundled ``shapes`` model uses
    (docs/shapes.md says what each fixed there); each is off by default and none has a published checkpoint."""

    # Sinusoidal frame positions in every temporal transformer. Not in the published model (whose frame order comes
    # from the temporal convolutions alone); the small shapes model needs them to tie a direction word to motion.
    frame_positions: bool = False
    # Coordinate planes (CoordConv, Liu et al. 2018): each latent pixel's x, y and frame position, in [-1, 1],
    # concatenated to the input of conv_in. Not in the published model either. Convolutions cannot tell where in the
    # frame they are (but for the zero padding at the border), so a clip's mean layout, such as "moving right starts
    # on the left", is out of their reach; with these planes it is a plain function of the input.
    coordinates: bool = False
    # Temporal transformers whose second attention reads the text (ModelScope's TemporalTransformer with
    # only_self_att=False) instead of the frames again. Off in the published model, where the caption reaches the
    # network through the per-frame spatial cross-attention alone and so acts alike on every frame; the shapes model
    # needs a word to act differently on different frames ("moving right": left early, right late).
    temporal_context: bool = False
    # The caption, averaged over its token positions, through a Linear-SiLU-Linear into the time embedding that every
    # ResNet block adds (as SDXL adds its pooled text embedding, and class-conditional diffusion models their class).
    # Off in the published model. Each word then shifts the ResNets' features directly, and with coordinate planes a
    # shift turns on the units whose half-plane "x - v f > c" is the asked motion: a first-order path from a word to
    # a layout that changes over frames, which cross-attention per frame does not have.
    pooled_text: bool = False
    # Planes drawn by the caption: the pooled text, through one Linear, gives each of ``text_planes`` input planes
    # its coefficients on the quadratic basis of (x, y, frame) (see :func:`layout_basis`), so a word can draw a
    # layout that moves over the clip ("moving right": a ridge along x - k * frame) straight into conv_in. Nothing
    # else in the network makes a product of a word and the frame position on first order. Off in the published
    # model.
    text_planes: int = 0

    def __post_init__(self) -> None:
        for name in ("frame_positions", "coordinates", "temporal_context", "pooled_text"):
            boolean(getattr(self, name), f"unet.shapes.{name}")
        integer(self.text_planes, "unet.shapes.text_planes", 0, MAX_TEXT_PLANES)


SHAPES_OPTION_NAMES = tuple(f.name for f in fields(ShapesOptions))


@dataclass(frozen=True)
class UNet3DConfig:
    """Defaults are the published model (diffusers ``unet/config.json`` / ModelScope ``model_cfg``)."""

    in_channels: int = 4
    out_channels: int = 4
    levels: tuple[UNetLevel, ...] = (
        UNetLevel(320, True),
        UNetLevel(640, True),
        UNetLevel(1280, True),
        UNetLevel(1280, False),
    )
    layers_per_block: int = 2  # the decoder has one more per level, to consume the downsampler's skip
    head_dim: int = 64  # spatial/temporal transformers use channels // head_dim heads of this width
    cross_attention_dim: int = 1024
    norm_groups: int = 32
    norm_eps: float = 1e-5
    transformer_in_heads: int = 8  # transformer_in alone has a fixed head count (8 x 64 = 512 inner)
    # The bundled shapes model's additions to the architecture (see :class:`ShapesOptions`); None in every published
    # model, and then absent from the stored config.
    shapes: ShapesOptions | None = None
    # The guidance embedding of guidance-distilled students (T2V-Turbo; LCM, Luo et al. 2023): the width of a sinusoidal
    # embedding of the guidance scale w * 1000, which `time_embedding.cond_proj` (bias-free) maps onto the timestep
    # sinusoid, as diffusers' `UNet3DConditionModel(time_cond_proj_dim=...)` does. None in every base model, and then
    # absent from the stored config.
    time_cond_proj_dim: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.levels, list | tuple) or not 1 <= len(self.levels) <= MAX_LEVELS:
            raise CinematicError(f"unet.levels must list 1 to {MAX_LEVELS} levels, got {self.levels!r:.40}")
        object.__setattr__(self, "levels", tuple(self.levels))
        for name in ("in_channels", "out_channels", "head_dim", "cross_attention_dim", "norm_groups"):
            integer(getattr(self, name), f"unet.{name}", 1, MAX_CHANNELS)
        integer(self.layers_per_block, "unet.layers_per_block", 1, MAX_LAYERS_PER_BLOCK)
        integer(self.transformer_in_heads, "unet.transformer_in_heads", 1, MAX_CHANNELS)
        number(self.norm_eps, "unet.norm_eps", 0, 1, open_low=True)
        if self.time_cond_proj_dim is not None:
            integer(self.time_cond_proj_dim, "unet.time_cond_proj_dim", 1, MAX_CHANNELS)
        if self.shapes is not None and not isinstance(self.shapes, ShapesOptions):
            raise CinematicError(f"unet.shapes must be a set of shapes options, got {self.shapes!r:.40}")
        for i, level in enumerate(self.levels):
            if not isinstance(level, UNetLevel):
                raise CinematicError(f"unet.levels[{i}] must be a level (channels, attention), got {level!r}")
            if level.channels % self.norm_groups:
                raise CinematicError(
                    f"unet.levels[{i}] has {level.channels} channels, not a positive multiple of "
                    f"norm_groups={self.norm_groups}"
                )
            # The middle block always has attention, at the last level's width.
            needs_heads = level.attention or i == len(self.levels) - 1
            if needs_heads and level.channels % self.head_dim:
                raise CinematicError(
                    f"unet.levels[{i}] has {level.channels} channels, not a multiple of head_dim={self.head_dim}"
                )
        sizes.check_parameters("the UNet", self.parameter_count())

    def parameter_count(self) -> int:
        """The parameters :class:`cinematic.models.unet3d.UNet3D` builds for this config, counted without building."""
        widths = [level.channels for level in self.levels]
        c0, temb, n = widths[0], self.time_embed_dim, len(widths)
        total = (
            sizes.conv(self.in_channels + self.coordinate_channels, c0, 9)
            + sizes.linear(c0, temb)
            + sizes.linear(temb, temb)
        )
        if self.time_cond_proj_dim is not None:
            total += sizes.linear(self.time_cond_proj_dim, c0, bias=False)
        if self.options.pooled_text:
            total += sizes.linear(self.cross_attention_dim, temb) + sizes.linear(temb, temb)
        if self.options.text_planes:
            total += sizes.linear(self.cross_attention_dim, self.options.text_planes * LAYOUT_BASIS)
        total += sizes.transformer(c0, self.transformer_in_heads * self.head_dim, self.temporal_context_dim)
        layers = self.layers_per_block
        for i, level in enumerate(self.levels):  # encoder: UNet3D._down_blocks
            in_chs = [widths[max(i - 1, 0)]] + [level.channels] * (layers - 1)
            total += _unet_stack(self, in_chs, level.channels, layers if level.attention else 0)
            total += sizes.conv(level.channels, level.channels, 9) if i < n - 1 else 0
        total += _unet_stack(self, [widths[-1]] * 2, widths[-1], 1)  # the middle block
        levels = list(reversed(self.levels))
        for i, level in enumerate(levels):  # decoder: UNet3D._up_blocks
            prev, shallower = levels[max(i - 1, 0)].channels, levels[min(i + 1, n - 1)].channels
            skips = [level.channels] * layers + [shallower]
            in_chs = [(prev if j == 0 else level.channels) + s for j, s in enumerate(skips)]
            total += _unet_stack(self, in_chs, level.channels, len(in_chs) if level.attention else 0)
            total += sizes.conv(level.channels, level.channels, 9) if i < n - 1 else 0
        return total + sizes.norm(c0) + sizes.conv(c0, self.out_channels, 9)

    @property
    def options(self) -> ShapesOptions:
        """The shapes options in force (all off for the published model)."""
        return self.shapes or NO_SHAPES_OPTIONS

    @property
    def coordinate_channels(self) -> int:
        return (3 if self.options.coordinates else 0) + self.options.text_planes

    @property
    def temporal_context_dim(self) -> int | None:
        return self.cross_attention_dim if self.options.temporal_context else None

    def to_dict(self) -> dict[str, Any]:
        """The config as stored in ``model.json``; ``shapes`` and ``time_cond_proj_dim`` only when set."""
        data = dataclasses.asdict(self)
        if self.shapes is None:
            del data["shapes"]
        if self.time_cond_proj_dim is None:
            del data["time_cond_proj_dim"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNet3DConfig:
        """Read :meth:`to_dict`'s form, or the older one with the shapes options flat among the other fields (the
        bundled model's ``model.json`` and checkpoints saved before the options had their own place)."""
        data = dict(data)
        flat = {name: data.pop(name) for name in SHAPES_OPTION_NAMES if name in data}
        if flat and data.get("shapes") is not None:
            raise CinematicError(f"unet config gives {', '.join(flat)} both flat and under 'shapes'")
        nested = data.pop("shapes", None)
        shapes = None if nested is None else ShapesOptions(**nested)
        if flat and ShapesOptions(**flat) != NO_SHAPES_OPTIONS:  # old flat form: all off means a published model
            shapes = ShapesOptions(**flat)
        levels = tuple(UNetLevel(**level) for level in data.pop("levels"))
        return cls(**data, levels=levels, shapes=shapes)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.levels[0].channels


def _unet_stack(config: UNet3DConfig, in_chs: list[int], out_ch: int, attention_layers: int) -> int:
    """unet3d_blocks._LayerStack: a resnet and a temporal conv per input, and the attention layers."""
    temporal_conv = 4 * (sizes.norm(out_ch) + sizes.conv(out_ch, out_ch, 3))
    total = sum(sizes.resnet(c, out_ch, config.time_embed_dim) + temporal_conv for c in in_chs)
    heads = out_ch // config.head_dim
    inner = heads * config.head_dim
    spatial = sizes.transformer(out_ch, inner, config.cross_attention_dim)
    temporal = sizes.transformer(out_ch, inner, config.temporal_context_dim)
    return total + attention_layers * (spatial + temporal)


NO_SHAPES_OPTIONS = ShapesOptions()
