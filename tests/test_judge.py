import json

import numpy as np
import pytest

from cinematic.data.shapes import ALL_CAPTIONS, HELD_OUT, PALETTE, TRAIN_CAPTIONS, parse_caption, render_clip
from cinematic.errors import CinematicError
from cinematic.eval.judge import (
    CIRCLE_MAX,
    SQUARE_MIN,
    TRIANGLE_SKEW,
    classify_colour,
    classify_shape,
    evaluate,
    judge_video,
    largest_component,
    read_frames,
    score,
)


def _ground_truth_accuracy(size: int, seeds: range) -> tuple[dict[str, float], list]:
    scores, verdicts = [], []
    for caption in ALL_CAPTIONS:
        for seed in seeds:
            verdict = judge_video(render_clip(caption, seed, size))
            scores.append(score(verdict, caption))
            verdicts.append(verdict)
    accuracy = {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}
    return accuracy, verdicts


@pytest.mark.parametrize(("size", "seeds"), [(32, range(10)), (64, range(100, 102))])
def test_judge_is_right_on_ground_truth(size, seeds):
    accuracy, verdicts = _ground_truth_accuracy(size, seeds)
    for key, value in accuracy.items():
        assert value >= 0.99, (key, value)
    assert min(v.colour_consistency for v in verdicts) >= 0.9
    assert min(v.shape_consistency for v in verdicts) >= 0.9
    assert np.mean([v.colour_consistency for v in verdicts]) >= 0.99
    assert np.mean([v.shape_consistency for v in verdicts]) >= 0.99
    assert all(v.presence == 1.0 for v in verdicts)


def _blur(video: np.ndarray) -> np.ndarray:
    padded = np.pad(video.astype(float), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = video.shape[1:3]
    return sum(padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9


def test_judge_tolerates_blur_noise_and_washed_out_colour():
    # Generated videos are blurry, noisy and off-colour; the judge should still read a clearly drawn object.
    rng = np.random.default_rng(0)
    right = []
    for caption in ALL_CAPTIONS:
        video = _blur(render_clip(caption, seed=7)) + rng.normal(0, 12, (16, 32, 32, 3))
        video = 0.6 * video + 0.4 * video.mean(-1, keepdims=True)
        right.append(score(judge_video(np.clip(video, 0, 255).astype(np.uint8)), caption)["all"])
    assert np.mean(right) >= 0.95


@pytest.mark.parametrize("fill", ["flat", "noise"])
def test_no_object_gives_an_unknown_verdict(fill):
    rng = np.random.default_rng(0)
    video = np.full((16, 32, 32, 3), 120, np.uint8)
    if fill == "noise":
        video = np.clip(120 + rng.normal(0, 5, video.shape), 0, 255).astype(np.uint8)
    verdict = judge_video(video)
    assert (verdict.colour, verdict.shape, verdict.direction) == (None, None, None)
    assert verdict.presence == verdict.colour_consistency == verdict.shape_consistency == 0.0
    assert not any(score(verdict, "a red circle moving left").values())


def test_static_object_has_no_direction():
    still = np.repeat(render_clip("a green square moving up", seed=1)[:1], 16, axis=0)
    verdict = judge_video(still)
    assert (verdict.colour, verdict.shape, verdict.direction) == ("green", "square", None)
    right = score(verdict, "a green square moving up")
    assert right == {"colour": True, "shape": True, "direction": False, "all": False}


def test_object_vanishing_halfway_lowers_consistency():
    video = render_clip("a yellow triangle moving right", seed=2)
    video[8:] = video[8:, :1, :1]  # the background colour of the top-left pixel everywhere
    verdict = judge_video(video)
    assert (verdict.colour, verdict.shape, verdict.direction) == ("yellow", "triangle", "right")
    assert verdict.presence == verdict.colour_consistency == verdict.shape_consistency == 0.5


def test_classify_colour():
    for name, rgb in PALETTE.items():
        assert classify_colour(rgb) == name
    assert classify_colour((200, 90, 70)) == "red"  # a dull, slightly orange red
    assert classify_colour((120, 200, 200)) in ("green", "blue")  # cyan sits between them
    assert classify_colour((128, 128, 140)) is None  # a grey has no hue


def test_largest_component_keeps_the_biggest_connected_blob():
    mask = np.zeros((2, 12, 12), bool)
    mask[0, 1:3, 1:3] = True  # 4 pixels
    mask[0, 5:11, 5] = mask[0, 10, 5:11] = mask[0, 5:11, 10] = True  # a 16-pixel U, joined only through its bottom
    mask[0, 0, 11] = mask[0, 1, 10] = True  # diagonal neighbours: one 2-pixel component (8-connectivity)
    mask[1, 6, 6] = True
    keep, size = largest_component(mask)
    assert size.tolist() == [16, 1]
    assert keep[0].sum() == 16 and keep[0, 5, 5] and keep[0, 5, 10] and not keep[0, 1, 1]
    assert keep[1].sum() == 1 and keep[1, 6, 6]
    keep, size = largest_component(np.zeros((1, 4, 4), bool))
    assert size.tolist() == [0] and not keep.any()


def test_judge_rejects_bad_input():
    with pytest.raises(CinematicError):
        judge_video(np.zeros((16, 32, 32), np.uint8))
    with pytest.raises(CinematicError):
        judge_video(np.zeros((16, 32, 32, 3), np.float32))  # a [-1, 1] float video must be converted first


def _hand_made_set() -> dict[str, list[np.ndarray]]:
    seen, held = "a red circle moving right", "a blue triangle moving up"
    assert seen in TRAIN_CAPTIONS and held in HELD_OUT
    return {
        seen: [
            render_clip(seen, 0),
            render_clip(seen, 1),
            render_clip("a green circle moving right", 2),  # wrong colour
            render_clip("a red circle moving up", 3),  # wrong direction
        ],
        held: [render_clip(held, 4), render_clip("a blue square moving up", 5)],  # the second has the wrong shape
    }


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_evaluate_splits_and_counts():
    report = evaluate(_hand_made_set())
    seen, held = report.seen, report.held_out
    assert (seen.clips, seen.colour, seen.shape, seen.direction, seen.all) == (4, 0.75, 1.0, 0.75, 0.5)
    assert (held.clips, held.colour, held.shape, held.direction, held.all) == (2, 1.0, 0.5, 1.0, 0.5)
    assert seen.colour_consistency == held.shape_consistency == 1.0
    assert report.per_caption["a blue triangle moving up"] == held

    table = report.table()
    assert table.splitlines()[0].startswith("| captions | clips | colour | shape | direction | all correct |")
    rows = {cells[0]: cells[1:6] for cells in (_cells(line) for line in table.splitlines()[2:])}
    assert rows["seen (train captions)"] == ["4", "75.0%", "100.0%", "75.0%", "50.0%"]
    assert rows["held out"] == ["2", "100.0%", "50.0%", "100.0%", "50.0%"]

    data = json.loads(json.dumps(report.to_json()))
    assert data["seen"]["all"] == 0.5 and data["seen"]["colour"] == 0.75 and data["seen"]["clips"] == 4
    assert data["held_out"]["shape"] == 0.5 and data["held_out"]["clips"] == 2
    assert data["per_caption"]["a red circle moving right"]["direction"] == 0.75


def test_evaluate_with_an_empty_split():
    caption = TRAIN_CAPTIONS[0]
    report = evaluate({caption: [render_clip(caption, 0)]})
    assert report.held_out.clips == 0 and report.held_out.all is None
    assert report.seen.all == 1.0
    assert "| held out | 0 | - |" in report.table()
    assert report.to_json()["held_out"]["all"] is None


def test_evaluate_rejects_an_unknown_caption():
    with pytest.raises(CinematicError):
        evaluate({"a purple blob moving sideways": [render_clip(ALL_CAPTIONS[0], 0)]})


def test_score_keys():
    verdict = judge_video(render_clip("a yellow square moving left", 0))
    assert score(verdict, "a yellow square moving left") == dict.fromkeys(("colour", "shape", "direction", "all"), True)
    assert parse_caption("a yellow square moving left") == ("yellow", "square", "left")


# --- shapes that must not be mistaken: soft blobs, rotated squares, every sub-pixel position ------------------------

SUBPIXEL = [(dx, dy) for dx in np.linspace(0, 1, 9) for dy in np.linspace(0, 1, 9)]  # 81 positions within a pixel


def _paint(alpha: np.ndarray, colour=(220, 40, 40), background=(120, 120, 120)) -> np.ndarray:
    """uint8 frames ``[F, H, W, 3]`` of ``colour`` over ``background`` with coverage ``alpha`` ``[F, H, W]``."""
    colour, background = np.asarray(colour, float), np.asarray(background, float)
    return np.rint(background + alpha[..., None] * (colour - background)).astype(np.uint8)


def _grid(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    centres = np.arange(size) + 0.5
    return np.meshgrid(centres, centres)  # x, y of each pixel centre


def _blobs(sigma: float, gain: float, size: int = 32) -> np.ndarray:
    """A round Gaussian blob (``gain`` > 1: a soft disc with a flat top) at each of the 81 sub-pixel positions."""
    x, y = _grid(size)
    alpha = [np.exp(-((x - 16 - dx) ** 2 + (y - 16 - dy) ** 2) / (2 * sigma**2)) for dx, dy in SUBPIXEL]
    return _paint(np.clip(gain * np.stack(alpha), 0, 1))


def _squares(radius: float, degrees: float, size: int = 32) -> np.ndarray:
    """An anti-aliased square of half-side ``radius`` turned by ``degrees``, at each of the 81 sub-pixel positions."""
    x, y = _grid(size)
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    alpha = []
    for dx, dy in SUBPIXEL:
        u, v = x - 16 - dx, y - 16 - dy
        alpha.append(np.clip(0.5 - (np.maximum(np.abs(c * u + s * v), np.abs(c * v - s * u)) - radius), 0, 1))
    return _paint(np.stack(alpha))


@pytest.mark.parametrize(("sigma", "gain"), [(1.0, 1.0), (1.5, 1.0), (1.5, 2.0), (2.0, 1.0), (3.0, 1.0), (3.0, 2.0)])
def test_a_soft_round_blob_never_reads_square(sigma, gain):
    """A round blob is a circle or too close to call, never a square, wherever it sits within a pixel. (Under the
    one threshold of 0.3 that the judge had, a blob of sigma 1.5 read square at 4 of these 81 positions; its
    squareness reaches 0.33, which is why SQUARE_MIN is 0.35.)"""
    shapes = [r.shape for r in read_frames(_blobs(sigma, gain))]
    assert "square" not in shapes and "triangle" not in shapes
    assert shapes.count("circle") >= len(shapes) // 2, shapes  # mostly read as what it is


@pytest.mark.parametrize("degrees", [0, 10, 22.5, 30, 45, 60])
@pytest.mark.parametrize("radius", [4.0, 6.5])
def test_a_rotated_square_reads_square_at_every_subpixel_position(radius, degrees):
    # at 45 degrees the old diagonal-minus-axial kurtosis was -0.6: a "circle"
    assert {r.shape for r in read_frames(_squares(radius, degrees))} == {"square"}


@pytest.mark.parametrize("caption", ["a red circle moving right", "a green square moving up"])
def test_drawn_shapes_read_right_at_every_subpixel_position(caption):
    """The dataset's shapes, drawn as it draws them (its size and anti-aliasing) at each sub-pixel position."""
    from cinematic.data.shapes import clip_params, signed_distance

    radius, shape = clip_params(caption, seed=0).radius, parse_caption(caption)[1]
    x, y = _grid()
    alpha = [np.clip(0.5 - signed_distance(shape, x - 16 - dx, y - 16 - dy, radius), 0, 1) for dx, dy in SUBPIXEL]
    assert {r.shape for r in read_frames(_paint(np.stack(alpha)))} == {shape}


def test_shape_has_a_no_shape_band_between_circle_and_square():
    assert classify_shape(0.0, 0.0) == classify_shape(0.0, CIRCLE_MAX - 0.01) == "circle"
    assert classify_shape(0.0, SQUARE_MIN + 0.01) == classify_shape(0.0, 0.6) == "square"
    for squareness in np.linspace(CIRCLE_MAX, SQUARE_MIN, 5):
        assert classify_shape(0.0, float(squareness)) is None  # too close to call
    assert classify_shape(TRIANGLE_SKEW - 0.1, 0.25) == "triangle"


def test_a_video_of_unclear_frames_has_no_shape():
    blobs = _blobs(1.5, 1.0)
    unclear = [i for i, r in enumerate(read_frames(blobs)) if r.shape is None]
    assert len(unclear) >= 16
    verdict = judge_video(blobs[unclear[:16]])
    assert verdict.shape is None and verdict.shape_consistency == 0.0 and verdict.presence == 1.0
    assert verdict.colour == "red"
