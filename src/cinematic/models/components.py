"""The whole model: the three networks' configs and the noise schedule, and the built networks with their tokenizer.

``ModelConfig`` is what cinematic's own format stores in ``model.json``, so a folder rebuilds its own model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cinematic.errors import CinematicError
from cinematic.models.text_encoder import TextEncoderConfig
from cinematic.models.unet3d import UNet3DConfig, UNetLevel
from cinematic.models.vae import VAEConfig

if TYPE_CHECKING:
    from torch import nn

    from cinematic.tokenizer import Tokenizer

FORMAT_VERSION = 1
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class ScheduleConfig:
    """The training noise schedule: 1000 discrete steps with scaled-linear betas, and what the UNet predicts: the
    noise (``"epsilon"``, every published checkpoint) or ``v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0``
    (``"v_prediction"``, Salimans & Ho 2022; the bundled shapes model)."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            allowed = ", ".join(repr(p) for p in PREDICTION_TYPES)
            raise CinematicError(f"prediction type {self.prediction_type!r} is not supported; allowed: {allowed}")


@dataclass(frozen=True)
class Defaults:
    """Generation defaults that a checkpoint was trained for (zeroscope_v2_576w, say, is 24 frames at 576x320)."""

    frames: int = 16
    height: int = 256
    width: int = 256
    fps: int = 8


@dataclass(frozen=True)
class ModelConfig:
    unet: UNet3DConfig = field(default_factory=UNet3DConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    defaults: Defaults = field(default_factory=Defaults)

    def __post_init__(self):
        if self.unet.cross_attention_dim != self.text_encoder.width:
            raise CinematicError(
                f"the UNet attends to {self.unet.cross_attention_dim}-wide text features but the text encoder "
                f"produces {self.text_encoder.width}; they must be equal"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CinematicError(f"model.json has format_version {version!r}; this cinematic reads {FORMAT_VERSION}")
        try:
            unet = dict(data["unet"])
            unet["levels"] = tuple(UNetLevel(**level) for level in unet["levels"])
            vae = dict(data["vae"])
            vae["block_out_channels"] = tuple(vae["block_out_channels"])
            return cls(
                unet=UNet3DConfig(**unet),
                text_encoder=TextEncoderConfig(**data["text_encoder"]),
                vae=VAEConfig(**vae),
                schedule=ScheduleConfig(**data.get("schedule", {})),
                defaults=Defaults(**data.get("defaults", {})),
            )
        except (KeyError, TypeError) as e:
            raise CinematicError(f"model.json does not describe a model this cinematic can build: {e}") from None


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
