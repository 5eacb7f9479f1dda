"""Checks for the values in a model config: an integer is an ``int`` (not a string, a float or a bool), a number is
finite, and each lies within bounds. The frozen configs call these in ``__post_init__`` with the key's name as the
config file spells it (``unet.layers_per_block``), and the layout readers call them on the files' own keys, so a bad
value is one line naming the key, never a traceback or a model built until memory runs out.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cinematic.errors import CinematicError

# Bounds shared by every network's config; generous (10x to 50x the published model's values) but finite, so that
# no single value can build an absurd model. The parameter count of the whole config is capped in sizes.py.
MAX_CHANNELS = 65_536  # any width: channels, head widths, MLP widths (published: at most 4096)
MAX_LEVELS = 8  # resolution levels of a UNet or VAE (published: 4); each halves the resolution
MAX_LAYERS_PER_BLOCK = 32  # published: 2
MAX_TEXT_LAYERS = 256  # published: 23
MAX_VOCAB = 1_000_000  # the largest tokenizers have about 256k entries; CLIP's has 49408
MAX_CONTEXT = 8192  # published: 77


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def integer(value: Any, name: str, low: int, high: int) -> int:
    """``value`` if it is an int (bools excluded) from ``low`` to ``high``, else a CinematicError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise CinematicError(f"{name} must be an integer, not {type(value).__name__} {_shown(value)}")
    if not low <= value <= high:
        raise CinematicError(f"{name} must be {low} or more and at most {high}, got {_shown(value)}")
    return value


def number(value: Any, name: str, low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> float:
    """``value`` if it is a finite int or float from ``low`` to ``high``, each end excluded when ``open_...``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CinematicError(f"{name} must be a finite number, not {type(value).__name__} {_shown(value)}")
    if value < low or value > high or (open_low and value == low) or (open_high and value == high):
        above = "more than" if open_low else "at least"
        below = "less than" if open_high else "at most"
        raise CinematicError(f"{name} must be {above} {low:g} and {below} {high:g}, got {_shown(value)}")
    return value


def boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise CinematicError(f"{name} must be true or false, not {type(value).__name__} {_shown(value)}")
    return value


def integers(value: Any, name: str, low: int, high: int, max_count: int) -> tuple[int, ...]:
    """A non-empty list or tuple of at most ``max_count`` integers, each checked as :func:`integer`."""
    if not isinstance(value, list | tuple) or not 1 <= len(value) <= max_count:
        raise CinematicError(f"{name} must be a list of 1 to {max_count} integers, got {_shown(value)}")
    return tuple(integer(v, f"{name}[{i}]", low, high) for i, v in enumerate(value))


def mapping(value: Any, name: str) -> dict[str, Any]:
    """A JSON object (a section of a config file)."""
    if not isinstance(value, dict):
        raise CinematicError(f"{name} must be a JSON object, not {type(value).__name__} {_shown(value)}")
    return value


@contextmanager
def config_file(where: object) -> Iterator[None]:
    """Prefix every config error raised inside with the file it came from: ``unet/config.json: layers_per_block must
    be an integer, not str '2'``."""
    try:
        yield
    except CinematicError as e:
        raise CinematicError(f"{where}: {e}") from None
