"""What one batch worker holds: the model, loaded once, and the making of one task's video at a time.

A worker is a whole process, a local one (:mod:`cinematic.batch.local`) or a Ray actor's
(:mod:`cinematic.batch.on_ray`): :func:`configure_process` sets its thread count and allocator once, as the
``generate`` command does for its own process. The video is written to a hidden temporary name and renamed into
place (``video.write``), so a worker killed at any moment leaves either the whole file or none; the manifest is the
driver's alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cinematic.batch.lines import Task, one_line
from cinematic.settings import SPECS

KEY = "batch_key"  # the file metadata field holding the task's key (see cinematic.batch.lines.Task.key)


@dataclass(frozen=True)
class Result:
    """What became of a task: ``done``, ``failed``, or ``broken`` (the worker could not load the model)."""

    id: str
    status: str
    seconds: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # done: every setting as resolved by the model
    error: str | None = None


def configure_process(device: str, threads: int | None) -> None:
    """A worker process's own settings, made once before the model loads: torch's thread count and, on a CPU,
    glibc's allocator setting (:mod:`cinematic.allocator`)."""
    import torch

    from cinematic.allocator import keep_freed_memory

    if threads is not None:
        torch.set_num_threads(threads)
    if torch.device(device).type == "cpu":
        keep_freed_memory()


class BatchWorker:
    """``BatchWorker(model, device, out)`` loads the model; ``run(task)`` makes one video into ``out``."""

    def __init__(self, model: str, device: str, out: str, dtype: str | None = None):
        self.out = Path(out)
        self.broken: str | None = None
        try:
            import torch

            from cinematic.pipeline import Pipeline

            self.pipe = Pipeline.from_pretrained(model, device=device, dtype=dtype and getattr(torch, dtype))
        except Exception as error:  # reported by run(): the driver stops the batch in one line
            self.broken = one_line(error)

    def run(self, task: Task) -> Result:
        if self.broken is not None:
            return Result(task.id, "broken", error=self.broken)
        start = time.perf_counter()
        try:
            clip = self.pipe(**task.settings, **task.pictures, progress=False)[0]
            clip.metadata = {**clip.metadata, "id": task.id, KEY: task.key}
            clip.save(self.out / task.file)
        except Exception as error:  # a bad setting for this model, an unreadable init video, a full disk
            return Result(task.id, "failed", time.perf_counter() - start, error=f"line {task.line}: {one_line(error)}")
        settings = {name: clip.metadata[name] for name in SPECS if name not in ("prompt", "seed")}
        return Result(task.id, "done", time.perf_counter() - start, settings)


def made_by(path: Path, task: Task) -> bool:
    """Whether ``path`` is a video this task made: a worker can finish a file just before the driver is killed,
    and the next run then keeps it instead of making it again."""
    from cinematic import video

    if not path.exists():
        return False
    try:
        return video.read(path, num_frames=1).metadata.get(KEY) == task.key
    except Exception:  # unreadable: made again
        return False
