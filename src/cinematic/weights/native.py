"""cinematic's own format: one folder with ``model.json`` (every config and the format version), one safetensors
file per network (fp16 by default) and the tokenizer files. It is what ``cinematic convert`` and training write, and
the fastest to load: no renames, no pickle, memory-mapped reads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from cinematic.errors import CinematicError
from cinematic.models.checks import config_file
from cinematic.models.components import COMPONENTS, ModelConfig
from cinematic.tokenizer import Tokenizer
from cinematic.weights.files import StateDict, read_json, read_safetensors
from cinematic.weights.source import Source

MODEL_JSON = "model.json"


def read_native(folder: Path) -> Source:
    data = read_json(folder / MODEL_JSON)
    with config_file(folder / MODEL_JSON):
        config = ModelConfig.from_dict(data)
    files = {c: folder / f"{c}.safetensors" for c in COMPONENTS}
    for path in files.values():
        if not path.is_file():
            raise CinematicError(f"{folder}: missing {path.name}")
    readers = {c: (lambda dtype=None, p=p: read_safetensors(p, dtype)) for c, p in files.items()}
    return Source("cinematic", folder, config, files, readers, folder / "tokenizer")


def prepare_destination(dst: Path) -> None:
    """DST may not exist yet, or be an empty folder; its parent must be writable."""
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CinematicError(f"destination {dst} exists and is not empty; choose a new folder")
    parent = dst.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise CinematicError(f"cannot write into {parent}: the folder is missing or not writable")


def write_native(
    dst: Path,
    config: ModelConfig,
    states: dict[str, Callable[[], StateDict]],
    tokenizer_dir: Path | None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write a model folder atomically: everything goes to a temporary sibling folder that is renamed at the end.

    ``states`` maps each component to a function returning its state dict (our keys), so that only one network's
    weights are in memory at a time.
    """
    from safetensors.torch import save_file

    dst = Path(dst)
    prepare_destination(dst)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.resolve().parent))
    try:
        for component in COMPONENTS:
            state: StateDict = states[component]()
            for key in list(state):
                tensor = state[key]
                cast = tensor.to(dtype) if tensor.is_floating_point() else tensor
                state[key] = cast.contiguous()
            save_file(state, str(tmp / f"{component}.safetensors"), metadata={"format": "pt"})
            del state
        if tokenizer_dir is not None:  # always written as vocab.json + merges.txt, whatever the source had
            Tokenizer.from_folder(tokenizer_dir).save(tmp / "tokenizer")
        meta = {**config.to_dict(), "dtype": str(dtype).removeprefix("torch.")}
        (tmp / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        if dst.exists():
            dst.rmdir()  # empty, checked above
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
