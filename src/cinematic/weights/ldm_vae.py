"""LDM / ModelScope ``AutoencoderKL`` state dict (``VQGAN_autoencoder.pth``) -> cinematic ``VAE`` state dict.

ModelScope ships the VAE inside a PyTorch-Lightning checkpoint of a whole latent-diffusion model: its ``state_dict``
also holds the UNet and text encoder, and the VAE's keys carry a ``first_stage_model.`` prefix. Take the VAE with
``strip_first_stage(ckpt["state_dict"])`` and rename it with ``convert_ldm_vae``. Our keys are diffusers' keys, so
the rules are those of diffusers' ``convert_ldm_vae_checkpoint`` (see reference-model.md §8.3).
"""

from __future__ import annotations

import re

import torch

from cinematic.errors import CinematicError

FIRST_STAGE_PREFIX = "first_stage_model."

# LDM key -> cinematic key. `{i}` is a level index, `{j}` a block index, `{side}` encoder or decoder, `{p}` weight
# or bias. LDM stores the decoder levels finest first (`up.0` is full resolution) while we store them in the order
# they run, coarsest first, so `{rev}` is `n_levels - 1 - i`.
RENAMES: dict[str, str] = {
    "{side}.conv_in.{p}": "{side}.conv_in.{p}",
    "{side}.conv_out.{p}": "{side}.conv_out.{p}",
    "{side}.norm_out.{p}": "{side}.conv_norm_out.{p}",
    "{side}.mid.block_1.{res}.{p}": "{side}.mid_block.resnets.0.{res}.{p}",
    "{side}.mid.block_2.{res}.{p}": "{side}.mid_block.resnets.1.{res}.{p}",
    "{side}.mid.attn_1.{attn}.{p}": "{side}.mid_block.attentions.0.{attn}.{p}",
    "encoder.down.{i}.block.{j}.{res}.{p}": "encoder.down_blocks.{i}.resnets.{j}.{res}.{p}",
    "encoder.down.{i}.downsample.conv.{p}": "encoder.down_blocks.{i}.downsamplers.0.conv.{p}",
    "decoder.up.{i}.block.{j}.{res}.{p}": "decoder.up_blocks.{rev}.resnets.{j}.{res}.{p}",
    "decoder.up.{i}.upsample.conv.{p}": "decoder.up_blocks.{rev}.upsamplers.0.conv.{p}",
    "quant_conv.{p}": "quant_conv.{p}",
    "post_quant_conv.{p}": "post_quant_conv.{p}",
}
# Names inside a ResNet block (`{res}`) and inside the mid-block attention (`{attn}`).
RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
ATTENTION_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# The only reshape: LDM's attention projections are 1x1 convs [C,C,1,1]; ours are Linear layers [C,C].
SQUEEZED_TO_LINEAR = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")

_FIELDS = {
    "side": "encoder|decoder",
    "i": r"\d+",
    "j": r"\d+",
    "p": "weight|bias",
    "res": "|".join(RESNET_PARTS),
    "attn": "|".join(ATTENTION_PARTS),
}


def _compile(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for field, alternatives in _FIELDS.items():
        pattern = pattern.replace(re.escape("{" + field + "}"), f"(?P<{field}>{alternatives})")
    return re.compile(pattern)


_RULES = [(_compile(source), target) for source, target in RENAMES.items()]


def strip_first_stage(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keeps the ``first_stage_model.*`` entries of a latent-diffusion state dict, with the prefix removed."""
    vae = {k.removeprefix(FIRST_STAGE_PREFIX): v for k, v in state_dict.items() if k.startswith(FIRST_STAGE_PREFIX)}
    if not vae:
        raise CinematicError(f"no '{FIRST_STAGE_PREFIX}*' keys in this checkpoint: it holds no LDM VAE")
    return vae


def convert_ldm_vae(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames an LDM ``AutoencoderKL`` state dict (prefix already stripped) to cinematic / diffusers keys.

    Pure: the input is not modified and tensors are not copied (the squeezed ones are views). Any key outside the
    rename table, e.g. attention inside a resolution level, which our VAE does not have, is an error naming it.
    """
    levels = {int(m.group(1)) for k in state_dict if (m := re.match(r"decoder\.up\.(\d+)\.", k))}
    n_levels = max(levels) + 1 if levels else 0
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new_key = _rename(key, n_levels)
        if SQUEEZED_TO_LINEAR.fullmatch(key):
            if tensor.ndim != 4 or tensor.shape[2:] != (1, 1):
                raise CinematicError(f"LDM VAE key {key} should be a 1x1 conv weight, got shape {list(tensor.shape)}")
            tensor = tensor[:, :, 0, 0]
        if new_key in converted:
            raise CinematicError(f"LDM VAE keys collide on {new_key} (at {key})")
        converted[new_key] = tensor
    return converted


def _rename(key: str, n_levels: int) -> str:
    for pattern, target in _RULES:
        if (m := pattern.fullmatch(key)) is None:
            continue
        fields = m.groupdict()
        if "res" in fields:
            fields["res"] = RESNET_PARTS[fields["res"]]
        if "attn" in fields:
            fields["attn"] = ATTENTION_PARTS[fields["attn"]]
        if "i" in fields:
            fields["rev"] = str(n_levels - 1 - int(fields["i"]))
        return target.format(**fields)
    raise CinematicError(f"unknown LDM VAE key: {key}")
