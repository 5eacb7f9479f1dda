"""OpenCLIP text tower (ModelScope's ``open_clip_pytorch_model.bin``) to ``TextEncoder`` keys.

Rules from reference-model.md section 8.2 (diffusers' ``convert_open_clip_checkpoint``): plain renames, the fused
attention ``in_proj`` split by rows into q, k, v, and everything the text encoder does not use dropped: the image
tower, the projection heads, the stored causal mask, and the resblocks past ``layers`` (the penultimate-layer cut).
"""

from __future__ import annotations

import re

import torch

from cinematic.errors import CinematicError

# OpenCLIP key -> ours, outside the resblocks.
TOP_RENAMES = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}

# Module inside ``transformer.resblocks.{i}`` -> module inside ``encoder.layers.{i}``; weight and bias alike.
LAYER_RENAMES = {
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}

# The one reshape: ``attn.in_proj_{weight,bias}`` [3*width, ...] -> rows [0:w] q, [w:2w] k, [2w:3w] v.
IN_PROJ_SPLIT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

# Present in the file, unused by the text encoder.
DROPPED = {"text_projection", "logit_scale", "attn_mask"}
DROPPED_PREFIXES = ("visual.",)

_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def convert_openclip_text(state_dict: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """Convert an OpenCLIP CLIP state dict to ``TextEncoder`` keys, keeping resblocks ``0..layers-1``.

    Strict: a key the tables do not know, or a key the text encoder needs but the file lacks, is an error.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        if key in TOP_RENAMES:
            out[TOP_RENAMES[key]] = tensor
        elif key in DROPPED or key.startswith(DROPPED_PREFIXES):
            continue
        elif (match := _RESBLOCK.fullmatch(key)) is None:
            unknown.append(key)
        elif int(match.group(1)) < layers:  # resblocks past the penultimate-layer cut are dropped
            converted = _convert_layer_param(f"encoder.layers.{match.group(1)}", match.group(2), tensor)
            if converted is None:
                unknown.append(key)
            out.update(converted or {})
    if unknown:
        raise CinematicError(f"unknown keys in OpenCLIP text weights: {sorted(unknown)}")
    missing = sorted(expected_keys(layers) - out.keys())
    if missing:
        raise CinematicError(f"OpenCLIP text weights lack {len(missing)} keys, e.g. {missing[:4]}")
    return out


def _convert_layer_param(prefix: str, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """One resblock parameter (``name`` relative to the block) as our keys; None when the name is unknown."""
    if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
        param = name.removeprefix("attn.in_proj_")
        if tensor.shape[0] % 3:
            raise CinematicError(f"{prefix}: in_proj has {tensor.shape[0]} rows, not a multiple of 3 (q, k, v)")
        # clone: views of one fused tensor would share storage, which safetensors refuses to save
        return {f"{prefix}.{part}.{param}": t.clone() for part, t in zip(IN_PROJ_SPLIT, tensor.chunk(3, dim=0))}
    module, _, param = name.rpartition(".")
    if module not in LAYER_RENAMES or param not in ("weight", "bias"):
        return None
    return {f"{prefix}.{LAYER_RENAMES[module]}.{param}": tensor}


def expected_keys(layers: int) -> set[str]:
    """The ``TextEncoder`` keys a ``layers``-layer conversion must produce."""
    keys = set(TOP_RENAMES.values())
    for i in range(layers):
        for module in (*LAYER_RENAMES.values(), *IN_PROJ_SPLIT):
            keys |= {f"encoder.layers.{i}.{module}.weight", f"encoder.layers.{i}.{module}.bias"}
    return keys
