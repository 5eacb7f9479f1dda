"""Long videos and prompt schedules: windows, their fusion, FreeNoise's noise, and per-window prompts."""

from __future__ import annotations

import pytest
import torch

from cinematic.cli import main
from cinematic.diffusion.windows import (
    WindowedEps,
    frame_prompts,
    parse_prompt_schedule,
    reschedule_noise,
    window_features,
    window_starts,
)
from cinematic.errors import CinematicError
from cinematic.generation.prompts import text_features
from cinematic.pipeline import Pipeline
from tests.factories import make_diffusers_folder

PROMPT = "a red cat riding a horse on the beach"
SMALL = dict(height=32, width=32, steps=3, seed=4, progress=False)


# --- schedules ----------------------------------------------------------------------------------------------------


def test_schedule_parses_and_gives_each_frame_its_prompt():
    schedule = parse_prompt_schedule(" 0: a red circle moving right |32:a red circle moving left ", 64)
    assert schedule == ((0, "a red circle moving right"), (32, "a red circle moving left"))
    prompts = frame_prompts(schedule, 64)
    assert prompts[:32] == ["a red circle moving right"] * 32
    assert prompts[32:] == ["a red circle moving left"] * 32
    assert frame_prompts(((0, "a"), (1, "b"), (3, "c")), 5) == ["a", "b", "b", "c", "c"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "prompt schedule must be text"),
        ("a red circle", 'is not "FRAME: prompt"'),
        ("0: a | b", 'is not "FRAME: prompt"'),
        ("0: a | 8:", 'is not "FRAME: prompt"'),
        ("4: a | 8: b", "must start at frame 0"),
        ("0: a | 8: b | 8: c", "must increase"),
        ("0: a | 16: b", "past the clip's last frame, 15"),
    ],
)
def test_bad_schedules_are_one_clear_error(text, message):
    with pytest.raises(CinematicError, match=message):
        parse_prompt_schedule(text, 16)


# --- windows ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("frames", "window", "stride"), [(64, 16, 8), (64, 16, 4), (40, 16, 8), (17, 16, 8)])
def test_windows_cover_every_frame_and_end_on_the_last(frames, window, stride):
    starts = window_starts(frames, window, stride)
    assert starts[0] == 0 and starts[-1] == frames - window
    assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))
    covered = torch.zeros(frames, dtype=torch.bool)
    for s in starts:
        covered[s : s + window] = True
    assert covered.all()
    assert window_starts(12, 16, 8) == [0]


def test_fusion_of_a_per_frame_network_is_that_network():
    """When every frame's output depends on that frame alone, all windows agree, and the fused result must equal
    the network run on the whole clip: the weights are normalised per frame."""
    x = torch.randn(2, 4, 23, 3, 3, generator=torch.Generator().manual_seed(0))

    def per_frame(x, t):
        return torch.tanh(x * 1.7 + t.view(-1, 1, 1, 1, 1) / 100).roll(1, dims=-1)

    starts = window_starts(23, 8, 3)
    fused = WindowedEps([per_frame] * len(starts), starts, 8)(x, torch.tensor([10.0, 20.0]))
    torch.testing.assert_close(fused, per_frame(x, torch.tensor([10.0, 20.0])), rtol=1e-6, atol=1e-6)


def test_fusion_runs_each_window_on_its_frames():
    seen = []

    def model(k):
        def run(x, t):
            seen.append((k, x[0, 0, :, 0, 0].tolist()))
            return torch.full_like(x, float(k))

        return run

    x = torch.arange(10, dtype=torch.float32).view(1, 1, 10, 1, 1)
    starts = window_starts(10, 4, 3)  # [0, 3, 6]
    out = WindowedEps([model(k) for k in range(3)], starts, 4)(x, torch.tensor([1.0]))
    assert seen == [(0, [0, 1, 2, 3]), (1, [3, 4, 5, 6]), (2, [6, 7, 8, 9])]
    # Frame 3 is the last of window 0 and the first of window 1: the mean of 0 and 1.
    assert out[0, 0, :, 0, 0].tolist() == [0, 0, 0, 0.5, 1, 1, 1.5, 2, 2, 2]


def test_fusion_is_the_plain_mean_wherever_a_frame_sits_in_its_windows():
    def constant(k):
        return lambda x, t: torch.full_like(x, float(k))

    x = torch.zeros(1, 1, 8, 1, 1)
    starts = window_starts(8, 4, 2)  # [0, 2, 4]: frame 2 is window 0's third frame and window 1's first
    out = WindowedEps([constant(k) for k in (0, 3, 6)], starts, 4)(x, torch.tensor([1.0]))
    assert out[0, 0, :, 0, 0].tolist() == [0, 0, 1.5, 1.5, 4.5, 4.5, 6, 6]


def test_rescheduled_noise_repeats_shuffled_blocks():
    first = torch.randn(1, 2, 8, 3, 3, generator=torch.Generator().manual_seed(1))
    noise = reschedule_noise(first, 20, 4, torch.Generator().manual_seed(2))
    assert noise.shape == (1, 2, 20, 3, 3)
    assert torch.equal(noise[:, :, :8], first)
    for i in (8, 12, 16):
        block, source = noise[:, :, i : i + 4], noise[:, :, i - 8 : i - 4]
        matches = [[torch.equal(block[:, :, a], source[:, :, b]) for b in range(4)] for a in range(4)]
        assert all(sum(row) == 1 for row in matches)  # a permutation of the frames 8 earlier
    assert torch.equal(reschedule_noise(first, 6, 4, torch.Generator()), first[:, :, :6])


def test_window_features_blend_by_frame_share():
    features = torch.stack([torch.zeros(2, 3), torch.ones(2, 3)])  # prompt 0 -> 0, prompt 1 -> 1
    index = [0] * 6 + [1] * 6
    out = window_features(features, index, [0, 4, 8], 4)
    assert [w[0, 0].item() for w in out] == [0.0, 0.5, 1.0]


# --- the pipeline -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> Pipeline:
    return Pipeline.from_pretrained(make_diffusers_folder(tmp_path_factory.mktemp("long") / "model"))


def test_short_clips_are_unchanged_by_the_window(pipe):
    plain = pipe(PROMPT, num_frames=4, window=0, **SMALL)
    assert torch.equal(pipe(PROMPT, num_frames=4, window=4, **SMALL).frames, plain.frames)
    assert torch.equal(pipe(PROMPT, num_frames=4, window=8, **SMALL).frames, plain.frames)


def test_long_clip_runs_in_windows_and_starts_from_the_short_clips_noise(pipe):
    short = pipe.validate(PROMPT, num_frames=4, window=4, seed=3)
    long = pipe.validate(PROMPT, num_frames=11, window=4, window_stride=2, seed=3)
    assert long.settings.windowed and not short.settings.windowed
    noise, _ = pipe.initial_noise(long)
    assert noise.shape[2] == 11
    assert torch.equal(noise[:, :, :4], pipe.initial_noise(short)[0])
    assert window_starts(11, 4, 2) == [0, 2, 4, 6, 7]

    calls = []
    unet_forward = pipe.model.unet.forward

    def spy(x, *args, **kwargs):
        calls.append(x.shape[2])
        return unet_forward(x, *args, **kwargs)

    pipe.model.unet.forward = spy
    try:
        video = pipe(PROMPT, num_frames=11, window=4, window_stride=2, **SMALL)
    finally:
        del pipe.model.unet.forward
    assert video.frames.shape == (11, 32, 32, 3)
    assert calls == [4] * 5 * 3  # five windows of four frames, three steps (small steps: guidance batched)
    assert video.metadata["window"] == 4 and video.metadata["window_stride"] == 2


def test_one_entry_schedule_is_the_plain_prompt(pipe):
    plain = pipe(PROMPT, num_frames=9, window=4, **SMALL)
    scheduled = pipe("", prompt_schedule=f"0: {PROMPT}", num_frames=9, window=4, **SMALL)
    assert torch.equal(scheduled.frames, plain.frames)
    assert scheduled.metadata["prompt_schedule"] == f"0: {PROMPT}"


def test_each_window_is_conditioned_on_its_frames_prompts(pipe):
    request = pipe.validate("", prompt_schedule="0: a red cat | 6: a blue dog", num_frames=12, window=4)
    s = request.settings
    starts = window_starts(s.num_frames, s.window, s.window_stride)
    assert starts == [0, 2, 4, 6, 8]
    conds = text_features(pipe.encode_prompts, s, request.prompts, 1, starts).windows
    red, blue = pipe.encode_prompts(["a red cat", "a blue dog"])
    torch.testing.assert_close(conds[0][0], red)
    torch.testing.assert_close(conds[2][0], (red + blue) / 2)  # frames 4-7: two of each
    torch.testing.assert_close(conds[4][0], blue)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(window=1), "window: must be 0"),
        (dict(window=-2), "window: must be an integer from 0"),
        (dict(window=4, window_stride=5), "window_stride: must be an integer from 1 to the window, 4"),
        (dict(prompt_schedule="0: a | 30: b", num_frames=16), "past the clip's last frame"),
    ],
)
def test_bad_window_settings_are_one_clear_error(pipe, kwargs, message):
    with pytest.raises(CinematicError, match=message):
        pipe.validate(None if "prompt_schedule" in kwargs else PROMPT, **kwargs)


def test_cli_long_video_with_a_schedule(tmp_path, capsys):
    out = tmp_path / "long.mp4"
    code = main(
        [
            "generate", "--prompt-schedule", "0: a red circle moving right | 24: a red circle moving left",
            "--num-frames", "48", "--num-inference-steps", "2", "--seed", "1", "-o", str(out),
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    from cinematic import video

    clip = video.read(out)
    assert clip.frames.shape[0] == 48
    assert clip.metadata["prompt_schedule"] == "0: a red circle moving right | 24: a red circle moving left"
