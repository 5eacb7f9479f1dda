"""The output folder of ``cinematic batch`` and its manifest.

The manifest (``manifest.jsonl``) has one row per outcome: ``id``, ``line``, ``prompt``, ``seed``, ``settings``,
``file``, ``status`` (``done`` or ``failed``), ``seconds``, ``error``, and ``key`` (what the video depends on, hashed:
:attr:`cinematic.batch.lines.Task.key`). Only the driver writes it, one appended
and flushed row at a time, so a driver killed at any moment leaves every row it finished and at most one torn last
line. The next run reads it (the last row of each id wins, a torn line is dropped), writes it back compacted,
atomically, and appends from there.

A run holds a lock on the folder (``.cinematic-batch.lock``), so two drivers never share one; under it, the hidden
temporary files that a killed writer left (``video.write`` writes ``.NAME.XXXXXXXX.tmp`` and renames it into place)
are removed before any work starts and again at the end.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from cinematic import video
from cinematic.errors import CinematicError

NAME = "manifest.jsonl"
FIELDS = ("id", "line", "prompt", "seed", "settings", "file", "status", "seconds", "error", "key")
LOCK = ".cinematic-batch.lock"
LEFTOVER = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")  # cinematic.video's temporary names


def prepare(folder: Path, extension: str) -> Path:
    """The output folder, made if missing and checked writable for ``extension`` files; one clear line if not."""
    folder = folder.expanduser().absolute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CinematicError(f"cannot make the output folder {folder}: {error.strerror or error}") from None
    video.check_writable(folder / f"probe{extension}")  # names the folder when it is not writable
    return folder


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the folder's lock for a run; another run on it is refused in one line."""
    try:
        handle = open(folder / LOCK, "a")  # noqa: SIM115 - held for the whole run
    except OSError as error:
        raise CinematicError(f"output folder {folder} is not writable: {error.strerror or error}") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            busy = f"another cinematic batch is writing to {folder}; wait for it or choose another --out"
            raise CinematicError(busy) from None
        remove_leftovers(folder)
        try:
            yield
        finally:
            remove_leftovers(folder)  # what a worker ended mid-video left
    finally:
        handle.close()


def remove_leftovers(folder: Path) -> None:
    for path in folder.iterdir():
        if LEFTOVER.fullmatch(path.name):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


class Manifest:
    """The rows so far (the last of each id) and the open file new rows are appended to."""

    def __init__(self, folder: Path):
        self.path = folder / NAME
        self.rows = read(self.path)
        self._file: TextIO | None = None

    def open(self) -> None:
        """Write the rows back compacted (atomically); rows are appended from there (the file is made by the first)."""
        if self.path.exists():
            text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in self.rows.values())
            temporary = self.path.with_name(f".{NAME}.{os.urandom(4).hex()}.tmp")
            temporary.write_text(text, encoding="utf-8")
            os.replace(temporary, self.path)

    def record(self, row: dict[str, Any]) -> None:
        """Append one row and flush it to the disk before going on."""
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        row = {name: row.get(name) for name in FIELDS}
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.rows[row["id"]] = row

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read(path: Path) -> dict[str, dict[str, Any]]:
    """The last row of each id in a manifest (none when there is no file); torn or foreign lines are dropped."""
    rows: dict[str, dict[str, Any]] = {}
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return rows
    except OSError as error:
        raise CinematicError(f"cannot read the manifest {path}: {error.strerror or error}") from None
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a torn last line (the driver was killed mid-write), or not JSON at all
            continue
        if isinstance(row, dict) and isinstance(row.get("id"), str):
            rows.pop(row["id"], None)  # keeps the order of last appearance
            rows[row["id"]] = row
    return rows
