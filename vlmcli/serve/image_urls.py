"""Where a request's images and videos come from: a data: URL, a file under --allow-files, or (images
only) an http(s) URL (--allow-remote-images, fetched off the event loop by remote.py). The bytes go to a
worker, which decodes them with the pixel cap as any image, or samples a video's frames."""

from __future__ import annotations

import asyncio
import base64
import binascii
from dataclasses import dataclass

from vlmcli.serve.errors import bad
from vlmcli.serve.schemas import ContentPart
from vlmcli.serve.state import ServeConfig


@dataclass
class RemoteImage:
    """An http(s) image_url, fetched by the route once the whole request is checked."""

    url: str
    param: str


def decode_data_url(url: str, param: str, what: str = "image") -> bytes:
    """data:[<type>][;base64],<data> -> bytes (base64 only: images and videos are binary)."""
    head, sep, data = url.partition(",")
    example = "data:image/png;base64,..." if what == "image" else "data:video/mp4;base64,..."
    if not sep or not head.startswith("data:"):
        raise bad(f"malformed data: URL (expected {example})", param, f"invalid_{what}_url")
    if not head.endswith(";base64"):
        raise bad(f"data: URLs of {what}s must be base64-encoded ({example})", param, f"invalid_{what}_url")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad("the data: URL is not valid base64", param, "invalid_image_url") from None


def image_source(url: str, config: ServeConfig, param: str) -> bytes | RemoteImage:
    """The bytes an image_url names, or the RemoteImage to fetch; refused as the server's flags say."""
    lower = url[:16].lower()
    if lower.startswith("data:"):
        return decode_data_url(url, param)
    if lower.startswith(("http://", "https://")):
        if not config.allow_remote_images:
            raise bad(
                "remote image URLs are refused by this server (start it with --allow-remote-images); "
                "send the image as a data: URL",
                param,
                "remote_image_refused",
            )
        return RemoteImage(url, param)
    path_text = url[7:] if lower.startswith("file://") else url
    if config.allow_files is None:
        raise bad(
            "local image paths are refused by this server (start it with --allow-files DIR); "
            "send the image as a data: URL",
            param,
            "local_image_refused",
        )
    root = config.allow_files.resolve()
    try:
        path = (root / path_text).resolve()
    except (OSError, ValueError, RuntimeError):
        raise bad("invalid image path", param, "invalid_image_url") from None
    if path != root and root not in path.parents:
        raise bad(f"image paths must lie under {root}", param, "local_image_refused")
    try:
        with open(path, "rb") as f:
            return f.read(config.max_body + 1)
    except OSError as e:
        raise bad(f"cannot read image file ({e.strerror or e})", param, "invalid_image_url") from None


def part_value(
    part: ContentPart, config: ServeConfig, param: str, videos: bool = False
) -> tuple[str, str | bytes | RemoteImage]:
    """("text", str), ("image", bytes | RemoteImage) or, where `videos` are taken, ("video", bytes) for a
    checked content part."""
    if part.image_url is not None:
        return "image", image_source(part.image_url.url, config, param)
    if part.video_url is not None:
        if not videos:
            raise bad("video_url parts are not taken here", param, "unsupported_content")
        return "video", video_source(part.video_url.url, config, param)
    return "text", part.text or ""


def video_source(url: str, config: ServeConfig, param: str) -> bytes:
    """The bytes a video_url names: a data: URL, or a file under --allow-files (never fetched from the web)."""
    if url[:16].lower().startswith(("http://", "https://")):
        raise bad(
            "remote video URLs are refused by this server; send the video as a data: URL (or a path under "
            "--allow-files)",
            param,
            "remote_video_refused",
        )
    if url[:5].lower() == "data:":
        return decode_data_url(url, param, "video")
    data = image_source(url, config, param)
    assert isinstance(data, bytes)  # not http(s): refused above
    return data


async def fetch_remote(image: RemoteImage, config: ServeConfig) -> bytes:
    from vlmcli.serve.remote import FETCH_TIMEOUT, FetchError, fetch_image

    timeout = min(FETCH_TIMEOUT, config.timeout)
    try:
        # The fetch keeps its own deadline between reads; this one also bounds connecting and the headers.
        return await asyncio.wait_for(asyncio.to_thread(fetch_image, image.url, config.max_body, timeout), timeout + 1)
    except FetchError as e:
        raise bad(e.message, image.param, e.code) from None
    except asyncio.TimeoutError:
        raise bad(f"fetching the image URL took more than {timeout:g} s", image.param, "invalid_image_url") from None
