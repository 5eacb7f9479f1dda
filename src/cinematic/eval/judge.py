"""A rule-based judge for shapes videos: which colour, which shape and which way the main object moves.

Per frame: the background is the median of the border pixels (a flat grey in the dataset); the object is the largest
8-connected component of pixels far from it (at least :data:`MIN_CONTRAST` and at least half the frame's 99th
percentile difference, so an anti-aliased edge counts where it is more than half covered). From that component:

- colour: the hue of the object's core colour, nearest of the four palette hues. Hue is unchanged by blending with a
  grey, so anti-aliased edges and a washed-out generated colour still read right; a grey object is ``None``.
- shape: moments of a soft coverage map (each pixel's position between background and object colour), which sum over
  all pixels and so are robust to anti-aliasing and noise where a thresholded outline at 32x32 is not. A triangle
  (pointing up) has its mass low: vertical skewness ~ -0.57 where circle and square have 0. A square's mass spreads
  to its corners: its profile along a diagonal is triangular (kurtosis 2.4) and along an axis uniform (1.8), where a
  circle's is 2.0 every way. Squareness is the size of that four-fold swing of the kurtosis with direction (the
  diagonal-minus-axial difference, combined with the same difference 22.5 degrees round, so a rotated square counts):
  ~0.6 for a drawn square at any angle, ~0 for a drawn circle. Generated squares are rounder (0.17-0.57 per frame on
  hand-labelled clips of the bundled model, tests/shapes_labels.json) and a soft round blob, cut out of the
  background by the segmentation, reaches 0.33, so a frame reads square above :data:`SQUARE_MIN`, circle below
  :data:`CIRCLE_MAX`, and between them (too close to call) has no shape.
- position: the centroid of the soft coverage.

Per video: colour and shape are the majority of the frames' readings; consistency is the fraction of all frames that
agree with it (a frame with no object found disagrees); direction is the dominant axis and sign of the centroid's
displacement from the first quarter of the frames to the last, ``None`` if it moved less than
:data:`MIN_TRAVEL_FRACTION` of the frame.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from cinematic.data.shapes import COLOURS, EXTRA_PALETTE, HELD_OUT, PALETTE, TRAIN_CAPTIONS, parse_caption
from cinematic.errors import CinematicError

MIN_CONTRAST = 40.0  # RGB distance from the background below which nothing is an object (of 255 * sqrt 3)
MIN_AREA_FRACTION = 0.004  # smaller components are noise: 4 pixels at 32x32, 16 at 64x64
MIN_CHROMA = 30.0  # max - min channel of the object's colour below which it has no hue (a grey)
MIN_TRAVEL_FRACTION = 0.05  # of the frame size; the dataset's objects travel at least 0.35
TRIANGLE_SKEW = -0.3  # vertical skewness below this is a triangle pointing up (triangle ~ -0.57, others 0)
# Squareness (see the module docstring): drawn squares ~0.6 and circles ~0; on the bundled model's generated clips,
# circles at most 0.19 and squares mostly 0.2-0.5; soft round blobs up to 0.33. Between the two bounds: no shape.
SQUARE_MIN = 0.35  # above this, a square
CIRCLE_MAX = 0.15  # below this, a circle


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) of RGB rows ``[..., 3]``: the angle of the colour around the grey axis.

    This is the smooth (atan2) form of the HSV hue, equal to it at the six primaries and secondaries and within a
    few degrees between them; like it, it ignores any grey added to or mixed into the colour."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.degrees(np.arctan2(np.sqrt(3.0) * (g - b), 2.0 * r - g - b)) % 360.0


PALETTE_HUES = {name: float(_hue(np.asarray(PALETTE[name], dtype=np.float64))) for name in COLOURS}
# The extra colours (purple) are candidates only when asked for: adding a hue moves the boundaries of its neighbours
# (blue and red here), and the standard evaluation must keep reading the four colours as it always has.
EXTRA_HUES = {name: float(_hue(np.asarray(rgb, dtype=np.float64))) for name, rgb in EXTRA_PALETTE.items()}


def classify_colour(rgb: Sequence[float], extra: bool = False) -> str | None:
    """The palette colour nearest in hue to ``rgb``, or ``None`` for a grey (chroma below :data:`MIN_CHROMA`).
    ``extra`` adds the colours of ``EXTRA_PALETTE`` (purple) to the candidates."""
    rgb = np.asarray(rgb, dtype=np.float64)
    if rgb.max() - rgb.min() < MIN_CHROMA:
        return None
    hue = float(_hue(rgb))
    hues = {**PALETTE_HUES, **EXTRA_HUES} if extra else PALETTE_HUES
    distance = {name: abs((hue - h + 180.0) % 360.0 - 180.0) for name, h in hues.items()}
    return min(distance, key=distance.get)


def classify_shape(skew: float, squareness: float) -> str | None:
    """The shape of one frame's moments; ``None`` when the squareness is between :data:`CIRCLE_MAX` and
    :data:`SQUARE_MIN`, too close to call."""
    if skew < TRIANGLE_SKEW:
        return "triangle"
    if squareness > SQUARE_MIN:
        return "square"
    if squareness < CIRCLE_MAX:
        return "circle"
    return None


@dataclass(frozen=True)
class FrameReading:
    """What the judge saw in one frame; the fields after ``found`` are ``None`` where it found no object."""

    found: bool
    centroid: tuple[float, float] | None = None  # (x, y) in pixels, pixel (i, j) centred at (j + 0.5, i + 0.5)
    area: float | None = None  # soft coverage, in pixels
    rgb: tuple[float, float, float] | None = None  # the object's core colour
    skew: float | None = None  # vertical skewness of the coverage
    squareness: float | None = None  # the four-fold swing of the coverage's kurtosis with direction
    colour: str | None = None
    shape: str | None = None  # None also where the squareness is too close to call


@dataclass(frozen=True)
class Verdict:
    """The judge's reading of one video; ``None`` means it could not tell (no object, grey object, no motion)."""

    colour: str | None
    shape: str | None
    direction: str | None
    colour_consistency: float  # fraction of frames whose colour is ``colour``
    shape_consistency: float  # fraction of frames whose shape is ``shape``
    presence: float  # fraction of frames with an object
    displacement: tuple[float, float] | None  # (dx, dy) in pixels, last quarter minus first quarter
    frames: tuple[FrameReading, ...]


# --- segmentation ---------------------------------------------------------------------------------------------


def _neighbourhood(a: np.ndarray, fill: int | bool, reduce: Callable[..., np.ndarray]) -> np.ndarray:
    """``reduce`` over each pixel's 3x3 neighbourhood in every frame of ``a`` ``[F, H, W]``, ``fill`` past the edge."""
    h, w = a.shape[1:]
    padded = np.pad(a, ((0, 0), (1, 1), (1, 1)), constant_values=fill)
    out = a.copy()
    for di in range(3):
        for dj in range(3):
            out = reduce(out, padded[:, di : di + h, dj : dj + w])
    return out


def largest_component(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The largest 8-connected component of each frame of ``mask`` ``[F, H, W]``, and its size in pixels ``[F]``.

    Vectorised labelling: every pixel starts with its own flat index and repeatedly takes the minimum over its
    neighbours, then follows its label's label (pointer jumping), so a blob converges in about log(diameter) rounds.
    Labels never cross frames because neighbourhoods stay within one frame."""
    n = mask.size
    labels = np.where(mask, np.arange(n).reshape(mask.shape), n)
    while True:
        new = np.where(mask, _neighbourhood(labels, n, np.minimum), n)
        flat = new.reshape(-1)
        inside = flat < n
        flat[inside] = flat[flat[inside]]
        if np.array_equal(new, labels):
            break
        labels = new
    per_frame = mask[0].size
    counts = np.bincount(labels[mask], minlength=n).reshape(len(mask), per_frame)  # F (H W)
    roots = counts.argmax(axis=1) + np.arange(len(mask)) * per_frame
    return labels == roots[:, None, None], counts.max(axis=1)


def _background(frames: np.ndarray) -> np.ndarray:
    """Per-frame median of the border pixels, ``[F, 3]``."""
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, 1:-1, 0], frames[:, 1:-1, -1]], axis=1)
    return np.median(border, axis=1)


def _soft_coverage(frames: np.ndarray, background: np.ndarray, core: np.ndarray, region: np.ndarray):
    """The object's core colour ``[F, 3]`` and each pixel's coverage ``[F, H, W]``: its position between background
    and object colour along the line joining them, clipped to [0, 1] and zero outside ``region``."""
    n_core = np.maximum(core.sum(axis=(1, 2)), 1)[:, None]
    rgb = (frames * core[..., None]).sum(axis=(1, 2)) / n_core  # F 3
    axis = rgb - background  # F 3
    offset = frames - background[:, None, None, :]  # F H W 3
    along = np.einsum("fhwc,fc->fhw", offset, axis) / np.maximum((axis * axis).sum(-1), 1e-6)[:, None, None]
    return rgb, np.clip(along, 0.0, 1.0) * region


def segment(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The main object of each frame: found ``[F]`` bool, core colour ``[F, 3]`` and soft coverage ``[F, H, W]``."""
    x = frames.astype(np.float64)
    background = _background(x)
    diff = np.linalg.norm(x - background[:, None, None, :], axis=-1)  # F H W
    threshold = np.maximum(MIN_CONTRAST, 0.5 * np.percentile(diff.reshape(len(x), -1), 99, axis=1))
    component, size = largest_component(diff >= threshold[:, None, None])
    found = size >= max(1.0, MIN_AREA_FRACTION * diff[0].size)
    # The core is the component's most contrasted pixels: the object's own colour, free of anti-aliased edges.
    peak = np.where(component, diff, 0.0).max(axis=(1, 2))
    core = component & (diff >= 0.8 * peak[:, None, None])
    # Coverage counts the faint edge pixels just outside the thresholded component, but not other blobs.
    region = _neighbourhood(component, False, np.logical_or) & found[:, None, None]
    rgb, alpha = _soft_coverage(x, background, core, region)
    return found, rgb, alpha


# --- per-frame reading ---------------------------------------------------------------------------------------


def _moments(alpha: np.ndarray) -> dict[str, np.ndarray]:
    """Area, centroid, vertical skewness and squareness of each frame's coverage ``[F, H, W]``."""
    h, w = alpha.shape[1:]
    area = np.maximum(alpha.sum(axis=(1, 2)), 1e-9)
    ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")

    def mean(values: np.ndarray) -> np.ndarray:
        return (alpha * values).sum(axis=(1, 2)) / area

    cx, cy = mean(xs[None]), mean(ys[None])
    dx, dy = xs[None] - cx[:, None, None], ys[None] - cy[:, None, None]  # F H W

    def kurtosis(u: np.ndarray) -> np.ndarray:
        return mean(u**4) / np.maximum(mean(u**2), 1e-9) ** 2

    def swing(angle: float) -> np.ndarray:
        """Mean kurtosis along the diagonals minus along the axes, of the axes turned by ``angle``."""
        c, s = np.cos(angle), np.sin(angle)
        u, v = c * dx + s * dy, c * dy - s * dx  # the turned axes
        axial = (kurtosis(u) + kurtosis(v)) / 2
        diagonal = (kurtosis((u + v) / np.sqrt(2)) + kurtosis((u - v) / np.sqrt(2))) / 2
        return diagonal - axial

    skew = mean(dy**3) / np.maximum(mean(dy**2), 1e-9) ** 1.5
    # The kurtosis along direction t swings as cos 4t for a square; the swing at 0 and at 22.5 degrees are its two
    # components, so their norm is the same at any rotation (an axis-aligned square: the first alone, ~0.6).
    squareness = np.hypot(swing(0.0), swing(np.pi / 8))
    return {"area": area, "cx": cx, "cy": cy, "skew": skew, "squareness": squareness}


def read_frames(frames: np.ndarray, extra: bool = False) -> tuple[FrameReading, ...]:
    """One :class:`FrameReading` per frame of a uint8 ``[F, H, W, 3]`` video."""
    found, rgb, alpha = segment(frames)
    m = _moments(alpha)
    readings = []
    for f in range(len(frames)):
        if not found[f]:
            readings.append(FrameReading(found=False))
            continue
        skew, squareness = float(m["skew"][f]), float(m["squareness"][f])
        readings.append(
            FrameReading(
                found=True,
                centroid=(float(m["cx"][f]), float(m["cy"][f])),
                area=float(m["area"][f]),
                rgb=tuple(float(c) for c in rgb[f]),
                skew=skew,
                squareness=squareness,
                colour=classify_colour(rgb[f], extra),
                shape=classify_shape(skew, squareness),
            )
        )
    return tuple(readings)


# --- per-video verdict ---------------------------------------------------------------------------------------


def _majority(labels: Sequence[str | None], total: int) -> tuple[str | None, float]:
    """The most common non-``None`` label and the fraction of ``total`` frames that carry it."""
    counts = Counter(label for label in labels if label is not None)
    if not counts:
        return None, 0.0
    label, count = counts.most_common(1)[0]
    return label, count / total


def _direction(readings: Sequence[FrameReading], size: int) -> tuple[str | None, tuple[float, float] | None]:
    track = np.array([r.centroid for r in readings if r.found])  # N 2
    if len(track) < 2:
        return None, None
    k = max(1, len(track) // 4)
    dx, dy = (track[-k:].mean(axis=0) - track[:k].mean(axis=0)).tolist()
    if max(abs(dx), abs(dy)) < MIN_TRAVEL_FRACTION * size:
        return None, (dx, dy)
    if abs(dx) >= abs(dy):
        return ("right" if dx > 0 else "left"), (dx, dy)
    return ("down" if dy > 0 else "up"), (dx, dy)  # image y grows downwards


def judge_video(frames: np.ndarray, extra: bool = False) -> Verdict:
    """Read the colour, shape and motion of the main object in a uint8 ``[F, H, W, 3]`` video (``extra``: the
    colour may also be one of ``EXTRA_PALETTE``)."""
    frames = np.asarray(frames)
    well_formed = frames.ndim == 4 and frames.shape[-1] == 3 and len(frames) > 0 and min(frames.shape[1:3]) >= 3
    if frames.dtype != np.uint8 or not well_formed:
        raise CinematicError(f"judge_video expects uint8 frames [F, H, W, 3], got {frames.dtype} {frames.shape}")
    readings = read_frames(frames, extra)
    total = len(readings)
    colour, colour_consistency = _majority([r.colour for r in readings], total)
    shape, shape_consistency = _majority([r.shape for r in readings], total)
    direction, displacement = _direction(readings, max(frames.shape[1:3]))
    presence = sum(r.found for r in readings) / total
    return Verdict(colour, shape, direction, colour_consistency, shape_consistency, presence, displacement, readings)


def score(verdict: Verdict, caption: str, extra: bool = False) -> dict[str, bool]:
    """Which of the caption's attributes the verdict got right: keys ``colour``, ``shape``, ``direction``, ``all``."""
    colour, shape, direction = parse_caption(caption, extra)
    right = {
        "colour": verdict.colour == colour,
        "shape": verdict.shape == shape,
        "direction": verdict.direction == direction,
    }
    return {**right, "all": all(right.values())}


# --- reports over many videos ----------------------------------------------------------------------------------

ATTRIBUTES = ("colour", "shape", "direction", "all")


@dataclass(frozen=True)
class Accuracy:
    """Fractions of ``clips`` videos judged right, per attribute and on all three at once, and the mean
    consistencies; every fraction is ``None`` when there are no clips."""

    clips: int
    colour: float | None
    shape: float | None
    direction: float | None
    all: float | None
    colour_consistency: float | None
    shape_consistency: float | None

    @staticmethod
    def of(scores: Sequence[dict[str, bool]], verdicts: Sequence[Verdict]) -> Accuracy:
        def mean(values: list[float]) -> float | None:
            return float(np.mean(values)) if values else None

        right = {key: mean([float(s[key]) for s in scores]) for key in ATTRIBUTES}
        consistency = {
            "colour_consistency": mean([v.colour_consistency for v in verdicts]),
            "shape_consistency": mean([v.shape_consistency for v in verdicts]),
        }
        return Accuracy(len(scores), **right, **consistency)


SPLITS = (("seen", "seen (train captions)"), ("held_out", "held out"))
COLUMNS = {  # Accuracy field -> table heading
    "colour": "colour",
    "shape": "shape",
    "direction": "direction",
    "all": "all correct",
    "colour_consistency": "colour consistency",
    "shape_consistency": "shape consistency",
}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


@dataclass(frozen=True)
class Report:
    """Accuracy on the seen (:data:`TRAIN_CAPTIONS`) and held-out (:data:`HELD_OUT`) captions, and per caption."""

    seen: Accuracy
    held_out: Accuracy
    per_caption: Mapping[str, Accuracy]

    def table(self) -> str:
        """A markdown table: one row per split, accuracies and mean consistencies in percent."""
        headings = ["captions", "clips", *COLUMNS.values()]
        lines = ["| " + " | ".join(headings) + " |", "|" + " --- |" * len(headings)]
        for key, name in SPLITS:
            acc: Accuracy = getattr(self, key)
            cells = [name, str(acc.clips), *(_percent(getattr(acc, column)) for column in COLUMNS)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_json(self) -> dict:
        """Plain JSON-able dict: fractions in [0, 1], ``None`` for an empty split."""
        out = {key: asdict(getattr(self, key)) for key, _ in SPLITS}
        out["per_caption"] = {caption: asdict(acc) for caption, acc in self.per_caption.items()}
        json.dumps(out)  # fail here, not in the caller's writer, if anything is not JSON-able
        return out


def evaluate(videos_by_caption: Mapping[str, Sequence[np.ndarray]]) -> Report:
    """Judge every video against the caption it was generated for and sum up seen and held-out accuracy."""
    split_scores: dict[str, tuple[list, list]] = {key: ([], []) for key, _ in SPLITS}
    per_caption = {}
    for caption, videos in videos_by_caption.items():
        parse_caption(caption)
        verdicts = [judge_video(video) for video in videos]
        scores = [score(verdict, caption) for verdict in verdicts]
        per_caption[caption] = Accuracy.of(scores, verdicts)
        split = "held_out" if caption in HELD_OUT else "seen"
        assert caption in HELD_OUT or caption in TRAIN_CAPTIONS  # every valid caption is in exactly one split
        split_scores[split][0].extend(scores)
        split_scores[split][1].extend(verdicts)
    return Report(**{key: Accuracy.of(*split_scores[key]) for key, _ in SPLITS}, per_caption=per_caption)
