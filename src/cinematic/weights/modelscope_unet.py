"""ModelScope ``UNetSD`` state dict (``text2video_pytorch_model.pth``) -> :class:`cinematic.models.unet3d.UNet3D`.

ModelScope numbers its modules as flat lists (``input_blocks.{k}.{m}``, ``middle_block.{m}``,
``output_blocks.{k}.{m}``); ours are grouped per level as in diffusers (``down_blocks.{level}.resnets.{layer}``...).
The module-level rename table is derived from the config by walking the two layouts in the same order; within a
ResBlock a fixed table renames the parameters. Tensors are copied unchanged except the temporal transformers'
proj_in/proj_out, Conv1d(k=1) in ModelScope and Linear here (34 tensors in the full model). Any key outside
the table, and any key or shape the model expects but does not get, is an error naming the keys.
"""

from __future__ import annotations

import torch

from cinematic.errors import CinematicError
from cinematic.models.unet3d import UNET_FULL, UNet3D, UNet3DConfig

StateDict = dict[str, torch.Tensor]

# Module prefixes that do not depend on the config.
_TOP_LEVEL = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "input_blocks.0.1": "transformer_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}

# Inside a ResBlock (ModelScope nn.Sequential indices -> diffusers names). ``temopral_conv`` (sic) is not renamed
# here: it moves out of the resnet to the sibling ``temp_convs`` list, see ``_resnet``.
_RESNET_RENAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _resnet(ms: str, ours: str, layer: int) -> dict[str, str]:
    """A ModelScope ResBlock ``ms`` -> our resnet ``{ours}.resnets.{layer}`` and its temporal conv."""
    return {
        ms: f"{ours}.resnets.{layer}",
        f"{ms}.temopral_conv": f"{ours}.temp_convs.{layer}",
    }


def _transformers(ms: str, ours: str, layer: int) -> dict[str, str]:
    """ModelScope puts the spatial then the temporal transformer at positions 1 and 2 of a block's list."""
    return {f"{ms}.1": f"{ours}.attentions.{layer}", f"{ms}.2": f"{ours}.temp_attentions.{layer}"}


def module_renames(config: UNet3DConfig) -> dict[str, str]:
    """ModelScope module prefix -> our module prefix, for every module of a UNet with this config."""
    table = dict(_TOP_LEVEL)
    n = len(config.levels)
    k = 1  # input_blocks.0 is conv_in + transformer_in
    for level, spec in enumerate(config.levels):
        for layer in range(config.layers_per_block):
            table |= _resnet(f"input_blocks.{k}.0", f"down_blocks.{level}", layer)
            if spec.attention:
                table |= _transformers(f"input_blocks.{k}", f"down_blocks.{level}", layer)
            k += 1
        if level < n - 1:  # the downsampler is an input block of its own
            table[f"input_blocks.{k}.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            k += 1
    table |= _resnet("middle_block.0", "mid_block", 0)
    table |= {"middle_block.1": "mid_block.attentions.0", "middle_block.2": "mid_block.temp_attentions.0"}
    table |= _resnet("middle_block.3", "mid_block", 1)
    k = 0
    for i, spec in enumerate(reversed(config.levels)):
        for layer in range(config.layers_per_block + 1):
            table |= _resnet(f"output_blocks.{k}.0", f"up_blocks.{i}", layer)
            if spec.attention:
                table |= _transformers(f"output_blocks.{k}", f"up_blocks.{i}", layer)
            k += 1
        if i < n - 1:  # the upsampler is the last module inside the level's last output block
            position = 3 if spec.attention else 1
            table[f"output_blocks.{k - 1}.{position}"] = f"up_blocks.{i}.upsamplers.0"
    return table


def conv1d_to_linear_keys(config: UNet3DConfig) -> list[str]:
    """Our keys whose ModelScope tensor is a Conv1d(k=1) weight ``[out, in, 1]``: the temporal transformers'
    ``proj_in``/``proj_out``. Spatial transformers already use Linear in ModelScope."""
    temporal = [ours for ours in module_renames(config).values() if _container(ours) == "temp_attentions"]
    return [f"{m}.{p}.weight" for m in ["transformer_in", *temporal] for p in ("proj_in", "proj_out")]


def _container(module: str) -> str:
    """The list a module sits in: ``down_blocks.0.resnets.1`` -> ``resnets``; ``conv_in`` -> ``""``."""
    parts = module.split(".")
    return parts[-2] if len(parts) > 1 else ""


def _rename(key: str, table: dict[str, str]) -> str | None:
    """Longest module prefix of ``key`` in ``table`` -> our key; ``None`` when nothing matches."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        ours = table.get(".".join(parts[:cut]))
        if ours is None:
            continue
        rest = ".".join(parts[cut:])
        if _container(ours) == "resnets":  # parameter names inside a ResBlock change too
            module, _, leaf = rest.rpartition(".")
            if module not in _RESNET_RENAMES:
                return None
            rest = f"{_RESNET_RENAMES[module]}.{leaf}"
        return f"{ours}.{rest}"
    return None


def _expected_shapes(config: UNet3DConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return {k: v.shape for k, v in UNet3D(config).state_dict().items()}


def convert_modelscope_unet(state_dict: StateDict, config: UNet3DConfig = UNET_FULL) -> StateDict:
    """Rename (and reshape) a ModelScope ``UNetSD`` state dict to :class:`UNet3D` keys; strict both ways."""
    table = module_renames(config)
    reshaped = set(conv1d_to_linear_keys(config))
    expected = _expected_shapes(config)
    out: StateDict = {}
    unknown = []
    for key, value in state_dict.items():
        ours = _rename(key, table)
        if ours is None or ours not in expected:
            unknown.append(key)
            continue
        if ours in reshaped and value.ndim == 3 and value.shape[-1] == 1:
            value = value[:, :, 0]  # Conv1d(k=1) [out,in,1] -> Linear [out,in]
        out[ours] = value
    if unknown:
        raise CinematicError(f"ModelScope UNet: unexpected keys {_preview(unknown)}")
    missing = [k for k in expected if k not in out]
    if missing:
        raise CinematicError(f"ModelScope UNet: missing keys (after renaming) {_preview(missing)}")
    bad = [f"{k} {tuple(v.shape)} != {tuple(expected[k])}" for k, v in out.items() if v.shape != expected[k]]
    if bad:
        raise CinematicError(f"ModelScope UNet: shape mismatches (config does not fit the weights): {_preview(bad)}")
    return out


def _preview(items: list[str], limit: int = 8) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
