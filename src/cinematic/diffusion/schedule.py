"""Noise schedules: the discrete alpha_bar table, the samplers' sigma grids, and the sigma <-> t maps.

Everything here is a pure function computed in float64 on the CPU; callers cast to the latent's dtype only where a
coefficient is applied.

Notation (DDPM, Ho et al. 2020; EDM, Karras et al. 2022):
- ``alpha_bar[t]`` is the signal fraction of the variance-preserving (VP) process, ``x_t = sqrt(alpha_bar) x0 +
  sqrt(1 - alpha_bar) eps``, for the discrete training timesteps ``t = 0 .. 999``.
- ``sigma = sqrt((1 - alpha_bar) / alpha_bar)`` is the same noise level in the variance-exploding (VE) form
  ``x = x0 + sigma eps``, with ``x_VE = x_VP * sqrt(1 + sigma**2)``.

The sigma grids reproduce the timestep spacings of the diffusers schedulers that the published model is run with,
each documented where it is built, so that the same initial noise follows the same trajectory.
"""

from __future__ import annotations

import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000


def alpha_bar_scaled_linear(beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000) -> Tensor:
    """``alpha_bar[t] = prod_{s<=t} (1 - beta_s)`` with betas linear in sqrt space ("scaled_linear", ModelScope's
    ``linear_sd``). Float64, shape ``[steps]``."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


# alpha_bar at the last step of a zero terminal SNR schedule: not 0, so that sigma stays finite for the samplers,
# which work in the VE form (diffusers' Euler uses the same value; its signal, 2**-12, is below float32 resolution
# of anything added to unit noise).
ZERO_SNR_ALPHA_BAR = 2.0**-24


def rescale_zero_terminal_snr(alpha_bar: Tensor) -> Tensor:
    """Shift and scale ``sqrt(alpha_bar)`` so that it ends at 0 and still starts where it did (Lin et al. 2024,
    algorithm 1); the last value is then :data:`ZERO_SNR_ALPHA_BAR` rather than exactly 0. Float64."""
    root = alpha_bar.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    out = root**2
    out[-1] = ZERO_SNR_ALPHA_BAR
    return out


def sigma_from_alpha_bar(alpha_bar: Tensor) -> Tensor:
    """VE noise level of a VP signal fraction: ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``."""
    return ((1.0 - alpha_bar) / alpha_bar).sqrt()


def alpha_bar_from_sigma(sigma: Tensor) -> Tensor:
    """Inverse of :func:`sigma_from_alpha_bar`: ``alpha_bar = 1 / (1 + sigma**2)``."""
    return 1.0 / (1.0 + sigma**2)


def linspace64(start: float, stop: float, n: int) -> Tensor:
    """``numpy.linspace(start, stop, n)`` in float64, with numpy's own arithmetic (``start + k * step``, last point
    set to ``stop``) so that values rounded afterwards round exactly as diffusers' do. ``n == 1`` gives ``[start]``."""
    if n == 1:
        return torch.tensor([start], dtype=torch.float64)
    step = (stop - start) / (n - 1)
    out = torch.arange(n, dtype=torch.float64) * step + start
    out[-1] = stop
    return out


# --- timestep spacings (descending), as each diffusers scheduler builds them ------------------------------------
# A scheduler config's ``timestep_spacing`` picks one of three families; the published configs name none, and then
# each scheduler uses its own default ("default" here): DDIM "leading", DPM-Solver and Euler "linspace". The
# families differ between schedulers in detail (DPM-Solver spaces ``steps + 1`` points and drops the last), so each
# sampler has its own function. ``offset`` is the config's ``steps_offset``, used by "leading" spacing only.

SPACINGS = ("default", "leading", "linspace", "trailing")


def ddim_timesteps(
    steps: int, num_train: int = NUM_TRAIN_TIMESTEPS, offset: int = 1, spacing: str = "leading"
) -> Tensor:
    """DDIMScheduler's timesteps. "leading" (its default): ``k * (num_train // steps) + offset`` for ``k = steps-1 ..
    0``, 981, 961, ..., 21, 1 for 50 steps; always exactly ``steps`` values, also when ``steps`` does not divide
    ``num_train`` (ModelScope's own ``arange`` would then add a step); clamped to the table, which bites only at
    ``steps == num_train``, where ModelScope clamps as we do. "linspace": ``steps`` points from ``num_train - 1`` to
    0, rounded. "trailing": :func:`trailing_timesteps`. Int64."""
    if spacing == "trailing":
        return trailing_timesteps(steps, num_train)
    if spacing == "linspace":
        return linspace64(0.0, num_train - 1.0, steps).round().flip(0).to(torch.int64)
    stride = num_train // steps
    t = torch.arange(steps - 1, -1, -1, dtype=torch.int64) * stride + offset
    return t.clamp(max=num_train - 1)


def trailing_timesteps(steps: int, num_train: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """ "Trailing" spacing (Lin et al. 2024, table 2; diffusers' ``timestep_spacing="trailing"``): counted down from
    the last training step, ``round(num_train - k * num_train / steps) - 1`` for ``k = 0 .. steps-1``. For 50 steps:
    999, 979, ..., 19. The first step is the pure-noise one, which a zero terminal SNR model is trained on. Int64."""
    return (num_train - torch.arange(steps, dtype=torch.float64) * (num_train / steps)).round().to(torch.int64) - 1


def dpm_solver_timesteps(
    steps: int, num_train: int = NUM_TRAIN_TIMESTEPS, offset: int = 1, spacing: str = "linspace"
) -> Tensor:
    """DPMSolverMultistepScheduler's timesteps. "linspace" (its default): ``steps + 1`` points from 0 to
    ``num_train - 1``, rounded, largest first, the final 0 dropped (25 steps: 999, 959, ..., 40). "leading": ``k *
    (num_train // (steps + 1)) + offset`` for ``k = steps .. 1``. "trailing": :func:`trailing_timesteps`. Int64."""
    if spacing == "trailing":
        return trailing_timesteps(steps, num_train)
    if spacing == "leading":
        stride = num_train // (steps + 1)
        return torch.arange(steps, 0, -1, dtype=torch.int64) * stride + offset
    return linspace64(0.0, num_train - 1.0, steps + 1).round().flip(0)[:-1].to(torch.int64)


def euler_timesteps(
    steps: int, num_train: int = NUM_TRAIN_TIMESTEPS, offset: int = 1, spacing: str = "linspace"
) -> Tensor:
    """EulerDiscreteScheduler's timesteps. "linspace" (its default): ``steps`` points from ``num_train - 1`` down to
    0, not rounded (25 steps: 999, 957.375, ..., 0), kept at float32 precision: diffusers keeps these timesteps in
    float32 and interpolates its sigmas at the rounded values, so rounding alike keeps the grid within float32
    storage error of diffusers' (1.6e-7 relative otherwise) and gives the network exactly diffusers' t. "leading":
    ``k * (num_train // steps) + offset`` for ``k = steps-1 .. 0``. "trailing": :func:`trailing_timesteps`.
    Float64."""
    if spacing == "trailing":
        return trailing_timesteps(steps, num_train).to(torch.float64)
    if spacing == "leading":
        return ddim_timesteps(steps, num_train, offset).to(torch.float64)
    return linspace64(0.0, num_train - 1.0, steps).flip(0).to(torch.float32).to(torch.float64)


# The grid that latent consistency distillation trains on (Luo et al. 2023, sec. 4.3; T2V-Turbo and MCM): the
# 50-step DDIM grid t = 20 k - 1, k = 1 .. 50, of 1000 training steps. A consistency model is only taught these
# timesteps, so its sampler takes its steps from them.
LCM_ORIGIN_STEPS = 50


def lcm_timesteps(steps: int, num_train: int = NUM_TRAIN_TIMESTEPS, origin_steps: int = LCM_ORIGIN_STEPS) -> Tensor:
    """T2V-Turbo's few-step timesteps (``scheduler/t2v_turbo_scheduler.py``, ``set_timesteps``): the origin grid
    ``k * (num_train // origin_steps) - 1`` (k = 1 .. origin_steps), read from its end with a stride of
    ``origin_steps // steps``, the first ``steps`` of them. 4 steps: 999, 759, 519, 279; 8: 999, 879, ..., 159.

    A step count that does not divide ``origin_steps`` keeps the stride ``origin_steps // steps`` and stops after
    ``steps`` values, so the last timestep is not the grid's lowest (3 steps: 999, 679, 359; 7: 999, 859, ..., 159),
    as the reference does; from 26 to 50 steps the stride is 1 (the top ``steps`` of the grid). More than
    ``origin_steps`` steps has no grid to come from and is refused. Int64, descending."""
    if not 1 <= steps <= origin_steps or num_train < origin_steps:
        raise ValueError(
            f"the lcm grid has {min(origin_steps, num_train)} timesteps; {steps} steps cannot come from it"
        )
    stride = num_train // origin_steps
    origin = torch.arange(1, origin_steps + 1, dtype=torch.int64) * stride - 1
    return origin.flip(0)[:: origin_steps // steps][:steps]


# --- sigma <-> t --------------------------------------------------------------------------------------------------


def sigma_at(t: Tensor, alpha_bar: Tensor) -> Tensor:
    """Sigma at (possibly fractional) timesteps, linear in sigma between the integer ones (``numpy.interp``, as
    diffusers' Euler and DPM schedulers build their grids). Integer ``t`` gives the table value exactly."""
    table = sigma_from_alpha_bar(alpha_bar)
    t = t.to(torch.float64).clamp(0, len(table) - 1)
    low = t.floor().to(torch.int64).clamp(max=len(table) - 2)
    w = t - low
    # (1 - w) a + w b rather than a + w (b - a): exact at both ends, t = 999 included.
    return (1 - w) * table[low] + w * table[low + 1]


def sigma_to_t(sigma: Tensor, alpha_bar: Tensor, *, interpolation: str = "log", quantize: bool = False) -> Tensor:
    """Continuous timestep of a noise level, interpolating between the two table entries around it.

    ``interpolation="log"`` is linear in log sigma, as diffusers maps Karras sigmas back to timesteps (and as
    k-diffusion does); ``"linear"`` is linear in sigma, the exact inverse of :func:`sigma_at`. Sigmas outside the
    table clamp to t = 0 or 999. ``quantize`` rounds to the nearest integer timestep (half to even, as numpy).
    """
    if interpolation not in ("log", "linear"):
        raise ValueError(f"interpolation must be 'log' or 'linear', not {interpolation!r}")
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    table = sigma_from_alpha_bar(alpha_bar)  # ascending in t
    if interpolation == "log":
        table, sigma = table.log(), sigma.clamp_min(1e-10).log()
    # low = the last entry at or below sigma, kept one short of the end so that low + 1 exists.
    low = torch.searchsorted(table, sigma.reshape(-1), right=True).reshape(sigma.shape) - 1
    low = low.clamp(0, len(table) - 2)
    w = ((table[low] - sigma) / (table[low] - table[low + 1])).clamp(0, 1)
    t = low + w
    return t.round() if quantize else t


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> Tensor:
    """EDM noise levels (Karras et al. 2022, eq. 5): uniform in ``sigma ** (1/rho)`` from ``sigma_max`` down to
    ``sigma_min``, ``steps`` values, no final zero. Float64."""
    ramp = linspace64(0.0, 1.0, steps)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (inv_max + ramp * (inv_min - inv_max)) ** rho


# --- the sigma grids the samplers walk: ``steps + 1`` values, the last one the level the result is returned at ---


def ddim_sigmas(alpha_bar: Tensor, steps: int, spacing: str = "default", offset: int = 1) -> Tensor:
    """DDIM grid: sigma at :func:`ddim_timesteps`, then sigma at t = 0, because the last step goes to alpha_bar[0]
    and not to 1 (``set_alpha_to_one=False``; ModelScope's ``alpha_bar[max(t - stride, 0)]``)."""
    table = sigma_from_alpha_bar(alpha_bar)
    t = ddim_timesteps(steps, len(alpha_bar), offset, "leading" if spacing == "default" else spacing)
    return torch.cat([table[t], table[:1]])


def dpm_solver_sigmas(alpha_bar: Tensor, steps: int, spacing: str = "default", offset: int = 1) -> Tensor:
    """DPM-Solver grid: sigma at :func:`dpm_solver_timesteps`, then 0 (``final_sigmas_type="zero"``)."""
    table = sigma_from_alpha_bar(alpha_bar)
    t = dpm_solver_timesteps(steps, len(alpha_bar), offset, "linspace" if spacing == "default" else spacing)
    return torch.cat([table[t], table.new_zeros(1)])


def karras_dpm_sigmas(alpha_bar: Tensor, steps: int, spacing: str = "default", offset: int = 1) -> Tensor:
    """Karras grid between the table's own extremes, sigma(t=0) and sigma(t=999), then 0. The network is fed the
    rounded log-interpolated timestep of each level (:func:`sigma_to_t` with ``quantize=True``), as diffusers does,
    while the solver uses the exact Karras sigma. ``spacing`` and ``offset`` do not apply: the grid spans the whole
    table."""
    table = sigma_from_alpha_bar(alpha_bar)
    sigmas = karras_sigmas(table[0].item(), table[-1].item(), steps)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def lcm_sigmas(alpha_bar: Tensor, steps: int, spacing: str = "default", offset: int = 1) -> Tensor:
    """Consistency grid: sigma at :func:`lcm_timesteps`, then 0, the level of the denoised estimate the sampler
    returns. ``spacing`` and ``offset`` do not apply: the grid is the one the model was distilled on."""
    table = sigma_from_alpha_bar(alpha_bar)
    t = lcm_timesteps(steps, len(alpha_bar))
    return torch.cat([table[t], table.new_zeros(1)])


def euler_sigmas(alpha_bar: Tensor, steps: int, spacing: str = "default", offset: int = 1) -> Tensor:
    """Euler grid: sigma linearly interpolated at :func:`euler_timesteps`, then 0."""
    t = euler_timesteps(steps, len(alpha_bar), offset, "linspace" if spacing == "default" else spacing)
    sigmas = sigma_at(t, alpha_bar)
    return torch.cat([sigmas, sigmas.new_zeros(1)])
