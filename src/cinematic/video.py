"""Write and read videos: mp4 (H.264), webm (VP9), animated gif and webp, and folders of PNG frames.

Every write goes to a hidden temporary file (or folder) beside the target and is renamed into place, so an
exception or Ctrl-C mid-write never leaves a half-written video behind. Encoding and decoding use PyAV
(FFmpeg's libraries), imported lazily so that importing cinematic stays fast.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cinematic.budget import DEFAULT as DEFAULT_BUDGET
from cinematic.budget import RGB_BYTES, Budget
from cinematic.errors import CinematicError

if TYPE_CHECKING:
    import av
    import torch

SUPPORTED_EXTENSIONS: tuple[str, ...] = (".mp4", ".webm", ".gif", ".webp")
"""File extensions `write` accepts. A path with no extension, or ending in '/', is a folder of PNG frames."""

_ALLOWED = ", ".join(SUPPORTED_EXTENSIONS) + ", or a folder (no extension, or a trailing '/') of PNG frames"
_METADATA_TAG = "comment"  # the caller's metadata, as JSON
# The frame size before padding to even dimensions. mp4's muxer keeps only a fixed set of tag names,
# so this borrows "description" rather than inventing a key that would be dropped.
_SIZE_TAG = "description"
_FRAME_NAME = re.compile(r"frame_(\d+)\.png")
_FOLDER_METADATA = "metadata.json"
_GIF_MAX_FPS = 50  # gif delays are whole centiseconds, and browsers play delays under 2 as 10
_DEFAULT_FPS = 8.0  # for a folder of PNG frames that has no metadata.json


@dataclass
class VideoData:
    """Decoded video: RGB frames, their rate, and the metadata dict stored by `write` ({} when absent)."""

    frames: np.ndarray  # uint8 [F, H, W, 3]
    fps: float
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Encoding:
    format: str  # FFmpeg muxer
    codec: str
    pix_fmt: str
    codec_options: dict[str, str]
    container_options: dict[str, str]
    chroma_loc: str | None = None  # where 4:2:0 chroma sits, for the formats whose RGB -> YUV conversion we do


_ENCODINGS = {
    # crf 18 is visually lossless for H.264; High profile + yuv420p plays in every browser, and faststart
    # moves the moov atom before mdat so playback can start before the download ends. H.264 streams that
    # signal no chroma siting are read as left-sited (the MPEG-2 convention), so the chroma is put there.
    "mp4": _Encoding(
        "mp4", "libx264", "yuv420p", {"crf": "18", "preset": "medium"}, {"movflags": "+faststart"}, "left"
    ),
    # b=0 makes crf a constant-quality target for libvpx-vp9; row-mt uses both cores. Nothing signals
    # chroma siting in this webm, and FFmpeg then assumes centred chroma.
    "webm": _Encoding("webm", "libvpx-vp9", "yuv420p", {"crf": "24", "b": "0", "row-mt": "1"}, {}, "center"),
    # libwebp converts RGB to YUV itself, so it gets bgra; loop=0 loops forever.
    "webp": _Encoding("webp", "libwebp_anim", "bgra", {"quality": "90"}, {"loop": "0"}),
    "gif": _Encoding("gif", "gif", "pal8", {}, {"loop": "0"}),
}


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Validate the extension and the output folder of `path`, cheaply, before any generation starts.

    Raises CinematicError naming the bad extension or folder; returns the target as a Path.
    """
    kind = _kind(path)
    target = Path(path).expanduser()
    folder = target.absolute().parent
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise CinematicError(f"output folder {folder} {problem}")
    if kind == "png" and target.exists() and not _is_frames_folder(target):
        raise CinematicError(f"{target} exists and is not a folder of frames written by cinematic; choose another")
    if kind != "png" and target.is_dir():
        raise CinematicError(f"{target} is a folder, not a {kind} file")
    _probe_writable(folder)
    return target


def write(
    path: str | os.PathLike[str],
    frames: np.ndarray | torch.Tensor,
    fps: float = 8,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write uint8 RGB frames [F, H, W, 3] to `path`, in the format its extension names; return the path.

    mp4 needs even sizes (yuv420p): an odd height or width is padded by one replicated edge pixel, the true
    size is recorded, and `read` crops it off again. `metadata` is stored as JSON in mp4 and webm; the gif
    and webp muxers keep no tags, so it is lost there, and a PNG folder keeps it in metadata.json.
    """
    target = check_writable(path)
    kind = _kind(path)
    frames, rate, metadata = _as_frames(frames), _rate(fps), dict(metadata or {})
    tags = {_METADATA_TAG: json.dumps(metadata, ensure_ascii=False)}  # fails here, before any file exists
    try:
        if kind == "png":
            _write_frames_folder(target, frames, float(rate), metadata)
        else:
            _write_file(target, _ENCODINGS[kind], frames, rate, tags)
    except OSError as error:  # a full disk, a quota, a folder removed mid-write (FFmpeg's write errors included)
        raise CinematicError(f"cannot write {target}: {_one_line(error)}") from error
    return target


def read(path: str | os.PathLike[str], num_frames: int | None = None, budget: Budget = DEFAULT_BUDGET) -> VideoData:
    """Decode a video (any format FFmpeg reads), an animated webp, or a folder of PNG frames.

    Only the first ``num_frames`` frames are decoded (None: all). What the file declares (frame size, frame count,
    duration) is checked against ``budget`` before any frame is decoded, and what is decoded is held to it too: a
    file over it is a CinematicError naming the limit (see :mod:`cinematic.budget`).
    """
    source = Path(path).expanduser()
    if not (source.is_dir() or source.is_file()):
        raise CinematicError(f"no such video file: {source}")
    try:
        if source.is_dir():
            return _read_frames_folder(source, num_frames, budget)
        budget.check_header(source)
        if source.suffix.lower() == ".webp":
            return _read_webp(source, num_frames, budget)
        _require_av()
        import av

        try:
            with av.open(str(source), options=budget.ffmpeg_options()) as container:
                return _decode(container, num_frames, budget)
        except (av.error.FFmpegError, UnicodeDecodeError) as error:
            raise CinematicError(_one_line(error)) from error
    except CinematicError as error:
        raise CinematicError(f"cannot read video {source}: {error}") from error


# --- paths and atomic replacement -----------------------------------------------------------------------


def _kind(path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    suffix = Path(text).suffix.lower()
    if text.endswith(("/", os.sep)) or not suffix:
        return "png"
    if suffix not in SUPPORTED_EXTENSIONS:
        raise CinematicError(f"unsupported video extension {suffix!r} in {text}: use {_ALLOWED}")
    return suffix[1:]


def _temp_sibling(target: Path) -> Path:
    # Hidden and beside the target, so the final rename stays on one filesystem and is atomic.
    return target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")


def _probe_writable(folder: Path) -> None:
    # Actually creating a file catches read-only mounts and ACLs that os.access (and running as root) miss.
    probe = _temp_sibling(folder / "probe")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        os.unlink(probe)
    except OSError as error:
        raise CinematicError(f"output folder {folder} is not writable: {error.strerror}") from error


@contextmanager
def _atomic_file(target: Path) -> Iterator[Path]:
    tmp = _temp_sibling(target)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:  # also KeyboardInterrupt: never leave the temp file behind
        tmp.unlink(missing_ok=True)
        raise


def _is_frames_folder(folder: Path) -> bool:
    """True for a folder holding only what `write` puts in one, which is therefore safe to replace."""
    if not folder.is_dir():
        return False
    return all(_FRAME_NAME.fullmatch(p.name) or p.name == _FOLDER_METADATA for p in folder.iterdir())


def _replace_folder(new: Path, target: Path) -> None:
    # A folder cannot be renamed over a non-empty one, so move the old frames aside first.
    if not target.exists():
        os.rename(new, target)
        return
    old = _temp_sibling(target)
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --- frames and rates ------------------------------------------------------------------------------------


def _as_frames(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    if hasattr(frames, "detach"):  # a torch.Tensor, without importing torch here
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    return np.ascontiguousarray(frames)


def _rate(fps: float) -> Fraction:
    if not (math.isfinite(fps) and fps > 0):
        raise CinematicError(f"fps must be a positive number, got {fps}")
    # Exact for integers and halves (8, 7.5), and 1001 keeps NTSC rates like 30000/1001 exact too.
    return Fraction(fps).limit_denominator(1001)


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    _, height, width, _ = frames.shape
    # Replicating the edge (rather than black) keeps the padded pixel from bleeding into chroma.
    return np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def _simplest_rate(times: list[float], tick: float) -> float:
    """The rate with the smallest denominator that explains frame timestamps `times` (seconds, > 1 frame).

    gif and webp round timestamps to their clock (1/100 s and 1/1000 s), so 8 fps comes back from a gif as
    7.95 on average. A rate explains the timestamps when their offsets from its ideal grid all fit in one
    tick (true of rounding, flooring or any quantizer); over a few frames several rates may, hence "simplest".
    """
    steps = np.arange(len(times))
    elapsed = np.asarray(times) - times[0]
    measured = steps[-1] / elapsed[-1]
    for denominator in range(1, 1002):
        for numerator in sorted({math.floor(measured * denominator), math.ceil(measured * denominator)}):
            if numerator > 0 and np.ptp(elapsed - steps * denominator / numerator) < tick * (1 + 1e-6):
                return numerator / denominator
    return float(measured)


# --- encoding --------------------------------------------------------------------------------------------


def _require_av() -> None:
    try:
        import av  # noqa: F401
    except ImportError as error:
        raise CinematicError("video files need PyAV: pip install 'cinematic[video]'") from error


def _rgb_frame(rgb: np.ndarray) -> av.VideoFrame:
    import av

    return av.VideoFrame.from_ndarray(rgb, format="rgb24")


def _write_file(target: Path, encoding: _Encoding, frames: np.ndarray, rate: Fraction, tags: dict[str, str]) -> None:
    if encoding.format == "gif" and rate > _GIF_MAX_FPS:
        raise CinematicError(f"gif cannot play at {float(rate):g} fps (browsers slow delays under 1/50 s): use mp4")
    if encoding.format == "mp4" and (frames.shape[1] % 2 or frames.shape[2] % 2):
        tags = {**tags, _SIZE_TAG: json.dumps({"size": list(frames.shape[1:3])})}
        frames = _pad_to_even(frames)
    _require_av()
    with _atomic_file(target) as tmp:
        if encoding.format == "gif":
            video_frames = _palette_frames(frames, rate)
        elif encoding.chroma_loc:
            video_frames = _yuv420_frames(frames, rate, encoding.chroma_loc)
        else:
            video_frames = map(_rgb_frame, frames)
        _mux(tmp, encoding, rate, video_frames, frames.shape[1:3], tags)


def _mux(
    tmp: Path,
    encoding: _Encoding,
    rate: Fraction,
    frames: Iterable[av.VideoFrame],
    size: tuple[int, int],
    tags: dict[str, str],
) -> None:
    import av

    options = encoding.codec_options
    if encoding.codec == "libx264":
        options = {**options, **_x264_cpu_options()}
    with av.open(str(tmp), "w", format=encoding.format, options=encoding.container_options) as container:
        container.metadata.update(tags)
        stream = container.add_stream(encoding.codec, rate=rate, options=options)
        stream.height, stream.width = size
        stream.pix_fmt = encoding.pix_fmt
        if encoding.chroma_loc:
            _tag_bt709(stream.codec_context)
        for index, frame in enumerate(frames):
            frame.pts = index  # in units of the codec's time base, 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _x264_cpu_options() -> dict[str, str]:
    """On a CPU with AVX-512, hold libx264 to its AVX2 code: encodes then depend on the frames alone.

    With its AVX-512 functions, the libx264 in PyAV's wheels (measured with PyAV 18.1 on an AMD EPYC, 2026-11-26)
    reads memory it never wrote whenever the frame width is not a multiple of 128 pixels (32, 64, 96, 160, 192, 448
    and 576 wide, among others): the same frames then encode to a different file from run to run, up to ~20 levels
    apart once decoded. Filling fresh allocations with a pattern (glibc's ``MALLOC_PERTURB_``) changes the output,
    which is how the reads show; held to AVX2 the output is the same under every pattern, and as small. The same
    run-to-run differences had been taken for a bug of the server (``tests/test_video.py`` holds the check)."""
    import torch

    return {"x264-params": "asm=AVX2"} if torch.backends.cpu.get_cpu_capability() == "AVX512" else {}


def _tag_bt709(codec_context: Any) -> None:
    from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc

    # Untagged video leaves players guessing between BT.601 and BT.709, and colours shift; say which.
    codec_context.colorspace = Colorspace.ITU709
    codec_context.color_primaries = ColorPrimaries.BT709
    codec_context.color_trc = ColorTrc.BT709
    codec_context.color_range = ColorRange.MPEG  # limited range, what browsers expect


def _yuv420_frames(frames: np.ndarray, rate: Fraction, chroma_loc: str) -> Iterator[av.VideoFrame]:
    """Convert RGB to BT.709 limited-range yuv420p, with the chroma sited where decoders will look for it.

    swscale's defaults point-sample the chroma and centre it: read back by an H.264 decoder, which assumes
    left siting, a colour test pattern then errs by 10 in red (mean abs, 0-255), against 2.2 like this.
    """
    import av.filter

    flags = "bicubic+accurate_rnd+full_chroma_inp"
    scale = f"out_color_matrix=bt709:out_range=tv:out_chroma_loc={chroma_loc}:flags={flags}"
    graph = av.filter.Graph()
    converter, pixel_format = graph.add("scale", scale), graph.add("format", "yuv420p")
    _rgb_source(graph, frames, rate).link_to(converter)
    converter.link_to(pixel_format)
    pixel_format.link_to(graph.add("buffersink"))
    graph.configure()
    for index, rgb in enumerate(frames):
        _push_rgb(graph, rgb, index, rate)
        yield from _drain(graph)
    graph.vpush(None)
    yield from _drain(graph)


def _palette_frames(frames: np.ndarray, rate: Fraction) -> list[av.VideoFrame]:
    """Quantize to one 256-colour palette computed over all frames (no flicker between frames).

    paletteuse waits for palettegen, which needs every frame first, so all frames pass through memory.
    """
    import av.filter

    graph = av.filter.Graph()
    split, sink = graph.add("split"), graph.add("buffersink")
    palettegen = graph.add("palettegen", "stats_mode=full")
    paletteuse = graph.add("paletteuse", "dither=sierra2_4a:diff_mode=rectangle")
    _rgb_source(graph, frames, rate).link_to(split)
    split.link_to(palettegen, 0, 0)
    split.link_to(paletteuse, 1, 0)
    palettegen.link_to(paletteuse, 0, 1)
    paletteuse.link_to(sink)
    graph.configure()
    for index, rgb in enumerate(frames):
        _push_rgb(graph, rgb, index, rate)
    graph.vpush(None)
    return list(_drain(graph))


def _rgb_source(graph: Any, frames: np.ndarray, rate: Fraction) -> Any:
    return graph.add_buffer(width=frames.shape[2], height=frames.shape[1], format="rgb24", time_base=1 / rate)


def _push_rgb(graph: Any, rgb: np.ndarray, index: int, rate: Fraction) -> None:
    frame = _rgb_frame(rgb)
    frame.pts, frame.time_base = index, 1 / rate
    graph.vpush(frame)


def _drain(graph: Any) -> Iterator[av.VideoFrame]:
    import av

    while True:
        try:
            yield graph.vpull()
        except (av.error.BlockingIOError, av.error.EOFError):
            return


def _png_bytes(rgb: np.ndarray) -> bytes:
    import av

    context = av.CodecContext.create("png", "w")
    context.height, context.width = rgb.shape[:2]
    context.pix_fmt = "rgb24"
    context.time_base = Fraction(1, 1)
    packets = context.encode(_rgb_frame(rgb)) + context.encode(None)
    return b"".join(bytes(packet) for packet in packets)


def _write_frames_folder(target: Path, frames: np.ndarray, fps: float, metadata: dict[str, Any]) -> None:
    _require_av()
    tmp = _temp_sibling(target)
    os.mkdir(tmp)
    digits = max(4, len(str(len(frames) - 1)))
    try:
        for index, rgb in enumerate(frames):
            (tmp / f"frame_{index:0{digits}d}.png").write_bytes(_png_bytes(rgb))
        text = json.dumps({"fps": fps, "metadata": metadata}, ensure_ascii=False, indent=2)
        (tmp / _FOLDER_METADATA).write_text(text + "\n", encoding="utf-8")
        _replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- decoding --------------------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    # FFmpeg errors carry an errno and the path in str(); their strerror alone is the readable part.
    return " ".join((getattr(error, "strerror", None) or str(error)).split())


def _decode(container: Any, num_frames: int | None, budget: Budget) -> VideoData:
    from av.video.reformatter import Interpolation

    if not container.streams.video:
        raise CinematicError("it has no video stream")
    stream = container.streams.video[0]
    if not (stream.width and stream.height):  # the open's probe could not size a frame under the pixel limit
        raise CinematicError(f"its frame size is unknown, or over the limit of {budget.frame_limit} pixels")
    budget.check_declared(_declared_frames(stream), stream.width, stream.height, num_frames)
    wanted = budget.frames_to_read(num_frames)
    rgb, timing, decoded_bytes = [], [], 0
    # Converts with the matrix and chroma siting each frame is tagged with; swscale's defaults would
    # point-sample the chroma (see _yuv420_frames).
    to_rgb = Interpolation.BICUBIC | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT
    for frame in container.decode(stream):
        if len(rgb) == wanted:
            if num_frames is None:  # the whole video was asked for, and it is longer than the budget
                budget.check_frames(wanted + 1)
            break
        budget.check_size(frame.width, frame.height)  # a stream may change size mid-way
        decoded_bytes += frame.width * frame.height * RGB_BYTES
        budget.check_bytes(decoded_bytes, f"its first {len(rgb) + 1} frames")
        rgb.append(frame.to_ndarray(format="rgb24", interpolation=to_rgb))
        timing.append((frame.pts, frame.duration))
    if not rgb:
        raise CinematicError("it has no frames")
    tags = {key.lower(): value for key, value in container.metadata.items()}  # matroska upper-cases keys
    frames = _crop_padding(np.stack(rgb), tags.get(_SIZE_TAG))
    return VideoData(frames, _stream_fps(stream, timing), _parse_metadata(tags))


def _declared_frames(stream: Any) -> int | None:
    """The frame count a stream's headers declare, or that its duration and rate imply; None if they do not say."""
    if stream.frames:
        return int(stream.frames)
    duration = stream.duration * stream.time_base if stream.duration and stream.time_base else None
    if duration is None and stream.container.duration:
        duration = Fraction(stream.container.duration, 1_000_000)  # AV_TIME_BASE
    rate = stream.average_rate or stream.guessed_rate
    return math.ceil(duration * rate) if duration and rate else None


def _stream_fps(stream: Any, timing: list[tuple[int | None, int | None]]) -> float:
    # gif stores whole-centisecond delays, and FFmpeg's average counts a guessed last delay, so 8 fps would
    # read back as 8.33; the frames' own timestamps pin the rate down better.
    pts = [frame_pts for frame_pts, _ in timing]
    if len(timing) == 1 and timing[0][1] and pts[0] is not None:
        pts.append(pts[0] + timing[0][1])  # one frame: its duration is the only clue
    if stream.container.format.name == "gif" and None not in pts and len(pts) > 1 and pts[-1] > pts[0]:
        tick = float(stream.time_base)
        return _simplest_rate([t * tick for t in pts], tick)
    rate = stream.average_rate or stream.guessed_rate
    if rate is None:
        raise CinematicError("cannot tell its frame rate")
    return float(rate)


def _parse_metadata(tags: dict[str, str]) -> dict[str, Any]:
    try:
        metadata = json.loads(tags.get(_METADATA_TAG, "{}"))
    except json.JSONDecodeError:  # someone else's free-text comment
        return {}
    return metadata if isinstance(metadata, dict) else {}


def _crop_padding(frames: np.ndarray, size_tag: str | None) -> np.ndarray:
    if size_tag is None:
        return frames
    try:
        height, width = json.loads(size_tag)["size"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return frames
    # Crop only when the decoded size is exactly the padded one, in case the file was re-encoded since.
    if frames.shape[1:3] != (height + height % 2, width + width % 2):
        return frames
    return frames[:, :height, :width]


def _read_webp(source: Path, num_frames: int | None, budget: Budget) -> VideoData:
    # FFmpeg (8.1) decodes still webp only, so animated webp is read with Pillow when it is installed.
    try:
        from PIL import Image
    except ImportError as error:
        raise CinematicError("reading animated webp needs Pillow: pip install pillow") from error
    pairs = []
    try:
        with Image.open(source) as image:  # reads the header only: the size was checked (check_header)
            budget.check_declared(getattr(image, "n_frames", 1), *image.size, num_frames)
            for index in range(min(getattr(image, "n_frames", 1), budget.frames_to_read(num_frames))):
                image.seek(index)
                pairs.append((np.asarray(image.convert("RGB")), image.info.get("duration", 0)))
    except (OSError, ValueError, EOFError) as error:
        raise CinematicError(_one_line(error)) from error
    # Frame i starts when the durations before it have passed; one frame's own duration is the only clue.
    durations_s = [duration / 1000 for _, duration in pairs]
    times = list(np.cumsum([0.0] + durations_s[: max(1, len(pairs) - 1)]))
    fps = _simplest_rate(times, 0.001) if times[-1] > 0 else _DEFAULT_FPS
    return VideoData(np.stack([rgb for rgb, _ in pairs]), fps, {})


def _read_frames_folder(folder: Path, num_frames: int | None, budget: Budget) -> VideoData:
    files = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _FRAME_NAME.fullmatch(p.name)))
    if not files:
        raise CinematicError("it holds no frame_NNNN.png files")
    if num_frames is None:
        budget.check_frames(len(files))
    _require_av()
    import av

    frames, decoded_bytes = [], 0
    try:
        for _, path in files[: budget.frames_to_read(num_frames)]:
            frames.append(read_image(path, budget))
            decoded_bytes += frames[-1].nbytes
            budget.check_bytes(decoded_bytes, f"its first {len(frames)} frames")
    except (av.error.FFmpegError, StopIteration, IndexError) as error:
        raise CinematicError(f"cannot read its frames: {_one_line(error)}") from error
    if len({frame.shape for frame in frames}) > 1:
        raise CinematicError("its frames differ in size")
    info_path = folder / _FOLDER_METADATA
    try:
        info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CinematicError(f"cannot parse {info_path.name}: {_one_line(error)}") from error
    return VideoData(np.stack(frames), float(info.get("fps", _DEFAULT_FPS)), dict(info.get("metadata", {})))


def read_image(path: Path, budget: Budget = DEFAULT_BUDGET) -> np.ndarray:
    """uint8 ``[H, W, 3]``: the first picture FFmpeg decodes from ``path`` (a PNG, a JPEG, a video's first frame),
    its declared size checked against ``budget`` first (a CinematicError naming the limit). FFmpeg's own errors,
    and StopIteration or IndexError for a file without a picture, are left to the caller to word."""
    import av

    budget.check_header(path)
    with av.open(str(path), options=budget.ffmpeg_options()) as container:
        stream = container.streams.video[0]
        if not (stream.width and stream.height):  # the open's probe could not size a frame under the limit
            raise CinematicError(f"its frame size is unknown, or over the limit of {budget.frame_limit} pixels")
        budget.check_size(stream.width, stream.height)
        return next(container.decode(stream)).to_ndarray(format="rgb24")
