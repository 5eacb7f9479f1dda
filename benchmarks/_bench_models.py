"""The random-weight model folders ``bench.py`` measures, one set of weights in three layouts.

- ``diffusers/``: written by diffusers' and transformers' own ``save_pretrained`` (fp16 weights, ``variant="fp16"``,
  as published), by ``load.make_diffusers_folder``;
- ``cinematic/``: ``cinematic.weights.convert`` of it (fp16);
- ``modelscope/``: the original layout, written here from the same weights by inverting cinematic's converters
  (fp32 files, as published): ``configuration.json``, ``text2video_pytorch_model.pth`` (``UNetSD``),
  ``open_clip_pytorch_model.bin`` (the text tower, one resblock more than used, as the penultimate-layer cut needs)
  and ``VQGAN_autoencoder.pth`` (the VAE under ``first_stage_model.``).

The ``full`` model is the published text-to-video-ms-1.7b; ``tiny`` is a small model that all three
implementations can build (ModelScope hard-codes GroupNorm(32) and a 1024-wide text context).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cinematic.models.components import ModelConfig
from cinematic.models.text_encoder import TextEncoderConfig
from cinematic.models.unet3d import UNet3DConfig, UNetLevel
from cinematic.models.vae import VAEConfig

BENCH_TINY = ModelConfig(
    unet=UNet3DConfig(
        levels=(UNetLevel(32, True), UNetLevel(64, True), UNetLevel(64, False)), head_dim=16, norm_groups=32
    ),
    text_encoder=TextEncoderConfig(vocab_size=1000, width=1024, layers=1, heads=16, mlp_width=1024),
    vae=VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_groups=32),
)


def model_config(name: str) -> ModelConfig:
    from cinematic.models.presets import PRESETS

    return BENCH_TINY if name == "tiny" else PRESETS[name]


def model_folders(workdir: Path, name: str) -> dict[str, Path]:
    # "full" shares load.py's folders (the same published configs); "tiny" is not load.py's tiny preset.
    base = workdir / ("full" if name == "full" else f"bench-{name}")
    return {layout: base / layout for layout in ("diffusers", "cinematic", "modelscope")}


MARKERS = {"diffusers": "model_index.json", "cinematic": "model.json", "modelscope": "configuration.json"}


def folders_complete(folders: dict[str, Path], layouts: set[str] | None = None) -> bool:
    """Whether the folders of ``layouts`` (default: all three) are written."""
    return all((folders[layout] / MARKERS[layout]).is_file() for layout in layouts or MARKERS)


def make_folders(name: str, folders: dict[str, Path], layouts: set[str] | None = None) -> None:
    """Write whichever of the folders of ``layouts`` (default: all three; the cinematic and ModelScope ones are made
    from the diffusers one) is missing, in a child process: the full model needs ~8 GB. Without the modelscope
    package installed (a GPU machine, say), leave ``modelscope`` out."""
    import torch
    from load import make_diffusers_folder

    from cinematic.weights import convert

    config = model_config(name)
    if not (folders["diffusers"] / "model_index.json").is_file():
        folders["diffusers"].parent.mkdir(parents=True, exist_ok=True)
        make_diffusers_folder(config, folders["diffusers"])
    if not (folders["cinematic"] / "model.json").is_file():
        shutil.rmtree(folders["cinematic"], ignore_errors=True)
        convert(folders["diffusers"], folders["cinematic"], dtype=torch.float16)
    if "modelscope" in (layouts or MARKERS) and not folders_complete(folders, {"modelscope"}):
        make_modelscope_folder(folders["cinematic"], folders["modelscope"])


# ---------------------------------------------------------------------------------------------------------------------
# The ModelScope layout, by inverting cinematic's converters.


def modelscope_model_cfg(unet: UNet3DConfig) -> dict[str, Any]:
    """``model_cfg`` of configuration.json for a UNet config (the inverse of ``parse_model_cfg``)."""
    dim = unet.levels[0].channels
    return {
        "type": "latent-text-to-video-synthesis-model",
        "unet_in_dim": unet.in_channels,
        "unet_dim": dim,
        "unet_y_dim": 768,  # stored but unused
        "unet_context_dim": unet.cross_attention_dim,
        "unet_out_dim": unet.out_channels,
        "unet_dim_mult": [level.channels // dim for level in unet.levels],
        "unet_num_heads": unet.transformer_in_heads,
        "unet_head_dim": unet.head_dim,
        "unet_res_blocks": unet.layers_per_block,
        "unet_attn_scales": [1 / 2**i for i, level in enumerate(unet.levels) if level.attention],
        "unet_dropout": 0.1,
        "temporal_attention": "True",
        "num_timesteps": 1000,
        "mean_type": "eps",
        "var_type": "fixed_small",
        "loss_type": "mse",
    }


def unetsd_from_cfg(cfg: dict[str, Any]):
    """ModelScope's ``UNetSD``, built from ``model_cfg`` exactly as its ``TextToVideoSynthesis`` model builds it."""
    from tests.factories import build_unetsd

    return build_unetsd(cfg, temporal_attention=cfg["temporal_attention"] == "True")


def ldm_ddconfig(vae: VAEConfig) -> dict[str, Any]:
    """The LDM ``ddconfig`` of ModelScope's ``AutoencoderKL`` for a VAE config (``ch_mult`` relative to ``ch``)."""
    ch = vae.block_out_channels[0]
    return {
        "double_z": True,
        "z_channels": vae.latent_channels,
        "resolution": 256,
        "in_channels": vae.in_channels,
        "out_ch": vae.out_channels,
        "ch": ch,
        "ch_mult": [width // ch for width in vae.block_out_channels],
        "num_res_blocks": vae.layers_per_block,
        "attn_resolutions": [],
        "dropout": 0.0,
    }


def inverse_keys(convert: Callable[[dict], dict], reference: dict) -> dict[str, str]:
    """Our key -> the reference layout's key, found by running our converter on the reference's own (meta) state
    dict: each converted tensor is the reference tensor itself or a view of it."""
    owner = {id(t): key for key, t in reference.items()}
    return {ours: owner[id(t)] if id(t) in owner else owner[id(t._base)] for ours, t in convert(reference).items()}


def openclip_state(ours: dict, layers: int) -> dict:
    """Our text encoder's state dict in OpenCLIP's layout (the inverse of ``convert_openclip_text``), with one
    resblock more than used (a copy of the last), as ModelScope's penultimate-layer file has."""
    import torch

    from cinematic.weights.openclip import IN_PROJ_SPLIT, LAYER_RENAMES, TOP_RENAMES

    state = {theirs: ours[mine] for theirs, mine in TOP_RENAMES.items()}
    for i in range(layers + 1):
        mine = f"encoder.layers.{min(i, layers - 1)}"
        block = f"transformer.resblocks.{i}"
        for theirs_module, mine_module in LAYER_RENAMES.items():
            for p in ("weight", "bias"):
                state[f"{block}.{theirs_module}.{p}"] = ours[f"{mine}.{mine_module}.{p}"]
        for p in ("weight", "bias"):
            state[f"{block}.attn.in_proj_{p}"] = torch.cat([ours[f"{mine}.{part}.{p}"] for part in IN_PROJ_SPLIT])
    return state


def make_modelscope_folder(src: Path, dst: Path) -> None:
    import torch
    from modelscope.models.multi_modal.video_synthesis.autoencoder import AutoencoderKL

    from cinematic.weights import load
    from cinematic.weights.ldm_vae import convert_ldm_vae
    from cinematic.weights.modelscope_unet import convert_modelscope_unet

    model = load(src, dtype=torch.float32)
    config = model.config
    cfg = modelscope_model_cfg(config.unet)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    with torch.device("meta"):
        reference = unetsd_from_cfg(cfg).state_dict()
    names = inverse_keys(lambda s: convert_modelscope_unet(s, config.unet), reference)
    unet = {names[k]: v.reshape(reference[names[k]].shape) for k, v in model.unet.state_dict().items()}
    torch.save(unet, tmp / "text2video_pytorch_model.pth")
    del unet, model.unet

    with torch.device("meta"):
        reference = AutoencoderKL(ldm_ddconfig(config.vae), config.vae.latent_channels).state_dict()
    names = inverse_keys(convert_ldm_vae, reference)
    vae = {
        f"first_stage_model.{names[k]}": v.reshape(reference[names[k]].shape) for k, v in model.vae.state_dict().items()
    }
    torch.save({"state_dict": vae}, tmp / "VQGAN_autoencoder.pth")

    clip = openclip_state(model.text_encoder.state_dict(), config.text_encoder.layers)
    torch.save(clip, tmp / "open_clip_pytorch_model.bin")
    shutil.copytree(src / "tokenizer", tmp / "tokenizer")
    args = {"ckpt_clip": "open_clip_pytorch_model.bin", "ckpt_unet": "text2video_pytorch_model.pth",
            "ckpt_autoencoder": "VQGAN_autoencoder.pth", "max_frames": 16, "tiny_gpu": 1}  # fmt: skip
    configuration = {
        "framework": "pytorch",
        "task": "text-to-video-synthesis",
        "model": {"type": "latent-text-to-video-synthesis", "model_args": args, "model_cfg": cfg},
        "pipeline": {"type": "latent-text-to-video-synthesis"},
    }
    (tmp / "configuration.json").write_text(json.dumps(configuration, indent=2))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
