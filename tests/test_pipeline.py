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
SHAPE = dict(num_frames=3, height=32, width=32)
SMALL = dict(**SHAPE, progress=False)


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


def diffusers_run(pipe, prompt, seed, scheduler=None, **kwargs) -> tuple[torch.Tensor, np.ndarray]:
    """diffusers' final latents [B,C,F,h,w] (``output_type="latent"``: the scaled latents, before decoding) and the
    frames [B,F,H,W,3] its ``output_type="np"`` makes of them, rounded to uint8 as ours are. One run gives both: the
    frames come from the very calls diffusers makes after its loop (``decode_latents``, ``postprocess_video``)."""
    from diffusers import DDIMScheduler

    pipe.scheduler = (scheduler or DDIMScheduler).from_config(pipe.scheduler.config)
    count = len(prompt) if isinstance(prompt, list) else 1
    generator = [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]
    latents = pipe(prompt, generator=generator if count > 1 else generator[0], output_type="latent", **kwargs).frames
    with torch.no_grad():
        frames = pipe.video_processor.postprocess_video(video=pipe.decode_latents(latents), output_type="np")
    return latents, np.round(np.asarray(frames) * 255).astype(np.int16)


def assert_frames_close(ours: list[Video] | Video, expected: np.ndarray) -> None:
    videos = ours if isinstance(ours, list) else [ours]
    assert len(videos) == len(expected)
    for video, ref in zip(videos, expected):
        assert video.frames.dtype == torch.uint8 and tuple(video.frames.shape) == ref.shape
        diff = np.abs(video.frames.numpy().astype(np.int16) - ref)
        assert diff.max() <= 1, f"max difference {diff.max()}/255"


# The frames alone are a weak check: the tiny VAE maps latents scaled by 0.95 or 1.05 to frames within +-1 of the
# right ones, and DDIM in place of DPM-Solver++ moves them only 4-6 levels. The latents themselves reach |x| ~ 60
# here and agree with diffusers' to at most 8.5e-5 (about 1e-6 of the peak, 1e-6 in norm) over every comparison in
# this file and test_v2v.py: float32 rounding of ~1e-6 per UNet call, amplified by guidance 9 over the steps, as in
# the batch test below. rtol = atol = 1e-4 leaves each element at most 0.56 of its allowance (so about 2x headroom
# for another CPU's kernels) and still refuses a latent 0.1% off; test_latent_check_catches_what_frames_miss shows it
# failing for latents scaled by 0.95 / 1.05 and for the wrong sampler.
LATENT_RTOL, LATENT_ATOL = 1e-4, 1e-4


def assert_latents_close(ours: torch.Tensor, expected: torch.Tensor, atol: float = LATENT_ATOL) -> None:
    torch.testing.assert_close(ours, expected, rtol=LATENT_RTOL, atol=atol)


def our_latents(pipe: Pipeline, prompt, **settings) -> torch.Tensor:
    """Our final latents ``[N, C, F, h, w]``, before decoding, for the same settings as a call of ``pipe``."""
    return pipe.sample(pipe.validate(prompt, **settings), progress=False)


def test_ddim_50_matches_diffusers(ours, theirs):
    video = ours(PROMPT, steps=50, seed=7, **SMALL)
    latents, frames = diffusers_run(theirs, PROMPT, 7, num_frames=3, height=32, width=32, num_inference_steps=50)
    assert_latents_close(our_latents(ours, PROMPT, steps=50, seed=7, num_frames=3, height=32, width=32), latents)
    assert_frames_close(video, frames)
    assert video.metadata["seed"] == 7 and video.metadata["sampler"] == "ddim" and video.fps == 8


@pytest.fixture(scope="module")
def dpm_25(theirs) -> tuple[torch.Tensor, np.ndarray]:
    """diffusers' DPM-Solver++ (2M), 25 steps, seed 3: its latents and frames."""
    from diffusers import DPMSolverMultistepScheduler

    return diffusers_run(theirs, PROMPT, 3, DPMSolverMultistepScheduler, num_inference_steps=25, **SHAPE)


def test_dpm_solver_25_matches_diffusers(ours, dpm_25):
    latents, frames = dpm_25
    video = ours(PROMPT, steps=25, seed=3, sampler="dpmpp_2m", **SMALL)
    assert_latents_close(our_latents(ours, PROMPT, steps=25, seed=3, sampler="dpmpp_2m", **SHAPE), latents)
    assert_frames_close(video, frames)


def test_latent_check_catches_what_frames_miss(ours, dpm_25):
    """The latent comparison fails for latents 5% off and for the wrong sampler (both of which the frame check can
    let through, see LATENT_RTOL), so the passing latent checks above mean something."""
    latents, _ = dpm_25
    right = our_latents(ours, PROMPT, steps=25, seed=3, sampler="dpmpp_2m", **SHAPE)
    assert_latents_close(right, latents)
    for scale in (0.95, 1.05, 0.999):
        with pytest.raises(AssertionError, match="Tensor-likes are not close"):
            assert_latents_close(right * scale, latents)
    wrong_sampler = our_latents(ours, PROMPT, steps=25, seed=3, sampler="ddim", **SHAPE)
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        assert_latents_close(wrong_sampler, latents)


def test_negative_prompt_matches_diffusers(ours, theirs):
    video = ours(PROMPT, negative_prompt="blurry dog", steps=10, seed=11, **SMALL)
    latents, frames = diffusers_run(
        theirs, PROMPT, 11, negative_prompt="blurry dog", num_frames=3, height=32, width=32, num_inference_steps=10
    )
    settings = dict(negative_prompt="blurry dog", steps=10, seed=11, num_frames=3, height=32, width=32)
    assert_latents_close(our_latents(ours, PROMPT, **settings), latents)
    assert_frames_close(video, frames)
    assert video.metadata["negative_prompt"] == "blurry dog"


def test_non_square_size_matches_diffusers(ours, theirs):
    # 40x72: multiples of 8, not of 64 (ModelScope's own UNet cannot take these)
    kwargs = dict(num_frames=2, height=40, width=72)
    video = ours(PROMPT, steps=10, seed=5, progress=False, **kwargs)
    latents, frames = diffusers_run(theirs, PROMPT, 5, num_inference_steps=10, **kwargs)
    assert_latents_close(our_latents(ours, PROMPT, steps=10, seed=5, **kwargs), latents)
    assert_frames_close(video, frames)
    assert tuple(video.frames.shape) == (2, 40, 72, 3)


def test_num_videos_matches_diffusers_generator_list(ours, theirs):
    videos = ours(PROMPT, steps=10, seed=20, num_videos=2, **SMALL)
    latents, frames = diffusers_run(
        theirs, [PROMPT, PROMPT], 20, num_frames=3, height=32, width=32, num_inference_steps=10
    )
    assert_latents_close(our_latents(ours, PROMPT, steps=10, seed=20, num_videos=2, **SHAPE), latents)
    assert_frames_close(videos, frames)
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
ZERO_SNR_CONFIG = ScheduleConfig(prediction_type="v_prediction", zero_terminal_snr=True, timestep_spacing="trailing")


def with_schedule(folder, destination, overrides: dict):
    """A copy of the model in ``folder`` whose scheduler config has ``overrides``."""
    import json
    import shutil

    copy = shutil.copytree(folder, destination)
    config_file = copy / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, **overrides}))
    return copy


def diffusers_pipeline(folder):
    from diffusers import TextToVideoSDPipeline

    pipe = TextToVideoSDPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# The latent tolerance for each schedule. Betas up to 0.03 make latents of |x| ~ 570, ten times the others, where
# float32 rounding alone is ~1e-3: our own float32 and float64 runs differ by 1.1e-3, diffusers' and ours by 1.5e-3
# (at most 5.8e-4 beyond rtol). Zero terminal SNR: we start from alpha_bar = 2**-24, not diffusers' exact 0
# (schedule.ZERO_SNR_ALPHA_BAR), so our first x0 keeps a 2**-12 (2.4e-4) share of the noise that diffusers' does not;
# that moves the final latents by 1e-4 in norm, 3.8e-4 beyond rtol. test_zero_snr_differs_only_by_its_terminal_alpha_bar
# shows it is that and nothing else, at the default tolerance.
@pytest.mark.parametrize(("overrides", "expected", "latent_atol"), [
    ({"beta_end": 0.03}, ScheduleConfig(beta_end=0.03), 1e-3),
    (ZERO_SNR, ZERO_SNR_CONFIG, 1e-3),
], ids=["betas", "zero-snr-v-trailing"])  # fmt: skip
def test_the_models_own_noise_schedule_matches_diffusers(folder, tmp_path, overrides, expected, latent_atol):
    """A model trained with another schedule samples with it: other scaled-linear betas, or v-prediction on a zero
    terminal SNR schedule sampled from t = 999 (as the bundled shapes model is)."""
    copy = with_schedule(folder, tmp_path / "model", overrides)
    ours = Pipeline.from_pretrained(copy)
    assert ours.model.config.schedule == expected
    kwargs = dict(num_frames=3, height=32, width=32, num_inference_steps=10, guidance_scale=9.0)
    latents, frames = diffusers_run(diffusers_pipeline(copy), PROMPT, seed=4, **kwargs)
    got = ours(PROMPT, num_frames=3, height=32, width=32, num_inference_steps=10, seed=4, progress=False)
    assert_latents_close(our_latents(ours, PROMPT, num_inference_steps=10, seed=4, **SHAPE), latents, latent_atol)
    assert_frames_close(got, frames)
    default = Pipeline.from_pretrained(folder)(
        PROMPT, num_frames=3, height=32, width=32, steps=10, seed=4, progress=False
    )
    assert not torch.equal(default.frames, got.frames)  # the schedule made a difference


def test_zero_snr_differs_only_by_its_terminal_alpha_bar(folder, tmp_path, monkeypatch):
    """With the terminal alpha_bar at 2**-40 (its noise share in x0 then 1e-6, under float32 rounding), zero-SNR
    v-prediction sampling agrees with diffusers' at the default latent tolerance: the 1e-3 above covers the
    documented 2**-24 and nothing else."""
    from cinematic.diffusion import schedule

    copy = with_schedule(folder, tmp_path / "model", ZERO_SNR)
    monkeypatch.setattr(schedule, "ZERO_SNR_ALPHA_BAR", 2.0**-40)
    ours = Pipeline.from_pretrained(copy)
    assert ours.alpha_bar[-1] == 2.0**-40
    kwargs = dict(num_frames=3, height=32, width=32, num_inference_steps=10, guidance_scale=9.0)
    latents, _ = diffusers_run(diffusers_pipeline(copy), PROMPT, seed=4, **kwargs)
    assert_latents_close(our_latents(ours, PROMPT, num_inference_steps=10, seed=4, **SHAPE), latents)
