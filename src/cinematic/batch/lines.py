"""The prompts file of ``cinematic batch``: one JSON object per line, read into :class:`Task` s.

A line holds a ``prompt`` and any generation setting by its name in :class:`cinematic.settings.Settings` (the old
names are accepted, as everywhere), and optionally an ``id`` (the output file's name) and an ``init_video`` or
``init_image`` path (relative to the prompts file's folder). A line that is a JSON string is a prompt alone; blank
lines are skipped. The settings given on the command line are every line's defaults.

Each line gets a stable id, so that a second run knows what is done: its own ``id``, else its line number
(``000007`` for line 7). Its seed is the line's ``seed``, else ``--seed`` plus the line number minus one, else one
drawn from the id: the same line makes the same video on every run. A line that cannot run (not JSON, an unknown
setting, a value out of bounds, an id used twice) becomes a task with an ``error``, one line that starts with its
line number; the other lines go on.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cinematic.errors import CinematicError
from cinematic.settings import SEED_RANGE, SPECS, canonical, settings_from

ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")
ID_RULE = "1 to 100 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
PICTURES = ("init_video", "init_image")


@dataclass(frozen=True)
class Task:
    """One line's work: its id and line number, its settings (prompt and seed included), the file it makes."""

    id: str
    line: int
    file: str  # the output file's name, inside the output folder
    settings: dict[str, Any] = field(default_factory=dict)
    pictures: dict[str, str] = field(default_factory=dict)  # init_video / init_image: absolute paths
    model: str = ""
    error: str | None = None  # a line that cannot run: its one-line problem, starting with "line N: "

    @property
    def key(self) -> str:
        """What the video depends on, hashed: a done line whose key changed is not the same work any more."""
        what = {"settings": self.settings, "pictures": self.pictures, "model": self.model, "file": self.file}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def prompt(self) -> str | None:
        return self.settings.get("prompt") or self.settings.get("prompt_schedule")


def default_id(line: int) -> str:
    return f"{line:06d}"


def drawn_seed(task_id: str) -> int:
    """A seed that depends on the id alone: a line without one makes the same video on every run."""
    return int.from_bytes(hashlib.sha256(f"cinematic-batch:{task_id}".encode()).digest()[:8], "big") % SEED_RANGE


def read_tasks(
    path: Path, defaults: Mapping[str, Any], model: str, extension: str, seed: int | None = None
) -> list[Task]:
    """Every non-blank line of ``path`` as a :class:`Task`; an unreadable file is a :class:`CinematicError`."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CinematicError(f"cannot read the prompts file {path}: {error.strerror or error}") from None
    folder = path.expanduser().absolute().parent
    tasks = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        if raw.strip():
            tasks.append(_task(raw, number, defaults, model, extension, seed, folder))
    if not tasks:
        raise CinematicError(f"the prompts file {path} holds no lines; write one JSON object per line")
    return _unique(tasks)


def _task(
    raw: bytes, number: int, defaults: Mapping[str, Any], model: str, extension: str, seed: int | None, folder: Path
) -> Task:
    task = Task(default_id(number), number, default_id(number) + extension, model=model)
    try:
        values = _parse(raw)
        task_id = values.pop("id", task.id)
        if not isinstance(task_id, str) or not ID.fullmatch(task_id):
            raise CinematicError(f"id must be {ID_RULE}, not {task_id!r}")
        task = replace(task, id=task_id, file=task_id + extension)
        pictures = {name: _picture(name, values.pop(name), folder) for name in PICTURES if name in values}
        given = {**canonical(defaults, "flag"), **canonical(values, "field")}
        if given.get("seed") is None:
            given["seed"] = drawn_seed(task_id) if seed is None else (seed + number - 1) % SEED_RANGE
        if given.get("prompt") is None and given.get("prompt_schedule") is None:
            raise CinematicError("prompt: is required (give a prompt or a prompt_schedule)")
        checked = settings_from(given).values()  # types and bounds; the rules that need the model: the worker's
        settings = {name: checked[name] for name in SPECS if given.get(name) is not None}
        return replace(task, settings=settings, pictures=pictures)
    except CinematicError as error:
        return replace(task, error=f"line {number}: {one_line(error)}")


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CinematicError(f"not UTF-8 text (the byte 0x{raw[error.start]:02x} at byte {error.start + 1})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise CinematicError(f"not valid JSON ({error.msg} at column {error.colno})") from None
    if isinstance(value, str):
        return {"prompt": value}
    if not isinstance(value, dict):
        raise CinematicError(f"must be a JSON object (or a string: the prompt), not {type(value).__name__}")
    return value


def _picture(name: str, value: Any, folder: Path) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CinematicError(f"{name} must be the path of a file, not {value!r}")
    return str(folder / Path(value).expanduser())


def _unique(tasks: list[Task]) -> list[Task]:
    """The second line with an id already taken fails, naming the first."""
    first: dict[str, int] = {}
    out = []
    for task in tasks:
        if task.id in first and task.error is None:
            task = replace(task, error=f"line {task.line}: id {task.id!r} is line {first[task.id]}'s already")
        first.setdefault(task.id, task.line)
        out.append(task)
    return out


def one_line(error: BaseException) -> str:
    """An error as one line: its message with every run of white space made one space."""
    text = " ".join(str(error).split())
    return text if isinstance(error, CinematicError) else f"{type(error).__name__}: {text}"
