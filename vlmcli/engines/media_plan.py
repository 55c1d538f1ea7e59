"""A prompt's images and video frames laid out for the engine, without native code.

The chat template writes each image and video as one marker; transformers' SmolVLM processor expands
them: an image into its tiles and overview (or the overview alone), a video into an intro line, then
for each sampled frame a `Frame from MM:SS:` label and the frame as one unsplit view, then a blank
line (prompt.video_intro, frame_label, MEDIA_OUTRO). `views` flattens a prompt's media into the views
the vision encoder sees, each with the text that comes before it.

The engine keeps the KV cells of what it last evaluated as a list of `Entry` (a text token, or one
image chunk with its identity); a new prompt reuses the cells of the longest common prefix.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vlmcli.engines.media import Media, VideoFrames
from vlmcli.engines.prompt import MEDIA_OUTRO, frame_label, video_intro

if TYPE_CHECKING:
    from PIL import Image


@dataclass
class View:
    """One picture the encoder sees: an image, or one frame of a video (`frame` its index there)."""

    item: int  # which media item of the prompt
    before: str  # the text between the previous view and this one
    image: Image.Image
    frame: int | None = None  # a video frame: always one unsplit view


def views(media: Sequence[Media], texts: Sequence[str]) -> tuple[list[View], str]:
    """The views of `media`, texts[i] coming before media[i]; and the text left over after the last view
    (a video's closing blank line), which goes before the text that follows."""
    if len(texts) != len(media):
        raise ValueError(f"{len(media)} media items but {len(texts)} texts before them")
    out: list[View] = []
    carry = ""
    for i, (item, text) in enumerate(zip(media, texts)):
        carry += text
        if isinstance(item, VideoFrames):
            carry += video_intro(len(item.frames), item.duration)
            for j, (frame, t) in enumerate(zip(item.frames, item.timestamps)):
                out.append(View(i, carry + frame_label(t), frame, j))
                carry = ""
            carry = MEDIA_OUTRO
        else:
            out.append(View(i, carry, item))
            carry = ""
    return out, carry


@dataclass(frozen=True)
class Entry:
    """A piece of the KV cache's content: a text token (`what` is its id, 1 position), or an image chunk
    (`what` is its identity: the image's digest, level, cap, chunk index; `size` positions)."""

    what: Hashable
    size: int = 1


def common_prefix(have: Sequence[Entry], want: Sequence[Entry]) -> int:
    """How many leading entries of `want` are already in the cache (`have`); at least the last entry of
    `want` is left out, so that it is evaluated and gives the logits to sample from."""
    n = 0
    limit = min(len(have), len(want) - 1)
    while n < limit and have[n] == want[n]:
        n += 1
    return n
