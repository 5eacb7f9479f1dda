"""Reading weight files, and loading a state dict into a network strictly."""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import pickle
import re
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from torch import nn

from cinematic.errors import CinematicError

StateDict = dict[str, torch.Tensor]


# Configs and shard indexes are kilobytes (the largest published index, a few MB): a bigger file, such as a sparse
# one declaring gigabytes, is refused before it is read.
MAX_JSON_BYTES = 100_000_000


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (every config and index file cinematic reads does)."""
    try:
        if Path(path).stat().st_size > MAX_JSON_BYTES:
            raise CinematicError(f"{path} is over {MAX_JSON_BYTES:,} bytes, too big for a config or index file")
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CinematicError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else e
        raise CinematicError(f"{path} is not valid JSON: {reason}") from None
    except OSError as e:
        raise CinematicError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    if not isinstance(data, dict):
        raise CinematicError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data


_SAFETENSORS_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
# The safetensors library's own cap (MAX_HEADER_SIZE in its Rust crate): no valid file has a longer header, and a
# huge declared length (a sparse file) must not make us read gigabytes before the JSON parser can object.
SAFETENSORS_MAX_HEADER = 100_000_000


class _Corrupt(ValueError):
    """What is wrong with a safetensors file, in words; read_safetensors_header names the file."""


@dataclass(frozen=True)
class SafetensorsTensor:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offsets in the file (not in the data section), end excluded
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked safetensors header: the tensors by key, in file order, and the ``__metadata__`` strings."""

    tensors: dict[str, SafetensorsTensor]
    metadata: dict[str, str]
    data_start: int  # 8 + the header's length


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Read and check a safetensors header against the file, as the safetensors library does before trusting it:
    the length within :data:`SAFETENSORS_MAX_HEADER` and the file, a JSON object, known dtypes, each tensor's byte
    span equal to its shape's size, and the spans tiling the data section exactly (no overlap, no gap, no bytes
    missing or left over). Reads only the header."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _parse_header(f, os.fstat(f.fileno()).st_size)
    except FileNotFoundError:
        raise CinematicError(f"missing file: {path}") from None
    except _Corrupt as e:
        raise CinematicError(f"{path} is not a valid safetensors file (truncated or corrupt): {e}") from None
    except OSError as e:
        raise CinematicError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None


def _parse_header(f, file_size: int) -> SafetensorsHeader:
    if file_size < 8:
        raise _Corrupt(f"the file has {file_size} bytes, fewer than the 8 of the header length")
    size = int.from_bytes(f.read(8), "little")
    if size > SAFETENSORS_MAX_HEADER:
        raise _Corrupt(f"the header length {size:,} is over the safetensors limit of {SAFETENSORS_MAX_HEADER:,} bytes")
    if 8 + size > file_size:
        raise _Corrupt(f"the header length {size:,} runs past the end of the {file_size:,}-byte file")
    raw = f.read(size)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _Corrupt:
        raise
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(e, RecursionError) else e
        raise _Corrupt(f"the header is not valid JSON ({reason})") from None
    if not isinstance(header, dict):
        raise _Corrupt(f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _Corrupt("__metadata__ must be an object of strings")
    data_start = 8 + size
    tensors = {key: _tensor_entry(key, info, data_start) for key, info in header.items()}
    tensors = dict(sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)))
    position = data_start
    for key, tensor in tensors.items():
        if tensor.start < position:
            raise _Corrupt(f"tensor {_printable(key)} overlaps the tensor before it")
        if tensor.start > position:
            raise _Corrupt(f"{tensor.start - position} unused bytes lie before tensor {_printable(key)}")
        position = tensor.end
    if position > file_size:
        raise _Corrupt(f"the tensors need {position - data_start:,} bytes of data but the file holds "
                       f"{file_size - data_start:,}")  # fmt: skip
    if position < file_size:
        raise _Corrupt(f"{file_size - position:,} bytes follow the last tensor")
    return SafetensorsHeader(tensors, metadata, data_start)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        twice = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise _Corrupt(f"the header names {_printable(twice)} twice")
    return data


def _printable(key: str, limit: int = 80) -> str:
    """A key from a file, fit for a one-line message: as it is when short and printable, else its repr, cut."""
    if key.isprintable() and len(key) <= limit:
        return key
    text = repr(key)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_entry(key: str, info: Any, data_start: int) -> SafetensorsTensor:
    if not isinstance(info, dict):
        raise _Corrupt(f"tensor {_printable(key)} is described by a {type(info).__name__}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_TORCH:
        raise _Corrupt(f"tensor {_printable(key)} has dtype {dtype!r:.40}; known: {', '.join(_SAFETENSORS_TORCH)}")
    if not isinstance(shape, list) or len(shape) > 64 or not all(_is_int(d) and d >= 0 for d in shape):
        raise _Corrupt(
            f"tensor {_printable(key)} has shape {shape!r:.40}, not a list of at most 64 non-negative integers"
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and o >= 0 for o in offsets):
        raise _Corrupt(f"tensor {_printable(key)} has data_offsets {offsets!r:.40}, not two non-negative integers")
    begin, end = offsets
    needed = math.prod(shape) * _SAFETENSORS_TORCH[dtype].itemsize
    if end - begin != needed:
        raise _Corrupt(
            f"tensor {_printable(key)} of shape {str(shape):.60} ({dtype}) needs {needed:,} bytes "
            f"but its offsets span {end - begin:,}"
        )
    return SafetensorsTensor(_SAFETENSORS_TORCH[dtype], tuple(shape), data_start + begin, data_start + end)


def read_safetensors(path: Path, dtype: torch.dtype | None = None) -> StateDict:
    """Read a safetensors file, checked first by :func:`read_safetensors_header`, casting floats to ``dtype``.

    When nothing needs a cast (``dtype`` is None or the file's own), the tensors are views of one private,
    prefaulted memory map of the file (:func:`_map_file`): no copy, and no fresh memory, which on Linux costs a page
    fault per 4 KiB page on first use (about 1 s per GB on our 2-core VM, more than the reading itself). Otherwise
    each tensor is read with plain file reads into memory of its own and cast, which keeps the peak at the loaded
    weights plus one tensor: a mapped file stays resident until its last tensor is freed, so an fp16 file cast to
    fp32 would hold both copies at once.
    """
    path = Path(path)
    header = read_safetensors_header(path)
    types = [t.dtype for t in header.tensors.values()]
    no_cast = dtype is None or all(t == dtype or not t.is_floating_point for t in types)
    try:
        with open(path, "rb") as f:
            mapped = _map_file(f) if no_cast and header.data_start % 8 == 0 and header.tensors else None
            state: StateDict = {}
            for key, info in header.tensors.items():
                if mapped is not None:
                    buffer = mapped[info.start : info.end]
                    if info.start % info.dtype.itemsize:  # not aligned for its dtype: this one tensor gets a copy
                        buffer = buffer.clone()
                else:
                    buffer = torch.empty(info.end - info.start, dtype=torch.uint8)
                    f.seek(info.start)
                    if f.readinto(memoryview(buffer.numpy())) != info.end - info.start:
                        raise ValueError(f"tensor {_printable(key)} is cut short")
                tensor = buffer.view(info.dtype).reshape(info.shape)
                if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor = tensor.to(dtype)
                state[key] = tensor
            return state
    except FileNotFoundError:
        raise CinematicError(f"missing file: {path}") from None
    except (ValueError, RuntimeError, OSError) as e:  # the file changed after its header was checked
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
        raise CinematicError(f"refusing to load {path}: it is not a plain weights file ({_refusal(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError, AttributeError) as e:
        raise CinematicError(f"cannot read {path}: {_first_line(str(e)) or type(e).__name__}") from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CinematicError(f"{path} does not hold a state dict of tensors")
    return data


def _first_line(text: str) -> str:
    """The first non-blank line of a message, without terminal escape codes (torch bolds part of its text)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _refusal(error: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, from its long message: the blocked global when it names one."""
    text = str(error)
    blocked = re.search(r"GLOBAL ([\w.]+) was not an allowed global", text)
    if blocked:
        return f"its pickle calls {blocked.group(1)}, which weights-only loading does not allow"
    reason = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    return _first_line(reason.group(1) if reason else text) or "unsafe pickle"


def read_index(path: Path) -> list[Path]:
    """The shard files of a sharded checkpoint's index (``*.index.json``, transformers' and diffusers'
    ``weight_map``), each checked by :func:`member_file` to lie inside the index's folder before any is opened."""
    path = Path(path)
    weight_map = read_json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CinematicError(f"{path} has no weight_map object naming the shard of each tensor")
    shards = {
        member_file(path.parent, name, f"{path}: the shard of {_printable(key)}") for key, name in weight_map.items()
    }
    return sorted(shards)


def member_file(folder: Path, name: Any, what: str) -> Path:
    """``folder / name`` for a file name that a config or index in ``folder`` gives, checked without opening
    anything: a relative path with no ``..`` that resolves (symlinks followed) inside ``folder``. In a Hugging Face
    cache snapshot, whose files are symlinks into the repo's ``blobs/`` folder, that folder counts as inside."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CinematicError(f"{what} is {name!r:.60}, not a file name")
    parts = re.split(r"[\\/]", name)
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).anchor or ".." in parts:
        raise CinematicError(f"{what}, {name!r:.60}, is not a file inside {folder}")
    target = (folder / name).resolve()
    if not any(target.is_relative_to(root) for root in _member_roots(folder)):
        raise CinematicError(f"{what}, {name!r:.60}, leads outside {folder} (a symlink)")
    return folder / name


def _member_roots(folder: Path) -> list[Path]:
    """Where a folder's files may resolve to: the folder, and in a hub cache snapshot the repo's blobs."""
    roots = [folder.resolve()]
    parts = folder.absolute().parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith(("models--", "datasets--", "spaces--")):
            roots.append(Path(*parts[:i], "blobs").resolve())
            break
    return roots


def is_safetensors(path: Path) -> bool:
    """A safetensors file, or the index of a sharded one."""
    return Path(path).name.endswith((".safetensors", ".safetensors.index.json"))


def read_weights(path: Path, dtype: torch.dtype | None = None) -> StateDict:
    """Any single weights file by extension; a sharded ``*.index.json`` reads all its shards."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        state: StateDict = {}
        for shard in read_index(path):
            part = read_weights(shard, dtype)
            twice = part.keys() & state.keys()
            if twice:
                raise CinematicError(f"{path}: tensor {_printable(sorted(twice)[0])} is stored in more than one shard")
            state.update(part)
        return state
    if path.suffix == ".safetensors":
        return read_safetensors(path, dtype)
    return read_torch(path)


def _describe(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(_printable(k) for k in keys)
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


def stored_dtype(path: Path) -> str:
    """The floating dtypes a safetensors file (or every shard of an index) stores, from its checked header alone."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        return "/".join(sorted({stored_dtype(shard) for shard in read_index(path)} - {"unknown"})) or "unknown"
    header = read_safetensors_header(path)
    return dtype_names(t.dtype for t in header.tensors.values())


def dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    """``"float16"``, ``"bfloat16/float32"``...: the floating dtypes among ``dtypes``, or ``"unknown"``."""
    names = sorted({str(d).removeprefix("torch.") for d in dtypes if d.is_floating_point})
    return "/".join(names) or "unknown"
