"""Round trips through every output format, the mp4 layout browsers need, and atomic writes that leave nothing
behind when they fail. Frames are tiny (48x64, 6 frames) so the whole file runs in a few seconds on two cores."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from cinematic import video
from cinematic.errors import CinematicError

METADATA = {
    "prompt": 'a café at night, 夜の街 🎬 "quoted"\nsecond line',
    "negative_prompt": "",
    "seed": 1234567890123,
    "guidance": 9.0,
    "eta": 0.1,
    "steps": 25,
    "size": [256, 256],
    "sampler": {"name": "ddim", "clip": None, "ok": True},
}

# Mean absolute error bounds (0-255 scale) on `_pattern`, measured -> bound:
#   mp4 2.4 / webm 1.7: crf 18 / 24 plus 4:2:0 chroma; a half-pixel chroma-siting mismatch between encoder and
#     decoder (swscale's default) measured 5.5, so 4 catches that regression.
#   gif 4.7: 255-colour palette with error-diffusion dither over a full-colour pattern.
#   webp 5.2: libwebp quality 90 with its own RGB -> YUV conversion.
# Every bound is far below the 44 between consecutive frames, so a dropped, duplicated or reordered frame fails.
TOLERANCE = {".mp4": 4.0, ".webm": 4.0, ".gif": 7.0, ".webp": 8.0, "": 0.0}
LOSSY = [".mp4", ".webm", ".gif", ".webp"]


def _pattern(frames: int = 6, height: int = 48, width: int = 64) -> np.ndarray:
    """Smooth sinusoids that scroll every frame (red right, green up) over a static blue ramp: [F, H, W, 3]."""
    t = np.arange(frames)[:, None, None]
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    red = 128 + 100 * np.sin(2 * np.pi * (x + 3 * t) / 16) + 0 * y
    green = 128 + 100 * np.sin(2 * np.pi * (y - 2 * t) / 12) + 0 * x
    blue = 40 + 170 * (x + y + 0 * t) / (height + width)
    return np.stack(np.broadcast_arrays(red, green, blue), axis=-1).round().astype(np.uint8)


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _top_level_boxes(data: bytes) -> list[str]:
    """The types of an ISO-BMFF file's top-level boxes, in order (ISO/IEC 14496-12 §4.2)."""
    boxes, offset = [], 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if size == 1:  # a 64-bit size follows the type
            (size,) = struct.unpack(">Q", data[offset + 8 : offset + 16])
        elif size == 0:  # the box runs to the end of the file
            size = len(data) - offset
        assert size >= 8, f"corrupt box {kind!r} at {offset}"
        boxes.append(kind.decode("latin-1"))
        offset += size
    assert offset == len(data)
    return boxes


@pytest.mark.parametrize("ext", [*LOSSY, ""])
def test_round_trip(tmp_path: Path, ext: str) -> None:
    frames = _pattern()
    path = video.write(tmp_path / f"clip{ext}", frames, fps=8, metadata=METADATA)
    decoded = video.read(path)
    assert decoded.frames.dtype == np.uint8
    assert decoded.frames.shape == frames.shape
    assert decoded.fps == 8.0
    errors = [_mae(got, want) for got, want in zip(decoded.frames, frames)]
    assert max(errors) <= TOLERANCE[ext], errors
    assert _listing(tmp_path) == [path.name]  # no temp files left over


@pytest.mark.parametrize("ext", [*LOSSY, ""])
@pytest.mark.parametrize(("fps", "expected"), [(24, 24.0), (7.5, 7.5), (12.5, 12.5), (30000 / 1001, None)])
def test_frame_rates(tmp_path: Path, ext: str, fps: float, expected: float | None) -> None:
    decoded = video.read(video.write(tmp_path / f"clip{ext}", _pattern(12, 16, 16), fps=fps))
    if expected is None:
        # mp4, webm and png store 30000/1001 exactly; gif (1/100 s) and webp (1/1000 s) clocks cannot tell it
        # from 30 over a few frames, and read picks the simplest consistent rate.
        expected = 30.0 if ext in (".gif", ".webp") else 30000 / 1001
    assert decoded.fps == pytest.approx(expected, rel=1e-9)
    assert len(decoded.frames) == 12


def test_mp4_is_browser_ready(tmp_path: Path) -> None:
    path = video.write(tmp_path / "clip.mp4", _pattern(), fps=8, metadata=METADATA)
    boxes = _top_level_boxes(path.read_bytes())
    assert boxes.index("moov") < boxes.index("mdat"), boxes  # faststart
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 8
        assert json.loads(container.metadata["comment"]) == METADATA
        frame = next(container.decode(stream))
        assert (frame.colorspace, frame.color_range) == (1, 1)  # tagged BT.709, limited range
    assert video.read(path).metadata == METADATA


# Encodes frames that once came out differently from run to run, and prints the file's hash.
_ENCODE_SCRIPT = """
import hashlib, sys
import numpy as np
from cinematic import video
from cinematic.data.shapes import render_clip
frames = render_clip("a green triangle moving right", 12).astype(np.int16)
frames += np.random.default_rng(0).integers(-6, 7, frames.shape, dtype=np.int16)
frames = np.ascontiguousarray(np.repeat(np.clip(frames, 0, 255).astype(np.uint8), 3, axis=2))  # 32 x 96
print(hashlib.sha256(video.write(sys.argv[1], frames, fps=8, metadata={"id": "x"}).read_bytes()).hexdigest())
"""


def test_mp4_bytes_depend_on_the_frames_alone(tmp_path: Path) -> None:
    # glibc's MALLOC_PERTURB_ fills new allocations with a pattern: an encoder that reads memory it never wrote
    # (libx264's AVX-512 code on frames that are not a multiple of 128 wide, see video._x264_cpu_options) writes a
    # different file under each pattern. Three processes, three patterns, one file.
    hashes = set()
    for pattern in ("0", "85", "170"):
        env = {**os.environ, "MALLOC_PERTURB_": pattern}
        out = tmp_path / f"clip-{pattern}.mp4"
        command = [sys.executable, "-c", _ENCODE_SCRIPT, str(out)]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        hashes.add(result.stdout.strip())
    assert len(hashes) == 1, hashes


def test_webm_is_vp9_with_metadata(tmp_path: Path) -> None:
    path = video.write(tmp_path / "clip.webm", _pattern(3), metadata=METADATA)
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == "vp9"
    assert video.read(path).metadata == METADATA


def test_frames_folder_layout(tmp_path: Path) -> None:
    folder = video.write(tmp_path / "frames", _pattern(3), fps=7.5, metadata=METADATA)
    assert _listing(folder) == ["frame_0000.png", "frame_0001.png", "frame_0002.png", "metadata.json"]
    assert json.loads((folder / "metadata.json").read_text(encoding="utf-8")) == {"fps": 7.5, "metadata": METADATA}
    assert video.read(folder).metadata == METADATA
    # A trailing slash names a folder too, even with a dot in its name.
    assert video.write(f"{tmp_path}/run.v2/", _pattern(1)).is_dir()


def test_gif_and_webp_loop_forever_and_drop_metadata(tmp_path: Path) -> None:
    gif = video.write(tmp_path / "clip.gif", _pattern(3), metadata=METADATA).read_bytes()
    assert b"NETSCAPE2.0\x03\x01\x00\x00" in gif  # application extension, loop count 0 = forever
    webp = video.write(tmp_path / "clip.webp", _pattern(3), metadata=METADATA).read_bytes()
    anim = webp.index(b"ANIM")
    assert struct.unpack("<H", webp[anim + 12 : anim + 14]) == (0,)  # after size and background colour
    # Neither muxer keeps tags: documented, and read says so with an empty dict.
    assert video.read(tmp_path / "clip.gif").metadata == {}
    assert video.read(tmp_path / "clip.webp").metadata == {}


@pytest.mark.parametrize("ext", [*LOSSY, ""])
def test_odd_size_is_restored(tmp_path: Path, ext: str) -> None:
    frames = _pattern(3, height=17, width=33)
    decoded = video.read(video.write(tmp_path / f"odd{ext}", frames))
    assert decoded.frames.shape == frames.shape
    assert _mae(decoded.frames, frames) <= TOLERANCE[ext] + 1.0  # small frames: edges weigh more


def test_mp4_pads_odd_size_with_edge_pixels(tmp_path: Path) -> None:
    frames = _pattern(2, height=17, width=33)
    path = video.write(tmp_path / "odd.mp4", frames)
    with av.open(str(path)) as container:
        stored = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert stored.shape == (2, 18, 34, 3)  # yuv420p needs even sizes: one replicated row and column
    # The added row and column repeat their neighbours (which share their chroma sample), unlike black padding.
    assert _mae(stored[:, 17], stored[:, 16]) < 3
    assert _mae(stored[:, :, 33], stored[:, :, 32]) < 3


def test_accepts_a_torch_tensor(tmp_path: Path) -> None:
    frames = torch.from_numpy(_pattern(2))
    assert np.array_equal(video.read(video.write(tmp_path / "t", frames)).frames, frames.numpy())


def test_import_does_not_load_av() -> None:
    code = "import sys, cinematic.video; assert 'av' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- refusing early, and leaving nothing behind ------------------------------------------------------------


def test_unsupported_extension(tmp_path: Path) -> None:
    with pytest.raises(CinematicError, match=r"'\.avi'.*\.mp4, \.webm, \.gif, \.webp"):
        video.write(tmp_path / "clip.avi", _pattern(1))
    with pytest.raises(CinematicError, match="'.mkv'"):
        video.check_writable(tmp_path / "clip.MKV")
    assert _listing(tmp_path) == []


def test_missing_or_unusable_folder(tmp_path: Path) -> None:
    with pytest.raises(CinematicError, match=f"{tmp_path / 'missing'} does not exist"):
        video.write(tmp_path / "missing" / "clip.mp4", _pattern(1))
    (tmp_path / "file").write_text("x")
    with pytest.raises(CinematicError, match="is not a folder"):
        video.check_writable(tmp_path / "file" / "clip.mp4")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CinematicError, match="not a folder of frames"):
        video.write(tmp_path / "mine", _pattern(1))  # would otherwise replace the user's folder
    assert _listing(tmp_path) == ["file", "mine"]
    assert _listing(tmp_path / "mine") == ["notes.txt"]


def test_unwritable_folder() -> None:
    # /proc refuses new files even to root, whose writes permission bits would not stop.
    with pytest.raises(CinematicError, match="not writable"):
        video.check_writable("/proc/clip.mp4")


def test_check_writable_creates_nothing(tmp_path: Path) -> None:
    assert video.check_writable(tmp_path / "clip.mp4") == tmp_path / "clip.mp4"
    assert video.check_writable(f"{tmp_path}/frames/") == tmp_path / "frames"
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("ext", [*LOSSY, ""])
@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_failure_mid_write_leaves_folder_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ext: str, failure: type[BaseException]
) -> None:
    target = tmp_path / f"clip{ext}"
    video.write(target, _pattern(2), fps=8)  # an earlier result, which a failed write must not touch
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    real, calls = video._rgb_frame, []

    def fail_on_third_frame(rgb: np.ndarray) -> av.VideoFrame:
        calls.append(1)
        if len(calls) == 3:
            raise failure("interrupted mid-write")
        return real(rgb)

    monkeypatch.setattr(video, "_rgb_frame", fail_on_third_frame)
    with pytest.raises(failure):
        video.write(target, _pattern(6), fps=8)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before
    assert _listing(tmp_path) == [target.name]


def test_bad_arguments_fail_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        video.write(tmp_path / "a.mp4", _pattern(1).astype(np.float32))
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        video.write(tmp_path / "a.mp4", _pattern(1)[0])
    with pytest.raises(CinematicError, match="fps"):
        video.write(tmp_path / "a.mp4", _pattern(1), fps=0)
    with pytest.raises(CinematicError, match="gif"):
        video.write(tmp_path / "a.gif", _pattern(1), fps=60)
    with pytest.raises(TypeError):
        video.write(tmp_path / "a.mp4", _pattern(1), metadata={"x": object()})
    assert _listing(tmp_path) == []


def test_read_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all")
    (tmp_path / "junk.webp").write_bytes(b"RIFF junk")
    (tmp_path / "empty").mkdir()
    for path in ["missing.mp4", "junk.mp4", "junk.webp", "empty"]:
        with pytest.raises(CinematicError) as caught:
            video.read(tmp_path / path)
        assert "\n" not in str(caught.value) and str(tmp_path / path) in str(caught.value)
