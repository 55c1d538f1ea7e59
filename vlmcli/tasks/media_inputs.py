"""What one record of ask / caption / chat reads: one image or video (a plain path, as ever), several
images and videos together (`vlm ask -i a.jpg -i b.jpg`), none (a text-only prompt), or one segment of
a video (`--segments`). The runner moves inputs around as strings, so a MediaInput has one:

    photo.jpg                  a plain path: an image, or a video (told by its content)
    long.mp4#t=30,60           a segment, in seconds (W3C media fragment syntax; the file exists, the
                               whole string does not)
    \\0a.jpg\\0b.jpg             several files in one prompt (NUL cannot occur in a path); "\\0": no file

Resume keys cover every file of an input (and a segment's times).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vlmcli.tasks.resume import FileKey, Record, file_key
from vlmcli.tasks.video import DEFAULT_FPS, DEFAULT_MAX_FRAMES, Sampling, is_video, load_video

if TYPE_CHECKING:
    from vlmcli.engines.media import Media

_GROUP = "\0"
_FRAGMENT = "#t="


@dataclass(frozen=True)
class MediaInput:
    paths: tuple[str, ...]
    segment: tuple[float, float] | None = None  # seconds of the one video

    @property
    def plain(self) -> bool:
        """One file, whole: records and keys as a plain image's."""
        return len(self.paths) == 1 and self.segment is None

    def encode(self) -> str:
        if self.plain:
            return self.paths[0]
        if self.segment is not None:
            return f"{self.paths[0]}{_FRAGMENT}{self.segment[0]:g},{self.segment[1]:g}"
        return _GROUP + _GROUP.join(self.paths)

    @classmethod
    def parse(cls, text: str) -> MediaInput:
        if text.startswith(_GROUP):
            return cls(tuple(p for p in text[1:].split(_GROUP) if p))
        head, sep, times = text.rpartition(_FRAGMENT)
        if sep and not os.path.lexists(text) and os.path.lexists(head):
            try:
                start, end = (float(t) for t in times.split(","))
            except ValueError:
                return cls((text,))
            return cls((head,), (start, end))
        return cls((text,))

    def label(self) -> str:
        """How an error names the input: its path, a segment's path#t=..., the files joined by " + ", or
        nothing for a text-only prompt."""
        return " + ".join(self.paths) if len(self.paths) != 1 else self.encode()

    def key(self, use_hash: bool) -> FileKey | None:
        """Every file's key in one (None when one cannot be read: its error is reported later)."""
        if self.plain:
            return file_key(self.paths[0], use_hash)
        keys = [file_key(p, use_hash) for p in self.paths]
        if any(k is None for k in keys):
            return None
        known = [k for k in keys if k is not None]
        where = "\0".join(k.abspath for k in known) or "text:"
        if self.segment is not None:
            where += f"{_FRAGMENT}{self.segment[0]:g},{self.segment[1]:g}"
        digest = None
        if use_hash:
            digest = hashlib.sha256("\0".join([where, *(k.sha256 or "" for k in known)]).encode()).hexdigest()
        return FileKey(where, sum(k.size for k in known), max((k.mtime_ns for k in known), default=0), digest)

    def base(self) -> Record:
        """The fields that name the input in its record."""
        if self.plain:
            return {"path": self.paths[0]}
        out: Record = {"path": self.paths[0] if self.paths else None, "inputs": list(self.paths)}
        if self.segment is not None:
            out["segment"] = {"start": self.segment[0], "end": self.segment[1]}
        return out


def load_media(item: MediaInput, max_pixels: int | None, frame_size: int, sampling: Sampling) -> list[Media]:
    """The input's images and videos decoded (videos by content: their sampled frames at frame_size)."""
    from vlmcli.images import load_image

    out: list[Media] = []
    for path in item.paths:
        if is_video(path):
            start, end = item.segment if item.segment else (None, None)
            out.append(load_video(path, frame_size, sampling, start, end))
        else:
            out.append(load_image(path, max_pixels=max_pixels))
    return out


def sampling_identity(sampling: Sampling) -> dict[str, Any]:
    """--fps / --max-frames in a record's options, only when they differ from the model's (old records stay valid)."""
    if (sampling.fps, sampling.max_frames) == (DEFAULT_FPS, DEFAULT_MAX_FRAMES):
        return {}
    return {"video": sampling.as_record()}


@dataclass
class PreparedMedia:
    """An input's media decoded, with what its record says of them."""

    input: MediaInput
    media: list[Media]

    def describe(self, encodings: list[Any]) -> list[Record]:
        """Each file as it went in (encodings: the engine's ImageEncoding per item): size, level, tokens;
        a video's duration and its frames' times."""
        from vlmcli.engines.media import VideoFrames

        out = []
        for path, item, enc in zip(self.input.paths, self.media, encodings):
            entry: Record = {"path": path, "kind": "video" if isinstance(item, VideoFrames) else "image"}
            entry.update(size=[enc.width, enc.height], image_tokens=enc.image_tokens, cache=enc.cached)
            if isinstance(item, VideoFrames):
                entry.update(duration=round(item.duration, 3), frames=[round(t, 3) for t in item.timestamps])
            else:
                entry.update(detail=enc.detail, tiles=enc.tiles)
            out.append(entry)
        return out
