"""What every layout reader returns: the model config, the weight files, and how to read each component."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cinematic.models.components import ModelConfig
from cinematic.weights.files import StateDict

TOKENIZER_FILES = ("vocab.json", "merges.txt")


@dataclass
class Source:
    format: str  # "cinematic", "diffusers" or "modelscope"
    folder: Path
    config: ModelConfig
    files: dict[str, Path]  # component -> weights file
    # component -> reader(dtype=None) giving our keys; floats cast to dtype where the reader can do it on the way
    readers: dict[str, Callable[..., StateDict]]
    tokenizer: Path | None  # a folder holding vocab.json and merges.txt, if the layout has one


def has_tokenizer(folder: Path) -> bool:
    """vocab.json + merges.txt (transformers 4, the published layout) or tokenizer.json (transformers 5)."""
    return all((folder / name).is_file() for name in TOKENIZER_FILES) or (folder / "tokenizer.json").is_file()


def find_tokenizer(folder: Path) -> Path | None:
    """The vocabulary beside the weights: the folder itself or its ``tokenizer/`` sub-folder."""
    for candidate in (folder, folder / "tokenizer"):
        if has_tokenizer(candidate):
            return candidate
    return None
