"""Reading weight files, and loading a state dict into a network strictly."""

from __future__ import annotations

import contextlib
import json
import mmap
import pickle
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cinematic.errors import CinematicError

StateDict = dict[str, torch.Tensor]


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CinematicError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CinematicError(f"{path} is not valid JSON: {e}") from None


_SAFETENSORS_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def read_safetensors(path: Path, dtype: torch.dtype | None = None) -> StateDict:
    """Read a safetensors file, casting floats to ``dtype`` on the way.

    When nothing needs a cast (``dtype`` is None or the file's own), the tensors are views of one private,
    prefaulted memory map of the file (:func:`_map_file`): no copy, and no fresh memory, which on Linux costs a page
    fault per 4 KiB page on first use (about 1 s per GB on our 2-core VM, more than the reading itself). Otherwise
    each tensor is read with plain file reads into memory of its own and cast, which keeps the peak at the loaded
    weights plus one tensor: a mapped file stays resident until its last tensor is freed, so an fp16 file cast to
    fp32 would hold both copies at once.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            file_size = path.stat().st_size
            if not 2 <= size <= file_size - 8:
                raise ValueError("header length is out of range")
            header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
            for key, info in entries:
                if 8 + size + info["data_offsets"][1] > file_size:
                    raise ValueError(f"tensor {key} runs past the end of the file")
            types = {key: _SAFETENSORS_TORCH[info["dtype"]] for key, info in entries}
            no_cast = dtype is None or all(t == dtype or not t.is_floating_point for t in types.values())
            mapped = _map_file(f) if no_cast and (8 + size) % 8 == 0 else None
            state: StateDict = {}
            for key, info in entries:
                start, end = (8 + size + offset for offset in info["data_offsets"])
                if mapped is not None:
                    buffer = mapped[start:end]
                    if start % types[key].itemsize:  # not aligned for its dtype: this one tensor gets a copy
                        buffer = buffer.clone()
                else:
                    buffer = torch.empty(end - start, dtype=torch.uint8)
                    f.seek(start)
                    if f.readinto(memoryview(buffer.numpy())) != end - start:
                        raise ValueError(f"tensor {key} is cut short")
                tensor = buffer.view(types[key]).reshape(info["shape"])
                if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor = tensor.to(dtype)
                state[key] = tensor
            return state
    except FileNotFoundError:
        raise CinematicError(f"missing file: {path}") from None
    except (ValueError, KeyError, TypeError, RuntimeError, UnicodeDecodeError) as e:
        raise CinematicError(f"{path} is not a valid safetensors file (truncated or corrupt): {e}") from None


def _map_file(f) -> torch.Tensor:
    """The whole open file as a uint8 tensor over a private (copy-on-write) memory map. Tensors viewing it keep the
    map alive; writing to one (merging a LoRA) copies the pages it touches and never changes the file.

    On Linux the page tables are filled for reading in one call (``MADV_POPULATE_READ``, Linux 5.14): the pages are
    those of the page cache, shared, not copies. (``MAP_POPULATE`` would write-fault a private writable map, copying
    every page.)"""
    if not hasattr(mmap, "MAP_PRIVATE"):  # Windows: copy-on-write through the access mode
        return torch.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=torch.uint8)
    mapping = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if sys.platform == "linux":
        with contextlib.suppress(OSError):  # an older kernel: pages then fault in on first use
            mapping.madvise(getattr(mmap, "MADV_POPULATE_READ", _MADV_POPULATE_READ))
    return torch.frombuffer(mapping, dtype=torch.uint8)


_MADV_POPULATE_READ = 22  # linux/mman.h; Python's mmap module names it from 3.13 on


def read_torch(path: Path) -> StateDict:
    """A ``torch.save`` state dict, loaded with ``weights_only=True``: pickled code is refused, never run."""
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # files in the pre-1.6 legacy format cannot be memory-mapped
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CinematicError(f"missing file: {path}") from None
    except pickle.UnpicklingError as e:
        first = str(e).split("\n\n")[-1].strip().splitlines()[0] if str(e) else "unsafe pickle"
        raise CinematicError(f"refusing to load {path}: it is not a plain weights file ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CinematicError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CinematicError(f"{path} does not hold a state dict of tensors")
    return data


def read_weights(path: Path, dtype: torch.dtype | None = None) -> StateDict:
    """Any single weights file by extension; a sharded ``*.index.json`` reads all its shards."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        shards = sorted(set(read_json(path).get("weight_map", {}).values()))
        state: StateDict = {}
        for shard in shards:
            state.update(read_weights(path.parent / shard, dtype))
        return state
    if path.suffix == ".safetensors":
        return read_safetensors(path, dtype)
    return read_torch(path)


def _describe(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_state_dict(module: nn.Module, state: StateDict, what: str) -> None:
    """Raise a CinematicError naming every missing key, unexpected key and wrong shape."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    if missing:
        raise CinematicError(f"{what}: missing keys: {_describe(missing)}")
    if unexpected:
        raise CinematicError(f"{what}: unexpected keys: {_describe(unexpected)}")
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
        for k in expected
        if tuple(state[k].shape) != expected[k]
    ]
    if wrong:
        raise CinematicError(f"{what}: wrong shapes: {_describe(wrong, 4)}")


def load_into(module: nn.Module, state: StateDict, what: str, dtype: torch.dtype, device: torch.device | str) -> None:
    """Strictly load ``state`` into a module built on the meta device, casting to ``dtype`` one tensor at a time."""
    check_state_dict(module, state, what)
    for key in list(state):
        tensor = state[key]
        target = dtype if tensor.is_floating_point() else tensor.dtype
        state[key] = tensor.to(device=device, dtype=target)
    module.load_state_dict(state, strict=True, assign=True)


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def stored_dtype(path: Path) -> str:
    """The floating dtype a weights file stores, read from its header (safetensors) or a memory-mapped load."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
        except (OSError, ValueError) as e:
            raise CinematicError(f"{path} is not a valid safetensors file: {e}") from None
        kinds = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    elif path.name.endswith(".index.json"):
        shard = sorted(set(read_json(path).get("weight_map", {}).values()))[:1]
        return stored_dtype(path.parent / shard[0]) if shard else "unknown"
    else:
        from cinematic.weights.pickle_safe import load_checkpoint

        data = load_checkpoint(path)
        data = data.get("state_dict", data) if isinstance(data, dict) else {}
        kinds = {str(v.dtype).removeprefix("torch.") for v in data.values() if isinstance(v, torch.Tensor)}
    names = sorted(_SAFETENSORS_DTYPES.get(k, k) for k in kinds if k not in ("I64", "I32", "int64", "int32", "BOOL"))
    return "/".join(names) or "unknown"
