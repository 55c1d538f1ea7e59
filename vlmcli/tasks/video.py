"""Videos for SmolVLM2: frames sampled by the rule of transformers' SmolVLM video processor, decoded with
PyAV (the optional `video` extra) one at a time and scaled to the encoder's input size as they are read,
so memory holds only the sampled frames at that size, whatever the file's resolution or length.

The rule (video_processing_smolvlm.py, sample_frames): round(fps x duration) frames, at most max_frames
and at least one, evenly spaced over the frame indices (numpy.linspace, truncated, duplicates dropped);
when the video is longer than max_frames / fps plus two seconds, the first and last second are left out.
Each frame is shown at index / the video's frame rate; the duration is frames / frame rate. Frames are
squared to the encoder's input size (the processor resizes the longest edge, then to max_image_size
square) and never tiled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from vlmcli.errors import ImageError, VlmError

if TYPE_CHECKING:
    from PIL import Image

    from vlmcli.engines.media import VideoFrames

DEFAULT_FPS = 1.0  # SmolVLM2's preprocessor_config.json: video_sampling.fps
DEFAULT_MAX_FRAMES = 64  # ... video_sampling.max_frames
SKIP_SECONDS = 1.0  # the processor's skip_secs
END_SLACK_S = 1.0  # a stream may end this much before its stated duration; further is a truncated file
SEEK_GAP_S = 3.0  # a sampled frame further ahead than this is reached by seeking, nearer ones by decoding on
INSTALL_HINT = "reading videos needs PyAV: pip install 'vlmcli[video]' (or: pip install av)"


@dataclass(frozen=True)
class Sampling:
    """How many frames to take: `fps` per second of video, at most `max_frames` (--fps, --max-frames)."""

    fps: float = DEFAULT_FPS
    max_frames: int = DEFAULT_MAX_FRAMES

    def as_record(self) -> dict[str, float]:
        return {"fps": self.fps, "max_frames": self.max_frames}


@dataclass(frozen=True)
class VideoInfo:
    frames: int  # frames in the stream (counted from the duration when the container does not say)
    fps: float
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.frames / self.fps if self.fps else 0.0


def sample_indices(
    total_frames: int, video_fps: float, duration: float, fps: float, max_frames: int, skip_s: float = SKIP_SECONDS
) -> list[int]:
    """The frame indices SmolVLM2's processor takes from a video (see the module doc)."""
    import numpy as np  # here: the CLI imports this module for its defaults

    if total_frames <= 0:
        return []
    wanted = max(1, min(int(round(fps * duration)), max_frames))
    first, last = 0, total_frames - 1
    if skip_s > 0 and duration - 2 * skip_s > max_frames * fps:
        first, last = int(skip_s * video_fps), int(total_frames - skip_s * video_fps)
    first, last = max(0, first), min(last, total_frames - 1)
    if first >= last:
        first, last = 0, total_frames - 1
    return sorted({int(i) for i in np.linspace(first, last, wanted, dtype=int)})


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise VlmError(INSTALL_HINT) from None
    return av


class _Opened:
    """An open container and its first video stream; refuses files with none (audio only) or no frames.
    `source` is a path, or an open binary file (a server's upload); errors name the path, if any."""

    def __init__(self, source: str | IO[bytes]):
        av = _av()
        self.av = av
        path = source if isinstance(source, str) else None
        try:
            self.container = av.open(source)
        except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
            raise ImageError(f"cannot read this video ({_reason(e)})", path) from None
        try:
            if not self.container.streams.video:
                raise ImageError("the file has no video stream (audio only?)", path)
            self.stream = self.container.streams.video[0]
            self.stream.thread_type = "AUTO"
            rate = self.stream.average_rate or self.stream.guessed_rate
            fps = float(rate) if rate else 0.0
            frames = int(self.stream.frames or 0)
            if frames <= 0 and fps > 0:
                seconds = self._seconds()
                frames = int(round(seconds * fps)) if seconds else 0
            ctx = self.stream.codec_context
            if ctx is None:  # no decoder for what the (damaged) header names
                raise ImageError("the video's codec cannot be read", path)
            self.info = VideoInfo(frames, fps, int(ctx.width or 0), int(ctx.height or 0))
            if fps <= 0 or frames <= 0 or self.info.width <= 0 or self.info.height <= 0:
                raise ImageError("the video has no frames", path)
        except BaseException:
            self.container.close()
            raise

    def _seconds(self) -> float:
        s = self.stream
        if s.duration and s.time_base:
            return float(s.duration * s.time_base)
        if self.container.duration:
            return self.container.duration / self.av.time_base
        return 0.0

    def close(self) -> None:
        self.container.close()


def _reason(e: BaseException) -> str:
    return " ".join(str(getattr(e, "strerror", None) or e).split()) or type(e).__name__


def probe(path: str) -> VideoInfo:
    """The frame count, rate and size of a video file (ImageError when it has none, or cannot be read)."""
    opened = _Opened(path)
    opened.close()
    return opened.info


def load_video(
    source: str | IO[bytes],
    size: int,
    sampling: Sampling = Sampling(),
    start: float | None = None,
    end: float | None = None,
) -> VideoFrames:
    """The frames SmolVLM2 reads of a video (or of its segment start..end seconds), size x size pixels each,
    with their times from the start of the segment. `source`: a path or an open binary file."""
    from vlmcli.engines.media import VideoFrames

    path = source if isinstance(source, str) else None
    opened = _Opened(source)
    try:
        info = opened.info
        first = 0 if start is None else max(0, int(round(start * info.fps)))
        stop = info.frames if end is None else min(info.frames, int(round(end * info.fps)))
        if stop <= first:
            raise ImageError(f"the segment {start or 0:g}-{end:g} s lies past the video's end", path)
        n = stop - first
        picks = [first + i for i in sample_indices(n, info.fps, n / info.fps, sampling.fps, sampling.max_frames)]
        frames = _decode(opened, picks, size, path)
    finally:
        opened.close()
    times = [(i - first) / info.fps for i in picks]
    return VideoFrames(frames, times, n / info.fps, info.width, info.height)


def _decode(opened: _Opened, picks: list[int], size: int, path: str | None) -> list[Image.Image]:
    """The frames at `picks` (indices), each scaled to size x size as it leaves the decoder."""
    av, stream, container = opened.av, opened.stream, opened.container
    fps = opened.info.fps
    base = stream.start_time or 0
    tb = float(stream.time_base) if stream.time_base else 1.0 / fps
    out: list[Image.Image] = []
    frames: Any = None
    last: Any = None
    position = 0.0  # the time the decoder is at
    try:
        for index in picks:
            t = index / fps
            if frames is None or t - position > SEEK_GAP_S:
                if t > SEEK_GAP_S:
                    container.seek(base + int(t / tb), stream=stream, backward=True)
                frames = container.decode(stream)
            chosen = None
            for frame in frames:
                last = frame
                position = (frame.pts - base) * tb if frame.pts is not None else position + 1 / fps
                if position + 0.5 / fps >= t:
                    chosen = frame
                    break
            if chosen is None:  # the stream ended before this frame
                if last is None:
                    raise ImageError("no frame could be decoded (the file is truncated or corrupt)", path)
                if t - position > END_SLACK_S:
                    raise ImageError(
                        f"the video breaks off at {position:.1f} s of its {opened.info.duration:.1f} s (truncated?)",
                        path,
                    )
                chosen = last  # a container's duration a little past its last frame
            out.append(chosen.to_image(width=size, height=size, interpolation="AREA"))
    except av.FFmpegError as e:
        if not out:
            raise ImageError(f"the video cannot be decoded ({_reason(e)})", path) from None
        raise ImageError(f"the video breaks off after {len(out)} frames ({_reason(e)})", path) from None
    return out


def is_video(path: str) -> bool:
    """A file that starts like a video container (content sniffing, as images are told)."""
    from vlmcli.image_magic import HEAD_BYTES, is_video_header

    try:
        with open(path, "rb") as f:
            return is_video_header(f.read(HEAD_BYTES))
    except OSError:
        return False


def parse_duration(text: str) -> float:
    """ "30s", "2m", "1h", "90", "1:30" -> seconds (--segments)."""
    t = text.strip().lower()
    try:
        if ":" in t:
            seconds = 0.0
            for part in t.split(":"):
                seconds = seconds * 60 + float(part)
        else:
            unit = {"s": 1, "m": 60, "h": 3600}.get(t[-1:], 0)
            seconds = float(t[:-1]) * unit if unit else float(t)
    except ValueError:
        raise VlmError(f"{text!r} is not a duration (30s, 2m, 1h, 1:30)") from None
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise VlmError(f"{text!r} is not a positive duration")
    return seconds


def segments(path: str, length: float) -> list[tuple[float, float]]:
    """(start, end) seconds of consecutive segments of `length` covering the video."""
    duration = probe(path).duration
    out = []
    start = 0.0
    while start < duration - 1e-6:
        out.append((start, min(duration, start + length)))
        start += length
    return out


VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".flv", ".3gp", ".ogv", ".wmv", ".mts"}
)


def has_video_extension(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS
