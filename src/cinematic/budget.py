"""How much one read of a video or picture may decode: a :class:`Budget`, checked against what the file's headers
declare before any frame is decoded, and again frame by frame as it decodes.

A compressed file can declare far more than it holds: a 43-byte GIF whose logical screen is 16000x16000 decodes to
a 1 GB canvas, and a 68-byte PNG to 768 MB, at once and for each frame. So the declared size and frame count are
read first (FFmpeg's demuxers and Pillow both read them without decoding), and FFmpeg is also given the pixel limit
itself (its ``max_pixels`` option), so that no decoder allocates a frame over it, whatever the headers said.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from cinematic.errors import CinematicError

RGB_BYTES = 3  # per decoded pixel (uint8 RGB)


@dataclass(frozen=True)
class Budget:
    """The most one read may decode: pixels per frame, frames, and bytes of RGB frames in all."""

    max_pixels: int = 4096 * 4096
    max_frames: int = 1024  # cinematic.settings.MAX_FRAMES: no call can use more
    max_bytes: int = 2 * 2**30

    def __post_init__(self) -> None:
        if min(self.max_pixels, self.max_frames, self.max_bytes) < 1:
            raise ValueError(f"every limit of a Budget must be at least 1: {self}")

    def ffmpeg_options(self) -> dict[str, str]:
        """Options for ``av.open``: every decoder refuses a frame over ``max_pixels`` (the open's probe included)."""
        return {"max_pixels": str(self.max_pixels)}

    def frames_to_read(self, num_frames: int | None) -> int:
        """How many frames a read of the first ``num_frames`` (None: all) may decode."""
        if num_frames is not None and num_frames > self.max_frames:
            raise CinematicError(f"{num_frames} frames were asked for, over the limit of {self.max_frames}")
        return self.max_frames if num_frames is None else num_frames

    def check_size(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise CinematicError(f"its frames are {width}x{height}, over the limit of {self.frame_limit} pixels")

    def check_frames(self, count: int) -> None:
        if count > self.max_frames:
            raise CinematicError(f"it has {count} frames or more, over the limit of {self.max_frames}")

    def check_bytes(self, size: int, what: str) -> None:
        """``what`` (some frames), ``size`` bytes once decoded, fits in ``max_bytes``."""
        if size > self.max_bytes:
            raise CinematicError(f"{what} decode to {_bytes(size)}, over the limit of {_bytes(self.max_bytes)}")

    def check_declared(self, count: int | None, width: int, height: int, num_frames: int | None) -> None:
        """What a file declares (``count`` frames, None when it does not say) against the budget of a read of its
        first ``num_frames`` frames (None: all of them)."""
        self.check_size(width, height)
        wanted = self.frames_to_read(num_frames)
        if num_frames is None and count is not None:
            self.check_frames(count)
        frames = min(wanted, count or 1)
        self.check_bytes(frames * width * height * RGB_BYTES, f"{frames} frames of {width}x{height}")

    def check_header(self, path: Path) -> None:
        """The size a picture file declares (PNG, JPEG, GIF, WebP...: the formats Pillow reads headers of), against
        ``max_pixels``. Nothing is decoded; a file Pillow does not know is left to FFmpeg."""
        from PIL import Image

        try:
            with warnings.catch_warnings():  # Pillow's own bomb warning: the check below is stricter
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    width, height = image.size
        except Image.DecompressionBombError:  # over Pillow's limit, which is far over any budget's
            raise CinematicError(f"its frames are over the limit of {self.frame_limit} pixels") from None
        except Exception:  # not a picture Pillow knows (an mp4...), or a damaged one: FFmpeg will say
            return
        self.check_size(width, height)

    @property
    def frame_limit(self) -> str:
        """``max_pixels`` in words: ``4096x4096`` for a square number."""
        side = math.isqrt(self.max_pixels)
        return f"{side}x{side}" if side * side == self.max_pixels else f"{self.max_pixels:,}"


def _bytes(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n:,} bytes"


DEFAULT = Budget()
