"""Training and fine-tuning: ``train(TrainConfig(...)) -> Path``, and the ``cinematic train`` command.

``train`` is imported on first use, so that building the CLI's parser does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cinematic.train.config import TrainConfig

if TYPE_CHECKING:
    from cinematic.train.loop import train

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from cinematic.train.loop import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
