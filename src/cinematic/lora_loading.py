"""Loading LoRA adapter files at inference: load them onto a UNet (merged or not), take them off again, parse
``path[:scale]``.

The adapter layers are in ``models/lora_adapters.py``, the file layouts in ``weights/lora_formats.py``; this is the
glue that :class:`cinematic.pipeline.Pipeline` and the CLI call. Every adapter loaded here is a change recorded by
:mod:`cinematic.models.modifications`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from cinematic.errors import CinematicError
from cinematic.models import lora_adapters
from cinematic.weights.lora_formats import adapter_file, read_adapter

LoRASpecs = Sequence[tuple[str | Path, float]]


def parse_spec(spec: str) -> tuple[str, float]:
    """``path`` or ``path:scale`` (the scale a number; a path may itself hold colons) -> ``(path, scale)``."""
    path, _, tail = spec.rpartition(":")
    if path:
        try:
            return path, lora_adapters.check_scale(float(tail))
        except ValueError:
            if not Path(spec).expanduser().exists():
                raise CinematicError(f"--lora {spec!r}: the scale after ':' must be a number, not {tail!r}") from None
    if not spec:
        raise CinematicError("--lora needs a path, optionally followed by :scale")
    return spec, 1.0


def load_lora(unet: nn.Module, path: str | Path, scale: float = 1.0, merge: bool = False) -> str:
    """Attach the adapter at ``path`` to ``unet`` with strength ``scale``; returns the name it is loaded under.

    Everything is checked (file, keys, shapes, scale) before the UNet changes, so a bad adapter leaves it as it was.
    """
    scale = lora_adapters.check_scale(scale)
    file = adapter_file(path)
    state, _ = read_adapter(file)
    taken = set(lora_adapters.adapter_names(unet))
    name = next(f"lora{i}" for i in range(len(taken) + 1) if f"lora{i}" not in taken)
    lora_adapters.load_adapter(unet, state, name, scale, what=str(file))
    if merge:
        try:
            lora_adapters.merge(unet, name)
        except CinematicError:
            lora_adapters.remove(unet, name)
            raise
    return name


def unload_lora(unet: nn.Module, name: str | None = None) -> None:
    """Take adapter ``name`` (default: every adapter) off ``unet``; merged weights are restored exactly."""
    for each in [name] if name is not None else reversed(lora_adapters.adapter_names(unet)):
        lora_adapters.remove(unet, each)


@contextmanager
def loras_applied(unet: nn.Module, loras: LoRASpecs | None, merge: bool = False) -> Iterator[list[str]]:
    """The adapters ``[(path, scale), ...]`` loaded for the duration of the block, then taken off again."""
    names: list[str] = []
    try:
        for path, scale in loras or ():
            names.append(load_lora(unet, path, scale, merge))
        yield names
    finally:
        for name in reversed(names):
            lora_adapters.remove(unet, name)
