"""T2V-Turbo's LoRA files (``unet_lora.pt`` of ``jiachenli-ucsb/T2V-Turbo-MS``): an ordered list without names.

The format, as T2V-Turbo writes and reads it (``Ji4chenLi/t2v-turbo``: ``utils/lora.py``, ``app_ms.py``):

- ``torch.save`` of a plain list of float32 tensors ``[up0, down0, up1, down1, ...]``, one pair per module of the
  UNet whose class is *exactly* ``nn.Linear``, ``nn.Conv2d`` or ``nn.Conv3d`` (subclasses are skipped), in the
  ``named_modules()`` order of its UNet (``model_scope/unet_3d_condition.py``, diffusers 0.30 blocks) built with
  ``time_cond_proj_dim=256``;
- rank 32, capped per layer at ``min(in, out)`` (``conv_in`` and ``conv_out`` get 4), applied at scale 1 (no alpha);
- a convolution's ``down`` has the layer's own kernel, its ``up`` is 1x1.

Our module names are diffusers', so the reference order is our layers' order but for two places where that UNet
registers modules in another order than it runs them: ``up_blocks`` before ``mid_block`` (diffusers creates both
ModuleLists before the middle block), and ``time_embedding.cond_proj`` between ``linear_1`` and ``linear_2``.
``FrameConv`` is our stand-in for the reference's ``nn.Conv3d`` (same weight, same keys). tests/test_fewstep_unet.py
checks this order against diffusers' ``UNet3DConditionModel`` module for module.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from cinematic.errors import CinematicError
from cinematic.models import lora_adapters
from cinematic.models.unet3d_blocks import FrameConv
from cinematic.weights.lora_formats import AdapterState

FILE_NAME = "unet_lora.pt"
SUFFIXES = (".pt", ".pth", ".bin")
GUIDANCE_WIDTH = 256  # the student's time_cond_proj_dim (app_ms.py)
# Top-level modules in the reference's registration order; the shapes model's extra modules are not in it.
REFERENCE_ORDER = ("conv_in", "time_embedding", "transformer_in", "down_blocks", "up_blocks", "mid_block", "conv_out")
TIME_EMBEDDING_ORDER = ("linear_1", "cond_proj", "linear_2")
# The reference's classes, and ours that stand for them.
_KINDS = {nn.Linear: "Linear", nn.Conv2d: "Conv2d", nn.Conv3d: "Conv3d", FrameConv: "Conv3d"}


def turbo_file(path: Path) -> Path | None:
    """The T2V-Turbo LoRA file that ``path`` is or holds (``unet_lora.pt``), else None."""
    if path.is_dir():
        return path / FILE_NAME if (path / FILE_NAME).is_file() else None
    return path if path.suffix in SUFFIXES else None


def reference_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """The layers a T2V-Turbo LoRA adapts, by module name, in the reference's order."""
    extra = [name for name, _ in unet.named_children() if name not in REFERENCE_ORDER]
    adapted = [name for name in extra if any(type(m) in _KINDS for m in getattr(unet, name).modules())]
    if adapted:
        raise CinematicError(
            f"T2V-Turbo LoRAs are for the published UNet; this one also has {', '.join(adapted)} (a shapes model)"
        )
    layers: dict[str, nn.Module] = {}
    for top in REFERENCE_ORDER:
        if top == "time_embedding":
            parts = [(f"{top}.{n}", getattr(unet.time_embedding, n, None)) for n in TIME_EMBEDDING_ORDER]
        else:
            parts = list(getattr(unet, top).named_modules(prefix=top))
        for name, module in parts:
            # Adapters already attached (nn.Linear too) are not layers of the model.
            if type(module) in _KINDS and lora_adapters.ADAPTERS not in name.split("."):
                layers[name] = module
    return layers


def read_turbo_lora(path: Path) -> list[torch.Tensor]:
    """The tensors of a ``unet_lora.pt``, read with ``torch.load(weights_only=True)`` (nothing in it is executed)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CinematicError(f"cannot read {path} as a T2V-Turbo LoRA (a list of tensors): {first}") from None
    if not isinstance(data, list | tuple) or not all(isinstance(t, torch.Tensor) for t in data):
        raise CinematicError(
            f"{path} is not a T2V-Turbo LoRA: expected a list of tensors [up, down, ...], found {type(data).__name__}"
        )
    if not data:
        raise CinematicError(f"{path} holds an empty list: no LoRA layers")
    return [t.float() for t in data]


def _file_rank(tensors: list[torch.Tensor], layers: list[tuple[str, nn.Module]]) -> int:
    """The file's rank: that of its first layer wider than it (a narrower layer has its width instead), read from
    the start of the list, where a shifted or damaged tensor later on cannot mislead it."""
    seen = []
    for (name, layer), down in zip(layers, tensors[1::2]):
        if down.ndim < 2:
            break
        if down.shape[0] < min(lora_adapters.features(name, layer)):
            return down.shape[0]
        seen.append(down.shape[0])
    return max(seen, default=0)


def convert_turbo_lora(tensors: list[torch.Tensor], unet: nn.Module, what: str) -> AdapterState:
    """The ordered list -> ``{layer: (down, up, alpha)}`` for ``unet`` (which must have the guidance embedding),
    checking every shape and the count; the error names the first layer that does not fit."""
    layers = list(reference_layers(unet).items())
    rank = _file_rank(tensors, layers)
    state: AdapterState = {}
    for i, (name, layer) in enumerate(layers[: len(tensors) // 2]):
        up, down = tensors[2 * i], tensors[2 * i + 1]
        n_in, n_out = lora_adapters.features(name, layer)
        down_shape, up_shape = lora_adapters.pair_shapes(name, layer, min(rank, n_in, n_out))
        if (tuple(up.shape), tuple(down.shape)) != (up_shape, down_shape):
            raise CinematicError(
                f"{what}: tensors {2 * i} and {2 * i + 1} are the up and down of layer {name} "
                f"({_KINDS[type(layer)]} {n_in}->{n_out}), which takes {list(up_shape)} and {list(down_shape)}, "
                f"not {list(up.shape)} and {list(down.shape)}"
            )
        state[name] = (down, up, float(down.shape[0]))  # alpha = rank: the update at scale 1, as the reference
    expected = 2 * len(layers)
    if len(tensors) < expected:
        missing = layers[len(tensors) // 2][0]
        raise CinematicError(
            f"{what} holds {len(tensors)} tensors, but this UNet's {len(layers)} layers take {expected}: "
            f"it ends before layer {missing} is complete (a truncated file?)"
        )
    if len(tensors) > expected:
        raise CinematicError(
            f"{what} holds {len(tensors)} tensors, {len(tensors) - expected} more than the {expected} of this "
            f"UNet's {len(layers)} layers, whose last is {layers[-1][0]}"
        )
    return state
