"""Where the videos live: ``<data>/videos/<job id>.<format>``, named only from job ids that the store made; and
what requests bring: uploaded init videos and images in ``<data>/uploads/``, and the LoRA adapters of ``--lora-dir``.

No part of a request becomes a path: a request's id is looked up in the store first, and the name is built from
the stored id, which :data:`ID_PATTERN` checks again here. Uploads are named by the server (:data:`UPLOAD_PATTERN`),
and a LoRA name must match :data:`LORA_PATTERN` (no separators, no leading dot) and be a file or folder directly in
the adapter folder. Every file is written beside its target and renamed (``cinematic.video.write``), so a reader
never sees half a video.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
import threading
import time
from pathlib import Path

from cinematic import video
from cinematic.errors import CinematicError
from cinematic.serve.store import ID_PATTERN, Params

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

    def remove(self, job_id: str, keep_mp4: bool = False) -> None:
        """Remove the job's files: the variants first, the mp4 last (unless ``keep_mp4``)."""
        for variant in VARIANTS[::-1]:
            if variant == "mp4" and keep_mp4:
                continue
            self.path(job_id, variant).unlink(missing_ok=True)
            with self._locks_lock:
                self._locks.pop((job_id, variant), None)

    def left(self, job_id: str) -> bool:
        """Whether any file of the job is on disk."""
        return any(self.path(job_id, variant).exists() for variant in VARIANTS)

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

    def sweep(self, keep: set[str], temp_files: bool = True) -> int:
        """Remove what a crash or a race can leave: temp files, and files of jobs not in ``keep``.

        Run at start, before any worker, when nothing is being written. Returns the number of files removed. In a
        fleet other servers may be writing into the folder: ``keep`` holds every job that is not deleted, and
        ``temp_files=False`` leaves temp files alone (a half-written file costs disk space, never a wrong video).
        """
        removed = 0
        for path in self.folder.iterdir():
            job_id = path.name.split(".", 1)[0]
            temp = path.name.startswith(".")
            if path.is_file() and ((temp and temp_files) or (not temp and job_id not in keep)):
                path.unlink(missing_ok=True)
                removed += 1
        return removed


UPLOAD_PATTERN = re.compile(r"^upload_[0-9a-f]{32}\.(?:bin|webp)$")
LORA_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Inputs:
    """Uploaded pictures (``<data>/uploads``) and the adapters of ``lora_dir`` (None: requests may name none)."""

    def __init__(self, folder: Path, lora_dir: Path | None = None):
        self.folder, self.lora_dir = folder, lora_dir
        self.folder.mkdir(parents=True, exist_ok=True)

    def save(self, data: bytes) -> str:
        """Store an upload (written to a temporary file, then renamed) and return its name."""
        suffix = "webp" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else "bin"  # FFmpeg sniffs the rest
        name = f"upload_{secrets.token_hex(16)}.{suffix}"
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.folder / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return name

    def sweep(self, keep: set[str], older_than: float = 0.0) -> int:
        """Remove the uploads no job refers to and half-written temporary files: what a crash between saving an
        upload and queueing its job leaves. Run at start, before any request. Returns the number removed. In a
        fleet another server may be between those two steps: ``older_than`` (seconds) spares recent files."""
        removed = 0
        now = time.time()
        for path in self.folder.iterdir():
            if (
                path.is_file()
                and path.name not in keep
                and (path.name.startswith(".tmp-") or UPLOAD_PATTERN.fullmatch(path.name))
                and (older_than <= 0 or now - path.stat().st_mtime > older_than)
            ):
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def path(self, name: str) -> Path:
        if not UPLOAD_PATTERN.fullmatch(name):
            raise ValueError(f"not an upload: {name!r}")
        return self.folder / name

    def remove(self, *names: str | None) -> None:
        for name in names:
            if name is not None:
                self.path(name).unlink(missing_ok=True)

    def loras(self) -> list[str]:
        """The adapter names on offer."""
        if self.lora_dir is None or not self.lora_dir.is_dir():
            return []
        names = (p.stem if p.suffix == ".safetensors" else p.name for p in self.lora_dir.iterdir())
        return sorted(n for n in names if LORA_PATTERN.fullmatch(n))

    def lora(self, name: str) -> Path | None:
        """The adapter ``name`` (a ``.safetensors`` file or a folder), or None if there is no such adapter."""
        if self.lora_dir is None or not LORA_PATTERN.fullmatch(name):
            return None
        for path in (self.lora_dir / f"{name}.safetensors", self.lora_dir / name):
            if path.exists() and path.parent == self.lora_dir:
                return path
        return None

    def call_kwargs(self, params: Params) -> dict:
        """The file arguments of ``Pipeline.__call__`` for ``params``: pictures and adapters."""
        kwargs: dict = {}
        if params.init_video is not None:  # decoded here, as the request was checked: the first num_frames only
            from cinematic.generation.pictures import load_video

            kwargs["init_video"] = load_video(self.path(params.init_video), params.settings.num_frames)
        if params.init_image is not None:
            kwargs["init_image"] = self.path(params.init_image)
        if params.loras:
            kwargs["loras"] = []
            for name, scale in params.loras:
                path = self.lora(name)
                if path is None:
                    raise CinematicError(f"LoRA adapter {name!r} is no longer in the server's adapter folder")
                kwargs["loras"].append((path, scale))
        return kwargs
