"""Captioned video files: a captions.jsonl or captions.csv listing videos, read as ``[3, F, H, W]`` clips."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cinematic.data.frames import resize_and_crop
from cinematic.errors import CinematicError

CAPTION_FILES = ("captions.jsonl", "captions.csv")
FILE_FRAMES, FILE_SIZE = 16, 256  # text-to-video-ms-1.7b's trained clip


@dataclass(frozen=True)
class Clip:
    path: Path
    caption: str


def find_captions(data: str | Path) -> Path:
    """The captions file itself, or the captions.jsonl / captions.csv inside a folder."""
    path = Path(data).expanduser()
    if path.is_dir():
        for name in CAPTION_FILES:
            if (path / name).is_file():
                return path / name
        raise CinematicError(f"{path} holds no {' or '.join(CAPTION_FILES)}")
    if not path.is_file():
        raise CinematicError(f"no such captions file: {path}")
    return path


def read_captions(path: Path) -> list[Clip]:
    """A JSONL of ``{"path": ..., "caption": ...}`` or a CSV with ``path`` and ``caption`` columns.

    Video paths are relative to the captions file. Every listed video must exist.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CinematicError(f"cannot read {path}: {e}") from None
    rows = _csv_rows(path, text) if path.suffix.lower() == ".csv" else _jsonl_rows(path, text)
    if not rows:
        raise CinematicError(f"{path} lists no videos")
    clips = []
    for line, row in rows:
        video, caption = row.get("path"), row.get("caption")
        if not isinstance(video, str) or not video or not isinstance(caption, str):
            raise CinematicError(f"{path}:{line}: expected a 'path' and a 'caption' (both strings)")
        clip = Clip((path.parent / video).expanduser(), caption)
        if not clip.path.exists():
            raise CinematicError(f"{path}:{line}: video not found: {clip.path}")
        clips.append(clip)
    return clips


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CinematicError(f"{path}:{number}: not valid JSON: {e}") from None
        if not isinstance(row, dict):
            raise CinematicError(f"{path}:{number}: expected a JSON object with 'path' and 'caption'")
        rows.append((number, row))
    return rows


def _csv_rows(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None:
        return []
    if not {"path", "caption"} <= set(reader.fieldnames):
        raise CinematicError(f"{path}: the CSV needs 'path' and 'caption' columns, found {reader.fieldnames}")
    return [(reader.line_num, row) for row in reader]


def probe(path: Path) -> None:
    """Fail now, with the file's name, on a video FFmpeg cannot open (rather than hours into a run)."""
    if path.is_dir() or path.suffix.lower() == ".webp":
        return  # folders of PNG frames and animated webp are read without FFmpeg; read() reports their errors
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise CinematicError(f"cannot read video {path}: it has no video stream")
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise CinematicError(f"cannot read video {path}: {str(e).splitlines()[0]}") from None


class VideoFiles:
    """Captioned video files as ``[3, F, H, W]`` clips: ``F`` frames ``stride`` apart, resized to cover
    ``H x W`` and centre-cropped. ``sample`` starts the clip at a random frame; ``[i]`` at the first."""

    def __init__(self, clips: Sequence[Clip], frames: int, height: int, width: int, stride: int = 1):
        self.clips = list(clips)
        self.frames, self.height, self.width, self.stride = frames, height, width, stride
        self.captions = [c.caption for c in self.clips]

    @classmethod
    def from_captions(cls, data: str | Path, frames: int, height: int, width: int, stride: int = 1) -> VideoFiles:
        clips = read_captions(find_captions(data))
        for clip in clips:
            probe(clip.path)
        return cls(clips, frames, height, width, stride)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.sample(index, None)

    def sample(self, index: int, rng: torch.Generator | None) -> dict[str, Any]:
        from cinematic import video

        clip = self.clips[index]
        frames = torch.from_numpy(video.read(clip.path).frames)  # uint8 [N,H,W,3]
        frames = self._pick_frames(frames, rng)
        return {"video": resize_and_crop(frames, self.height, self.width), "caption": clip.caption}

    def _pick_frames(self, frames: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
        """``self.frames`` frames ``stride`` apart (closer when the video is short; its last frame repeated when
        it has too few)."""
        n, want = frames.shape[0], self.frames
        stride = max(1, min(self.stride, (n - 1) // max(want - 1, 1)))
        span = (want - 1) * stride + 1
        start = 0
        if rng is not None and n > span:
            start = int(torch.randint(0, n - span + 1, (1,), generator=rng))
        index = (start + torch.arange(want) * stride).clamp(max=n - 1)
        return frames[index]
