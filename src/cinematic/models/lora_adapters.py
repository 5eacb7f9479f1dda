"""LoRA adapters on the UNet's layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation"): training adapts the attention
projections; loaded files may adapt any linear layer or convolution (a convolution's ``down`` has its kernel, ``up`` is
1x1, as in PEFT and T2V-Turbo).

A wrapped projection computes ``W x + scale * (alpha / rank) * up(down(x))``. The adapter lives beside the layer it
adapts, as ``<layer>.lora_adapters.<name>.{down,up}``, and reaches the layer's output through a forward hook, so the
base weights keep their own names and state-dict keys (a checkpoint of the base model loads unchanged) and several
adapters can be stacked. ``up`` starts at zero, so a fresh adapter leaves the model exactly as it was.

Merging adds ``scale * (alpha / rank) * up @ down`` into the layer's weight (computed in float32) after keeping a copy
of the weight, and unmerging puts that copy back: the base weights return bit for bit.

Both are changes recorded by :mod:`cinematic.models.modifications`: attaching adapter ``name`` is one (kind
``"lora"``, undone by :func:`remove`, which takes the hook and the ``lora_adapters`` container off again with the last
adapter of a layer), merging it another (kind ``"lora_merge"``, undone by :func:`unmerge`). An attached adapter is
graph-safe only while its hook adds nothing: merged into the weights, which a compiled or recorded forward reads, or
at scale 0.

Layer names are the UNet's module names, which follow diffusers' ``UNet3DConditionModel`` exactly, e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``; ``weights/lora_formats.py`` turns them into file keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cinematic.errors import CinematicError
from cinematic.models import modifications, precision
from cinematic.models.unet3d_blocks import FrameConv

# "both": the attention projections of both kinds (the default of ``cinematic train --lora``); "all": every linear
# layer and convolution of the UNet, as consistency-distilled students adapt it (``cinematic distill``, T2V-Turbo).
TARGETS = ("spatial", "temporal", "both", "all")
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
# Which attention modules each target adapts: the spatial transformers (self- and cross-attention), or the temporal
# transformers and the transformer before the first level, which attend across frames.
_TARGET_MODULES = {"spatial": ("attentions",), "temporal": ("temp_attentions", "transformer_in")}
_LAYER_KINDS = (nn.Linear, nn.Conv2d, nn.Conv3d, FrameConv)  # "all": these classes exactly (adapters' own are skipped)
ADAPTERS = "lora_adapters"  # the attribute (and state-dict key part) that holds a layer's adapters
DEFAULT_NAME = "default"


@dataclass(frozen=True)
class LoRAConfig:
    """What a trained adapter is: its rank, its alpha (the update is scaled by alpha / rank) and its layers."""

    rank: int
    alpha: float | None = None  # None: alpha = rank, an update scale of 1
    targets: str = "both"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= 1024:
            raise CinematicError(f"lora rank must be an integer from 1 to 1024, not {self.rank!r}")
        alpha = self.alpha
        if alpha is not None and (
            isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0
        ):
            raise CinematicError(f"lora alpha must be a positive number, not {alpha!r}")
        if self.targets not in TARGETS:
            raise CinematicError(f"lora targets must be one of {', '.join(TARGETS)}, not {self.targets!r}")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


def check_scale(scale: object) -> float:
    """A user's adapter strength: a finite number (0 turns the adapter off; negative values subtract it)."""
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise CinematicError(f"lora scale must be a finite number, not {scale!r}")
    return float(scale)


class Adapter(nn.Module):
    """``factor * up(down(x))`` with ``factor = scale * alpha / rank``; ``merged`` adapters add nothing here."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        scale: float = 1.0,
        conv: nn.Conv2d | nn.Conv3d | None = None,
    ):
        """A linear adapter, or with ``conv`` a convolution's: ``down`` with the layer's kernel, stride, padding and
        dilation, ``up`` 1x1 (as PEFT's and T2V-Turbo's convolution LoRAs), so ``up(down(x))`` is the convolution
        with the weight ``up @ down``."""
        super().__init__()
        if conv is None:
            self.down = nn.Linear(in_features, rank, bias=False)  # PEFT's lora_A: PyTorch's Linear init
            self.up = nn.Linear(rank, out_features, bias=False)  # PEFT's lora_B: zeros
        else:
            kind = nn.Conv3d if isinstance(conv, nn.Conv3d) else nn.Conv2d
            self.down = kind(in_features, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False)
            self.up = kind(rank, out_features, 1, bias=False)
        nn.init.zeros_(self.up.weight)
        self.rank, self.alpha, self.scale = rank, float(alpha), float(scale)
        self.merged = False
        self.original: torch.Tensor | None = None  # the layer's weight before merging
        self.merge_order = 0  # merges into one layer are undone last-in, first-out

    @property
    def factor(self) -> float:
        return self.scale * self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype))) * self.factor

    def delta(self) -> torch.Tensor:
        """The update of the layer's weight, ``[out, in]`` (a convolution's ``[out, in, *kernel]``), in float32."""
        down, up = self.down.weight.float(), self.up.weight.float()
        update = up.flatten(1) @ down.flatten(1)  # [out, rank] @ [rank, in * kernel] -> [out, in * kernel]
        return update.reshape(up.shape[0], *down.shape[1:]) * self.factor


class AdapterSet(nn.ModuleDict):
    """A layer's adapters by name, and the handle of the forward hook through which they reach its output."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.hook = layer.register_forward_hook(_add_adapters)


def _add_adapters(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of an adapted layer: its output plus every unmerged adapter's update."""
    for adapter in getattr(module, ADAPTERS).values():
        if not adapter.merged and adapter.scale != 0:
            output = output + adapter(args[0]).to(output.dtype)
    return output


def target_layers(unet: nn.Module, targets: str) -> dict[str, nn.Module]:
    """The projections that ``targets`` adapts, by module name, in module order."""
    if targets not in TARGETS:
        raise CinematicError(f"lora targets must be one of {', '.join(TARGETS)}, not {targets!r}")
    if targets == "all":
        return {
            name: module
            for name, module in unet.named_modules()
            if ADAPTERS not in name.split(".") and type(module) in _LAYER_KINDS and adaptable(module)
        }
    kinds = _TARGET_MODULES.keys() if targets == "both" else (targets,)
    wanted = {m for kind in kinds for m in _TARGET_MODULES[kind]}
    return {
        name: module
        for name, module in unet.named_modules()
        if name.endswith(PROJECTIONS) and wanted & set(name.split("."))
    }


def attach(
    unet: nn.Module,
    layers: dict[str, nn.Module],
    ranks: dict[str, int],
    alphas: dict[str, float],
    name: str = DEFAULT_NAME,
    scale: float = 1.0,
) -> dict[str, Adapter]:
    """Add a fresh adapter ``name`` to each of ``unet``'s ``layers`` (rank and alpha per layer), recorded as one change
    of ``unet``; returns the adapters by layer name."""
    for layer_name, layer in layers.items():
        features(layer_name, layer)
        if name in getattr(layer, ADAPTERS, {}):
            raise CinematicError(f"an adapter named {name!r} is already loaded")
    adapters = {}
    for layer_name, layer in layers.items():
        if not hasattr(layer, ADAPTERS):
            setattr(layer, ADAPTERS, AdapterSet(layer))
        weight = _stored_weight(layer)
        n_in, n_out = features(layer_name, layer)
        conv = layer if isinstance(layer, nn.Conv2d | nn.Conv3d) else None
        adapter = Adapter(n_in, n_out, ranks[layer_name], alphas[layer_name], scale, conv)
        getattr(layer, ADAPTERS)[name] = adapter.to(
            device=weight.device, dtype=weight.dtype if weight.is_floating_point() else None
        )
        adapters[layer_name] = getattr(layer, ADAPTERS)[name]

    def detach() -> None:
        unmerge(unet, name)
        for layer in layers.values():
            held = getattr(layer, ADAPTERS)
            del held[name]
            if not held:  # the last adapter of the layer: the layer is exactly as before the first one came
                held.hook.remove()
                delattr(layer, ADAPTERS)

    def adds_nothing() -> bool:
        return all(a.merged or a.scale == 0 for a in adapters.values())

    modifications.record(unet, "lora", name, detach, graph_safe=adds_nothing)
    return adapters


def features(layer_name: str, layer: nn.Module) -> tuple[int, int]:
    """``(in, out)`` features of a layer that can take an adapter: a linear layer or an ungrouped 2-D or 3-D
    convolution (the UNet's frame convolutions are 3-D)."""
    if isinstance(layer, nn.Conv2d | nn.Conv3d) and layer.groups == 1:
        return layer.in_channels, layer.out_channels
    if hasattr(layer, "in_features") and not isinstance(layer, nn.Conv2d | nn.Conv3d):
        return layer.in_features, layer.out_features
    raise CinematicError(f"{layer_name} is not a linear layer or a convolution and cannot take a LoRA adapter")


def adaptable(layer: nn.Module) -> bool:
    """Whether ``layer`` can take an adapter (see :func:`features`)."""
    try:
        features("", layer)
    except CinematicError:
        return False
    return True


def pair_shapes(layer_name: str, layer: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of a rank-``rank`` adapter's ``down`` and ``up`` weights for ``layer``."""
    n_in, n_out = features(layer_name, layer)
    kernel = tuple(layer.kernel_size) if isinstance(layer, nn.Conv2d | nn.Conv3d) else ()
    return (rank, n_in, *kernel), (n_out, rank, *(1 for _ in kernel))


def adapters_of(unet: nn.Module, name: str) -> dict[str, Adapter]:
    """The adapters called ``name`` in ``unet``, by layer name."""
    return {
        layer_name: getattr(layer, ADAPTERS)[name]
        for layer_name, layer in unet.named_modules()
        if name in getattr(layer, ADAPTERS, {})
    }


def adapter_names(unet: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for layer in unet.modules():
        names.update(dict.fromkeys(getattr(layer, ADAPTERS, {})))
    return list(names)


def _stored_weight(layer: nn.Module) -> torch.Tensor:
    if precision.is_cast(layer):
        return precision.stored_parameter(layer, "weight")
    weight = layer.weight
    return weight() if callable(weight) else weight  # int8 dynamic-quantized Linear: a method


def _plain_weight(layer_name: str, layer: nn.Module) -> torch.Tensor:
    """The weight tensor a merge writes into: an ordinary floating-point parameter."""
    weight = getattr(layer, "weight", None)
    if precision.is_cast(layer) or not isinstance(weight, torch.Tensor):
        raise CinematicError(
            f"cannot merge a LoRA into {layer_name}: its weights are quantized or stored in another precision; "
            "load the adapter unmerged"
        )
    if not weight.is_floating_point():
        raise CinematicError(f"cannot merge a LoRA into the quantized layer {layer_name}; load the adapter unmerged")
    return weight


@torch.no_grad()
def merge(unet: nn.Module, name: str = DEFAULT_NAME) -> None:
    """Fold adapter ``name`` into its layers' weights (a copy of each weight is kept for :func:`unmerge`); recorded
    as a change of ``unet``, graph-safe since it lives in the weights."""
    layers = _layers_with(unet, name)
    todo = {n: layer for n, layer in layers.items() if not getattr(layer, ADAPTERS)[name].merged}
    if not todo:
        return
    weights = {n: _plain_weight(n, layer) for n, layer in todo.items()}  # every layer checked before any changes
    for layer_name, layer in todo.items():
        adapter, weight = getattr(layer, ADAPTERS)[name], weights[layer_name]
        adapter.original = weight.detach().clone()
        adapter.merge_order = max((a.merge_order for a in getattr(layer, ADAPTERS).values()), default=0) + 1
        weight.copy_((weight.float() + adapter.delta().to(weight.device)).to(weight.dtype))
        adapter.merged = True
    modifications.record(unet, "lora_merge", name, lambda: _restore_weights(todo, name), graph_safe=True)


@torch.no_grad()
def _restore_weights(layers: dict[str, nn.Module], name: str) -> None:
    for layer_name, layer in layers.items():
        adapter = getattr(layer, ADAPTERS)[name]
        later = [n for n, a in getattr(layer, ADAPTERS).items() if a.merged and a.merge_order > adapter.merge_order]
        if later:  # the kept copy predates them: restoring it would drop their updates too
            raise CinematicError(f"unmerge adapter {later[-1]!r} before {name!r} (merged after it into {layer_name})")
    for layer in layers.values():
        adapter = getattr(layer, ADAPTERS)[name]
        layer.weight.copy_(adapter.original)
        adapter.original, adapter.merged = None, False


def unmerge(unet: nn.Module, name: str = DEFAULT_NAME) -> None:
    """Put back the weights that :func:`merge` changed, exactly; the adapter stays loaded (unmerged)."""
    _layers_with(unet, name)
    for merged in modifications.active(unet, "lora_merge"):
        if merged.detail == name:
            modifications.undo(unet, merged)


def remove(unet: nn.Module, name: str = DEFAULT_NAME) -> None:
    """Unmerge and drop adapter ``name``; the model is exactly as before it was attached."""
    _layers_with(unet, name)
    for attached in modifications.active(unet, "lora"):
        if attached.detail == name:
            modifications.undo(unet, attached)


def set_scale(unet: nn.Module, name: str, scale: float) -> None:
    scale = check_scale(scale)
    for adapter in adapters_of(unet, name).values():
        if adapter.merged:
            raise CinematicError(f"adapter {name!r} is merged; unmerge it before changing its scale")
        adapter.scale = scale


def _layers_with(unet: nn.Module, name: str) -> dict[str, nn.Module]:
    layers = {n: m for n, m in unet.named_modules() if name in getattr(m, ADAPTERS, {})}
    if not layers:
        raise CinematicError(f"no LoRA adapter named {name!r} is loaded")
    return layers


def adapter_state(unet: nn.Module, name: str = DEFAULT_NAME) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{layer name: (down [rank, in], up [out, rank], alpha)}`` of adapter ``name``."""
    return {
        layer_name: (a.down.weight.detach(), a.up.weight.detach(), a.alpha)
        for layer_name, a in adapters_of(unet, name).items()
    }


def add_lora(unet: nn.Module, config: LoRAConfig, name: str = DEFAULT_NAME) -> dict[str, Adapter]:
    """Fresh adapters (``up`` zero) on the layers of ``config.targets``; the caller seeds the ``down`` init."""
    """A layer narrower than the rank gets the rank ``min(rank, in, out)`` and an alpha that keeps the update's
    scale ``alpha / rank`` (T2V-Turbo caps ranks the same way: conv_in and conv_out take 4)."""
    layers = target_layers(unet, config.targets)
    if not layers:
        raise CinematicError(f"this UNet has no {config.targets} attention layers to adapt")
    ranks = {layer_name: min(config.rank, *features(layer_name, layer)) for layer_name, layer in layers.items()}
    alphas = {layer_name: config.scale * rank for layer_name, rank in ranks.items()}
    return attach(unet, layers, ranks, alphas, name)


def load_adapter(
    unet: nn.Module,
    state: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
    name: str,
    scale: float = 1.0,
    what: str = "the adapter",
) -> dict[str, Adapter]:
    """Attach ``state`` (as :func:`adapter_state` returns it) as adapter ``name``; strict about layers and shapes."""
    modules = dict(unet.named_modules())
    unknown = sorted(layer for layer in state if layer not in modules or not adaptable(modules[layer]))
    if len(unknown) == len(state):
        raise CinematicError(f"{what} matches no layer of this model (e.g. {unknown[0] if unknown else 'no keys'})")
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise CinematicError(f"{what} names layers this model lacks: {', '.join(unknown[:3])}{more}")
    layers = {layer: modules[layer] for layer in state}
    for layer_name, (down, up, _) in state.items():
        layer = layers[layer_name]
        expected = pair_shapes(layer_name, layer, down.shape[0] if down.ndim else -1)
        if (tuple(down.shape), tuple(up.shape)) != expected:
            n_in, n_out = features(layer_name, layer)
            raise CinematicError(
                f"{what}: {layer_name} has shapes {tuple(down.shape)} and {tuple(up.shape)}, but the layer maps "
                f"{n_in} to {n_out} features (expected {expected[0]} and {expected[1]})"
            )
    ranks = {layer: down.shape[0] for layer, (down, _, _) in state.items()}
    alphas = {layer: alpha for layer, (_, _, alpha) in state.items()}
    adapters = attach(unet, layers, ranks, alphas, name, check_scale(scale))
    with torch.no_grad():
        for layer_name, (down, up, _) in state.items():
            adapters[layer_name].down.weight.copy_(down)
            adapters[layer_name].up.weight.copy_(up)
    return adapters
