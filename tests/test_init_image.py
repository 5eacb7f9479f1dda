"""First-frame animation and looping: the pinned frames decode to the VAE round-trip of the picture, every sampler
keeps them, and bad input is one clear line."""

from __future__ import annotations

import pytest
import torch

from cinematic import video
from cinematic.cli import main
from cinematic.diffusion import alpha_bar_scaled_linear, sample
from cinematic.diffusion.schedule import ddim_sigmas
from cinematic.errors import CinematicError
from cinematic.generation.pictures import Pin, encode_image, fit_frames
from cinematic.pipeline import Pipeline
from tests.factories import make_diffusers_folder
from tests.test_v2v import assert_within_one, smooth_clip

PROMPT = "a red cat riding a horse on the beach"
SIZE = dict(height=32, width=32, progress=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_diffusers_folder(tmp_path_factory.mktemp("init-image") / "model")


@pytest.fixture(scope="module")
def ours(folder) -> Pipeline:
    return Pipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def still() -> torch.Tensor:
    return smooth_clip(1, 40, 48, seed=4)[0]  # uint8 [H, W, 3], not the output size: it is fitted first


def round_trip(pipe: Pipeline, image: torch.Tensor) -> torch.Tensor:
    """The still fitted to 32x32, encoded to its posterior mean and decoded: uint8 ``[H, W, 3]``."""
    z = encode_image(pipe.model.vae, fit_frames(image[None], 1, 32, 32), pipe.dtype)  # [1,C,h,w]
    return pipe.decode(z[:, :, None])[0][0]  # [1,C,h,w] -> [1,C,1,h,w] -> frame 0


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler_ancestral"])
def test_first_frame_is_the_round_trip_of_the_image(ours, still, sampler):
    result = ours(PROMPT, init_image=still, num_frames=3, steps=4, seed=1, sampler=sampler, **SIZE)
    assert_within_one(result.frames[0], round_trip(ours, still))
    plain = ours(PROMPT, num_frames=3, steps=4, seed=1, sampler=sampler, **SIZE)
    assert (result.frames[1:].int() - plain.frames[1:].int()).abs().max() > 1  # the other frames follow it


def test_loop_pins_the_last_frame_to_the_image(ours, still):
    result = ours(PROMPT, init_image=still, loop=True, num_frames=4, steps=4, seed=2, **SIZE)
    assert_within_one(result.frames[-1], result.frames[0])
    assert_within_one(result.frames[0], round_trip(ours, still))
    assert result.metadata["loop"] is True


def test_loop_without_an_image_ties_last_to_first(ours):
    result = ours(PROMPT, loop=True, num_frames=3, steps=4, seed=3, **SIZE)
    assert torch.equal(result.frames[-1], result.frames[0])
    assert not torch.equal(result.frames[1], result.frames[0])


def test_pin_renoises_the_known_frame_every_step():
    """What the network sees in the pinned frame is the known latent at the current level; what the sampler gets
    back is the known latent; the final latent holds it exactly."""
    g = torch.Generator().manual_seed(0)
    known, noise = torch.randn((1, 4, 5, 6), generator=g), torch.randn((1, 4, 3, 5, 6), generator=g)
    pin = Pin(known, noise[:, :, 0], loop=True)
    seen = []

    def denoiser(x, sigma):
        seen.append((x.clone(), float(sigma)))
        return x * 0.5  # anything

    sigma = torch.tensor(3.0, dtype=torch.float64)
    x0 = pin.wrap(denoiser)(torch.randn((1, 4, 3, 5, 6), generator=g), sigma)
    x, s = seen[0]
    for i in (0, -1):
        torch.testing.assert_close(x[:, :, i], known + s * noise[:, :, 0])
        assert torch.equal(x0[:, :, i], known)
    assert torch.equal(pin.finish(torch.zeros(1, 4, 3, 5, 6))[:, :, -1], known)


def test_pinned_ddim_trajectory_is_the_forward_process():
    """With a pinned frame, DDIM carries ``known + sigma * n`` from level to level exactly, whatever the network."""
    g = torch.Generator().manual_seed(1)
    known, noise = torch.randn((1, 4, 4, 4), generator=g), torch.randn((1, 4, 2, 4, 4), generator=g)
    pin = Pin(known, noise[:, :, 0])
    levels = []

    def eps_model(x, t):
        levels.append(x[:, :, 0].clone())
        return torch.sin(x)  # a network that knows nothing

    out = sample("ddim", eps_model, noise, 5, wrap=pin.wrap)
    sigmas = ddim_sigmas(alpha_bar_scaled_linear(), 5)
    assert len(levels) == 5
    for x_vp, sigma in zip(levels, sigmas.tolist()):
        torch.testing.assert_close(x_vp, (known + sigma * noise[:, :, 0]) / (1 + sigma**2) ** 0.5)
    # Without the final paste the last DDIM step lands at sigma(t=0) ~ 0.03, not on the known latent.
    assert (out[:, :, 0] - known).abs().max() < 0.1


def test_bad_input(ours, still, tmp_path):
    with pytest.raises(CinematicError, match="at least 2 frames"):
        ours(PROMPT, init_image=still, loop=True, num_frames=1, steps=2, **SIZE)
    with pytest.raises(CinematicError, match="no such init image"):
        ours(PROMPT, init_image=tmp_path / "missing.png", steps=2, **SIZE)
    (tmp_path / "junk.png").write_text("not an image")
    with pytest.raises(CinematicError, match="cannot read init image"):
        ours(PROMPT, init_image=tmp_path / "junk.png", steps=2, **SIZE)
    with pytest.raises(CinematicError, match="not both"):
        ours(PROMPT, init_image=still, init_video=smooth_clip(2, 32, 32), steps=2, **SIZE)
    with pytest.raises(CinematicError, match=r"uint8 RGB \[H, W, 3\]"):
        ours(PROMPT, init_image=still.float(), steps=2, **SIZE)


# --- the CLI ------------------------------------------------------------------------------------------------------

QUICK = ["--num-inference-steps", "2", "--num-frames", "3", "--height", "32", "--width", "32", "--seed", "1"]


def write_png(path, image: torch.Tensor):
    from PIL import Image

    Image.fromarray(image.numpy()).save(path)
    return path


def test_cli_init_image_and_loop(folder, ours, still, tmp_path):
    source = write_png(tmp_path / "still.png", still)
    out = tmp_path / "frames"  # a folder of PNGs: lossless, so the first frame can be compared
    args = ["generate", "a cat", "-o", f"{out}/", "--model", str(folder), "--init-image", str(source), "--loop"]
    assert main([*args, *QUICK]) == 0
    frames = torch.from_numpy(video.read(out).frames)
    assert frames.shape == (3, 32, 32, 3)
    assert_within_one(frames[0], round_trip(ours, still))
    assert_within_one(frames[-1], frames[0])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--init-image", "{tmp}/missing.png"], "no such init image"),
        (["--init-image", "{tmp}/junk.png"], "cannot read init image"),
        (["--init-image", "{tmp}/still.png", "--init-video", "{tmp}/still.png"], "not both"),
        (["--loop", "--num-frames", "1"], "at least 2 frames"),
        (["--freeinit", "-1"], "freeinit: must be an integer from 0 to 10"),
    ],
)
def test_cli_bad_input_one_line_no_file(folder, still, tmp_path, capsys, extra, message):
    write_png(tmp_path / "still.png", still)
    (tmp_path / "junk.png").write_text("not an image")
    out = tmp_path / "out.mp4"
    extra = [e.format(tmp=tmp_path) for e in extra]
    assert main(["generate", "a cat", "-o", str(out), "--model", str(folder), *QUICK, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("error: ")
    assert not out.exists()
