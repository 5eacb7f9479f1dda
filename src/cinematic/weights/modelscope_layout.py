"""The original ModelScope layout: ``configuration.json``, ``text2video_pytorch_model.pth`` (the UNet),
``open_clip_pytorch_model.bin`` (the whole OpenCLIP ViT-H/14) and ``VQGAN_autoencoder.pth`` (a Lightning checkpoint
whose ``state_dict`` holds the VAE under ``first_stage_model.``).

The UNet config comes from ``model_cfg`` in configuration.json; the text encoder and VAE configs are hard-coded in
the original code (ViT-H/14, SD KL-f8), so we read their sizes off the tensors' shapes instead, which also serves
smaller checkpoints built the same way.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cinematic.errors import CinematicError
from cinematic.models.checks import (
    MAX_CHANNELS,
    MAX_LAYERS_PER_BLOCK,
    MAX_LEVELS,
    config_file,
    integer,
    integers,
    mapping,
    number,
)
from cinematic.models.components import Defaults, ModelConfig
from cinematic.models.text_encoder import TextEncoderConfig
from cinematic.models.unet3d import UNet3DConfig, UNetLevel
from cinematic.models.vae import VAEConfig
from cinematic.settings import spec
from cinematic.weights.files import StateDict, member_file, read_json, read_torch
from cinematic.weights.ldm_vae import convert_ldm_vae, strip_first_stage
from cinematic.weights.modelscope_unet import convert_modelscope_unet
from cinematic.weights.openclip import convert_openclip_text
from cinematic.weights.pickle_safe import load_checkpoint
from cinematic.weights.source import Source, find_tokenizer

DEFAULT_FILES = {
    "unet": "text2video_pytorch_model.pth",
    "text_encoder": "open_clip_pytorch_model.bin",
    "vae": "VQGAN_autoencoder.pth",
}
_CKPT_ARGS = {"unet": "ckpt_unet", "text_encoder": "ckpt_clip", "vae": "ckpt_autoencoder"}
OPENCLIP_HEAD_WIDTH = 64  # open_clip derives the text tower's head count as width // 64; the weights cannot tell us
LDM_NORM_GROUPS = 32  # the LDM autoencoder's Normalize() is GroupNorm(32) unconditionally
_MODEL_CFG_USED = {
    "unet_in_dim", "unet_out_dim", "unet_dim", "unet_dim_mult", "unet_res_blocks", "unet_attn_scales",
    "unet_head_dim", "unet_num_heads", "unet_context_dim",
}  # fmt: skip
_MODEL_CFG_IGNORED = {
    "type", "unet_y_dim", "unet_dropout", "temporal_attention", "num_timesteps", "mean_type", "var_type",
    "loss_type",
}  # fmt: skip


def parse_model_cfg(cfg: dict[str, Any], where: Path) -> UNet3DConfig:
    unknown = cfg.keys() - _MODEL_CFG_USED - _MODEL_CFG_IGNORED
    if unknown:
        raise CinematicError(f"{where}: unknown model_cfg keys {sorted(unknown)} (they may change the architecture)")
    if cfg.get("mean_type", "eps") != "eps":
        raise CinematicError(f"{where}: mean_type {cfg['mean_type']!r} is not supported; allowed: 'eps'")
    if str(cfg.get("temporal_attention", True)).lower() != "true":
        raise CinematicError(f"{where}: temporal_attention must be true; this checkpoint has no temporal attention")
    with config_file(where):
        dim = integer(cfg.get("unet_dim", 320), "unet_dim", 1, MAX_CHANNELS)
        scales = cfg.get("unet_attn_scales", [1, 0.5, 0.25])
        if not isinstance(scales, list | tuple):
            raise CinematicError(f"unet_attn_scales must be a list of numbers, got {scales!r:.40}")
        scales = [number(s, "unet_attn_scales[]", 0, 1) for s in scales]
        mults = integers(cfg.get("unet_dim_mult", [1, 2, 4, 4]), "unet_dim_mult", 1, MAX_CHANNELS, MAX_LEVELS)
        # Level i works at scale 1/2**i; it has spatial attention when that scale is listed in attn_scales.
        levels = tuple(UNetLevel(dim * m, 1.0 / 2**i in scales) for i, m in enumerate(mults))
        return UNet3DConfig(
            in_channels=integer(cfg.get("unet_in_dim", 4), "unet_in_dim", 1, MAX_CHANNELS),
            out_channels=integer(cfg.get("unet_out_dim", 4), "unet_out_dim", 1, MAX_CHANNELS),
            levels=levels,
            layers_per_block=integer(cfg.get("unet_res_blocks", 2), "unet_res_blocks", 1, MAX_LAYERS_PER_BLOCK),
            head_dim=integer(cfg.get("unet_head_dim", 64), "unet_head_dim", 1, MAX_CHANNELS),
            cross_attention_dim=integer(cfg.get("unet_context_dim", 1024), "unet_context_dim", 1, MAX_CHANNELS),
            transformer_in_heads=integer(cfg.get("unet_num_heads", 8), "unet_num_heads", 1, MAX_CHANNELS),
        )


def openclip_text_config(state: StateDict, where: Path) -> TextEncoderConfig:
    try:
        vocab, width = state["token_embedding.weight"].shape
        context = state["positional_embedding"].shape[0]
        mlp_width = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as e:
        raise CinematicError(f"{where}: not an OpenCLIP text tower (missing {e})") from None
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    # ModelScope uses the penultimate layer: the last stored block is dropped.
    return TextEncoderConfig(
        vocab_size=vocab,
        context_length=context,
        width=width,
        layers=len(blocks) - 1,
        heads=width // OPENCLIP_HEAD_WIDTH,
        mlp_width=mlp_width,
    )


def ldm_vae_config(state: StateDict, where: Path) -> VAEConfig:
    try:
        levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        blocks = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
        channels = tuple(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in levels)
        return VAEConfig(
            in_channels=state["encoder.conv_in.weight"].shape[1],
            out_channels=state["decoder.conv_out.weight"].shape[0],
            latent_channels=state["post_quant_conv.weight"].shape[0],
            block_out_channels=channels,
            layers_per_block=len(blocks),
            norm_groups=LDM_NORM_GROUPS,
        )
    except KeyError as e:
        raise CinematicError(f"{where}: not an LDM autoencoder (missing {e})") from None


def _vae_state(path: Path) -> StateDict:
    checkpoint = load_checkpoint(path)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise CinematicError(f"{path}: expected a checkpoint dict with a state_dict")
    vae = strip_first_stage(state) if any(k.startswith("first_stage_model.") for k in state) else dict(state)
    if not vae:
        raise CinematicError(f"{path}: the checkpoint holds no first_stage_model.* (VAE) weights")
    return vae


def read_modelscope(folder: Path) -> Source:
    where = folder / "configuration.json"
    configuration = read_json(where)
    with config_file(where):
        model = mapping(configuration.get("model", {}), "model")
        args = mapping(model.get("model_args", {}), "model.model_args")
        cfg = mapping(model.get("model_cfg", {}), "model.model_cfg")
        max_frames = integer(args.get("max_frames", 16), "model.model_args.max_frames", 1, int(spec("num_frames").high))
    files = {
        c: member_file(folder, args.get(_CKPT_ARGS[c], DEFAULT_FILES[c]), f"{where}: model_args.{_CKPT_ARGS[c]}")
        for c in DEFAULT_FILES
    }
    for component, path in files.items():
        if not path.is_file():
            raise CinematicError(f"{folder}: the {component} weights file {path.name} is missing")
    unet_config = parse_model_cfg(cfg, where)
    # The text and VAE configs are read off tensor shapes; both files are memory-mapped, so this reads little.
    clip_state = read_torch(files["text_encoder"])
    text_config = openclip_text_config(clip_state, files["text_encoder"])
    vae_state = _vae_state(files["vae"])
    vae_config = ldm_vae_config(vae_state, files["vae"])
    with config_file(folder):
        config = ModelConfig(unet=unet_config, text_encoder=text_config, vae=vae_config, defaults=Defaults(max_frames))
    readers = {
        # torch files are memory-mapped; load_into casts them one tensor at a time.
        "unet": lambda dtype=None: convert_modelscope_unet(read_torch(files["unet"]), unet_config),
        "text_encoder": lambda dtype=None: convert_openclip_text(clip_state, text_config.layers),
        "vae": lambda dtype=None: convert_ldm_vae(vae_state),
    }
    return Source("modelscope", folder, config, files, readers, find_tokenizer(folder))
