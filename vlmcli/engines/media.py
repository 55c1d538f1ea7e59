"""What the SmolVLM2 engine reads besides text: still images (PIL images) and videos (their sampled frames).

A prompt's media are a list of these, in the order the prompt places them (engines/prompt.py's Turn.media).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class VideoFrames:
    """A video as the model reads it: frames already at the encoder's input size (one unsplit view each,
    as transformers lays frames out), the time of each, and the video's duration for the intro line."""

    frames: Sequence[Image.Image]
    timestamps: Sequence[float]  # seconds from the start, one per frame
    duration: float  # seconds
    width: int = 0  # the source's size (for records)
    height: int = 0

    def __post_init__(self) -> None:
        if len(self.frames) != len(self.timestamps):
            raise ValueError(f"{len(self.frames)} frames but {len(self.timestamps)} timestamps")


Media = Union["Image.Image", VideoFrames]


def kind_of(item: Media) -> str:
    """The chat template's name for a media item: image | video."""
    return "video" if isinstance(item, VideoFrames) else "image"
