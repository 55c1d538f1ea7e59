"""What SmolVLM2's commands read besides folders of images: several files in one prompt (--image/-i), none
(--no-image), videos' frame sampling (--fps, --max-frames) and video segments (--segments)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from vlmcli.errors import EXIT_USAGE, VlmError

if TYPE_CHECKING:
    from vlmcli.tasks.inputs import Expansion
    from vlmcli.tasks.video import Sampling

ImagesOpt = typer.Option(
    None,
    "--image",
    "-i",
    help="An image or video for the prompt; repeat for several, in order (then every argument is a question).",
)
NoImageOpt = typer.Option(False, "--no-image", help="A text-only prompt (then every argument is a question).")
FpsOpt = typer.Option(None, "--fps", min=0.001, help="Video frames taken per second (default: the model's, 1).")
MaxFramesOpt = typer.Option(None, "--max-frames", min=1, help="Most frames taken from a video (default: 64).")
SegmentsOpt = typer.Option(
    None,
    "--segments",
    help="Caption each video in segments of this length (30s, 2m, 1:30): a record per segment, with its start and end.",
)


def sampling(fps: float | None, max_frames: int | None) -> Sampling:
    from vlmcli.tasks.video import DEFAULT_FPS, DEFAULT_MAX_FRAMES, Sampling

    return Sampling(DEFAULT_FPS if fps is None else fps, DEFAULT_MAX_FRAMES if max_frames is None else max_frames)


def together(paths: list[str]) -> Expansion:
    """One input of these files read together in one prompt (none: a text-only prompt)."""
    from vlmcli.tasks.inputs import Expansion
    from vlmcli.tasks.media_inputs import MediaInput

    return Expansion([MediaInput(tuple(paths)).encode()], [], batch_like=False)


def check_single(input: str, max_pixels: int | None) -> None:
    """The files of one named input are read before the model loads, so a bad one fails at once: an image
    decoded, a video's container opened (and PyAV's absence said in one line)."""
    from vlmcli.images import load_image
    from vlmcli.tasks.media_inputs import MediaInput
    from vlmcli.tasks.video import has_video_extension, is_video, probe

    for path in MediaInput.parse(input).paths:
        if is_video(path) or (has_video_extension(path) and _exists(path)):
            probe(path)
        else:
            load_image(path, max_pixels=max_pixels)


VIDEO_SNIFF_LIMIT = 1000  # named inputs looked at for a video (folders of a million files are not read twice)


def context_for(ctx: int, inputs: list[str]) -> int:
    """The context to open the model with: the model's own (0: SmolVLM2's 8192) instead of the default
    4096 when a named input holds a video, whose 64 frames at the default sampling need ~4,700 tokens."""
    from vlmcli.defaults import DEFAULT_N_CTX
    from vlmcli.tasks.media_inputs import MediaInput
    from vlmcli.tasks.video import is_video

    if ctx != DEFAULT_N_CTX:
        return ctx
    for input in inputs[:VIDEO_SNIFF_LIMIT]:
        if any(is_video(p) for p in MediaInput.parse(input).paths):
            return 0
    return ctx


def _exists(path: str) -> bool:
    import os

    return os.path.isfile(path)


def in_segments(expansion: Expansion, length: str) -> Expansion:
    """Each video of the expansion as its consecutive segments of `length` (images stay as they are; a video
    that cannot be read stays whole, so that its record says why)."""
    from vlmcli.tasks.inputs import Expansion
    from vlmcli.tasks.media_inputs import MediaInput
    from vlmcli.tasks.video import is_video, parse_duration, segments

    try:
        seconds = parse_duration(length)
    except VlmError as e:
        raise VlmError(f"--segments: {e.message}", exit_code=EXIT_USAGE) from None
    out: list[str] = []
    for path in expansion.paths:
        if not is_video(path):
            out.append(path)
            continue
        try:
            parts = segments(path, seconds)
        except VlmError:
            out.append(path)
            continue
        out += [MediaInput((path,), part).encode() for part in parts]
    return Expansion(out, expansion.warnings, expansion.batch_like)  # a named video: PATH<TAB>[times] caption
