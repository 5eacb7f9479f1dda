"""Adapters between the network and the samplers (k-diffusion's ``external.py`` pattern).

Three interfaces, innermost first:

- ``EpsModel``: the UNet, ``eps_model(x, t, cond) -> eps`` on the VP latent ``x`` [B, C, F, H, W], float32 timesteps
  ``t`` [B] and text embeddings ``cond`` [B, L, D].
- ``GuidedEps``: the network with its conditioning bound, ``guided(x, t) -> eps``. :func:`classifier_free_guidance`
  builds one; so does ``functools.partial(eps_model, cond=...)``.
- ``Denoiser``: what every sampler calls, ``denoiser(x, sigma) -> x0`` on the VE latent ``x = x0 + sigma * eps``
  with ``sigma`` a 0-d float64 tensor shared by the whole batch. :class:`DiscreteDenoiser` builds one.

The network predicts ε or, for a ``"v_prediction"`` model, ``v``; guidance combines either linearly, so everything
above the denoiser is the same for both (the names say ``eps`` for the common case).

Nothing here folds frames into the batch: all maps are elementwise over (B, C, F, H, W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from cinematic.diffusion.schedule import sigma_to_t


class EpsModel(Protocol):
    def __call__(self, x: Tensor, t: Tensor, cond: Any, /) -> Tensor: ...


class GuidedEps(Protocol):
    def __call__(self, x: Tensor, t: Tensor, /) -> Tensor: ...


class Denoiser(Protocol):
    def __call__(self, x: Tensor, sigma: Tensor, /) -> Tensor: ...


@dataclass(frozen=True)
class ClassifierFreeGuidance:
    """``eps = eps_u + scale * (eps_c - eps_u)`` (Ho & Salimans 2022), a ``GuidedEps`` around an ``EpsModel``.

    ``batched=True`` runs one batch of 2B ordered [uncond, cond], as diffusers does; ``batched=False`` runs the two
    branches one after the other with batch B, as ModelScope does: half the activation memory, same result.
    ``scale == 1`` is the conditional branch alone and never runs the unconditional one. ``cond`` and ``uncond``
    must have the same shape.
    """

    eps_model: EpsModel
    cond: Tensor
    uncond: Tensor | None
    scale: float
    batched: bool = True

    def __post_init__(self) -> None:
        if self.uncond is None and self.scale != 1.0:
            raise ValueError("classifier-free guidance with scale != 1 needs an unconditional embedding")
        if self.uncond is not None and self.uncond.shape != self.cond.shape:
            raise ValueError(f"cond {tuple(self.cond.shape)} and uncond {tuple(self.uncond.shape)} differ in shape")

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if self.scale == 1.0:
            return self.eps_model(x, t, self.cond)
        if self.batched:
            # [B, C, F, H, W] -> [2B, C, F, H, W], rows [uncond, cond]
            eps = self.eps_model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.uncond, self.cond]))
            eps_u, eps_c = eps.chunk(2)
        else:
            eps_u = self.eps_model(x, t, self.uncond)
            eps_c = self.eps_model(x, t, self.cond)
        return eps_u + self.scale * (eps_c - eps_u)


def classifier_free_guidance(
    eps_model: EpsModel, cond: Tensor, uncond: Tensor | None, scale: float, batched: bool = True
) -> ClassifierFreeGuidance:
    """Bind ``cond``/``uncond`` to ``eps_model`` and guide with ``scale``; see :class:`ClassifierFreeGuidance`."""
    return ClassifierFreeGuidance(eps_model, cond, uncond, float(scale), batched)


def guided_steps(steps: int, stop: float) -> int:
    """How many of ``steps`` steps keep guidance when it stops at fraction ``stop`` of sampling: ``ceil(stop *
    steps)``, rounded first so that 0.7 * 10 counts 7 steps, not 8."""
    return math.ceil(round(stop * steps, 9))


@dataclass
class TruncatedGuidance:
    """Guidance truncation: ``guided`` for the first ``guided_steps`` evaluations, the conditional branch alone after.

    Late steps refine detail at low noise, where the guided and conditional predictions are close, so dropping the
    unconditional pass there halves their cost for a small change (the guidance-interval observation of
    Kynkäänniemi et al. 2024, applied to the end of sampling only). Samplers evaluate their denoiser once per step,
    so evaluation ``i`` is step ``i``; ``guided_steps >= steps`` is plain guidance.
    """

    guided: ClassifierFreeGuidance
    guided_steps: int
    calls: int = 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        if self.calls <= self.guided_steps:
            return self.guided(x, t)
        return self.guided.eps_model(x, t, self.guided.cond)


def prediction_target(prediction: str, x0: Tensor, eps: Tensor, signal: Tensor, noise: Tensor) -> Tensor:
    """What the network learns to output for ``x_t = signal * x0 + noise * eps`` (``signal = sqrt(alpha_bar_t)``,
    ``noise = sqrt(1 - alpha_bar_t)``, broadcastable): ``eps``, or ``v = signal * eps - noise * x0``.
    :class:`DiscreteDenoiser` inverts it."""
    if prediction == "v_prediction":
        return signal * eps - noise * x0
    return eps


@dataclass(frozen=True)
class DiscreteDenoiser:
    """``denoiser(x, sigma) -> x0`` around a network trained on discrete timesteps.

    The VE latent enters the network in VP form, ``x_VP = x / sqrt(1 + sigma**2)``, at the timestep of ``sigma``
    (:func:`~cinematic.diffusion.schedule.sigma_to_t` with this adapter's ``interpolation`` and ``quantize``). For
    ε-prediction ``x0 = x - sigma * eps``; for v-prediction, with ``c = 1 / sqrt(1 + sigma**2)`` (``sqrt(alpha_bar)``),
    ``x0 = c x_VP - sigma c v = c**2 x - sigma c v``. Coefficients are computed in float64 and applied as Python
    floats, so ``x`` keeps its dtype and device; ``t`` reaches the network as float32 [B] on ``x``'s device.
    """

    model: GuidedEps
    alpha_bar: Tensor
    interpolation: str = "log"
    quantize: bool = True
    prediction: str = "epsilon"

    def timestep(self, sigma: Tensor) -> float:
        return sigma_to_t(sigma, self.alpha_bar, interpolation=self.interpolation, quantize=self.quantize).item()

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        s = float(sigma)
        t = torch.full((x.shape[0],), self.timestep(sigma), dtype=torch.float32, device=x.device)
        c = (1.0 + s * s) ** -0.5
        out = self.model(x * c, t)
        if self.prediction == "v_prediction":
            return x * (c * c) - out * (s * c)
        return x - s * out


SIGMA_DATA = 0.5  # the data std the consistency boundary scalings assume (Song et al. 2023, app. C; LCM's 0.5)


def boundary_scalings(t: float, timestep_scaling: float) -> tuple[float, float]:
    """``(c_skip, c_out)`` of a consistency model at discrete timestep ``t`` (Song et al. 2023, eq. 9, with the
    timestep scaled as latent consistency models scale it: ``s = timestep_scaling * t``): ``c_skip = sigma_data**2 /
    (s**2 + sigma_data**2)``, ``c_out = s / sqrt(s**2 + sigma_data**2)``. At t = 0 the output is the input itself;
    a larger scaling brings ``c_out`` nearer 1 at every other t (10: T2V-Turbo and LCM; 4: MCM)."""
    s = timestep_scaling * t
    return SIGMA_DATA**2 / (s * s + SIGMA_DATA**2), s / math.sqrt(s * s + SIGMA_DATA**2)


@dataclass(frozen=True)
class ConsistencyDenoiser:
    """A consistency model's output ``f(x, t) = c_skip(t) x_VP + c_out(t) x0_hat`` as a ``Denoiser``, around the
    network's own estimate ``x0_hat`` (:class:`DiscreteDenoiser`, epsilon or v, as any other sampler reads it).

    The skip term adds the VP latent, as the distilled models were trained (not the VE ``x``); ``t`` is the
    timestep the network is given. Coefficients are Python floats, so ``x`` keeps its dtype."""

    denoiser: DiscreteDenoiser
    timestep_scaling: float = 10.0

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        s = float(sigma)
        c_skip, c_out = boundary_scalings(self.denoiser.timestep(sigma), self.timestep_scaling)
        return self.denoiser(x, sigma) * c_out + x * (c_skip * (1.0 + s * s) ** -0.5)
