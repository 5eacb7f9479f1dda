"""Samplers: pure functions over one interface, in the manner of k-diffusion's ``sampling.py``.

Every sampler has the signature

    sample_x(denoiser, x, sigmas, *, eta=..., generator=None, callback=None) -> x

where ``denoiser(x, sigma) -> x0`` (see :mod:`cinematic.diffusion.denoisers`), ``x`` is the VE latent at
``sigmas[0]`` with any shape (here [B, C, F, H, W]), and ``sigmas`` is a descending float64 grid of ``steps + 1``
levels. The result is the VE latent at ``sigmas[-1]``. ``callback(i, steps)`` runs after step ``i``. Noise for the
stochastic steps is drawn from ``generator``'s device (the CPU for a CPU generator) in ``x``'s dtype, then moved to
``x``'s device, one draw of ``x``'s shape per step, as diffusers draws it.

:func:`sample` is the entry point the pipeline calls: it builds the grid and the denoiser for a named sampler from
:data:`SAMPLERS`, scales the initial noise as diffusers does, and returns the VP latent the VAE decodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from cinematic.diffusion import schedule
from cinematic.diffusion.denoisers import ConsistencyDenoiser, DiscreteDenoiser, GuidedEps
from cinematic.errors import CinematicError

StepCallback = Callable[[int, int], None]


class Sampler(Protocol):
    def __call__(
        self,
        denoiser: Callable[[Tensor, Tensor], Tensor],
        x: Tensor,
        sigmas: Tensor,
        *,
        eta: float = ...,
        generator: torch.Generator | None = None,
        callback: StepCallback | None = None,
    ) -> Tensor: ...


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def _require_deterministic(name: str, eta: float) -> None:
    if eta != 0.0:
        raise CinematicError(f"sampler {name!r} is deterministic; eta applies only to 'ddim' and 'euler_ancestral'")


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Split a step from ``sigma`` to ``sigma_next`` into a deterministic part down to ``sigma_down`` and fresh noise
    of std ``sigma_up``, with ``sigma_down**2 + sigma_up**2 = sigma_next**2``.

    ``sigma_up = eta * sigma_next * sqrt(1 - sigma_next**2 / sigma**2)`` is DDIM's sigma_t (Song et al. 2021, eq. 16)
    rescaled to VE; eta = 1 is the ancestral (DDPM posterior) step. Capped at ``sigma_next`` for eta > 1.
    """
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def sample_euler_ancestral(
    denoiser: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Euler steps on the probability-flow ODE ``dx/dsigma = eps`` down to ``sigma_down``, plus noise ``sigma_up``.

    With eta = 0 this is plain Euler, and plain Euler on the VE ODE is DDIM (Karras et al. 2022, sec. 4; Song et
    al. 2021, eq. 12): ``x_next = x0 + sigma_next * eps``. With eta > 0 it is DDIM(eta), whose noise term is the same
    ``sigma_up`` (see :func:`ancestral_sigmas`). Noise is drawn at every step whenever eta > 0.
    """
    steps = len(sigmas) - 1
    for i in range(steps):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0 = denoiser(x, sigmas[i])
        eps = (x - x0) / sigma
        sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
        x = x0 + sigma_down * eps
        if eta > 0:
            x = x + sigma_up * _randn_like(x, generator)
        if callback is not None:
            callback(i, steps)
    return x


def sample_ddim(
    denoiser: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) with stochasticity ``eta``. In VE form it is :func:`sample_euler_ancestral`;
    what makes it "DDIM" in :data:`SAMPLERS` is its grid, the leading integer timesteps ending at alpha_bar[0]."""
    return sample_euler_ancestral(denoiser, x, sigmas, eta=eta, generator=generator, callback=callback)


def sample_euler(
    denoiser: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn)."""
    _require_deterministic("euler", eta)
    return sample_euler_ancestral(denoiser, x, sigmas, eta=0.0, callback=callback)


def sample_dpmpp_2m(
    denoiser: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), midpoint form, in ``lambda = -log sigma``.

    Each step integrates the linear part exactly and x0 as a line through the last two predictions:
    ``x_next = (sigma_next / sigma) x - expm1(-h) D`` with ``h = lambda_next - lambda`` and
    ``D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev``, ``r = h_prev / h``. The first step has no history and is first order
    (``D = x0``, which is DDIM); a step to sigma = 0 returns x0, as diffusers' ``lower_order_final`` with
    ``final_sigmas_type="zero"`` does.
    """
    _require_deterministic("dpmpp_2m", eta)
    steps = len(sigmas) - 1
    x0_prev, h_prev = None, None
    for i in range(steps):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0 = denoiser(x, sigmas[i])
        if sigma_next == 0.0:
            x = x0
        else:
            h = math.log(sigma) - math.log(sigma_next)
            d = x0
            if x0_prev is not None:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (sigma_next / sigma) * x - math.expm1(-h) * d
            h_prev = h
        x0_prev = x0
        if callback is not None:
            callback(i, steps)
    return x


def sample_lcm(
    denoiser: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; Luo et al. 2023, Algorithm 1): the denoiser
    (a :class:`~cinematic.diffusion.denoisers.ConsistencyDenoiser`) maps ``x`` straight to a clean estimate, which
    is noised afresh to the next level, ``x_next = x0 + sigma_next * z`` with new noise ``z`` from ``generator``:
    the VE form of T2V-Turbo's ``sqrt(alpha_bar_prev) x0 + sqrt(1 - alpha_bar_prev) z``. The last step goes to
    sigma = 0 and returns its estimate without drawing noise. ``eta`` does not apply (the noise is the method's)."""
    if eta != 0.0:
        raise CinematicError("sampler 'lcm' draws its own noise; eta applies only to 'ddim' and 'euler_ancestral'")
    steps = len(sigmas) - 1
    for i in range(steps):
        x = denoiser(x, sigmas[i])
        sigma_next = sigmas[i + 1].item()
        if sigma_next > 0:
            x = x + sigma_next * _randn_like(x, generator)
        if callback is not None:
            callback(i, steps)
    return x


# --- the named presets the pipeline picks from --------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler with the grid and the sigma -> t map of the diffusers scheduler it reproduces.

    ``noise_is_vp``: True when the initial noise is the VP latent itself (diffusers' ``init_noise_sigma = 1``, DDIM
    and DPM-Solver), False when it is scaled by ``sigmas[0]`` into the VE latent (Euler's ``init_noise_sigma =
    sigma_max``). ``interpolation``/``quantize`` configure :class:`DiscreteDenoiser`'s timestep map.
    ``consistency``: the network is a consistency model, read through
    :class:`~cinematic.diffusion.denoisers.ConsistencyDenoiser`'s boundary scalings.
    """

    fn: Sampler
    sigmas: Callable[[Tensor, int, str, int], Tensor]
    noise_is_vp: bool
    interpolation: str = "log"
    quantize: bool = True
    default_eta: float = 0.0
    consistency: bool = False


SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec(sample_ddim, schedule.ddim_sigmas, noise_is_vp=True),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, schedule.dpm_solver_sigmas, noise_is_vp=True),
    "dpmpp_2m_karras": SamplerSpec(sample_dpmpp_2m, schedule.karras_dpm_sigmas, noise_is_vp=True),
    # diffusers' Euler grids are linear in sigma between integer timesteps, so the network's t inverts that map
    # exactly (fractional, not rounded).
    "euler": SamplerSpec(sample_euler, schedule.euler_sigmas, False, interpolation="linear", quantize=False),
    "euler_ancestral": SamplerSpec(
        sample_euler_ancestral, schedule.euler_sigmas, False, interpolation="linear", quantize=False, default_eta=1.0
    ),
    # Consistency-distilled models (T2V-Turbo, MCM): a few steps on the 50-step DDIM grid they were distilled on.
    "lcm": SamplerSpec(sample_lcm, schedule.lcm_sigmas, noise_is_vp=True, consistency=True),
}


def get_sampler(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise CinematicError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sample(
    name: str,
    eps_model: GuidedEps,
    noise: Tensor,
    steps: int,
    *,
    eta: float | None = None,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    alpha_bar: Tensor | None = None,
    init: Tensor | None = None,
    start: int = 0,
    wrap: Callable[[Callable[[Tensor, Tensor], Tensor]], Callable[[Tensor, Tensor], Tensor]] | None = None,
    prediction: str = "epsilon",
    spacing: str = "default",
    steps_offset: int = 1,
    timestep_scaling: float = 10.0,
) -> Tensor:
    """Denoise ``noise`` with the named sampler in ``steps`` network evaluations; return the VP latent to decode.

    ``eps_model(x, t) -> eps`` is the guided network (see :func:`~cinematic.diffusion.denoisers.
    classifier_free_guidance`). ``noise`` is standard normal of the latent shape [B, C, F, H, W], drawn as diffusers
    draws it (``randn`` from a seeded CPU generator), so the same noise follows diffusers' trajectory. ``eta``
    defaults to the sampler's own (0 for DDIM, 1 for Euler ancestral) and must stay 0 for the deterministic ones.
    ``generator`` feeds the per-step noise of the stochastic samplers. ``alpha_bar`` defaults to the model's
    scaled-linear schedule.

    ``init`` (video-to-video, see :mod:`cinematic.generation.pictures`): a clean latent; sampling then skips the grid's
    first ``start`` steps and begins from ``init + sigma * noise``, diffusers' ``add_noise`` in VE form. ``wrap``
    wraps the denoiser (pinned frames). ``prediction`` is the model's ``prediction_type``: ``eps_model`` returns ε
    (``"epsilon"``) or v (``"v_prediction"``). ``spacing`` and ``steps_offset`` are the model's
    ``timestep_spacing`` and ``steps_offset`` (:mod:`cinematic.diffusion.schedule`); ``lcm`` takes its own grid
    whatever the spacing. ``timestep_scaling``: the consistency boundary scalings' (``lcm`` only; 10 for T2V-Turbo,
    4 for MCM).
    """
    spec = get_sampler(name)
    top = schedule.LCM_ORIGIN_STEPS if spec.consistency else schedule.NUM_TRAIN_TIMESTEPS
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= top:
        raise CinematicError(f"steps must be an integer from 1 to {top} for sampler {name!r}, not {steps!r}")
    alpha_bar = schedule.alpha_bar_scaled_linear() if alpha_bar is None else alpha_bar.to("cpu", torch.float64)
    sigmas = spec.sigmas(alpha_bar, steps, spacing, steps_offset)[start:]
    denoiser = DiscreteDenoiser(eps_model, alpha_bar, spec.interpolation, spec.quantize, prediction)
    if spec.consistency:
        denoiser = ConsistencyDenoiser(denoiser, timestep_scaling)
    denoiser = denoiser if wrap is None else wrap(denoiser)
    sigma_max, sigma_min = sigmas[0].item(), sigmas[-1].item()
    if init is not None:
        x = init + sigma_max * noise
    else:
        # diffusers' Euler schedulers start from the VP latent too under "leading" spacing (their init_noise_sigma).
        vp = spec.noise_is_vp or spacing == "leading"
        x = noise * (math.sqrt(1 + sigma_max**2) if vp else sigma_max)
    eta = spec.default_eta if eta is None else float(eta)
    x = spec.fn(denoiser, x, sigmas, eta=eta, generator=generator, callback=callback)
    return x * (1 + sigma_min**2) ** -0.5
