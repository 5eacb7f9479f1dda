"""The whole model: the three networks' configs and the noise schedule, and the built networks with their tokenizer.

``ModelConfig`` is what cinematic's own format stores in ``model.json``, so a folder rebuilds its own model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cinematic.errors import CinematicError
from cinematic.models import sizes
from cinematic.models.checks import boolean, integer, mapping, number
from cinematic.models.text_encoder import TextEncoderConfig
from cinematic.models.unet3d import UNet3DConfig
from cinematic.models.vae import VAEConfig
from cinematic.settings import spec

if TYPE_CHECKING:
    from torch import nn

    from cinematic.tokenizer import Tokenizer

FORMAT_VERSION = 1
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("default", "leading", "linspace", "trailing")  # cinematic.diffusion.schedule.SPACINGS
# The schedule's tables hold one float64 per training step: diffusers' models use 1000; 100k is 800 kB.
MAX_TRAIN_TIMESTEPS = 100_000


@dataclass(frozen=True)
class ScheduleConfig:
    """The training noise schedule: 1000 discrete steps with scaled-linear betas, and what the UNet predicts: the
    noise (``"epsilon"``, every published checkpoint) or ``v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0``
    (``"v_prediction"``, Salimans & Ho 2022).

    ``zero_terminal_snr`` rescales the betas so that the last step holds no signal at all (Lin et al. 2024,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed"; diffusers' ``rescale_betas_zero_snr``); it needs
    v-prediction, and ``timestep_spacing="trailing"`` so that sampling starts at that step. ``"default"`` spacing is
    each sampler's own, as diffusers builds it from the published configs, which name none; a config that names
    ``"leading"``, ``"linspace"`` or ``"trailing"`` is sampled with it by every sampler, as diffusers does with that
    config. ``steps_offset`` shifts "leading" timesteps (the published configs' 1)."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False
    timestep_spacing: str = "default"
    steps_offset: int = 1

    def __post_init__(self):
        # Both ends of the scaled-linear betas must be probabilities strictly between 0 and 1.
        number(self.beta_start, "schedule.beta_start", 0, 1, open_low=True, open_high=True)
        number(self.beta_end, "schedule.beta_end", 0, 1, open_low=True, open_high=True)
        integer(self.num_train_timesteps, "schedule.num_train_timesteps", 1, MAX_TRAIN_TIMESTEPS)
        integer(self.steps_offset, "schedule.steps_offset", 0, 1000)
        boolean(self.zero_terminal_snr, "schedule.zero_terminal_snr")
        if not isinstance(self.prediction_type, str) or self.prediction_type not in PREDICTION_TYPES:
            allowed = ", ".join(repr(p) for p in PREDICTION_TYPES)
            raise CinematicError(f"prediction type {self.prediction_type!r} is not supported; allowed: {allowed}")
        if not isinstance(self.timestep_spacing, str) or self.timestep_spacing not in TIMESTEP_SPACINGS:
            allowed = ", ".join(repr(p) for p in TIMESTEP_SPACINGS)
            raise CinematicError(f"timestep spacing {self.timestep_spacing!r} is not supported; allowed: {allowed}")
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise CinematicError(
                "a zero terminal SNR schedule needs prediction_type 'v_prediction' (ε is undefined there)"
            )

    def alpha_bar(self):
        """The float64 ``alpha_bar`` table of this schedule (see :mod:`cinematic.diffusion.schedule`)."""
        from cinematic.diffusion.schedule import alpha_bar_scaled_linear, rescale_zero_terminal_snr

        table = alpha_bar_scaled_linear(self.beta_start, self.beta_end, self.num_train_timesteps)
        return rescale_zero_terminal_snr(table) if self.zero_terminal_snr else table


@dataclass(frozen=True)
class Defaults:
    """Generation defaults that a checkpoint was trained for (zeroscope_v2_576w, say, is 24 frames at 576x320)."""

    frames: int = 16
    height: int = 256
    width: int = 256
    fps: int = 8
    # How the model is sampled when a call names nothing: DDIM 50 with guidance 9 for the published model; a
    # few-step (consistency-distilled) model says "lcm", 4 steps and its own guidance and timestep scaling.
    sampler: str = "ddim"
    num_inference_steps: int = 50
    guidance_scale: float = 9.0
    timestep_scaling: float = 10.0

    def __post_init__(self):
        # The bounds are the settings' own (each declared once, in settings.py): a default must be a valid setting.
        for name, setting in (("frames", "num_frames"), ("height", "height"), ("width", "width"),
                              ("num_inference_steps", "num_inference_steps")):  # fmt: skip
            bounds = spec(setting)
            value = integer(getattr(self, name), f"defaults.{name}", int(bounds.low), int(bounds.high))
            if bounds.multiple_of and value % bounds.multiple_of:
                raise CinematicError(f"defaults.{name} must be a multiple of {bounds.multiple_of}, got {value}")
        for name in ("fps", "guidance_scale", "timestep_scaling"):
            number(getattr(self, name), f"defaults.{name}", spec(name).low, spec(name).high)
        choices = spec("sampler").choices
        if not isinstance(self.sampler, str) or self.sampler not in choices:
            raise CinematicError(f"defaults.sampler must be one of {', '.join(choices)}, got {self.sampler!r:.40}")


@dataclass(frozen=True)
class ModelConfig:
    unet: UNet3DConfig = field(default_factory=UNet3DConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    defaults: Defaults = field(default_factory=Defaults)

    def __post_init__(self):
        kinds = {"unet": UNet3DConfig, "text_encoder": TextEncoderConfig, "vae": VAEConfig}
        kinds |= {"schedule": ScheduleConfig, "defaults": Defaults}
        for name, kind in kinds.items():
            if not isinstance(getattr(self, name), kind):
                raise CinematicError(f"ModelConfig.{name} must be a {kind.__name__}, got {getattr(self, name)!r:.40}")
        sizes.check_parameters("the model", sum(c.parameter_count() for c in (self.unet, self.text_encoder, self.vae)))
        if self.unet.cross_attention_dim != self.text_encoder.width:
            raise CinematicError(
                f"the UNet attends to {self.unet.cross_attention_dim}-wide text features but the text encoder "
                f"produces {self.text_encoder.width}; they must be equal"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self), "unet": self.unet.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CinematicError(f"format_version is {version!r:.40}; this cinematic reads {FORMAT_VERSION}")
        try:
            sections = {name: mapping(data[name], name) for name in ("unet", "text_encoder", "vae")}
            sections |= {name: mapping(data.get(name, {}), name) for name in ("schedule", "defaults")}
            unet = UNet3DConfig.from_dict(sections["unet"])
            return cls(
                unet=unet,
                text_encoder=TextEncoderConfig(**sections["text_encoder"]),
                vae=VAEConfig(**sections["vae"]),
                schedule=ScheduleConfig(**sections["schedule"]),
                defaults=Defaults(**sections["defaults"]),
            )
        except (KeyError, TypeError) as e:
            raise CinematicError(f"not a model config this cinematic can build: {e}") from None


COMPONENTS = ("unet", "text_encoder", "vae")


@dataclass
class Model:
    """The built networks, ready to run, and where they came from."""

    config: ModelConfig
    unet: nn.Module
    text_encoder: nn.Module
    vae: nn.Module
    tokenizer: Tokenizer
    source: str = ""
    format: str = ""
