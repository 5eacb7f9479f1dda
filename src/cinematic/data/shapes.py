"""A procedural captioned-video dataset: one coloured shape gliding across a plain grey background.

Every clip is described exactly by its caption, ``f"a {colour} {shape} moving {direction}"``: 4 colours x 3 shapes x
4 directions = 48 captions. Eight of them (:data:`HELD_OUT`) are never shown in training, so a model's samples for them
measure compositional generalisation: each held-out caption recombines a colour, a shape and a direction that the model
has seen, and every (colour, shape), (colour, direction) and (shape, direction) pair in it also occurs in training.

What varies from clip to clip, drawn from the clip's seed (see :func:`clip_params`): the start position, the size, the
speed and the background's grey level and faint tint. What never varies: the four colours (:data:`PALETTE`), the
shapes' orientation (triangles point up) and the straight, constant-velocity motion. The whole object stays inside
the frame in every frame, and travels at least 35% of the frame along the caption's axis.

Drawing is anti-aliased from a signed distance: a pixel's coverage is ``clip(0.5 - sdf, 0, 1)`` at its centre,
exact for axis-aligned edges and within a few percent of the true box-filtered coverage elsewhere, at 1/16 of the cost
of 4x4 supersampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from cinematic.errors import CinematicError

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")

# Saturated colours whose hues (0, 129, 227 and 51 degrees) are far apart, and whose distance from any background
# grey (:data:`BACKGROUND_LEVELS`) is at least ~100 of 255, so the object is never confused with the background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 50),
    "green": (50, 170, 70),
    "blue": (50, 90, 220),
    "yellow": (230, 200, 50),
}
# Colours that the 48 captions never use, for fine-tuning experiments (a LoRA that teaches the shapes model a new
# colour: scripts/lora_purple). Captions with them parse, and their clips render, only where ``extra=True`` is asked
# for. Purple's hue (285 degrees) is 58 degrees from blue and 75 from red.
EXTRA_PALETTE: dict[str, tuple[int, int, int]] = {"purple": (160, 50, 200)}
BACKGROUND_LEVELS = (80, 170)  # the grey level is uniform in this range ...
BACKGROUND_TINT = 6  # ... plus an independent per-channel offset in [-6, 6]: grey-ish, never coloured
# Half the object's bounding box, as a fraction of the frame size: objects of 11.5-16.6 pixels at 32x32, so that
# a shape spans 3-4 cells of a 4x-downsampled latent (at (0.12, 0.2), the range of sessions 1-9, it spanned 2-3 and
# a model's slight blur already rounded squares and triangles into circles; docs/shapes.md, session 10).
RADIUS_FRACTION = (0.18, 0.26)
MIN_TRAVEL_FRACTION = 0.35  # distance travelled over the clip, as a fraction of the frame size
FPS = 8
FRAMES, SIZE = 16, 32  # a clip's default length and side


def caption_of(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


ALL_CAPTIONS: tuple[str, ...] = tuple(caption_of(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS)

# Chosen by hand so that every colour and direction is held out twice and every shape two or three times, and no
# (colour, shape), (colour, direction) or (shape, direction) pair is held out twice: every pair a held-out caption
# combines is still seen in training with another third attribute.
HELD_OUT: tuple[str, ...] = (
    "a red circle moving left",
    "a red square moving up",
    "a green square moving right",
    "a green triangle moving down",
    "a blue triangle moving up",
    "a blue circle moving right",
    "a yellow circle moving down",
    "a yellow square moving left",
)
TRAIN_CAPTIONS: tuple[str, ...] = tuple(c for c in ALL_CAPTIONS if c not in HELD_OUT)

# Unit steps in image coordinates: x grows to the right, y grows downwards.
DIRECTION_STEP: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def parse_caption(caption: str, extra: bool = False) -> tuple[str, str, str]:
    """``(colour, shape, direction)`` of one of the 48 captions (or, with ``extra``, of a caption with a colour of
    :data:`EXTRA_PALETTE`); anything else is a :class:`CinematicError`."""
    words = caption.split(" ") if isinstance(caption, str) else []
    if len(words) == 5 and words[0] == "a" and words[3] == "moving":
        colour, shape, direction = words[1], words[2], words[4]
        known = colour in COLOURS or (extra and colour in EXTRA_PALETTE)
        if known and shape in SHAPES and direction in DIRECTIONS:
            return colour, shape, direction
    raise CinematicError(f"not a shapes caption: {caption!r}; expected 'a <colour> <shape> moving <direction>'")


@dataclass(frozen=True)
class ClipParams:
    """Everything that determines one clip. Positions are in pixels, with pixel ``(row i, column j)`` centred at
    ``(x, y) = (j + 0.5, i + 0.5)``; the object's centre in frame ``f`` is ``start + f * velocity``."""

    colour: str
    shape: str
    direction: str
    size: int
    frames: int
    start: tuple[float, float]  # (x, y) of the object's centre in frame 0
    velocity: tuple[float, float]  # (vx, vy) in pixels per frame
    radius: float  # half the side of the object's bounding box
    background: tuple[int, int, int]  # RGB

    def centre(self, frame: int) -> tuple[float, float]:
        return self.start[0] + frame * self.velocity[0], self.start[1] + frame * self.velocity[1]


def _check_geometry(size: int, frames: int) -> None:
    if size < 16:
        raise CinematicError(f"shapes clips need size >= 16 pixels, got {size}")
    if frames < 2:
        raise CinematicError(f"shapes clips need at least 2 frames to show motion, got {frames}")


def clip_params(caption: str, seed: int, size: int = SIZE, frames: int = FRAMES, extra: bool = False) -> ClipParams:
    """The sampled start, velocity, radius and background of the clip ``(caption, seed)``."""
    colour, shape, direction = parse_caption(caption, extra)
    _check_geometry(size, frames)
    rng = np.random.default_rng(seed)
    radius = rng.uniform(*RADIUS_FRACTION) * size
    span = size - 2 * radius  # the range the centre may take with the whole object inside the frame
    travel = rng.uniform(MIN_TRAVEL_FRACTION * size, span)
    along = radius + rng.uniform(0.0, span - travel)  # start coordinate on the motion axis, if moving + ...
    across = radius + rng.uniform(0.0, span)  # ... and the fixed coordinate on the other axis
    step_x, step_y = DIRECTION_STEP[direction]
    if step_x + step_y < 0:  # moving left or up: start at the mirrored position so the end stays in frame
        along = size - along
    start = (along, across) if step_x else (across, along)
    speed = travel / (frames - 1)
    level = rng.uniform(*BACKGROUND_LEVELS)
    tint = rng.integers(-BACKGROUND_TINT, BACKGROUND_TINT + 1, size=3)
    background = tuple(int(round(level + t)) for t in tint)
    return ClipParams(
        colour, shape, direction, size, frames, start, (step_x * speed, step_y * speed), float(radius), background
    )


def signed_distance(shape: str, x: np.ndarray, y: np.ndarray, radius: np.ndarray | float) -> np.ndarray:
    """Signed distance (negative inside) from points ``(x, y)``, relative to the shape's centre, to the shape
    inscribed in the square ``[-radius, radius]^2``. For the square and the triangle it is the maximum over their
    edges' half-planes: exact inside and near an edge, slightly short only outside a corner."""
    if shape == "circle":
        return np.sqrt(x * x + y * y) - radius
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) - radius
    # Triangle pointing up: apex (0, -r), base corners (+-r, r); each slanted edge has outward normal (+-2, -1)/sqrt 5.
    base = y - radius
    slant = (2.0 * (np.abs(x) - radius) - base) / np.sqrt(5.0)
    return np.maximum(base, slant)


def coverage(params: ClipParams) -> np.ndarray:
    """The object's anti-aliased coverage of each pixel in each frame, float32 ``[F, H, W]`` in [0, 1]."""
    grid = np.arange(params.size, dtype=np.float32) + 0.5
    t = np.arange(params.frames, dtype=np.float32)
    cx = (params.start[0] + t * params.velocity[0])[:, None, None]  # F 1 1
    cy = (params.start[1] + t * params.velocity[1])[:, None, None]
    sdf = signed_distance(params.shape, grid[None, None, :] - cx, grid[None, :, None] - cy, params.radius)  # F H W
    return np.clip(0.5 - sdf, 0.0, 1.0).astype(np.float32)


def render(params: ClipParams) -> np.ndarray:
    """The clip described by ``params``: uint8 ``[F, H, W, 3]``."""
    alpha = coverage(params)[..., None]  # F H W 1
    colour = np.asarray({**PALETTE, **EXTRA_PALETTE}[params.colour], dtype=np.float32)
    background = np.asarray(params.background, dtype=np.float32)
    return np.rint(background + alpha * (colour - background)).astype(np.uint8)


def render_clip(caption: str, seed: int, size: int = SIZE, frames: int = FRAMES, extra: bool = False) -> np.ndarray:
    """The clip for ``caption`` drawn with ``seed``: uint8 ``[F, H, W, 3]``, ``F = frames``, ``H = W = size``.
    ``extra`` also draws the colours of :data:`EXTRA_PALETTE`."""
    return render(clip_params(caption, seed, size, frames, extra))


def item_seed(seed: int, index: int) -> int:
    """The clip seed of dataset item ``index``: independent streams for every ``(seed, index)`` pair."""
    return int(np.random.SeedSequence((seed, index)).generate_state(1, dtype=np.uint64)[0])


class ShapesDataset(Dataset):
    """``length`` clips cycling through ``captions`` in order; item ``i`` is a pure function of ``(seed, i)``.

    An item is ``{"video": float32 [3, F, H, W] in [-1, 1], "caption": str}``.
    """

    def __init__(
        self,
        captions: tuple[str, ...] | list[str] = TRAIN_CAPTIONS,
        size: int = SIZE,
        frames: int = FRAMES,
        seed: int = 0,
        length: int = 100_000,
    ) -> None:
        if len(captions) == 0:
            raise CinematicError("ShapesDataset needs at least one caption")
        if length < 1:
            raise CinematicError(f"ShapesDataset needs length >= 1, got {length}")
        for caption in captions:
            parse_caption(caption)
        _check_geometry(size, frames)
        self.captions = tuple(captions)
        self.size, self.frames, self.seed, self.length = size, frames, seed, length

    def __len__(self) -> int:
        return self.length

    def caption(self, index: int) -> str:
        return self.captions[index % len(self.captions)]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a ShapesDataset of length {self.length}")
        caption = self.caption(index)
        clip = render_clip(caption, item_seed(self.seed, index), self.size, self.frames)  # F H W 3
        # F H W C -> C F H W, rescaled in numpy: ~10x faster than the same ops on a small torch tensor here.
        video = np.ascontiguousarray(clip.transpose(3, 0, 1, 2), dtype=np.float32) / np.float32(127.5) - np.float32(1)
        return {"video": torch.from_numpy(video), "caption": caption}
