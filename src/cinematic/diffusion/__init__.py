"""Diffusion: noise schedules, denoiser adapters around the eps-prediction network, and samplers."""

from cinematic.diffusion.denoisers import (
    ClassifierFreeGuidance,
    Denoiser,
    DiscreteEpsDenoiser,
    EpsModel,
    GuidedEps,
    TruncatedGuidance,
    classifier_free_guidance,
    guided_steps,
)
from cinematic.diffusion.samplers import (
    SAMPLERS,
    SamplerSpec,
    get_sampler,
    sample,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
)
from cinematic.diffusion.schedule import alpha_bar_scaled_linear, sigma_from_alpha_bar, sigma_to_t

__all__ = [
    "SAMPLERS",
    "ClassifierFreeGuidance",
    "Denoiser",
    "DiscreteEpsDenoiser",
    "EpsModel",
    "GuidedEps",
    "SamplerSpec",
    "TruncatedGuidance",
    "alpha_bar_scaled_linear",
    "classifier_free_guidance",
    "get_sampler",
    "guided_steps",
    "sample",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
    "sigma_from_alpha_bar",
    "sigma_to_t",
]
