"""The diffusers folder layout: ``model_index.json`` with ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and
``scheduler/``, as published in ali-vilab/text-to-video-ms-1.7b, zeroscope and others.

Our module names are diffusers' own, so the UNet and VAE weights load without renames; the text encoder only loses
the ``text_model.`` prefix that transformers 4 wrote (transformers 5 writes none). The configs are parsed into our
dataclasses: a key that would change the architecture must hold the one value we implement, and harmless keys are
listed in explicit ignore sets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cinematic.errors import CinematicError
from cinematic.models.checks import (
    MAX_CHANNELS,
    MAX_CONTEXT,
    MAX_LAYERS_PER_BLOCK,
    MAX_LEVELS,
    MAX_TEXT_LAYERS,
    MAX_VOCAB,
    boolean,
    config_file,
    integer,
    integers,
    number,
)
from cinematic.models.components import MAX_TRAIN_TIMESTEPS, Defaults, ModelConfig, ScheduleConfig
from cinematic.models.text_encoder import TextEncoderConfig
from cinematic.models.unet3d import UNet3DConfig, UNetLevel
from cinematic.models.vae import VAEConfig
from cinematic.settings import spec
from cinematic.weights.files import StateDict, read_json, read_weights
from cinematic.weights.source import Source

# Weight file stems per component, in the order we look for them.
WEIGHT_STEMS = {
    "unet": ("diffusion_pytorch_model",),
    "vae": ("diffusion_pytorch_model",),
    "text_encoder": ("model", "pytorch_model"),
}

LATENT_FACTOR = 8  # sample_size counts latent pixels; the published VAE downsamples by 8
_UNET_FIXED = {  # key: the only value our UNet implements
    "act_fn": "silu",
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "num_attention_heads": None,  # diffusers itself refuses a non-None value for this model
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
_UNET_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "sample_size"}

_TEXT_FIXED = {"hidden_act": "gelu", "use_attention_mask": False}
_TEXT_IGNORED = {
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "projection_dim", "initializer_factor", "initializer_range",
    "attention_dropout", "dropout", "output_hidden_states", "output_attentions", "return_dict", "use_cache",
    "_attn_implementation_autoset", "tie_word_embeddings", "id2label", "label2id",
}  # fmt: skip

_VAE_FIXED = {
    "act_fn": "silu",
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
_VAE_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "sample_size", "force_upcast"}

_SCHEDULE_FIXED = {
    "beta_schedule": "scaled_linear",
    "thresholding": False,
    "clip_sample": False,
    "trained_betas": None,
}
_SCHEDULE_IGNORED = {
    "_class_name", "_diffusers_version", "set_alpha_to_one", "skip_prk_steps",
    "clip_sample_range", "dynamic_thresholding_ratio", "sample_max_value", "solver_order", "solver_type",
    "algorithm_type", "lower_order_final", "use_karras_sigmas", "interpolation_type", "final_sigmas_type",
    "euler_at_final", "variance_type", "lambda_min_clipped", "use_lu_lambdas", "use_exponential_sigmas",
    "use_beta_sigmas", "use_flow_sigmas", "flow_shift", "sigma_min", "sigma_max", "timestep_type",
}  # fmt: skip


def _check_keys(config: dict[str, Any], used: set[str], fixed: dict[str, Any], ignored: set[str], where: Path) -> None:
    for key, value in fixed.items():
        if key in config and config[key] != value:
            raise CinematicError(f"{where}: {key}={config[key]!r} is not supported; allowed: {value!r}")
    unknown = config.keys() - used - fixed.keys() - ignored
    if unknown:
        raise CinematicError(f"{where}: unknown config keys {sorted(unknown)} (they may change the architecture)")


def _block_types(config: dict[str, Any], key: str, default: list[str]) -> list[str]:
    types = config.get(key, default)
    if not isinstance(types, list | tuple) or not all(isinstance(t, str) for t in types):
        raise CinematicError(f"{key} must be a list of block type names, got {types!r:.60}")
    return list(types)


def parse_unet_config(config: dict[str, Any], where: Path) -> UNet3DConfig:
    used = {
        "in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
        "layers_per_block", "norm_num_groups", "norm_eps", "cross_attention_dim", "attention_head_dim",
        "time_cond_proj_dim",
    }  # fmt: skip
    _check_keys(config, used, _UNET_FIXED, _UNET_IGNORED, where)
    with config_file(where):
        channels = integers(config.get("block_out_channels", [320, 640, 1280, 1280]), "block_out_channels", 1,
                            MAX_CHANNELS, MAX_LEVELS)  # fmt: skip
        down = _block_types(config, "down_block_types", ["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"])
        up = _block_types(config, "up_block_types", ["UpBlock3D"] + ["CrossAttnUpBlock3D"] * 3)
        allowed_down = {"CrossAttnDownBlock3D": True, "DownBlock3D": False}
        if len(down) != len(channels) or any(d not in allowed_down for d in down):
            raise CinematicError(f"down_block_types {down} must be one of {sorted(allowed_down)} per level")
        mirrored = ["CrossAttnUpBlock3D" if allowed_down[d] else "UpBlock3D" for d in reversed(down)]
        if up != mirrored:
            raise CinematicError(f"up_block_types {up} must mirror down_block_types ({mirrored})")
        return UNet3DConfig(
            in_channels=integer(config.get("in_channels", 4), "in_channels", 1, MAX_CHANNELS),
            out_channels=integer(config.get("out_channels", 4), "out_channels", 1, MAX_CHANNELS),
            levels=tuple(UNetLevel(c, allowed_down[d]) for c, d in zip(channels, down)),
            layers_per_block=integer(config.get("layers_per_block", 2), "layers_per_block", 1, MAX_LAYERS_PER_BLOCK),
            head_dim=integer(config.get("attention_head_dim", 64), "attention_head_dim", 1, MAX_CHANNELS),
            cross_attention_dim=integer(
                config.get("cross_attention_dim", 1024), "cross_attention_dim", 1, MAX_CHANNELS
            ),
            norm_groups=integer(config.get("norm_num_groups", 32), "norm_num_groups", 1, MAX_CHANNELS),
            norm_eps=number(config.get("norm_eps", 1e-5), "norm_eps", 0, 1, open_low=True),
            time_cond_proj_dim=_optional_width(config, "time_cond_proj_dim"),
        )


def _optional_width(config: dict[str, Any], key: str) -> int | None:
    """A width that may be absent or null (diffusers writes null for "none")."""
    value = config.get(key)
    return None if value is None else integer(value, key, 1, MAX_CHANNELS)


def parse_sample_size(config: dict[str, Any], where: Path) -> tuple[int, int] | None:
    """The trained ``(height, width)`` in pixels from the UNet's ``sample_size`` (latent pixels: one number, or
    ``[height, width]``), or None when the config has none."""
    size = config.get("sample_size")
    if size is None:
        return None
    sizes = list(size) if isinstance(size, list | tuple) else [size]
    most = int(spec("height").high) // LATENT_FACTOR
    with config_file(where):
        height, width = integers(sizes * 2 if len(sizes) == 1 else sizes, "sample_size", 1, most, 2)
    return height * LATENT_FACTOR, width * LATENT_FACTOR


def parse_text_encoder_config(config: dict[str, Any], where: Path) -> TextEncoderConfig:
    used = {
        "vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "intermediate_size", "layer_norm_eps",
    }  # fmt: skip
    _check_keys(config, used, _TEXT_FIXED, _TEXT_IGNORED, where)
    with config_file(where):
        return TextEncoderConfig(
            vocab_size=integer(config.get("vocab_size", 49408), "vocab_size", 1, MAX_VOCAB),
            context_length=integer(
                config.get("max_position_embeddings", 77), "max_position_embeddings", 1, MAX_CONTEXT
            ),  # fmt: skip
            width=integer(config.get("hidden_size", 1024), "hidden_size", 1, MAX_CHANNELS),
            layers=integer(config.get("num_hidden_layers", 23), "num_hidden_layers", 0, MAX_TEXT_LAYERS),
            heads=integer(config.get("num_attention_heads", 16), "num_attention_heads", 1, MAX_CHANNELS),
            mlp_width=integer(config.get("intermediate_size", 4096), "intermediate_size", 1, MAX_CHANNELS),
            eps=number(config.get("layer_norm_eps", 1e-5), "layer_norm_eps", 0, 1, open_low=True),
        )


def parse_vae_config(config: dict[str, Any], where: Path) -> VAEConfig:
    used = {
        "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
        "layers_per_block", "latent_channels", "norm_num_groups", "scaling_factor",
    }  # fmt: skip
    _check_keys(config, used, _VAE_FIXED, _VAE_IGNORED, where)
    with config_file(where):
        channels = integers(config.get("block_out_channels", [128, 256, 512, 512]), "block_out_channels", 1,
                            MAX_CHANNELS, MAX_LEVELS)  # fmt: skip
        down = _block_types(config, "down_block_types", ["DownEncoderBlock2D"])
        up = _block_types(config, "up_block_types", ["UpDecoderBlock2D"])
        if set(down) != {"DownEncoderBlock2D"} or set(up) != {"UpDecoderBlock2D"}:
            raise CinematicError("only DownEncoderBlock2D / UpDecoderBlock2D blocks are supported")
        return VAEConfig(
            in_channels=integer(config.get("in_channels", 3), "in_channels", 1, MAX_CHANNELS),
            out_channels=integer(config.get("out_channels", 3), "out_channels", 1, MAX_CHANNELS),
            latent_channels=integer(config.get("latent_channels", 4), "latent_channels", 1, MAX_CHANNELS),
            block_out_channels=channels,
            layers_per_block=integer(config.get("layers_per_block", 2), "layers_per_block", 1, MAX_LAYERS_PER_BLOCK),
            norm_groups=integer(config.get("norm_num_groups", 32), "norm_num_groups", 1, MAX_CHANNELS),
            scaling_factor=number(config.get("scaling_factor", 0.18215), "scaling_factor", 0, 1e6, open_low=True),
        )


def parse_schedule_config(config: dict[str, Any], where: Path) -> ScheduleConfig:
    """The training schedule of a diffusers scheduler config, with the spacing and offset of its timesteps: a
    config that names no ``timestep_spacing`` (the published ones) keeps each sampler's own, as diffusers builds
    each scheduler class with its own default then; ``steps_offset`` defaults to diffusers' 0."""
    used = {
        "beta_start",
        "beta_end",
        "num_train_timesteps",
        "prediction_type",
        "rescale_betas_zero_snr",
        "timestep_spacing",
        "steps_offset",
    }
    _check_keys(config, used, _SCHEDULE_FIXED, _SCHEDULE_IGNORED, where)
    with config_file(where):
        return ScheduleConfig(
            beta_start=number(config.get("beta_start", 0.00085), "beta_start", 0, 1, open_low=True, open_high=True),
            beta_end=number(config.get("beta_end", 0.012), "beta_end", 0, 1, open_low=True, open_high=True),
            num_train_timesteps=integer(
                config.get("num_train_timesteps", 1000), "num_train_timesteps", 1, MAX_TRAIN_TIMESTEPS
            ),  # fmt: skip
            prediction_type=config.get("prediction_type", "epsilon"),
            zero_terminal_snr=boolean(config.get("rescale_betas_zero_snr", False), "rescale_betas_zero_snr"),
            timestep_spacing=config.get("timestep_spacing") or "default",
            steps_offset=integer(config.get("steps_offset", 0), "steps_offset", 0, 1000),
        )


def find_weight_file(folder: Path, component: str, variant: str | None) -> Path:
    """Pick one weight file: the asked variant first (``fp16``), then the full one; safetensors before .bin."""
    variants = [variant, None] if variant else [None, "fp16"]
    for v in variants:
        for stem in WEIGHT_STEMS[component]:
            ext = stem if v is None else f"{stem}.{v}"
            for name in (f"{ext}.safetensors", f"{ext}.safetensors.index.json", f"{ext}.bin", f"{ext}.bin.index.json"):
                if (folder / name).is_file():
                    return folder / name
    raise CinematicError(f"{folder}: no weights file for {component} (looked for {WEIGHT_STEMS[component][0]}.*)")


def strip_text_model_prefix(state: StateDict) -> StateDict:
    """transformers 4 wrote CLIPTextModel keys under ``text_model.``; transformers 5 writes them bare."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    state.pop("embeddings.position_ids", None)  # a non-persistent buffer that old transformers saved
    return state


def read_diffusers(folder: Path, variant: str | None = None) -> Source:
    index = read_json(folder / "model_index.json")
    for component in ("unet", "vae", "text_encoder", "tokenizer"):
        if component not in index or not (folder / component).is_dir():
            raise CinematicError(f"{folder}: model_index.json layout lacks the {component}/ folder")
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    schedule = parse_schedule_config(read_json(scheduler_file), scheduler_file) if scheduler_file.is_file() else None
    unet_file, text_file, vae_file = (folder / c / "config.json" for c in ("unet", "text_encoder", "vae"))
    unet_json = read_json(unet_file)
    trained = parse_sample_size(unet_json, unet_file)
    with config_file(folder):
        config = ModelConfig(
            unet=parse_unet_config(unet_json, unet_file),
            text_encoder=parse_text_encoder_config(read_json(text_file), text_file),
            vae=parse_vae_config(read_json(vae_file), vae_file),
            schedule=schedule or ScheduleConfig(),
            defaults=Defaults() if trained is None else Defaults(height=trained[0], width=trained[1]),
        )
    files = {c: find_weight_file(folder / c, c, variant) for c in ("unet", "text_encoder", "vae")}
    readers = {
        "unet": lambda dtype=None: read_weights(files["unet"], dtype),
        "vae": lambda dtype=None: read_weights(files["vae"], dtype),
        "text_encoder": lambda dtype=None: strip_text_model_prefix(read_weights(files["text_encoder"], dtype)),
    }
    return Source("diffusers", folder, config, files, readers, folder / "tokenizer")
