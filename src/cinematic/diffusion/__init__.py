"""Diffusion: noise schedules, denoiser adapters around the ε- or v-prediction network, and samplers."""

from cinematic.diffusion.denoisers import (
    ClassifierFreeGuidance,
    ConsistencyDenoiser,
    Denoiser,
    DiscreteDenoiser,
    EpsModel,
    GuidedEps,
    TruncatedGuidance,
    classifier_free_guidance,
    guided_steps,
    prediction_target,
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
    sample_lcm,
)
from cinematic.diffusion.schedule import alpha_bar_scaled_linear, sigma_from_alpha_bar, sigma_to_t

__all__ = [
    "SAMPLERS",
    "ClassifierFreeGuidance",
    "ConsistencyDenoiser",
    "Denoiser",
    "DiscreteDenoiser",
    "EpsModel",
    "GuidedEps",
    "SamplerSpec",
    "TruncatedGuidance",
    "alpha_bar_scaled_linear",
    "classifier_free_guidance",
    "get_sampler",
    "guided_steps",
    "prediction_target",
    "sample",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_lcm",
    "sigma_from_alpha_bar",
    "sigma_to_t",
]
