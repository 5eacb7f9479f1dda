"""What a training set is: the interface the trainer reads clips through, whatever makes them."""

from __future__ import annotations

from typing import Any, Protocol


class VideoDataset(Protocol):
    """``dataset[i] -> {"video": float32 [3, F, H, W] in [-1, 1], "caption": str}``.

    A dataset may also define ``sample(i, generator)`` for random augmentation (the loader then calls that with a
    generator seeded from the sample's position in the run) and ``captions`` (every caption, for a new tokenizer).
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


def vocabulary_texts(dataset: VideoDataset) -> list[str]:
    """Every caption of ``dataset``: the texts a new tokenizer learns its vocabulary from."""
    captions = getattr(dataset, "captions", None)
    if captions is None:
        captions = [dataset[i]["caption"] for i in range(len(dataset))]
    return list(captions)
