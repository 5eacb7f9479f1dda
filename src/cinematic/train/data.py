"""Training data: the shapes generator or a folder of captioned video files, and the order they are seen in.

Every random choice is a pure function of ``(seed, position)``: which item the n-th sample of the run is (a fresh
permutation per epoch), and where a clip starts inside its video. A resumed run therefore sees exactly the batches
an uninterrupted run would have seen, with no sampler state to save.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from cinematic.errors import CinematicError

CAPTION_FILES = ("captions.jsonl", "captions.csv")
SHAPES_FRAMES, SHAPES_SIZE = 16, 32  # the shapes generator's defaults
FILE_FRAMES, FILE_SIZE = 16, 256  # text-to-video-ms-1.7b's trained clip

# Independent random streams, one per use (see derive_seed).
ORDER, SAMPLE, STEP, MODULES, INIT, PREVIEW = range(1, 7)


def derive_seed(seed: int, *words: int) -> int:
    """A 63-bit seed for the stream ``(seed, *words)``; different word tuples give independent streams."""
    state = np.random.SeedSequence([seed, *words]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def generator(seed: int, *words: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(derive_seed(seed, *words))


class VideoDataset(Protocol):
    """``dataset[i] -> {"video": float32 [3, F, H, W] in [-1, 1], "caption": str}``.

    A dataset may also define ``sample(i, generator)`` for random augmentation (the loader then calls that with a
    generator seeded from the sample's position in the run) and ``captions`` (every caption, for a new tokenizer).
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


# --- captioned video files ----------------------------------------------------------------------------------------


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


def resize_and_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 ``[F, h, w, 3]`` -> float32 ``[3, F, height, width]`` in [-1, 1]: scaled to cover, centre-cropped."""
    x = frames.permute(0, 3, 1, 2).float()  # [F,h,w,3] -> [F,3,h,w]
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=scale < 1, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    return (x / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()  # [F,3,H,W] -> [3,F,H,W]


def shapes(frames: int, size: int, seed: int) -> tuple[VideoDataset, tuple[str, ...]]:
    """The shapes generator on its training captions, and all 48 captions (the held-out ones recombine words the
    training captions already use, so they may shape the vocabulary)."""
    from cinematic.data.shapes import ALL_CAPTIONS, TRAIN_CAPTIONS, ShapesDataset

    return ShapesDataset(TRAIN_CAPTIONS, size=size, frames=frames, seed=seed), ALL_CAPTIONS


def vocabulary_texts(dataset: VideoDataset) -> list[str]:
    captions = getattr(dataset, "captions", None)
    if captions is None:
        captions = [dataset[i]["caption"] for i in range(len(dataset))]
    return list(captions)


# --- the order of the run -----------------------------------------------------------------------------------------


class BatchPlan:
    """The keys of every micro-batch from ``start_step`` to ``end_step``, as a ``batch_sampler``.

    Sample ``p`` of the run (counting every micro-batch of every step) is item ``perm_e[p % N]`` of a dataset of
    ``N`` items, ``perm_e`` being the permutation of epoch ``e = p // N``; its key also carries the seed of its own
    augmentation stream.
    """

    def __init__(self, size: int, batch_size: int, accum: int, seed: int, start_step: int, end_step: int):
        self.size, self.batch_size, self.accum, self.seed = size, batch_size, accum, seed
        self.start_step, self.end_step = start_step, end_step
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return (self.end_step - self.start_step) * self.accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for micro in range(self.start_step * self.accum, self.end_step * self.accum):
            first = micro * self.batch_size
            yield [self.key(p) for p in range(first, first + self.batch_size)]

    def key(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.size)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=generator(self.seed, ORDER, epoch))
        return int(self._perm[offset]), derive_seed(self.seed, SAMPLE, position)


class Keyed:
    """A dataset indexed by ``BatchPlan`` keys: ``(index, sample_seed) -> item``."""

    def __init__(self, dataset: VideoDataset):
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        sample = getattr(self.dataset, "sample", None)
        if sample is not None:
            return sample(index, torch.Generator("cpu").manual_seed(seed))
        return self.dataset[index]


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    shapes = {tuple(item["video"].shape) for item in items}
    if len(shapes) > 1:
        raise CinematicError(f"the clips of one batch differ in shape: {sorted(shapes)}")
    return {"video": torch.stack([item["video"] for item in items]), "caption": [item["caption"] for item in items]}


def loader(dataset: VideoDataset, plan: BatchPlan, workers: int = 0, pin: bool = False) -> Iterator[dict[str, Any]]:
    from torch.utils.data import DataLoader

    return iter(DataLoader(Keyed(dataset), batch_sampler=plan, num_workers=workers, collate_fn=collate, pin_memory=pin))
