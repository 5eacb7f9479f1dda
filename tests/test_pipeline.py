"""The pipeline against diffusers' TextToVideoSDPipeline and ModelScope's own DDIM loop, plus invariances."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cinematic.errors import CinematicError
from cinematic.models.components import ScheduleConfig
from cinematic.pipeline import Pipeline, Video
from tests.factories import make_diffusers_folder

PROMPT = "a red cat riding a horse on the beach"
SMALL = dict(num_frames=3, height=32, width=32, progress=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_diffusers_folder(tmp_path_factory.mktemp("pipe") / "model")


@pytest.fixture(scope="module")
def ours(folder) -> Pipeline:
    return Pipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def theirs(folder):
    from diffusers import TextToVideoSDPipeline

    pipe = TextToVideoSDPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_frames(pipe, prompt, seed, scheduler=None, **kwargs) -> np.ndarray:
    """diffusers' ``output_type="np"`` frames [B,F,H,W,3] in [0,1], rounded to uint8 as our frames are."""
    from diffusers import DDIMScheduler

    pipe.scheduler = (scheduler or DDIMScheduler).from_config(pipe.scheduler.config)
    count = len(prompt) if isinstance(prompt, list) else 1
    generator = [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]
    out = pipe(prompt, generator=generator if count > 1 else generator[0], output_type="np", **kwargs).frames
    return np.round(np.asarray(out) * 255).astype(np.int16)


def assert_frames_close(ours: list[Video] | Video, expected: np.ndarray) -> None:
    videos = ours if isinstance(ours, list) else [ours]
    assert len(videos) == len(expected)
    for video, ref in zip(videos, expected):
        assert video.frames.dtype == torch.uint8 and tuple(video.frames.shape) == ref.shape
        diff = np.abs(video.frames.numpy().astype(np.int16) - ref)
        assert diff.max() <= 1, f"max difference {diff.max()}/255"


def test_ddim_50_matches_diffusers(ours, theirs):
    video = ours(PROMPT, steps=50, seed=7, **SMALL)
    expected = diffusers_frames(theirs, PROMPT, 7, num_frames=3, height=32, width=32, num_inference_steps=50)
    assert_frames_close(video, expected)
    assert video.metadata["seed"] == 7 and video.metadata["sampler"] == "ddim" and video.fps == 8


def test_dpm_solver_25_matches_diffusers(ours, theirs):
    from diffusers import DPMSolverMultistepScheduler

    video = ours(PROMPT, steps=25, seed=3, sampler="dpmpp_2m", **SMALL)
    expected = diffusers_frames(
        theirs, PROMPT, 3, DPMSolverMultistepScheduler, num_frames=3, height=32, width=32, num_inference_steps=25
    )
    assert_frames_close(video, expected)


def test_negative_prompt_matches_diffusers(ours, theirs):
    video = ours(PROMPT, negative_prompt="blurry dog", steps=10, seed=11, **SMALL)
    expected = diffusers_frames(
        theirs, PROMPT, 11, negative_prompt="blurry dog", num_frames=3, height=32, width=32, num_inference_steps=10
    )
    assert_frames_close(video, expected)
    assert video.metadata["negative_prompt"] == "blurry dog"


def test_non_square_size_matches_diffusers(ours, theirs):
    # 40x72: multiples of 8, not of 64 (ModelScope's own UNet cannot take these)
    kwargs = dict(num_frames=2, height=40, width=72)
    video = ours(PROMPT, steps=10, seed=5, progress=False, **kwargs)
    expected = diffusers_frames(theirs, PROMPT, 5, num_inference_steps=10, **kwargs)
    assert_frames_close(video, expected)
    assert tuple(video.frames.shape) == (2, 40, 72, 3)


def test_num_videos_matches_diffusers_generator_list(ours, theirs):
    videos = ours(PROMPT, steps=10, seed=20, num_videos=2, **SMALL)
    expected = diffusers_frames(theirs, [PROMPT, PROMPT], 20, num_frames=3, height=32, width=32, num_inference_steps=10)
    assert_frames_close(videos, expected)
    assert [v.metadata["seed"] for v in videos] == [20, 21]
    alone = ours(PROMPT, steps=10, seed=21, **SMALL)  # each video is reproducible alone from its own seed
    assert_frames_close(alone, videos[1].frames.numpy()[None].astype(np.int16))


def test_batch_of_two_prompts_equals_two_runs(ours):
    both = ours.sample(
        ours.validate(["a red cat", "a blue dog"], num_frames=3, height=32, width=32, steps=6, seed=4), progress=False
    )
    first = ours.sample(ours.validate("a red cat", num_frames=3, height=32, width=32, steps=6, seed=4), progress=False)
    second = ours.sample(
        ours.validate("a blue dog", num_frames=3, height=32, width=32, steps=6, seed=5), progress=False
    )
    # Batch size changes the CPU kernels' summation order (about 1e-6 per UNet call); guidance 9 multiplies that by
    # nine at each of the six steps, so the bound is float32 rounding grown through the loop, not a looser check.
    torch.testing.assert_close(both, torch.cat([first, second]), rtol=1e-4, atol=2e-4)


def test_guidance_one_equals_conditional_branch(ours, monkeypatch):
    request = ours.validate(PROMPT, num_frames=3, height=32, width=32, steps=6, seed=2, guidance_scale=1.0)
    calls = []
    original = ours.encode_prompts
    monkeypatch.setattr(ours, "encode_prompts", lambda prompts: calls.append(list(prompts)) or original(prompts))
    guided = ours.sample(request, progress=False)
    assert calls == [[PROMPT]]  # the unconditional branch is never encoded nor run
    from cinematic.diffusion import sample
    from cinematic.generation.denoiser import UNetCall

    noise, _ = ours.initial_noise(request)
    context = original([PROMPT])
    unet = UNetCall(ours.model.unet, ours.dtype, ours.device)
    plain = sample("ddim", lambda x, t: unet(x, t, context), noise, 6, alpha_bar=ours.alpha_bar)
    torch.testing.assert_close(guided, plain, rtol=0, atol=0)


def test_low_memory_equals_batched(ours):
    request = ours.validate(PROMPT, num_frames=3, height=32, width=32, steps=6, seed=9)
    batched = ours.sample(request, progress=False)
    sequential = ours.sample(request, progress=False, low_memory=True)
    torch.testing.assert_close(batched, sequential, rtol=1e-4, atol=2e-4)  # as in the batch test above
    one_at_a_time, together = ours.decode(batched, chunk=1)[0], ours.decode(batched, chunk=8)[0]
    assert (one_at_a_time.int() - together.int()).abs().max() <= 1


def test_progress_and_callback(ours, capsys):
    steps = []
    ours(
        PROMPT,
        steps=4,
        seed=1,
        num_frames=2,
        height=32,
        width=32,
        progress=True,
        callback=lambda i, n: steps.append((i, n)),
    )
    assert [n for _, n in steps] == [4] * 4
    err = capsys.readouterr().err
    assert "sampling" in err and "4/4" in err and "ETA" in err


def test_long_prompt_is_truncated_with_a_warning(ours):
    with pytest.warns(UserWarning, match="truncated"):
        ours(" ".join(["red cat"] * 60), steps=1, seed=0, **SMALL)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_frames=0), "num_frames: must be"),
        (dict(height=100), "height: must be a multiple of 8"),
        (dict(width=4096), "width: must be"),
        (dict(height=24), "height: must be a multiple of 8 from 32 to 2048 for this model"),
        (dict(num_inference_steps=0), "num_inference_steps: must be"),
        (dict(steps=0), "num_inference_steps: must be"),  # the deprecated name
        (dict(guidance_scale=float("nan")), "guidance_scale: must be"),
        (dict(guidance_scale=-1.0), "guidance_scale: must be"),
        (dict(sampler="plms"), "sampler: must be one of ddim, dpmpp_2m"),
        (dict(seed=-1), "seed: must be"),
        (dict(colour="red"), "colour: is not a setting"),
    ],
)
def test_bad_arguments(ours, kwargs, message):
    with pytest.raises(CinematicError, match=message):
        ours.validate(PROMPT, **kwargs)


def test_matches_modelscope_ddim_loop():
    """Our DDIM with batched guidance vs ModelScope's GaussianDiffusion.ddim_sample_loop on its own UNetSD."""
    from modelscope.models.multi_modal.video_synthesis.diffusion import GaussianDiffusion, beta_schedule

    from cinematic.diffusion import alpha_bar_scaled_linear, classifier_free_guidance, sample
    from cinematic.models.unet3d import UNet3D
    from cinematic.weights.modelscope_layout import parse_model_cfg
    from cinematic.weights.modelscope_unet import convert_modelscope_unet
    from tests.factories import MODELSCOPE_TINY_CFG, modelscope_unet

    reference = modelscope_unet()
    config = parse_model_cfg(MODELSCOPE_TINY_CFG, "test")
    unet = UNet3D(config).eval()
    unet.load_state_dict(convert_modelscope_unet(reference.state_dict(), config))
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 77, 1024, generator=g), torch.randn(1, 77, 1024, generator=g)
    noise = torch.randn(1, 4, 3, 8, 8, generator=g)
    diffusion = GaussianDiffusion(
        betas=beta_schedule("linear_sd", 1000, init_beta=0.00085, last_beta=0.012), var_type="fixed_small"
    )
    with torch.no_grad():
        expected = diffusion.ddim_sample_loop(
            noise.clone(), reference, model_kwargs=[{"y": cond}, {"y": uncond}], guide_scale=9.0, ddim_timesteps=20
        )
        guided = classifier_free_guidance(lambda x, t, c: unet(x, t, c), cond, uncond, 9.0)
        ours = sample("ddim", guided, noise, 20, alpha_bar=alpha_bar_scaled_linear())
    # The two UNets agree to ~3e-6 per call (ModelScope computes the timestep frequencies with pow, diffusers and we
    # with exp); guidance 9 amplifies that ninefold at each of 20 steps, so 3e-4 is float32 agreement here.
    torch.testing.assert_close(ours, expected.float(), rtol=1e-4, atol=3e-4)


def test_size_and_frames_default_to_what_the_model_was_trained_on():
    pipe = Pipeline.from_pretrained("shapes")
    d = pipe.model.config.defaults
    s = pipe.validate("a red circle moving left").settings
    assert (s.num_frames, s.height, s.width) == (d.frames, d.height, d.width) == (16, 32, 32)
    s = pipe.validate("a red circle moving left", num_frames=8, height=48).settings
    assert (s.num_frames, s.height, s.width) == (8, 48, 32)


ZERO_SNR = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"beta_end": 0.03}, ScheduleConfig(beta_end=0.03)),
    (ZERO_SNR, ScheduleConfig(prediction_type="v_prediction", zero_terminal_snr=True, timestep_spacing="trailing")),
], ids=["betas", "zero-snr-v-trailing"])  # fmt: skip
def test_the_models_own_noise_schedule_matches_diffusers(folder, tmp_path, overrides, expected):
    """A model trained with another schedule samples with it: other scaled-linear betas, or v-prediction on a zero
    terminal SNR schedule sampled from t = 999 (as the bundled shapes model is)."""
    import json
    import shutil

    from diffusers import TextToVideoSDPipeline

    copy = shutil.copytree(folder, tmp_path / "model")
    config_file = copy / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, **overrides}))
    ours = Pipeline.from_pretrained(copy)
    assert ours.model.config.schedule == expected
    theirs = TextToVideoSDPipeline.from_pretrained(copy)
    theirs.set_progress_bar_config(disable=True)
    kwargs = dict(num_frames=3, height=32, width=32, num_inference_steps=10, guidance_scale=9.0)
    expected = diffusers_frames(theirs, PROMPT, seed=4, **kwargs)
    got = ours(PROMPT, num_frames=3, height=32, width=32, num_inference_steps=10, seed=4, progress=False)
    assert_frames_close(got, expected)
    default = Pipeline.from_pretrained(folder)(
        PROMPT, num_frames=3, height=32, width=32, steps=10, seed=4, progress=False
    )
    assert not torch.equal(default.frames, got.frames)  # the schedule made a difference
