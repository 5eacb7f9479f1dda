"""Samplers: analytic checks first (exactness, order of convergence), then whole trajectories against diffusers.

Reference: diffusers==0.42.1 (pinned in pyproject's ``test`` extra). Everything runs in float64 on tiny tensors.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
import sys

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

from cinematic.diffusion import SAMPLERS, DiscreteDenoiser, classifier_free_guidance, prediction_target, sample
from cinematic.diffusion import schedule as sch
from cinematic.diffusion.samplers import sample_dpmpp_2m, sample_euler
from cinematic.errors import CinematicError
from cinematic.models.components import ScheduleConfig
from tests.factories import SCHEDULER_CONFIG

# The published scheduler_config.json of text-to-video-ms-1.7b (a DDIMScheduler; see tests.factories). The DPM and
# Euler schedulers are built from the same dict; `from_config(pipe.scheduler.config)` gives them the same settings,
# because diffusers does not pass DDIM's default-filled `timestep_spacing="leading"` on, so each keeps its own
# default, "linspace".
PUBLISHED = SCHEDULER_CONFIG
SHAPE = (2, 4, 3, 4, 5)  # B C F H W
ALPHA_BAR = sch.alpha_bar_scaled_linear()


def fake_eps(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    """A fixed nonlinear eps(x, t) that keeps latents O(1): near the exact eps of N(0, 1) data at large t, plus a
    term that mixes along W and oscillates in t; ``cond`` [B] enters nonlinearly."""
    t = t.to(x.dtype).view(-1, 1, 1, 1, 1)
    eps = (1 - torch.exp(-t / 200)).sqrt() * x + 0.3 * torch.tanh(1.5 * x.roll(1, dims=-1) + torch.sin(t / 150))
    return eps if cond is None else eps + 0.5 * torch.tanh(x * cond.to(x.dtype).view(-1, 1, 1, 1, 1))


def fake_eps_unbound(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return fake_eps(x, t)


class Recorder:
    """Wraps an eps model and keeps every (x, t) it is called with: x is the VP latent of each step."""

    def __init__(self, model=None):
        self.model, self.calls = model or fake_eps, []

    def __call__(self, x, t, *cond):
        self.calls.append((x.clone(), t.clone()))
        return self.model(x, t, *cond)


def noise(seed: int = 0, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def diffusers_scheduler(cls, exact_alpha_bar: bool = True, **overrides):
    """The scheduler as diffusers builds it from the published config. With ``exact_alpha_bar`` its float32
    alphas_cumprod is replaced by our float64 table before set_timesteps, isolating the one known difference (betas
    in float32; `trained_betas` would not help, diffusers casts those to float32 too)."""
    s = cls.from_config({**PUBLISHED, **overrides})
    if exact_alpha_bar:
        s.alphas_cumprod = ALPHA_BAR.clone()
        if cls is DDIMScheduler:
            s.final_alpha_cumprod = ALPHA_BAR[0].clone()
    return s


def run_diffusers(s, x_T: torch.Tensor, steps: int, generator=None, **step_kwargs):
    """diffusers' own denoising loop; returns the final latent and the (x, t) the network saw at each step."""
    s.set_timesteps(steps)
    x, rec = x_T * s.init_noise_sigma, Recorder()
    for t in s.timesteps:
        x_in = s.scale_model_input(x, t)
        eps = rec(x_in, torch.full((x.shape[0],), float(t), dtype=torch.float32))
        kwargs = {"generator": generator} if generator is not None else {}
        x = s.step(eps, t, x, **kwargs, **step_kwargs).prev_sample
    return x, rec.calls


def run_ours(name: str, x_T: torch.Tensor, steps: int, **kwargs):
    # kwargs: eta, generator, prediction
    rec = Recorder()
    return sample(name, rec, x_T, steps, **kwargs), rec.calls


def assert_same_trajectory(ours, ref, rtol: float, atol: float) -> None:
    (x, calls), (x_ref, calls_ref) = ours, ref
    assert len(calls) == len(calls_ref)
    for (xi, ti), (xi_ref, ti_ref) in zip(calls, calls_ref):
        torch.testing.assert_close(ti, ti_ref, rtol=0, atol=0)
        torch.testing.assert_close(xi, xi_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(x, x_ref, rtol=rtol, atol=atol)


# --- schedule ----------------------------------------------------------------------------------------------------


def test_alpha_bar_matches_diffusers_float32_table():
    ref = DDIMScheduler.from_config(PUBLISHED).alphas_cumprod.double()
    assert ALPHA_BAR.dtype == torch.float64 and ALPHA_BAR.shape == (1000,)
    # diffusers accumulates 1000 float32 products: ~1e-6 relative drift at t = 999.
    torch.testing.assert_close(ALPHA_BAR, ref, rtol=2e-6, atol=0)


def test_ddim_timesteps_are_modelscope_leading_spacing():
    assert sch.ddim_timesteps(50).tolist() == list(range(981, 0, -20))
    assert sch.ddim_timesteps(30).tolist() == [1 + 33 * k for k in range(29, -1, -1)]  # S steps, not S + 1


@pytest.mark.parametrize("steps", [1, 2, 7, 25, 30, 50, 333, 999])
def test_grids_match_diffusers(steps):
    pairs = [
        (DDIMScheduler, {}, sch.ddim_timesteps(steps).double(), None),
        (DPMSolverMultistepScheduler, {}, sch.dpm_solver_timesteps(steps).double(), sch.dpm_solver_sigmas),
        (EulerDiscreteScheduler, {}, sch.euler_timesteps(steps), sch.euler_sigmas),
    ]
    karras = sch.karras_dpm_sigmas(ALPHA_BAR, steps)
    karras_t = sch.sigma_to_t(karras[:-1], ALPHA_BAR, quantize=True)
    pairs.append((DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, karras_t, sch.karras_dpm_sigmas))
    for cls, overrides, t, sigmas in pairs:
        s = diffusers_scheduler(cls, **overrides)
        s.set_timesteps(steps)
        assert torch.equal(s.timesteps.double(), t), (cls.__name__, overrides)
        if sigmas is not None:  # diffusers stores sigmas in float32
            torch.testing.assert_close(s.sigmas.double(), sigmas(ALPHA_BAR, steps), rtol=1e-7, atol=0)


def test_sigma_to_t_inverts_the_table():
    t = torch.tensor([0.0, 1.0, 17.0, 500.0, 998.0, 999.0], dtype=torch.float64)
    table = sch.sigma_from_alpha_bar(ALPHA_BAR)
    for interpolation in ("log", "linear"):
        torch.testing.assert_close(sch.sigma_to_t(table[t.long()], ALPHA_BAR, interpolation=interpolation), t)
    frac = torch.tensor([0.25, 41.625, 957.375, 998.5], dtype=torch.float64)
    torch.testing.assert_close(sch.sigma_to_t(sch.sigma_at(frac, ALPHA_BAR), ALPHA_BAR, interpolation="linear"), frac)
    # Out of range clamps to the ends, as diffusers' _sigma_to_t does.
    assert sch.sigma_to_t(torch.tensor(1e-6), ALPHA_BAR).item() == 0.0
    assert sch.sigma_to_t(torch.tensor(1e3), ALPHA_BAR).item() == 999.0


# --- analytic ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "dpmpp_2m_karras", "euler"])
def test_constant_x0_denoiser_is_followed_exactly(name):
    """With a denoiser that always predicts the same x0, the PF-ODE trajectory is x = x0 + sigma * n: every
    deterministic sampler must stay on it and land on x0 (DDIM on x0 + sigma(t=0) * n, its last level)."""
    x0, n = noise(1), noise(2)
    spec = SAMPLERS[name]
    sigmas = spec.sigmas(ALPHA_BAR, 20)
    seen = []

    def denoiser(x, sigma):
        seen.append((x.clone(), sigma.item()))
        return x0

    out = spec.fn(denoiser, x0 + sigmas[0].item() * n, sigmas)
    for x, sigma in seen:
        torch.testing.assert_close(x, x0 + sigma * n, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out, x0 + sigmas[-1].item() * n, rtol=1e-13, atol=1e-13)
    if sigmas[-1] == 0:
        assert torch.equal(out, x0)


def gaussian_toy():
    """Data ~ N(mu, s^2) per coordinate. Then x_sigma ~ N(mu, s^2 + sigma^2), the exact denoiser is
    D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), and the PF-ODE dx/dsigma = (x - D) / sigma has the solution
    x(sigma) = mu + (x(sigma_T) - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_T^2)."""
    mu = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    s = torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64)

    def denoiser(x, sigma):
        return mu + s**2 / (s**2 + sigma.item() ** 2) * (x - mu)

    def solution(x_T, sigma_T, sigma):
        return mu + (x_T - mu) * ((s**2 + sigma**2) / (s**2 + sigma_T**2)).sqrt()

    return denoiser, solution


@pytest.mark.parametrize(("fn", "order"), [(sample_dpmpp_2m, 2), (sample_euler, 1)])
def test_order_of_convergence_on_gaussian_data(fn, order):
    denoiser, solution = gaussian_toy()
    sigma_T, sigma_end = 20.0, 0.05
    x_T = sigma_T * torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = []
    for steps in (16, 32, 64):
        sigmas = torch.linspace(math.log(sigma_T), math.log(sigma_end), steps + 1, dtype=torch.float64).exp()
        errors.append((fn(denoiser, x_T, sigmas) - solution(x_T, sigma_T, sigma_end)).abs().max().item())
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    # Halving the step divides the error by 2**order: measured 3.80, 3.95 (2M) and 1.96, 1.98 (Euler).
    assert all(0.9 * 2**order < r < 1.1 * 2**order for r in ratios), (errors, ratios)


# --- whole trajectories against diffusers ----------------------------------------------------------------------


@functools.cache
def float64_diffusers(cls):
    """``cls`` rebuilt from diffusers' own source with its float32 casts promoted to float64: the sample cast in
    ``step()``, the stored sigmas and the betas. Timestep dtypes are untouched (Euler keeps float32 timesteps).

    Stock DPMSolverMultistep and Euler schedulers cast the latent to float32 inside every ``step()`` and keep sigmas
    in float32, so they cannot agree with a float64 sampler beyond ~1e-6. This is the same algorithm without that
    rounding, which lets whole trajectories be compared at 1e-10 and catches errors far below float32 noise.
    """
    module = sys.modules[cls.__module__]
    src, n_torch = re.subn(r"torch\.float32", "torch.float64", inspect.getsource(module))
    sigma_storage = r"(np\.concatenate\(\[sigmas, \[[^\]]*\]\]\))\.astype\(np\.float32\)"
    src, n_np = re.subn(sigma_storage, r"\1.astype(np.float64)", src)
    assert n_torch > 0 and (n_np > 0 or cls is DDIMScheduler), "diffusers source changed; re-check the promotion"
    namespace = {"__name__": f"{module.__name__}_float64", "__package__": module.__package__}
    exec(compile(src, module.__file__, "exec"), namespace)  # noqa: S102 - diffusers' own source, promoted
    return namespace[cls.__name__]


TRAJECTORIES = [
    # name, diffusers class, config overrides, steps, step kwargs
    ("ddim", DDIMScheduler, {}, 50, {}),
    ("ddim", DDIMScheduler, {}, 30, {}),  # 30 does not divide 1000
    ("ddim", DDIMScheduler, {}, 25, {"eta": 1.0}),
    ("dpmpp_2m", DPMSolverMultistepScheduler, {}, 25, {}),
    ("dpmpp_2m", DPMSolverMultistepScheduler, {}, 30, {}),
    ("dpmpp_2m_karras", DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, 25, {}),
    ("dpmpp_2m_karras", DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, 30, {}),
    ("euler", EulerDiscreteScheduler, {}, 25, {}),
    ("euler", EulerDiscreteScheduler, {}, 30, {}),
    ("euler_ancestral", EulerAncestralDiscreteScheduler, {}, 25, {}),
]


def compare(name, s, steps, step_kwargs):
    """Run diffusers' loop and ours from the same noise; stochastic ones from equally seeded CPU generators, which
    line up because both draw one randn of the latent's shape and dtype per step, in the same order. The network
    output means what the diffusers scheduler's ``prediction_type`` says."""
    x_T = noise()
    stochastic = name == "euler_ancestral" or step_kwargs.get("eta", 0) > 0
    gen = (lambda: torch.Generator().manual_seed(7)) if stochastic else (lambda: None)
    ref = run_diffusers(s, x_T, steps, generator=gen(), **step_kwargs)
    prediction = s.config.prediction_type
    ours = run_ours(name, x_T, steps, generator=gen(), eta=step_kwargs.get("eta"), prediction=prediction)
    return ours, ref


@pytest.mark.parametrize(("name", "cls", "overrides", "steps", "step_kwargs"), TRAJECTORIES)
def test_trajectory_matches_diffusers_float64(name, cls, overrides, steps, step_kwargs):
    s = diffusers_scheduler(float64_diffusers(cls), **overrides)
    # Measured: <= 5e-15 absolute (<= 1e-12 relative) on latents of size ~3, network timesteps identical.
    assert_same_trajectory(*compare(name, s, steps, step_kwargs), rtol=1e-10, atol=1e-10)


V_TRAJECTORIES = [
    ("ddim", DDIMScheduler, {"prediction_type": "v_prediction"}, 50, {}),
    ("ddim", DDIMScheduler, {"prediction_type": "v_prediction"}, 25, {"eta": 1.0}),
    ("dpmpp_2m", DPMSolverMultistepScheduler, {"prediction_type": "v_prediction"}, 25, {}),
    ("euler", EulerDiscreteScheduler, {"prediction_type": "v_prediction"}, 25, {}),
    ("euler_ancestral", EulerAncestralDiscreteScheduler, {"prediction_type": "v_prediction"}, 25, {}),
]


@pytest.mark.parametrize(("name", "cls", "overrides", "steps", "step_kwargs"), V_TRAJECTORIES)
def test_v_prediction_trajectory_matches_diffusers_float64(name, cls, overrides, steps, step_kwargs):
    """The same network read as v instead of ε (the bundled shapes model): every sampler follows diffusers' own
    ``prediction_type="v_prediction"`` branch."""
    s = diffusers_scheduler(float64_diffusers(cls), **overrides)
    assert_same_trajectory(*compare(name, s, steps, step_kwargs), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_denoiser_inverts_the_training_target(prediction):
    """A network that outputs exactly the training target of (x0, eps) at t makes the denoiser return x0: the
    training loss and the samplers read the network the same way."""
    x0, eps = noise(3), noise(4)
    for t in (0, 1, 500, 981, 999):
        signal, sigma_noise = ALPHA_BAR[t].sqrt(), (1 - ALPHA_BAR[t]).sqrt()
        target = prediction_target(prediction, x0, eps, signal, sigma_noise)
        sigma = sigma_noise / signal
        denoiser = DiscreteDenoiser(lambda x, tt, out=target: out, ALPHA_BAR, prediction=prediction)
        x_ve = x0 + sigma * eps  # the VE latent of x_t = signal * x0 + noise * eps
        torch.testing.assert_close(denoiser(x_ve, sigma), x0, rtol=1e-9, atol=1e-9)


ZERO_SNR = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def test_zero_terminal_snr_table_matches_diffusers():
    ours = ScheduleConfig(prediction_type="v_prediction", zero_terminal_snr=True).alpha_bar()
    ref = DDIMScheduler.from_config({**PUBLISHED, **ZERO_SNR}).alphas_cumprod.double()
    # diffusers rescales in float32: measured 3.9e-7 absolute. Its last entry is exactly 0; ours is 2**-24, as
    # diffusers' own Euler scheduler sets it, so that every sampler's sigma stays finite.
    torch.testing.assert_close(ours[:-1], ref[:-1], rtol=0, atol=1e-6)
    assert ref[-1] == 0 and ours[-1] == sch.ZERO_SNR_ALPHA_BAR and ours[0] == ALPHA_BAR[0]
    assert torch.all(ours[1:] < ours[:-1])


@pytest.mark.parametrize("steps", [1, 7, 25, 30, 50, 333])
def test_trailing_grids_match_diffusers(steps):
    t = sch.trailing_timesteps(steps)
    assert t[0] == 999 and len(t) == steps
    for cls, grid in [(DDIMScheduler, None), (DPMSolverMultistepScheduler, sch.dpm_solver_sigmas),
                      (EulerDiscreteScheduler, sch.euler_sigmas)]:  # fmt: skip
        s = diffusers_scheduler(cls, timestep_spacing="trailing")
        s.set_timesteps(steps)
        assert torch.equal(s.timesteps.double(), t.double()), cls.__name__
        if grid is not None:
            torch.testing.assert_close(s.sigmas.double(), grid(ALPHA_BAR, steps, "trailing"), rtol=1e-7, atol=0)


@pytest.mark.parametrize(("name", "cls", "steps"), [("ddim", DDIMScheduler, 50), ("ddim", DDIMScheduler, 20),
                                                    ("dpmpp_2m", DPMSolverMultistepScheduler, 25),
                                                    ("euler", EulerDiscreteScheduler, 25)])  # fmt: skip
def test_zero_terminal_snr_trajectory_matches_diffusers_float64(name, cls, steps):
    """A v-prediction model on the rescaled schedule, sampled from t = 999 (the bundled shapes model). diffusers is
    given our table, whose last entry is 2**-24 rather than 0 (see the table test), so that the comparison
    checks the trailing grid and the first step at sigma = 4096 alone. (DDIM at step counts that do not divide
    1000 is left out: diffusers then steps from t to ``t - 1000 // steps``, off its own trailing grid.)"""
    table = ScheduleConfig(prediction_type="v_prediction", zero_terminal_snr=True).alpha_bar()
    s = float64_diffusers(cls).from_config({**PUBLISHED, **ZERO_SNR})
    s.alphas_cumprod = table.clone()
    if cls is DDIMScheduler:
        s.final_alpha_cumprod = table[0].clone()
    else:  # the schedulers that keep sigmas: recompute them from the given table
        s.sigmas = sch.sigma_from_alpha_bar(table)
    x_T = noise()
    ref = run_diffusers(s, x_T, steps)
    rec = Recorder()
    ours = sample(name, rec, x_T, steps, alpha_bar=table, prediction="v_prediction", spacing="trailing"), rec.calls
    assert_same_trajectory(ours, ref, rtol=1e-9, atol=1e-9)


def test_schedule_config_checks_its_options():
    with pytest.raises(CinematicError, match="zero terminal SNR schedule needs prediction_type 'v_prediction'"):
        ScheduleConfig(zero_terminal_snr=True)
    with pytest.raises(
        CinematicError,
        match="timestep spacing 'karras' is not supported; allowed: 'default', 'leading', 'linspace', 'trailing'",
    ):
        ScheduleConfig(timestep_spacing="karras")


@pytest.mark.parametrize(("name", "cls", "overrides", "steps", "step_kwargs"), TRAJECTORIES)
def test_trajectory_matches_stock_diffusers(name, cls, overrides, steps, step_kwargs):
    s = diffusers_scheduler(cls, **overrides)
    # Stock DDIM is float64 throughout once given the float64 alpha_bar. The others round the latent to float32 in
    # every step() and their sigmas to float32 (see float64_diffusers): measured <= 1.6e-6 absolute.
    tol = 1e-10 if cls is DDIMScheduler else 1e-5
    assert_same_trajectory(*compare(name, s, steps, step_kwargs), rtol=tol, atol=tol)


@pytest.mark.parametrize(("name", "cls", "overrides", "steps", "step_kwargs"), TRAJECTORIES)
def test_trajectory_matches_published_config(name, cls, overrides, steps, step_kwargs):
    """Stock schedulers from the published config alone, as diffusers users run them: betas in float32, so alpha_bar
    differs from ours by up to 1e-6 relative. Measured <= 5.3e-6 absolute; the network's timesteps are identical,
    Karras ones included."""
    s = diffusers_scheduler(cls, exact_alpha_bar=False, **overrides)
    assert_same_trajectory(*compare(name, s, steps, step_kwargs), rtol=1e-5, atol=2e-5)


# --- classifier-free guidance ------------------------------------------------------------------------------------


class CountingModel:
    """fake_eps whose conditioning is a per-row scalar [B]; records the batch size and conds of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond):
        self.calls.append((x.shape[0], cond.clone()))
        return fake_eps(x, t, cond)


COND, UNCOND = torch.tensor([0.7, -1.3]), torch.tensor([0.0, 0.0])


def test_cfg_batched_equals_sequential_and_the_formula():
    x, t = noise(), torch.full((2,), 501.0)
    batched, sequential = CountingModel(), CountingModel()
    eps_b = classifier_free_guidance(batched, COND, UNCOND, 9.0, batched=True)(x, t)
    eps_s = classifier_free_guidance(sequential, COND, UNCOND, 9.0, batched=False)(x, t)
    torch.testing.assert_close(eps_b, eps_s, rtol=1e-12, atol=1e-12)
    eps_u, eps_c = fake_eps(x, t, UNCOND), fake_eps(x, t, COND)
    torch.testing.assert_close(eps_s, eps_u + 9.0 * (eps_c - eps_u), rtol=0, atol=0)
    assert [n for n, _ in batched.calls] == [4] and torch.equal(batched.calls[0][1], torch.cat([UNCOND, COND]))
    assert [n for n, _ in sequential.calls] == [2, 2]


def test_cfg_scale_one_is_the_conditional_branch_alone():
    x, t, model = noise(), torch.full((2,), 981.0), CountingModel()
    for batched in (True, False):
        eps = classifier_free_guidance(model, COND, UNCOND, 1.0, batched=batched)(x, t)
        assert torch.equal(eps, fake_eps(x, t, COND))
    assert all(n == 2 and torch.equal(c, COND) for n, c in model.calls) and len(model.calls) == 2


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m_karras"])
def test_cfg_modes_give_the_same_video_latent(name):
    outs = [
        sample(name, classifier_free_guidance(fake_eps, COND, UNCOND, 9.0, batched=b), noise(), 10)
        for b in (True, False)
    ]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)


# --- the entry point -----------------------------------------------------------------------------------------------


def test_registry_names():
    assert sorted(SAMPLERS) == ["ddim", "dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_ancestral", "lcm"]


def test_unknown_sampler_lists_the_choices():
    with pytest.raises(CinematicError, match="unknown sampler 'plms'.*ddim, dpmpp_2m, dpmpp_2m_karras, euler"):
        sample("plms", fake_eps_unbound, noise(), 10)


@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, True])
def test_bad_step_count(steps):
    with pytest.raises(CinematicError, match="steps"):
        sample("ddim", fake_eps_unbound, noise(), steps)


@pytest.mark.parametrize("name", ["dpmpp_2m", "euler"])
def test_eta_is_refused_by_deterministic_samplers(name):
    with pytest.raises(CinematicError, match="deterministic"):
        sample(name, fake_eps_unbound, noise(), 5, eta=0.5)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_entry_point_keeps_shape_dtype_and_reports_progress(name):
    """float32 latents stay float32 (schedule math is float64, applied as Python floats); the network always sees
    [B, C, F, H, W], never frames folded into the batch; one call per step, each reported."""
    rec, progress = Recorder(), []
    x_T = noise().float()
    out = sample(
        name, rec, x_T, 3, generator=torch.Generator().manual_seed(0), callback=lambda i, n: progress.append((i, n))
    )
    assert out.shape == SHAPE and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert all(x.shape == SHAPE and x.dtype == torch.float32 and t.shape == (2,) for x, t in rec.calls)
    assert progress == [(0, 3), (1, 3), (2, 3)] and len(rec.calls) == 3
    assert sample(name, rec, x_T, 1, generator=torch.Generator()).shape == SHAPE  # a single step works


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m_karras", "euler"])
def test_a_batch_of_two_equals_two_batches_of_one(name):
    x_T, out = noise(), {}
    for rows in ([0, 1], [0], [1]):
        out[tuple(rows)] = sample(name, fake_eps_unbound, x_T[rows], 8)
    torch.testing.assert_close(out[(0, 1)], torch.cat([out[(0,)], out[(1,)]]), rtol=1e-12, atol=1e-12)
