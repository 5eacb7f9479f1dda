"""Where the videos live: ``<data>/videos/<job id>.<format>``, named only from job ids that the store made.

No part of a request becomes a path: a request's id is looked up in the store first, and the name is built from
the stored id, which :data:`ID_PATTERN` checks again here. Every file is written beside its target and renamed
(``cinematic.video.write``), so a reader never sees half a video.
"""

from __future__ import annotations

import threading
from pathlib import Path

from cinematic import video
from cinematic.serve.store import ID_PATTERN

MEDIA_TYPES = {"mp4": "video/mp4", "webm": "video/webm", "gif": "image/gif"}
VARIANTS = tuple(MEDIA_TYPES)


class Files:
    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def path(self, job_id: str, variant: str = "mp4") -> Path:
        if not ID_PATTERN.fullmatch(job_id) or variant not in MEDIA_TYPES:
            raise ValueError(f"not a job file: {job_id!r} {variant!r}")
        return self.folder / f"{job_id}.{variant}"

    def remove(self, job_id: str) -> None:
        for variant in VARIANTS:
            self.path(job_id, variant).unlink(missing_ok=True)
            with self._locks_lock:
                self._locks.pop((job_id, variant), None)

    def variant(self, job_id: str, variant: str) -> Path | None:
        """The job's video in ``variant``, made from its mp4 on first request; None if the mp4 is gone.

        Made lazily because most videos are only ever watched as mp4, and encoding VP9 costs as much as a few
        sampling steps. A lock per file keeps two requests from encoding it twice.
        """
        target = self.path(job_id, variant)
        if variant == "mp4" or target.is_file():
            return target if target.is_file() else None
        with self._lock_for(job_id, variant):
            if target.is_file():
                return target
            source = self.path(job_id)
            if not source.is_file():
                return None
            clip = video.read(source)
            video.write(target, clip.frames, fps=clip.fps, metadata=clip.metadata)
        return target

    def _lock_for(self, job_id: str, variant: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault((job_id, variant), threading.Lock())

    def sweep(self, keep: set[str]) -> int:
        """Remove what a crash or a race can leave: temp files, and files of jobs that are not completed.

        Run at start, before any worker, when nothing is being written. Returns the number of files removed.
        """
        removed = 0
        for path in self.folder.iterdir():
            job_id = path.name.split(".", 1)[0]
            if path.is_file() and (path.name.startswith(".") or job_id not in keep):
                path.unlink(missing_ok=True)
                removed += 1
        return removed
