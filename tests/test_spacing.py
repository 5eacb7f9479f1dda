"""A diffusers folder whose scheduler config names a ``timestep_spacing`` is sampled with it, as diffusers samples
that folder; the published configs name none and keep each sampler's own spacing (issue 22)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from cinematic.diffusion import schedule as sch
from cinematic.pipeline import Pipeline
from tests.factories import make_diffusers_folder

PROMPT = "a red cat riding a horse on the beach"
SIZE = dict(num_frames=3, height=32, width=32)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return make_diffusers_folder(tmp_path_factory.mktemp("spacing") / "model")


def with_scheduler(folder, tmp_path, **overrides):
    copy = shutil.copytree(folder, tmp_path / "model")
    config_file = copy / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **overrides}))
    return copy


def diffusers_run(folder, scheduler_class, seed: int, steps: int, output_type: str):
    from diffusers import TextToVideoSDPipeline

    pipe = TextToVideoSDPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(PROMPT, generator=generator, num_inference_steps=steps, output_type=output_type, **SIZE).frames


# DDIM under "linspace" or "trailing" is left out: diffusers' DDIMScheduler then still steps each latent to
# ``t - num_train // steps`` rather than to the next timestep of its own grid, so that every later step evaluates the
# network at a timestep the latent is not at. cinematic steps between the named timesteps (plain DDIM on that grid).
CASES = [("ddim", "leading")] + [(s, p) for s in ("dpmpp_2m", "euler") for p in ("leading",
         "linspace", "trailing")]  # fmt: skip


@pytest.mark.parametrize(("sampler", "spacing"), CASES)
def test_a_named_spacing_is_sampled_as_diffusers_samples_it(published, tmp_path, spacing, sampler):
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    scheduler = {
        "ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler,
        "euler_ancestral": EulerAncestralDiscreteScheduler,
    }  # fmt: skip
    folder = with_scheduler(published, tmp_path, timestep_spacing=spacing)
    ours = Pipeline.from_pretrained(folder)
    assert ours.model.config.schedule.timestep_spacing == spacing
    steps, seed = 12, 5
    request = ours.validate(PROMPT, num_inference_steps=steps, seed=seed, sampler=sampler, **SIZE)
    latents = ours.sample(request, progress=False)
    expected = diffusers_run(folder, scheduler[sampler], seed, steps, "latent")
    # diffusers keeps the latents in [B, C, F, h, w] as we do. 1e-4: float32 rounding through 12 guided steps.
    torch.testing.assert_close(latents, expected.float(), rtol=1e-4, atol=1e-4)
    frames = ours.decode(latents)[0].numpy().astype(np.int16)
    reference = np.round(np.asarray(diffusers_run(folder, scheduler[sampler], seed, steps, "np"))[0] * 255)
    assert np.abs(frames - reference).max() <= 1


def test_the_published_config_keeps_each_samplers_own_spacing(published):
    schedule = Pipeline.from_pretrained(published).model.config.schedule
    assert schedule.timestep_spacing == "default" and schedule.steps_offset == 1
    alpha_bar = schedule.alpha_bar()
    # Each sampler's own: DDIM leading from t = 981, DPM-Solver and Euler linspace from t = 999.
    assert sch.ddim_sigmas(alpha_bar, 50, "default", 1)[0] == sch.sigma_from_alpha_bar(alpha_bar)[981]
    assert sch.dpm_solver_timesteps(25)[:2].tolist() == [999, 959]
    assert sch.euler_timesteps(25)[0] == 999.0
    # A named spacing moves them.
    assert sch.dpm_solver_timesteps(25, offset=1, spacing="leading")[:2].tolist() == [25 * 38 + 1, 24 * 38 + 1]


def test_an_unknown_spacing_is_one_clear_error(published, tmp_path):
    from cinematic.cli import main

    folder = with_scheduler(published, tmp_path, timestep_spacing="karras-ish")
    assert main(["info", str(folder)]) == 2
