import math

import numpy as np
import pytest
import torch

from cinematic.data.shapes import (
    ALL_CAPTIONS,
    BACKGROUND_LEVELS,
    BACKGROUND_TINT,
    COLOURS,
    DIRECTION_STEP,
    DIRECTIONS,
    HELD_OUT,
    MIN_TRAVEL_FRACTION,
    PALETTE,
    SHAPES,
    TRAIN_CAPTIONS,
    ShapesDataset,
    clip_params,
    coverage,
    item_seed,
    parse_caption,
    render_clip,
)
from cinematic.errors import CinematicError

SEEDS = range(5)


def test_caption_sets():
    assert len(ALL_CAPTIONS) == len(set(ALL_CAPTIONS)) == 48
    assert len(HELD_OUT) == len(set(HELD_OUT)) == 8
    assert len(TRAIN_CAPTIONS) == 40
    assert set(HELD_OUT) <= set(ALL_CAPTIONS)
    assert set(TRAIN_CAPTIONS) | set(HELD_OUT) == set(ALL_CAPTIONS)
    assert not set(TRAIN_CAPTIONS) & set(HELD_OUT)
    assert "a red circle moving left" in ALL_CAPTIONS


def test_held_out_covers_every_attribute_and_keeps_every_pair_in_training():
    parsed = [parse_caption(c) for c in HELD_OUT]
    for k, values in enumerate((COLOURS, SHAPES, DIRECTIONS)):
        assert {p[k] for p in parsed} == set(values)
    train = [parse_caption(c) for c in TRAIN_CAPTIONS]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        for p in parsed:
            assert any(t[a] == p[a] and t[b] == p[b] for t in train), (p, a, b)


def test_parse_caption_round_trip():
    for caption in ALL_CAPTIONS:
        colour, shape, direction = parse_caption(caption)
        assert caption == f"a {colour} {shape} moving {direction}"


NOT_CAPTIONS = ["", "a purple circle moving left", "a red circle moving", "red circle moving left", None, "a  red"]


@pytest.mark.parametrize("caption", NOT_CAPTIONS)
def test_parse_caption_rejects(caption):
    with pytest.raises(CinematicError):
        parse_caption(caption)


@pytest.mark.parametrize("size", [32, 64])
def test_clip_shape_dtype_and_determinism(size):
    clip = render_clip("a red circle moving left", seed=3, size=size)
    assert clip.shape == (16, size, size, 3) and clip.dtype == np.uint8
    np.testing.assert_array_equal(clip, render_clip("a red circle moving left", seed=3, size=size))
    assert not np.array_equal(clip, render_clip("a red circle moving left", seed=4, size=size))
    assert render_clip("a red circle moving left", seed=3, size=size, frames=8).shape == (8, size, size, 3)


def test_background_is_grey_and_far_from_every_colour():
    for seed in range(50):
        bg = np.array(clip_params("a blue square moving up", seed).background)
        assert BACKGROUND_LEVELS[0] - BACKGROUND_TINT <= bg.min() and bg.max() <= BACKGROUND_LEVELS[1] + BACKGROUND_TINT
        assert bg.max() - bg.min() <= 2 * BACKGROUND_TINT
    for level in BACKGROUND_LEVELS:
        for rgb in PALETTE.values():
            assert np.linalg.norm(np.array(rgb) - level) > 90


def _expected_area(shape: str, radius: float) -> float:
    return {"circle": math.pi * radius**2, "square": 4 * radius**2, "triangle": 2 * radius**2}[shape]


@pytest.mark.parametrize("size", [32, 64])
def test_object_stays_whole_inside_the_frame(size):
    for caption in ALL_CAPTIONS:
        for seed in SEEDS:
            p = clip_params(caption, seed, size)
            for f in range(p.frames):
                cx, cy = p.centre(f)
                assert p.radius <= cx <= size - p.radius and p.radius <= cy <= size - p.radius
            # From the pixels: the drawn area is the whole shape's area in every frame, so nothing is cut off.
            area = coverage(p).sum(axis=(1, 2))
            np.testing.assert_allclose(area, _expected_area(p.shape, p.radius), rtol=0.03)


def _pixel_centroids(clip: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    diff = np.abs(clip.astype(float) - np.array(background)).sum(-1)  # F H W
    weight = diff / diff.sum(axis=(1, 2), keepdims=True)
    ys, xs = np.mgrid[: clip.shape[1], : clip.shape[2]] + 0.5
    return np.stack([(weight * xs).sum(axis=(1, 2)), (weight * ys).sum(axis=(1, 2))], axis=1)  # F 2


@pytest.mark.parametrize("size", [32, 64])
def test_object_moves_in_the_captions_direction(size):
    for caption in ALL_CAPTIONS:
        direction = parse_caption(caption)[2]
        step = np.array(DIRECTION_STEP[direction])
        for seed in SEEDS[:2]:
            p = clip_params(caption, seed, size)
            velocity = np.array(p.velocity)
            assert np.all(velocity * step >= 0) and np.all(velocity[step == 0] == 0)
            assert np.linalg.norm(velocity) * (p.frames - 1) >= MIN_TRAVEL_FRACTION * size - 1e-9
            track = _pixel_centroids(render_clip(caption, seed, size), p.background)
            travel = (track[-1] - track[0]) @ step
            assert travel >= 0.3 * size, (caption, seed, travel)
            assert np.all(np.diff(track @ step) > 0)  # steadily, every frame
            # A triangle's centroid sits a third of the way from its base to its apex: r/3 below the box centre.
            offset = p.radius / 3 if p.shape == "triangle" else 0.0
            np.testing.assert_allclose(track[0], (p.start[0], p.start[1] + offset), atol=0.6)


def test_dataset_items():
    data = ShapesDataset(length=100)
    item = data[7]
    assert set(item) == {"video", "caption"}
    video = item["video"]
    assert video.shape == (3, 16, 32, 32) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1 and video.max() - video.min() > 0.5
    assert item["caption"] in TRAIN_CAPTIONS
    torch.testing.assert_close(video, ShapesDataset(length=100)[7]["video"], rtol=0, atol=0)
    assert not torch.equal(video, data[7 + len(TRAIN_CAPTIONS)]["video"])  # same caption, another clip
    assert not torch.equal(video, ShapesDataset(seed=1, length=100)[7]["video"])
    with pytest.raises(IndexError):
        data[100]


def test_dataset_video_is_the_rendered_clip_rescaled():
    data = ShapesDataset(size=64, frames=8, length=10)
    item = data[3]
    assert item["video"].shape == (3, 8, 64, 64)
    clip = torch.from_numpy(render_clip(data.caption(3), item_seed(0, 3), size=64, frames=8)).float()  # F H W C
    torch.testing.assert_close(item["video"], clip.permute(3, 0, 1, 2) / 127.5 - 1)


def test_dataset_never_shows_a_held_out_caption():
    data = ShapesDataset(TRAIN_CAPTIONS)
    captions = {data.caption(i) for i in range(len(data))}
    assert captions == set(TRAIN_CAPTIONS)
    assert not any(data[i]["caption"] in HELD_OUT for i in range(0, len(data), 997))


def test_dataset_batches_through_a_dataloader():
    batch = next(iter(torch.utils.data.DataLoader(ShapesDataset(length=8), batch_size=4)))
    assert batch["video"].shape == (4, 3, 16, 32, 32) and len(batch["caption"]) == 4


@pytest.mark.parametrize(
    "kwargs",
    [{"captions": ()}, {"captions": ("a pink circle moving left",)}, {"length": 0}, {"size": 8}, {"frames": 1}],
)
def test_dataset_rejects_bad_arguments(kwargs):
    with pytest.raises(CinematicError):
        ShapesDataset(**kwargs)


def test_the_vae_stage_data_can_recolour_objects():
    """recipes/train_shapes.py's MixedFrames: frame f of item i is frame f of dataset item i*F+f; with
    ``other_colours`` some objects take a random colour while the background stays."""
    from recipes.train_shapes import MixedFrames

    plain = MixedFrames(0, frames=4)
    video = plain[1]["video"]
    assert torch.equal(video, torch.stack([plain.clips[4 + f]["video"][:, f] for f in range(4)], dim=1))
    recoloured = MixedFrames(0, frames=4, other_colours=1.0)[1]["video"]
    changed = (recoloured != video).any(dim=0)  # [F, H, W]
    assert changed.any() and not changed.all()
    assert torch.equal(recoloured[:, ~changed], video[:, ~changed])
