"""The few-step consistency sampler (``lcm``, issue 24): T2V-Turbo's scheduler rebuilt from its equations, the
analytic checks, one UNet pass per step in the pipeline, and the sampler and ``timestep_scaling`` everywhere a
sampler is chosen (settings, model defaults, the CLI, ``cinematic eval``, the server and its page).

The reference is ``Ji4chenLi/t2v-turbo`` at commit eaae323f10d136796a33e8f5304ed50e40def570:
``scheduler/t2v_turbo_scheduler.py`` lines 345-353 (``set_timesteps``: the 50-step origin grid read backwards),
359-365 (``get_scalings_for_boundary_condition_discrete``: ``t / 0.1``, sigma_data 0.5) and 413-462 (``step``: x0
from epsilon or v, the boundary-scaled ``denoised``, fresh noise to the next timestep, the last step noised to its
own timestep), and ``pipeline/t2v_turbo_ms_pipeline.py`` lines 191-207 (one UNet call per step, the result is the
last ``denoised``). MCM (``yhZhai/mcm`` ``demo.py``) runs the same equations with ``timestep_scaling=4``.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from cinematic.cli import main
from cinematic.diffusion import SAMPLERS, ConsistencyDenoiser, DiscreteDenoiser, sample
from cinematic.diffusion import schedule as sch
from cinematic.diffusion.denoisers import boundary_scalings
from cinematic.diffusion.samplers import sample_lcm
from cinematic.errors import CinematicError
from cinematic.generation.pictures import Pictures, encode_image, fit_frames
from cinematic.models.components import Defaults, ScheduleConfig
from cinematic.pipeline import Pipeline
from cinematic.settings import SAMPLER_NAMES, ModelFacts, SettingError, settings_from

ALPHA_BAR = sch.alpha_bar_scaled_linear()
SHAPE = (2, 4, 3, 4, 5)  # B C F H W
PROMPT = "a red circle moving left"
SMALL = dict(num_frames=2, seed=3, progress=False)  # the bundled model at 2 frames: a UNet pass is cheap


def fake_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear network output (read as eps or v) that keeps latents O(1) and depends on t."""
    t = t.to(x.dtype).view(-1, 1, 1, 1, 1)
    return (1 - torch.exp(-t / 200)).sqrt() * x + 0.3 * torch.tanh(1.5 * x.roll(1, dims=-1) + torch.sin(t / 150))


class Recorder:
    """The network, keeping every (x, t) it is given: x is the VP latent of each step."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t):
        self.calls.append((x.clone(), t.clone()))
        return fake_eps(x, t)


def noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- T2V-Turbo's scheduler and loop, rebuilt from the published equations -----------------------------------------


def reference_timesteps(steps: int, origin_steps: int = 50, num_train: int = 1000) -> list[int]:
    """``set_timesteps``: numpy's backwards slice of the origin grid, as the reference writes it."""
    origin = np.asarray(range(1, origin_steps + 1)) * (num_train // origin_steps) - 1
    return origin[:: -(len(origin) // steps)][:steps].tolist()


def reference_run(x_T, steps, timestep_scaling=10.0, prediction="epsilon", seed=11):
    """The reference pipeline's loop over the reference scheduler's ``step``, in float64 on our alpha_bar table (the
    reference accumulates float32 betas; that known difference is isolated here as test_samplers.py isolates it
    for diffusers). Noise comes from a CPU generator seeded ``seed``, one draw of the latent's shape per step, the
    last one drawn and unused as the reference does. Returns the result and the (x, t) of every network call."""
    rec, latents, generator = Recorder(), x_T.clone(), torch.Generator().manual_seed(seed)
    timesteps = reference_timesteps(steps)
    sigma_data = 0.5
    for i, t in enumerate(timesteps):
        out = rec(latents, torch.full((x_T.shape[0],), float(t), dtype=torch.float32))
        prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else t
        a_t, a_prev = ALPHA_BAR[t].item(), ALPHA_BAR[prev_t].item()
        if prediction == "epsilon":
            x0 = (latents - math.sqrt(1 - a_t) * out) / math.sqrt(a_t)
        else:
            x0 = math.sqrt(a_t) * latents - math.sqrt(1 - a_t) * out
        scaled = t * timestep_scaling  # the reference's t / 0.1
        c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
        c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
        denoised = c_out * x0 + c_skip * latents
        if len(timesteps) > 1:
            z = torch.randn(denoised.shape, generator=generator, dtype=denoised.dtype)
            latents = math.sqrt(a_prev) * denoised + math.sqrt(1 - a_prev) * z
        else:
            latents = denoised
    return denoised, rec.calls


def test_lcm_timesteps_are_t2v_turbos():
    assert sch.lcm_timesteps(4).tolist() == [999, 759, 519, 279]  # few-step.md
    assert sch.lcm_timesteps(8).tolist() == [999, 879, 759, 639, 519, 399, 279, 159]
    for steps in range(1, 51):  # every count the sampler takes, dividing 50 or not
        assert sch.lcm_timesteps(steps).tolist() == reference_timesteps(steps), steps
    assert sch.lcm_timesteps(3).tolist() == [999, 679, 359]  # the stride of a non-divisor: 50 // 3 = 16
    sigmas = sch.lcm_sigmas(ALPHA_BAR, 4)
    assert sigmas[-1] == 0 and torch.equal(sigmas[:-1], sch.sigma_from_alpha_bar(ALPHA_BAR)[[999, 759, 519, 279]])
    for steps in (0, 51):
        with pytest.raises(ValueError, match="lcm grid has 50 timesteps"):
            sch.lcm_timesteps(steps)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(("steps", "scaling"), [(1, 10.0), (2, 10.0), (4, 10.0), (8, 10.0), (4, 4.0), (3, 10.0)])
def test_trajectory_matches_t2v_turbo(steps, scaling, prediction):
    """Every network input (the intermediate latents), every network timestep and the result, from the same noise."""
    x_T = noise()
    ref, ref_calls = reference_run(x_T, steps, scaling, prediction)
    rec = Recorder()
    ours = sample("lcm", rec, x_T, steps, generator=torch.Generator().manual_seed(11), prediction=prediction,
                  timestep_scaling=scaling)  # fmt: skip
    assert len(rec.calls) == len(ref_calls) == steps
    for (x, t), (x_ref, t_ref) in zip(rec.calls, ref_calls):
        assert torch.equal(t, t_ref)
        # Measured: <= 4e-15 absolute on latents of size ~3.
        torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert (ours - ref).abs().max() < 1e-12  # the float64 agreement itself, far inside the acceptance's 1e-6


# --- analytic ------------------------------------------------------------------------------------------------------


def test_a_constant_x0_denoiser_is_landed_on_exactly():
    """A denoiser that always returns x0: each step re-noises x0 to the next level with the generator's next draw,
    and the result is x0 itself, not a noisy version of it."""
    x0, sigmas = noise(1), sch.lcm_sigmas(ALPHA_BAR, 4)
    seen = []

    def denoiser(x, sigma):
        seen.append((x.clone(), sigma.item()))
        return x0

    out = sample_lcm(denoiser, x0 + sigmas[0].item() * noise(2), sigmas, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, x0)
    draws = torch.Generator().manual_seed(5)
    for x, sigma in seen[1:]:
        z = torch.randn(SHAPE, generator=draws, dtype=torch.float64)
        torch.testing.assert_close(x, x0 + sigma * z, rtol=0, atol=1e-14)
    assert [s for _, s in seen] == sigmas[:-1].tolist()


def test_boundary_scalings():
    """c_skip(0) = 1 and c_out(0) = 0: the consistency model is the identity at t = 0. With sigma_data = 0.5 the
    two satisfy c_out^2 + c_skip = 1 at every t."""
    assert boundary_scalings(0.0, 10.0) == (1.0, 0.0)
    for t, scaling in ((279, 10.0), (999, 4.0), (19, 4.0), (1, 10.0)):
        c_skip, c_out = boundary_scalings(float(t), scaling)
        s = t * scaling
        assert math.isclose(c_skip, 0.25 / (s * s + 0.25), rel_tol=1e-15)
        assert math.isclose(c_out, s / math.sqrt(s * s + 0.25), rel_tol=1e-15)
        assert math.isclose(c_out**2 + c_skip, 1.0, rel_tol=1e-15)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_an_exact_network_gives_the_boundary_scaled_x0(prediction):
    """A network that outputs the exact training target of a fixed x0 makes x0_hat = x0 at every step; the sampler's
    result is then ``c_out x0 + c_skip x_VP`` at the last timestep, which for 4 steps (t = 279, scaling 10: c_skip
    = 3.2e-8) is x0 within 1e-6."""
    x0 = noise(3)
    a = ALPHA_BAR

    def network(x_vp, t):
        i = int(t[0].item())
        signal, sigma_noise = a[i].sqrt().item(), (1 - a[i]).sqrt().item()
        eps = (x_vp - signal * x0) / sigma_noise
        return eps if prediction == "epsilon" else signal * eps - sigma_noise * x0

    calls = []
    denoiser = ConsistencyDenoiser(DiscreteDenoiser(network, a, prediction=prediction), 10.0)

    def recording(x, sigma):
        calls.append(x.clone() / math.sqrt(1 + sigma.item() ** 2))  # the VP latent
        return denoiser(x, sigma)

    out = sample_lcm(recording, noise(4) * math.sqrt(1 + sch.lcm_sigmas(a, 4)[0].item() ** 2), sch.lcm_sigmas(a, 4),
                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    c_skip, c_out = boundary_scalings(279.0, 10.0)
    torch.testing.assert_close(out, c_out * x0 + c_skip * calls[-1], rtol=0, atol=1e-12)
    assert (out - x0).abs().max() < 1e-6


def test_the_sampler_refuses_what_it_cannot_do():
    with pytest.raises(CinematicError, match="steps must be an integer from 1 to 50 for sampler 'lcm', not 51"):
        sample("lcm", fake_eps, noise(), 51)
    with pytest.raises(CinematicError, match="sampler 'lcm' draws its own noise; eta applies only to"):
        sample("lcm", fake_eps, noise(), 4, eta=0.5)
    assert tuple(SAMPLERS) == SAMPLER_NAMES  # the settings table names the registry's samplers, in its order


def test_zero_terminal_snr_v_model_starts_at_pure_noise():
    """The bundled model's schedule (v-prediction, zero terminal SNR): lcm starts at t = 999 whatever the spacing,
    where the VP latent the network sees is the initial noise itself."""
    table = ScheduleConfig(prediction_type="v_prediction", zero_terminal_snr=True).alpha_bar()
    rec, x_T = Recorder(), noise()
    out = sample("lcm", rec, x_T, 4, alpha_bar=table, prediction="v_prediction", spacing="trailing",
                 generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert [c[1][0].item() for c in rec.calls] == [999, 759, 519, 279]
    torch.testing.assert_close(rec.calls[0][0], x_T, rtol=0, atol=1e-12)
    assert torch.isfinite(out).all()


# --- settings: the sampler, timestep_scaling, the model's defaults ---------------------------------------------------

FACTS = ModelFacts(16, 32, 32, 8, 1000, 2, "ddim", 50, 9.0, 10.0)
FEW_STEP = dataclasses.replace(FACTS, sampler="lcm", num_inference_steps=4, guidance_scale=1.0, timestep_scaling=4.0)


def resolve(facts: ModelFacts = FACTS, **given):
    return settings_from({"prompt": PROMPT, **given}).resolve(facts)


def test_model_defaults_pick_the_sampler_and_named_values_win():
    s = resolve()
    assert (s.sampler, s.num_inference_steps, s.guidance_scale, s.timestep_scaling) == ("ddim", 50, 9.0, 10.0)
    s = resolve(FEW_STEP)  # an MCM-style model: lcm, 4 steps, guidance 1, scaling 4, without a flag
    assert (s.sampler, s.num_inference_steps, s.guidance_scale, s.timestep_scaling) == ("lcm", 4, 1.0, 4.0)
    s = resolve(FEW_STEP, num_inference_steps=2, timestep_scaling=10)
    assert (s.sampler, s.num_inference_steps, s.timestep_scaling) == ("lcm", 2, 10.0)
    s = resolve(FEW_STEP, sampler="ddim", num_inference_steps=25)
    assert (s.sampler, s.num_inference_steps) == ("ddim", 25)
    assert settings_from(s.values()).resolve(FEW_STEP) == s  # resolved settings resolve to themselves (stored jobs)


def test_lcm_on_a_model_without_a_guidance_embedding_is_unguided():
    s = resolve(sampler="lcm", num_inference_steps=4)  # the model's default guidance, 9, does not apply
    assert s.guidance_scale == 1.0 and not s.unconditional_pass(FACTS)
    assert resolve(sampler="lcm", guidance_scale=1).guidance_scale == 1.0
    with pytest.raises(SettingError, match="guidance_scale: must be 1 with the lcm sampler on a model without a "
                                           "guidance embedding .*, not 9") as error:  # fmt: skip
        resolve(sampler="lcm", guidance_scale=9)
    assert error.value.field == "guidance_scale"
    embedded = dataclasses.replace(FACTS, guidance_embedding=True)
    s = resolve(embedded, sampler="lcm", guidance_scale=7.5)  # the guidance embedding takes any scale
    assert s.guidance_scale == 7.5 and not s.unconditional_pass(embedded)
    assert not resolve(embedded).unconditional_pass(embedded)  # DDIM on such a model: one pass too


@pytest.mark.parametrize(
    ("given", "field", "message"),
    [
        ({"num_inference_steps": 51}, "num_inference_steps", "from 1 to 50 with the lcm sampler"),
        ({"eta": 0.5}, "eta", "does not apply to the lcm sampler"),
        ({"cache_interval": 3}, "cache_interval", "must be 1 with the lcm sampler"),
        ({"negative_prompt": "blurry"}, "negative_prompt", "needs the unconditional UNet pass, and there is none"),
        ({"guidance_stop": 0.5}, "guidance_stop", "drops the unconditional UNet pass, and there is none"),
    ],
)
def test_what_one_pass_per_step_rules_out_is_refused_naming_the_setting(given, field, message):
    with pytest.raises(SettingError, match=message) as error:
        resolve(sampler="lcm", **given)
    assert error.value.field == field and "\n" not in str(error.value)


def test_a_guidance_embedding_rules_out_the_unconditional_pass_with_any_sampler():
    embedded = dataclasses.replace(FACTS, guidance_embedding=True)
    with pytest.raises(SettingError, match="negative_prompt: .*this model takes the guidance scale as an input"):
        resolve(embedded, negative_prompt="blurry")
    assert resolve(embedded, cache_interval=3).cache_interval == 3  # caching is DDIM's to use here


@pytest.mark.parametrize("value", [0, -1, 1001, float("nan"), "ten"])
def test_timestep_scaling_is_checked(value):
    with pytest.raises(SettingError, match="timestep_scaling: must be a number from 0.01 to 1000"):
        settings_from({"prompt": PROMPT, "timestep_scaling": value})


def test_model_defaults_are_checked_by_the_settings_bounds():
    assert Defaults(sampler="lcm", num_inference_steps=4, guidance_scale=7.5, timestep_scaling=10.0).sampler == "lcm"
    for bad, message in [
        ({"sampler": "plms"}, "defaults.sampler must be one of ddim, .*lcm, got 'plms'"),
        ({"num_inference_steps": 0}, "defaults.num_inference_steps must be 1 or more"),
        ({"guidance_scale": -1.0}, "defaults.guidance_scale must be at least 0"),
        ({"timestep_scaling": 0.0}, "defaults.timestep_scaling must be at least 0.01"),
    ]:
        with pytest.raises(CinematicError, match=message):
            Defaults(**bad)


# --- the pipeline: one UNet pass per step ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.from_pretrained("shapes")


class UNetCalls:
    """Counts the UNet's calls and the batch of each, and the prompts the text encoder is asked for."""

    def __init__(self, pipe: Pipeline):
        self.pipe, self.batches, self.prompts = pipe, [], []

    def __enter__(self):
        unet = self.pipe.model.unet
        self.handle = unet.register_forward_pre_hook(lambda _, args: self.batches.append(args[0].shape[0]))
        encode = self.pipe.encode_prompts
        self.pipe.encode_prompts = lambda prompts: self.prompts.extend(prompts) or encode(prompts)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        del self.pipe.encode_prompts


def test_lcm_runs_one_conditional_unet_pass_per_step(pipe):
    with UNetCalls(pipe) as calls:
        video = pipe(PROMPT, sampler="lcm", num_inference_steps=4, num_videos=2, **SMALL)
    assert calls.batches == [2] * 4  # two videos, one batch, no unconditional rows
    assert calls.prompts == [PROMPT, PROMPT]  # the empty (unconditional) prompt is never encoded
    assert [v.metadata["sampler"] for v in video] == ["lcm", "lcm"]
    assert video[0].metadata["guidance_scale"] == 1.0 and video[0].metadata["timestep_scaling"] == 10.0
    with UNetCalls(pipe) as ddim:
        pipe(PROMPT, num_inference_steps=1, **SMALL)
    assert ddim.batches == [2] and ddim.prompts == [PROMPT, ""]  # DDIM with guidance 9: both branches


def test_lcm_equals_the_sampler_run_on_the_pipelines_own_eps(pipe):
    """The pipeline's lcm latents are the sampler's on the same network, noise and generator: nothing else (no
    guidance, no other schedule) comes between."""
    request = pipe.validate(PROMPT, sampler="lcm", num_inference_steps=3, timestep_scaling=4, num_frames=2, seed=9)
    latents = pipe.sample(request, progress=False)
    noise, generator = pipe.initial_noise(request)
    cond = pipe.encode_prompts([PROMPT])
    config = pipe.model.config.schedule

    def eps(x, t):
        return pipe.model.unet(x, t, cond)

    with torch.inference_mode():
        expected = sample("lcm", eps, noise, 3, generator=generator, alpha_bar=pipe.alpha_bar, timestep_scaling=4.0,
                          prediction=config.prediction_type, spacing=config.timestep_spacing)  # fmt: skip
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-6)


def test_lcm_with_video_to_video_freeinit_windows_and_a_pinned_frame(pipe):
    """What combines with one pass per step: a restyled clip runs the steps its strength leaves (4 x 0.5 = 2),
    FreeInit samples again (2 x 2 calls), a long clip with a prompt schedule runs its windows (2 per step), FreeU and
    a loop run, a first frame stays pinned."""
    clip = torch.randint(0, 255, (2, 32, 32, 3), dtype=torch.uint8)
    with UNetCalls(pipe) as calls:
        latents = pipe.sample(
            pipe.validate(
                PROMPT, sampler="lcm", num_inference_steps=4, strength=0.5, num_frames=2, pictures=Pictures(video=clip)
            ),
            progress=False,
            pictures=Pictures(video=clip),
        )
    assert calls.batches == [1, 1] and torch.isfinite(latents).all()
    with UNetCalls(pipe) as calls:
        pipe.sample(
            pipe.validate(PROMPT, sampler="lcm", num_inference_steps=2, freeinit=1, num_frames=2), progress=False
        )
    assert calls.batches == [1] * 4
    schedule = "0: a red circle moving right | 3: a red circle moving left"
    request = pipe.validate("", prompt_schedule=schedule, sampler="lcm", num_inference_steps=1, num_frames=6,
                            window=4, seed=1, freeu=True, loop=True)  # fmt: skip
    with UNetCalls(pipe) as calls:
        latents = pipe.sample(request, progress=False)
    assert calls.batches == [1, 1] and torch.equal(latents[:, :, -1], latents[:, :, 0])
    still = torch.randint(0, 255, (32, 32, 3), dtype=torch.uint8)
    request = pipe.validate(PROMPT, sampler="lcm", num_inference_steps=2, num_frames=2, seed=2)
    latents = pipe.sample(request, progress=False, pictures=Pictures(image=still))
    known = encode_image(pipe.model.vae, fit_frames(still[None], 1, 32, 32), pipe.dtype)
    torch.testing.assert_close(latents[:, :, 0], known, rtol=0, atol=0)
    assert torch.isfinite(latents).all()


class _WithEmbedding:
    """A config that reads as ``config`` and has a guidance embedding (``time_cond_proj_dim``)."""

    time_cond_proj_dim = 256

    def __init__(self, config):
        self._config = config

    def __getattr__(self, name):
        return getattr(self._config, name)


class _ModelConfigWithEmbedding(_WithEmbedding):
    time_cond_proj_dim = None

    @property
    def unet(self):
        return _WithEmbedding(self._config.unet)


class GuidedUNet(torch.nn.Module):
    """Stands in for a UNet with a guidance embedding (``UNet3D.forward(x, t, context, guidance)``, the other half
    of issue 24): the bundled UNet, its output moved by the guidance scale it is given, which it records."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet, self.config, self.given = unet, _WithEmbedding(unet.config), []

    def forward(self, x, t, context, guidance=None):
        self.given.append(guidance)
        return self.unet(x, t, context) + 0.01 * guidance.view(-1, 1, 1, 1, 1)


@pytest.mark.parametrize("sampler", ["lcm", "ddim"])
def test_a_unet_with_a_guidance_embedding_gets_the_scale_and_one_pass_per_step(sampler):
    pipe = Pipeline.from_pretrained("shapes")
    pipe.model.unet = GuidedUNet(pipe.model.unet)
    pipe.model.config = _ModelConfigWithEmbedding(pipe.model.config)
    assert pipe.facts.guidance_embedding
    with UNetCalls(pipe) as calls:
        video = pipe(PROMPT, sampler=sampler, num_inference_steps=2, guidance_scale=7.5, num_videos=2, **SMALL)
    assert calls.batches == [2, 2] and calls.prompts == [PROMPT, PROMPT]
    assert len(pipe.model.unet.given) == 2
    for w in pipe.model.unet.given:
        assert w.dtype == torch.float32 and w.tolist() == [7.5, 7.5]
    assert video[0].metadata["guidance_scale"] == 7.5
    with pytest.raises(SettingError, match="negative_prompt: needs the unconditional UNet pass"):
        pipe(PROMPT, sampler=sampler, negative_prompt="blurry", **SMALL)


def test_the_memory_plan_counts_one_pass_per_step(pipe):
    from cinematic.generation.memory import Footprint, Memory

    footprint, batched = Footprint.of(pipe), Memory(batched_guidance=True)
    lcm = pipe.validate(PROMPT, sampler="lcm", num_inference_steps=4)
    ddim = pipe.validate(PROMPT, guidance_scale=9)
    unguided = pipe.validate(PROMPT, guidance_scale=1)
    steps = [footprint.need(r.settings, 1, batched).steps for r in (lcm, ddim, unguided)]
    assert steps[0] == steps[2] < steps[1]


# --- the command line, cinematic eval, the server and its page --------------------------------------------------


def test_generate_with_lcm_and_its_errors(tmp_path, capsys):
    from cinematic import video

    out = tmp_path / "lcm.mp4"
    args = ["generate", PROMPT, "--sampler", "lcm", "--num-inference-steps", "2", "--num-frames", "2"]
    assert main([*args, "--timestep-scaling", "4", "--seed", "1", "-o", str(out)]) == 0
    metadata = video.read(out).metadata
    assert (metadata["sampler"], metadata["num_inference_steps"], metadata["timestep_scaling"]) == ("lcm", 2, 4.0)
    assert metadata["guidance_scale"] == 1.0
    capsys.readouterr()
    for extra, message in [
        (
            ["--guidance-scale", "9"],
            "error: guidance_scale: must be 1 with the lcm sampler on a model without a "
            "guidance embedding (one conditional UNet pass per step), not 9",
        ),
        (["--negative-prompt", "blurry"], "error: negative_prompt: needs the unconditional UNet pass"),
        (["--timestep-scaling", "0"], "error: timestep_scaling: must be a number from 0.01 to 1000, not 0.0"),
        (["--num-inference-steps", "60"], "error: num_inference_steps: must be an integer from 1 to 50 with the lcm"),
    ]:
        bad = tmp_path / "bad.mp4"
        assert main([*args, *extra, "--seed", "1", "-o", str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(message), err
        assert not bad.exists()


def test_eval_takes_the_sampler_and_the_scaling(tmp_path, capsys):
    report = tmp_path / "eval.json"
    caption = ["--captions", PROMPT, "--seeds", "1", "--device", "cpu"]
    assert main(["eval", *caption, "--sampler", "lcm", "--num-inference-steps", "1", "--timestep-scaling", "4",
                 "--json", str(report)]) == 0  # fmt: skip
    settings = json.loads(report.read_text())["settings"]
    assert (settings["sampler"], settings["num_inference_steps"], settings["timestep_scaling"]) == ("lcm", 1, 4.0)
    assert settings["guidance_scale"] == 1.0
    capsys.readouterr()
    assert main(["eval", *caption, "--timestep-scaling", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "timestep_scaling: must be a number from 0.01 to 1000" in err[0], err


def test_the_server_offers_lcm_and_checks_it(tmp_path):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from tests.serve_helpers import running, submit, wait_status

    with running(tmp_path / "data") as client:
        health = client.get("/healthz").json()
        assert "lcm" in health["samplers"] and health["defaults"]["timestep_scaling"] == 10.0
        assert health["bounds"]["timestep_scaling"] == [0.01, 1000]
        job = submit(client, prompt=PROMPT, sampler="lcm", num_inference_steps=2, num_frames=2, timestep_scaling=4.0)
        assert (job["sampler"], job["guidance_scale"], job["timestep_scaling"]) == ("lcm", 1.0, 4.0)
        assert wait_status(client, job["id"], ("completed", "failed"), timeout=120)["status"] == "completed"
        for body, field in [
            ({"sampler": "lcm", "guidance_scale": 9}, "guidance_scale"),
            ({"sampler": "lcm", "negative_prompt": "blurry"}, "negative_prompt"),
            ({"sampler": "lcm", "num_inference_steps": 51}, "num_inference_steps"),
            ({"timestep_scaling": 0.0}, "timestep_scaling"),
        ]:
            response = client.post("/v1/videos", json={"prompt": PROMPT, **body})
            assert response.status_code == 422 and response.json()["error"]["param"] == field, response.text
        page = client.get("/").text
        assert 'name="timestep_scaling"' in page and 'name="sampler"' in page
        script = client.get("/static/app.js").text
        assert '"timestep_scaling"' in script and "form.timestep_scaling.placeholder" in script


def test_a_t2v_turbo_lora_alone_gives_a_four_step_video_with_the_scale_in_its_guidance_embedding(tmp_path):
    """The two halves of issue 24 together, with the real UNet: a T2V-Turbo ``unet_lora.pt`` loaded onto a model of
    the published architecture (tiny) adds the guidance embedding and brings its sampler defaults, so a call (and
    ``generate --lora``) that names nothing samples with lcm in 4 single passes, each given the scale 7.5; unloading
    restores DDIM 50."""
    from cinematic import video as video_files
    from cinematic.models.presets import PRESETS
    from cinematic.train.setup import fresh_model
    from cinematic.weights.native import write_native
    from tests.test_fewstep_unet import turbo_list_for

    model = fresh_model(PRESETS["tiny"], ["a red circle"], None, seed=0)
    tokenizer = model.tokenizer.save(tmp_path / "tokenizer")
    states = {name: (lambda n=name: getattr(model, n).state_dict()) for name in ("unet", "text_encoder", "vae")}
    folder = write_native(tmp_path / "model", model.config, states, tokenizer, torch.float32)
    lora = tmp_path / "unet_lora.pt"
    torch.save(turbo_list_for(model.unet), lora)
    pipe = Pipeline.from_pretrained(folder)
    name = pipe.load_lora(lora)
    given = []
    handle = pipe.model.unet.register_forward_pre_hook(
        lambda _, args, kwargs: given.append((args[0].shape[0], kwargs.get("guidance", args[3:4] or None))),
        with_kwargs=True,
    )
    video = pipe(PROMPT, **SMALL)
    handle.remove()
    assert [batch for batch, _ in given] == [1, 1, 1, 1]  # 4 steps, the conditional pass only
    assert all(torch.as_tensor(w).flatten().tolist() == [7.5] for _, w in given)
    m = video[0].metadata
    assert (m["sampler"], m["num_inference_steps"], m["guidance_scale"], m["timestep_scaling"]) == ("lcm", 4, 7.5, 10)
    pipe.unload_lora(name)
    assert pipe.model.config.unet.time_cond_proj_dim is None
    assert (pipe.model.config.defaults.sampler, pipe.model.config.defaults.num_inference_steps) == ("ddim", 50)
    out = tmp_path / "clip.mp4"
    args = ["generate", PROMPT, "--model", str(folder), "--num-frames", "2", "--seed", "1", "--lora", str(lora)]
    assert main([*args, "-o", str(out)]) in (0, None)
    stored = video_files.read(out).metadata
    assert (stored["sampler"], stored["num_inference_steps"]) == ("lcm", 4)
