"""FreeInit (Wu et al. 2023, "FreeInit: Bridging Initialization Gap in Video Diffusion Models").

Training noise ``sqrt(alpha_bar_T) x0 + sqrt(1 - alpha_bar_T) eps`` keeps the clip's low spatio-temporal
frequencies (alpha_bar_T is not 0); pure Gaussian noise at inference lacks them. FreeInit samples once, diffuses the
result back to ``t = T - 1`` with the first initial noise, keeps the low frequencies of that (a 3-D Butterworth
low-pass over frames, height and width) and takes the high ones from fresh noise, then samples again; ``N``
iterations sample ``N + 1`` times. Everything here is float32 FFT arithmetic on ``[B, C, F, H, W]`` latents.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# The paper's defaults: order 4, normalised spatial and temporal stop frequencies 0.25.
ORDER = 4
SPATIAL_CUTOFF = 0.25
TEMPORAL_CUTOFF = 0.25


def butterworth_lowpass(
    frames: int,
    height: int,
    width: int,
    order: int = ORDER,
    spatial_cutoff: float = SPATIAL_CUTOFF,
    temporal_cutoff: float = TEMPORAL_CUTOFF,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Gain ``[F, H, W]`` on an unshifted 3-D FFT: ``1 / (1 + (d / d_s) ** (2 n))``.

    ``d`` is the distance from DC with each axis's frequency normalised to [-1, 1) (twice ``fftfreq``, so 1 is
    Nyquist) and the temporal one scaled by ``d_s / d_t``, so the gain is 1 at DC, 1/2 on the ellipsoid ``f_hw =
    d_s``, ``f_t = d_t``, and falls as ``d ** -2n`` above it.
    """
    f_t = 2 * torch.fft.fftfreq(frames, device=device, dtype=torch.float64) * (spatial_cutoff / temporal_cutoff)
    f_h = 2 * torch.fft.fftfreq(height, device=device, dtype=torch.float64)
    f_w = 2 * torch.fft.fftfreq(width, device=device, dtype=torch.float64)
    d2 = f_t[:, None, None] ** 2 + f_h[None, :, None] ** 2 + f_w[None, None, :] ** 2
    return (1.0 / (1.0 + (d2 / spatial_cutoff**2) ** order)).to(torch.float32)


def mix_frequencies(low_source: Tensor, high_source: Tensor, lowpass: Tensor) -> Tensor:
    """``low_source``'s frequencies through ``lowpass`` plus ``high_source``'s through ``1 - lowpass``; the FFT runs
    over the last three dims (frames, height, width) of ``[B, C, F, H, W]``."""
    dims = (-3, -2, -1)
    low = torch.fft.fftn(low_source.float(), dim=dims) * lowpass
    high = torch.fft.fftn(high_source.float(), dim=dims) * (1 - lowpass)
    return torch.fft.ifftn(low + high, dim=dims).real.to(low_source.dtype)


def diffuse(x0: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """The VP latent at the last training timestep: ``sqrt(alpha_bar[-1]) x0 + sqrt(1 - alpha_bar[-1]) noise``."""
    a = float(alpha_bar[-1])
    return math.sqrt(a) * x0 + math.sqrt(1 - a) * noise


def free_init(
    run: Callable[[Tensor], Tensor],
    noise: Tensor,
    iterations: int,
    alpha_bar: Tensor,
    generator: torch.Generator | None = None,
    lowpass: Tensor | None = None,
) -> Tensor:
    """``run(noise) -> latents`` once, then ``iterations`` more times from re-initialised noise; returns the last.

    The fresh high-frequency noise of each iteration is drawn from ``generator`` on its device (the CPU for a CPU
    generator), in the shape of ``noise``. ``lowpass`` defaults to :func:`butterworth_lowpass` with the paper's
    settings. ``iterations = 0`` is ``run(noise)``.
    """
    latents = run(noise)
    if iterations == 0:
        return latents
    if lowpass is None:
        lowpass = butterworth_lowpass(*noise.shape[-3:], device=noise.device)
    for _ in range(iterations):
        device = generator.device if generator is not None else torch.device("cpu")
        fresh = torch.randn(noise.shape, generator=generator, dtype=noise.dtype, device=device).to(noise.device)
        latents = run(mix_frequencies(diffuse(latents, noise, alpha_bar), fresh, lowpass.to(noise.device)))
    return latents
