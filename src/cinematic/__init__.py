"""cinematic: the ModelScope text-to-video-ms-1.7b model, from scratch in PyTorch.

Nothing heavy is imported here, so that ``cinematic --help`` answers at once; ``Pipeline`` and ``Video`` are
imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Pipeline", "Video", "__version__"]

if TYPE_CHECKING:
    from cinematic.pipeline import Pipeline, Video


def __getattr__(name: str) -> Any:
    if name in ("Pipeline", "Video"):
        from cinematic import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'cinematic' has no attribute {name!r}")
