"""Running networks in another precision than they are stored in.

- :func:`compute_in`: weights stay in their storage dtype (fp16 or bf16: half the memory) and every layer casts its
  weights to the compute dtype (fp32) when it runs, one layer at a time. For CPUs without fast half-precision
  arithmetic: the memory of half precision, the arithmetic of fp32. When the stored weights came from fp16 files
  (the published diffusers weights, cinematic's format) the results are those of the fp32 run, because fp32 holds
  every fp16 value exactly.
- :func:`quantize_int8`: dynamic int8 quantization of the Linear layers (weights int8 per channel, activations
  quantized per call), for CPU inference; it changes the results slightly.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from cinematic.models import modifications


class CastArena:
    """Where the per-layer casts of :func:`compute_in` are written: one preallocated buffer used as a ring.

    Each cast takes the next ``numel`` elements and wraps to the start when the end is reached, so a cast stays
    intact until later casts have filled the rest of the buffer. The buffer holds the largest parameter plus 2**20
    elements: each layer of cinematic's networks reads at most its weight and one bias in a call (a cast that
    does not fit at the end starts again at 0, so the two never overlap), and nothing keeps a cast weight past
    the call that reads it. Without the arena every cast would be a fresh allocation, and on Linux a large one is
    a fresh mapping whose pages fault in again at every step.
    """

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device):
        self.buffer = torch.empty(numel, dtype=dtype, device=device)
        self.offset = 0

    def cast(self, stored: torch.Tensor) -> torch.Tensor:
        n = stored.numel()
        if n > self.buffer.numel():  # not planned for (a parameter added after compute_in): a plain cast
            return stored.to(self.buffer.dtype)
        if self.offset + n > self.buffer.numel():
            self.offset = 0
        out = self.buffer[self.offset : self.offset + n].view(stored.shape)
        self.offset += -(-n // 16) * 16  # keep every slice 64-byte aligned for the vector kernels
        return out.copy_(stored)


class _Caster:
    """What a cast layer's parameters are read through: a cast to ``dtype``, into ``arena`` when there is one."""

    def __init__(self, dtype: torch.dtype, arena: CastArena | None):
        self.dtype, self.arena = dtype, arena

    def __call__(self, stored: torch.Tensor) -> torch.Tensor:
        if self.arena is None or torch.is_grad_enabled() and stored.requires_grad:
            return stored.to(self.dtype)
        return self.arena.cast(stored)


_CASTER = "_cinematic_caster"  # the instance attribute a cast layer keeps its _Caster in
_CAST_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def _cast_class(cls: type, names: tuple[str, ...]) -> type:
    """A subclass of ``cls`` whose ``names`` read as the cast of the stored parameters of the same names (a data
    descriptor on the class takes precedence over ``nn.Module``'s lookup in ``_parameters``). One class per
    ``(cls, names)``, made once: swapping a layer's class costs nothing, where a ``torch.nn.utils.parametrize``
    registration builds two modules and a class per parameter (0.4 s of a 0.8 s load of the full model)."""
    key = (cls, names)
    if key not in _CAST_CLASSES:

        def reader(name: str) -> property:
            return property(lambda self: self.__dict__[_CASTER](self._parameters[name]))

        attributes = {name: reader(name) for name in names} | {"_cast_stored_class": cls}
        _CAST_CLASSES[key] = type(f"Cast{cls.__name__}", (cls,), attributes)
    return _CAST_CLASSES[key]


def stored_type(layer: nn.Module) -> type:
    """A layer's class as it was before :func:`compute_in`."""
    return getattr(type(layer), "_cast_stored_class", type(layer))


def stored_parameter(layer: nn.Module, name: str) -> torch.Tensor:
    """The parameter ``name`` as stored (under :func:`compute_in`, not its cast)."""
    return layer._parameters[name]


def cast_arena(layer: nn.Module) -> CastArena | None:
    """The arena ``layer``'s casts are written into (None: fresh memory, off the CPU)."""
    return layer.__dict__[_CASTER].arena


def is_cast(layer: nn.Module) -> bool:
    """Whether ``layer`` reads its parameters through :func:`compute_in`'s casts."""
    return _CASTER in layer.__dict__


def compute_in(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Make every floating parameter of ``module`` read as ``dtype`` while it is stored as it is; in place.

    Each layer with such parameters gets a subclass of its own class (:func:`_cast_class`) where ``layer.weight``
    is the cast of the stored tensor, computed at each access (inside the layer's forward), so only one layer's
    weights exist in ``dtype`` at a time. The stored ``Parameter`` objects stay where they were: ``parameters()``,
    ``state_dict()`` and its keys are those of the stored network (:func:`stored_parameter` reads one). Parameters
    already in ``dtype`` are left alone. (cinematic's networks have no floating buffers to cast.) The change is
    recorded (:mod:`cinematic.models.modifications`, kind ``"compute_dtype"``): undoing it gives every layer its
    class back. Graph-safe: the casts run inside each layer's own forward, which a compiled or recorded forward runs
    too.

    On the CPU the casts are written into one :class:`CastArena` per module instead of fresh memory. Embedding
    tables are not cast whole: an ``nn.Embedding`` looks its rows up in the stored table and casts what it returns
    (the text encoder's 49408 x 1024 token table would otherwise be cast at every call, and size the arena).
    """
    embeddings = [
        sub
        for sub in module.modules()
        if isinstance(sub, nn.Embedding) and sub.weight.is_floating_point() and sub.weight.dtype != dtype
    ]
    layers = []  # (layer, names of its parameters to cast)
    for sub in module.modules():
        if isinstance(sub, nn.Embedding) or is_cast(sub):
            continue
        names = tuple(n for n, p in sub.named_parameters(recurse=False) if p.is_floating_point() and p.dtype != dtype)
        if names:
            layers.append((sub, names))
    if not layers and not embeddings:
        return module
    cast = [sub._parameters[name] for sub, names in layers for name in names]
    frozen = [(p, p.requires_grad) for p in [e.weight for e in embeddings] + cast]
    handles = [e.register_forward_hook(lambda _module, _args, out: out.to(dtype)) for e in embeddings]
    device = cast[0].device if cast else None
    largest = max((param.numel() for param in cast), default=0)
    arena = CastArena(largest + (1 << 20), dtype, device) if device is not None and device.type == "cpu" else None
    caster = _Caster(dtype, arena)
    for param, _ in frozen:
        # Inference only: frozen, so that nothing (autograd, FlopCounterMode's module tracker) treats the cast as a
        # step of a graph to differentiate.
        param.requires_grad_(False)
    for sub, names in layers:
        sub.__dict__[_CASTER] = caster
        sub.__class__ = _cast_class(type(sub), names)

    def restore() -> None:
        for sub, _ in layers:
            sub.__class__ = stored_type(sub)
            del sub.__dict__[_CASTER]
        for handle in handles:
            handle.remove()
        for param, requires_grad in frozen:
            param.requires_grad_(requires_grad)

    modifications.record(module, "compute_dtype", str(dtype).removeprefix("torch."), restore, graph_safe=True)
    return module


def storage_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a network's first floating parameter is stored in (under :func:`compute_in`, the stored one)."""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def quantize_int8(module: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of every ``nn.Linear`` (``torch.ao.quantization.quantize_dynamic``), in place.

    Weights are quantized per output channel (less error than one scale per tensor: 0.12 against 0.13 relative
    error on the tiny test UNet with every parameter random), activations per call with one scale per tensor.
    CPU only, fp32 modules only. Convolutions, half of the UNet's FLOPs, stay fp32: PyTorch has no dynamic int8
    convolution. The change is recorded (kind ``"int8"``): undoing it puts the original Linear modules back, whose
    weights quantization only read. Graph-safe: the quantized layers are ordinary submodules of the forward.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    linears = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if stored_type(child) is nn.Linear  # what quantize_dynamic swaps
    ]
    had_qconfig = {id(m) for m in module.modules() if "qconfig" in m.__dict__}
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        quantize_dynamic(module, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)

    def restore() -> None:
        for parent, name, child in linears:
            setattr(parent, name, child)
        for m in [*module.modules(), *(child for _, _, child in linears)]:
            if id(m) not in had_qconfig:
                m.__dict__.pop("qconfig", None)  # quantize_dynamic labels every module it visits with its qconfig

    modifications.record(module, "int8", f"{len(linears)} Linear layers", restore, graph_safe=True)
    return module
