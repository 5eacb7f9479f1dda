"""The model a run starts from, and which of its parameters train.

A run starts from an existing model (``init``: any layout that ``cinematic.weights.load`` reads, so the published
weights can be fine-tuned) or from a preset / ModelConfig JSON with a fresh random init. Fresh networks are built
on the CPU for real (not on ``meta``), from a seeded generator, with their own init (zero-initialised temporal
output convs, OpenCLIP's text init). The tokenizer of a fresh model is trained on the run's captions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from cinematic.errors import CinematicError
from cinematic.models.checks import config_file
from cinematic.models.components import Model, ModelConfig
from cinematic.train.batches import INIT, derive_seed
from cinematic.train.config import TrainConfig

# UNet parameters that ``--train temporal`` trains: everything that mixes information across frames.
TEMPORAL_MODULES = ("temp_convs", "temp_attentions", "transformer_in")


def preset_config(preset: str) -> ModelConfig:
    """A preset name (``cinematic.models.presets.PRESETS``) or a JSON file describing a ModelConfig."""
    from cinematic.models.components import FORMAT_VERSION
    from cinematic.models.presets import PRESETS

    if preset in PRESETS:
        return PRESETS[preset]
    path = Path(preset).expanduser()
    if path.suffix.lower() != ".json":
        raise CinematicError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)} or a ModelConfig .json")
    from cinematic.weights.files import read_json

    data = read_json(path)
    if not isinstance(data, dict):
        raise CinematicError(f"{path} does not hold a JSON object")
    with config_file(path):
        return ModelConfig.from_dict({"format_version": FORMAT_VERSION, **data})


def starting_config(config: TrainConfig) -> ModelConfig:
    """The config of the model the run starts from (read without loading any weights)."""
    if config.init is not None:
        from cinematic.weights import open_source

        return open_source(config.init).config
    if config.preset is None:
        raise CinematicError("nothing to start from: give an init model (--init) or a preset (--preset)")
    return preset_config(config.preset)


def fresh_model(model_config: ModelConfig, captions: Sequence[str], tokenizer: str | None, seed: int) -> Model:
    """Randomly initialised networks (seeded), and a tokenizer trained on ``captions`` unless one is given."""
    from cinematic.models.text_encoder import TextEncoder
    from cinematic.models.unet3d import UNet3D
    from cinematic.models.vae import VAE
    from cinematic.tokenizer import Tokenizer, train_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, INIT))
        unet = UNet3D(model_config.unet)
        text_encoder = TextEncoder(model_config.text_encoder)
        vae = VAE(model_config.vae)
    text = model_config.text_encoder
    if tokenizer is not None:
        vocab = Tokenizer.from_folder(tokenizer, text.context_length)
    else:
        vocab = train_tokenizer(captions, vocab_size=text.vocab_size, context_length=text.context_length)
    return Model(model_config, unet, text_encoder, vae, vocab, source="", format="cinematic")


def load_network(model: str, name: str, device: torch.device) -> tuple[nn.Module, ModelConfig]:
    """One network (``"unet"`` or ``"vae"``, float32) and the config of another model, read without loading its
    other networks."""
    from cinematic.models.unet3d import UNet3D
    from cinematic.models.vae import VAE
    from cinematic.weights import open_source
    from cinematic.weights.files import load_into

    source = open_source(model)
    with torch.device("meta"):
        network = UNet3D(source.config.unet) if name == "unet" else VAE(source.config.vae)
    load_into(network, source.readers[name](torch.float32), str(source.files[name]), torch.float32, device)
    return network, source.config


def starting_model(config: TrainConfig, captions: Sequence[str], device: torch.device) -> tuple[Model, bool]:
    """The model to train, float32 on ``device``, and whether it is freshly initialised."""
    from cinematic.weights import load

    fresh = config.init is None
    if config.stage == "unet" and fresh and config.vae is None:
        raise CinematicError(
            "the unet stage trains on the latents of a frozen, trained VAE: give --vae MODEL (for example the "
            "output of --stage vae) or start from a model with --init"
        )
    if fresh:
        model = fresh_model(starting_config(config), captions, config.tokenizer, config.seed)
        for name in ("unet", "text_encoder", "vae"):
            setattr(model, name, getattr(model, name).to(device))
    else:
        model = load(config.init, device=device, dtype=torch.float32, tokenizer=config.tokenizer)
    if config.vae is not None:
        model.vae, vae_source = load_network(config.vae, "vae", device)
        model.config = dataclasses.replace(model.config, vae=vae_source.vae)
    check_tokenizer(model)
    return model, fresh


def check_tokenizer(model: Model) -> None:
    largest = max(model.tokenizer.vocab.values())
    size = model.config.text_encoder.vocab_size
    if largest >= size:
        raise CinematicError(f"the tokenizer has ids up to {largest}, but the text encoder embeds only {size} tokens")
    if model.tokenizer.context_length != model.config.text_encoder.context_length:
        raise CinematicError(
            f"the tokenizer makes {model.tokenizer.context_length} tokens, the text encoder reads "
            f"{model.config.text_encoder.context_length}"
        )


def with_clip_size(model_config: ModelConfig, frames: int, height: int, width: int) -> ModelConfig:
    """The model's generation defaults become the clips it was trained on."""
    defaults = dataclasses.replace(model_config.defaults, frames=frames, height=height, width=width)
    return dataclasses.replace(model_config, defaults=defaults)


def select_trainable(model: Model, stage: str, parts: frozenset[str]) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Freeze everything, then unfreeze ``parts``; returns the trainable parameters of each network, by name.

    Networks with trainable parameters are put in training mode (the UNet's temporal-conv dropout), the others in
    evaluation mode.
    """
    chosen: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for network_name in ("unet", "text_encoder", "vae"):
        network = getattr(model, network_name)
        network.requires_grad_(False)
        named = [(n, p) for n, p in network.named_parameters() if _trains(stage, parts, network_name, n)]
        for _, p in named:
            p.requires_grad_(True)
        network.train(bool(named))
        if named:
            chosen[network_name] = named
    return chosen


def _trains(stage: str, parts: frozenset[str], network: str, name: str) -> bool:
    if stage == "vae":
        return network == "vae" and ("vae" in parts or name.startswith(("decoder.", "post_quant_conv.")))
    if network == "text_encoder":
        return "text" in parts
    if network == "unet":
        return "unet" in parts or ("temporal" in parts and any(m in name.split(".") for m in TEMPORAL_MODULES))
    return False
