"""Tiny random-weight reference models, saved in each published layout, for loader and pipeline tests.

The references are built with the packages that wrote the published files (diffusers, transformers, modelscope),
so a loader that reads these folders reads the real ones the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.clip_vocab import write_tiny_clip_vocab

SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "thresholding": False,
    "skip_prk_steps": True,
}


def randomize_zero_params(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give zero-initialised layers (temporal conv4, proj_out...) random values, so parity tests see every path."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return module


def diffusers_components(vocab_dir: Path, cross_attention_dim: int = 32):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet3DConditionModel(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
        sample_size=4,  # 32-pixel videos by default, so tests can run small
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=16,
    )
    tokenizer = CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"), pad_token="!")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cross_attention_dim,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=0,
        )
    )
    for module in (unet, vae, text_encoder):
        randomize_zero_params(module)
        module.eval()
    scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def make_diffusers_folder(
    folder: Path, safe_serialization: bool = True, variant: str | None = None, tokenizer_json: bool = False
) -> Path:
    """A tiny ``TextToVideoSDPipeline`` saved with ``save_pretrained``; returns the folder.

    transformers 5 saves the tokenizer as ``tokenizer.json``; the published repos hold transformers 4's
    ``vocab.json`` + ``merges.txt`` + ``special_tokens_map.json``. ``tokenizer_json`` picks the first, else the second.
    """
    from diffusers import TextToVideoSDPipeline

    vocab_dir = write_tiny_clip_vocab(folder.parent / f"{folder.name}-vocab")
    pipe = TextToVideoSDPipeline(**diffusers_components(vocab_dir))
    if variant == "fp16":
        pipe.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
    if not tokenizer_json:
        write_published_tokenizer(folder / "tokenizer")
    write_published_scheduler(folder / "scheduler")
    return folder


def write_published_tokenizer(folder: Path) -> Path:
    """Replace what transformers 5 saved (tokenizer.json) by the files the published repos hold: transformers 4's
    vocab.json + merges.txt + special_tokens_map.json (pad "!") + tokenizer_config.json (77 tokens)."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    write_tiny_clip_vocab(folder)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
               "unk_token": "<|endoftext|>"}  # fmt: skip
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = {"model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def write_published_scheduler(folder: Path) -> Path:
    """save_pretrained writes every default (timestep_spacing "leading" among them); the published file names only
    these keys, and what it leaves out decides the spacing of schedulers made from it with from_config."""
    published = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.15.0.dev0", **SCHEDULER_CONFIG}
    (folder / "scheduler_config.json").write_text(json.dumps(published, indent=2))
    return folder


def add_text_model_prefix(folder: Path) -> None:
    """Rewrite text_encoder weights with transformers 4's ``text_model.`` key prefix, as the published files have."""
    from safetensors.torch import load_file, save_file

    for path in (folder / "text_encoder").glob("*.safetensors"):
        state = load_file(str(path))
        save_file({f"text_model.{k}": v for k, v in state.items()}, str(path), metadata={"format": "pt"})
    for path in (folder / "text_encoder").glob("*.bin"):
        state = torch.load(path, weights_only=True)
        torch.save({f"text_model.{k}": v for k, v in state.items()}, path)


MODELSCOPE_TINY_CFG = {
    "type": "latent-text-to-video-synthesis-model",
    "unet_in_dim": 4,
    "unet_dim": 32,
    "unet_y_dim": 32,
    "unet_context_dim": 1024,  # UNetSD hard-codes 1024 for its decoder cross-attention
    "unet_out_dim": 4,
    "unet_dim_mult": [1, 2],
    "unet_num_heads": 8,
    "unet_head_dim": 8,
    "unet_res_blocks": 1,
    "unet_attn_scales": [1],
    "unet_dropout": 0.1,
    "temporal_attention": "True",
    "num_timesteps": 1000,
    "mean_type": "eps",
    "var_type": "fixed_small",
    "loss_type": "mse",
}
MODELSCOPE_TINY_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 64,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def build_unetsd(cfg: dict, temporal_attention: bool = True):
    """ModelScope's ``UNetSD`` from a ``model_cfg`` dict, as its ``TextToVideoSynthesis`` builds it."""
    from modelscope.models.multi_modal.video_synthesis.unet_sd import UNetSD

    return UNetSD(
        in_dim=cfg["unet_in_dim"],
        dim=cfg["unet_dim"],
        y_dim=cfg["unet_y_dim"],
        context_dim=cfg["unet_context_dim"],
        out_dim=cfg["unet_out_dim"],
        dim_mult=cfg["unet_dim_mult"],
        num_heads=cfg["unet_num_heads"],
        head_dim=cfg["unet_head_dim"],
        num_res_blocks=cfg["unet_res_blocks"],
        attn_scales=cfg["unet_attn_scales"],
        dropout=cfg["unet_dropout"],
        temporal_attention=temporal_attention,
    )


def modelscope_unet(cfg: dict = MODELSCOPE_TINY_CFG):
    unet = build_unetsd(cfg)
    return randomize_zero_params(unet).eval()


def modelscope_vae(ddconfig: dict = MODELSCOPE_TINY_DDCONFIG):
    from modelscope.models.multi_modal.video_synthesis.autoencoder import AutoencoderKL

    return randomize_zero_params(AutoencoderKL(ddconfig, ddconfig["z_channels"])).eval()


def openclip_text_state(width: int = 64, layers: int = 3, vocab: int = 64, mlp: int = 128) -> dict:
    """An OpenCLIP text tower's state dict (``layers`` resblocks), with the vision keys a real file also holds."""
    g = torch.Generator().manual_seed(1)

    def r(*shape, scale=0.05):
        return torch.randn(shape, generator=g) * scale

    state = {"token_embedding.weight": r(vocab, width, scale=0.5), "positional_embedding": r(77, width, scale=0.1)}
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        state |= {
            p + "ln_1.weight": 1 + r(width), p + "ln_1.bias": r(width),
            p + "attn.in_proj_weight": r(3 * width, width, scale=0.2), p + "attn.in_proj_bias": r(3 * width),
            p + "attn.out_proj.weight": r(width, width, scale=0.2), p + "attn.out_proj.bias": r(width),
            p + "ln_2.weight": 1 + r(width), p + "ln_2.bias": r(width),
            p + "mlp.c_fc.weight": r(mlp, width, scale=0.2), p + "mlp.c_fc.bias": r(mlp),
            p + "mlp.c_proj.weight": r(width, mlp, scale=0.2), p + "mlp.c_proj.bias": r(width),
        }  # fmt: skip
    state |= {
        "ln_final.weight": 1 + r(width), "ln_final.bias": r(width), "text_projection": r(width, width),
        "logit_scale": torch.tensor(4.6), "visual.conv1.weight": r(8, 3, 4, 4), "visual.class_embedding": r(8),
    }  # fmt: skip
    return state


class ModelCheckpoint:
    """Stands for pytorch_lightning's callback object that Lightning pickles into its checkpoints."""

    def __init__(self):
        self.monitor, self.best_model_score = "val/loss", None


def lightning_checkpoint(vae_state: dict) -> dict:
    """A dict shaped like ModelScope's VQGAN_autoencoder.pth: Lightning bookkeeping around a whole LDM state dict."""
    import numpy as np

    state = {f"first_stage_model.{k}": v for k, v in vae_state.items()}
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)
    state["cond_stage_model.model.positional_embedding"] = torch.zeros(77, 8)
    return {
        "epoch": 3,
        "global_step": np.int64(1200),
        "pytorch-lightning_version": "1.4.2",
        "state_dict": state,
        "callbacks": {ModelCheckpoint: ModelCheckpoint()},
        "loops": {"fit": np.array([1.0, 2.0])},
    }


def save_lightning_checkpoint(checkpoint: dict, path: Path, legacy: bool = False) -> None:
    """torch.save the checkpoint so that its pickle names ``pytorch_lightning...ModelCheckpoint`` like the real one
    (``legacy``: in the pre-1.6 format, not a zip file)."""
    import sys
    import types

    name = "pytorch_lightning.callbacks.model_checkpoint"
    packages = ["pytorch_lightning", "pytorch_lightning.callbacks", name]
    for package in packages:
        sys.modules[package] = types.ModuleType(package)
    sys.modules[name].ModelCheckpoint = ModelCheckpoint
    saved = ModelCheckpoint.__module__
    ModelCheckpoint.__module__ = name
    try:
        torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    finally:
        ModelCheckpoint.__module__ = saved
        for package in packages:
            del sys.modules[package]


def make_modelscope_folder(folder: Path, with_tokenizer: bool = True) -> Path:
    """A tiny folder in the original ModelScope layout; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab_dir = write_tiny_clip_vocab(
        folder / "tokenizer" if with_tokenizer else folder.parent / f"{folder.name}-vocab"
    )
    vocab_size = len(json.loads((vocab_dir / "vocab.json").read_text()))
    torch.save(modelscope_unet().state_dict(), folder / "text2video_pytorch_model.pth")
    clip = openclip_text_state(width=MODELSCOPE_TINY_CFG["unet_context_dim"], vocab=vocab_size)
    torch.save(clip, folder / "open_clip_pytorch_model.bin")
    save_lightning_checkpoint(lightning_checkpoint(modelscope_vae().state_dict()), folder / "VQGAN_autoencoder.pth")
    configuration = {
        "framework": "pytorch",
        "task": "text-to-video-synthesis",
        "model": {
            "type": "latent-text-to-video-synthesis",
            "model_args": {
                "ckpt_clip": "open_clip_pytorch_model.bin",
                "ckpt_unet": "text2video_pytorch_model.pth",
                "ckpt_autoencoder": "VQGAN_autoencoder.pth",
                "max_frames": 16,
                "tiny_gpu": 1,
            },
            "model_cfg": MODELSCOPE_TINY_CFG,
        },
        "pipeline": {"type": "latent-text-to-video-synthesis"},
    }
    (folder / "configuration.json").write_text(json.dumps(configuration, indent=2))
    return folder


# --- hostile pictures: tiny files that declare huge frames (issue 23) ------------------------------------------


def bomb_gif(width: int = 16000, height: int = 16000, frames: int = 1) -> bytes:
    """A GIF whose logical screen is ``width`` x ``height`` and whose ``frames`` images are 1x1 pixel: 43 bytes for
    one frame, and a decoder that trusts it allocates the whole canvas (16000x16000 RGBA: 1 GB) for every frame."""
    import struct

    screen = struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"  # 2-colour table
    delay = b"\x21\xf9\x04\x00\x0a\x00\x00\x00"  # graphic control extension: 10 cs per frame
    image = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"  # 1x1, LZW min code size 2
    return b"GIF89a" + screen + (delay + image) * frames + b"\x3b"


def bomb_png(width: int = 16000, height: int = 16000) -> bytes:
    """A 68-byte PNG whose header declares ``width`` x ``height`` RGB (768 MB at 16000x16000) and holds 10 bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def bomb_webp(side: int = 16000) -> bytes:
    """An animated WebP of two 4x4 frames whose canvas (VP8X) declares ``side`` x ``side``."""
    import io

    from PIL import Image

    frames = [Image.new("RGB", (4, 4), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"VP8X"  # RIFF, size, WEBP, then the extended header: flags, 3 reserved, w-1, h-1
    data[24:27] = data[27:30] = (side - 1).to_bytes(3, "little")
    return bytes(data)


def write_tiny_model(folder: Path, clip: tuple[int, int, int] = (4, 32, 32)) -> Path:
    """A fresh tiny model (random weights, seed 0) written in cinematic's format as ``folder/model``, trained size
    ``clip`` (frames, height, width), its tokenizer learnt on two shapes captions."""
    from cinematic.models.presets import PRESETS
    from cinematic.train.setup import fresh_model, with_clip_size
    from cinematic.weights.native import write_native

    model = fresh_model(PRESETS["tiny"], ["a red circle moving left", "a blue square moving up"], None, seed=0)
    config = with_clip_size(model.config, *clip)
    tokenizer = model.tokenizer.save(folder / "tokenizer-src")
    states = {name: (lambda n=name: getattr(model, n).state_dict()) for name in ("unet", "text_encoder", "vae")}
    return write_native(folder / "model", config, states, tokenizer, torch.float32)
