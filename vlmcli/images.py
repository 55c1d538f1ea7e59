"""Loading input images: every common format, EXIF orientation, RGB, a pixel cap."""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from vlmcli.defaults import DEFAULT_MAX_PIXELS
from vlmcli.errors import ImageError, debugging
from vlmcli.image_magic import HEAD_BYTES, is_image_header

# load_image enforces the cap above per call, before decoding; Pillow's own process-wide limit
# would refuse images the user allowed with --max-pixels (and changing it per call races between
# decode threads), so it is switched off once here.
Image.MAX_IMAGE_PIXELS = None

# Pillow keeps a pointer and an aligned allocation per row, so a 1-pixel-wide strip costs several times
# its pixels (1 x 64,000,000: over 1.5 GB decoded as RGB), and every model shrinks it to a square or a
# few tiles anyway. Sides differing more than this are refused before decoding; within it, rows stay
# under sqrt(max_pixels x ratio) (2 million at the default cap), so decoding costs about its pixels.
MAX_ASPECT_RATIO = 65536

SUPPORTED_FORMATS = {
    "JPEG",
    "PNG",
    "WEBP",
    "GIF",
    "BMP",
    "TIFF",
    "MPO",
}  # image_magic.py tells them by their first bytes


def looks_like_image(path: str | os.PathLike[str]) -> bool:
    """True if the file starts like a supported image format (content sniffing, not the extension)."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
    except OSError:
        return False
    return is_image_header(head)


@functools.cache
def quiet_libtiff() -> None:
    """Stop libtiff printing its errors and warnings on stderr (once per process; not under --debug).

    Pillow reads TIFFs through libtiff, whose default handlers print lines such as "LZWDecode: Not
    enough data at scanline 0" before Pillow raises: an image error then read as two lines. Pillow
    checks libtiff's return codes, not its messages. The library is found among the process's mapped
    files (Linux: the copy Pillow loaded, bundled or the system's); elsewhere nothing is changed.
    """
    if debugging():
        return
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(None, 5)[5].strip() for line in maps if line.count(" ") >= 5 and "/libtiff" in line}
    except OSError:
        return
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in (
            "TIFFSetErrorHandler",
            "TIFFSetErrorHandlerExt",
            "TIFFSetWarningHandler",
            "TIFFSetWarningHandlerExt",
        ):
            try:
                setter = lib[name]
            except AttributeError:  # an older libtiff without the Ext forms
                continue
            setter.restype, setter.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
            setter(None)  # no handler: libtiff prints nothing


def load_image(
    path: str | os.PathLike[str] | BinaryIO,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft: tuple[int, int] | None = None,
) -> Image.Image:
    """Open an image file as an upright RGB image, or raise ImageError naming the file and the cause.
    `path` may also be an open binary file (bytes in memory as io.BytesIO: an upload); errors then name no file.

    `draft` lets JPEG decoding downscale by a power of two while keeping at least that size
    (much faster for CLIP's 224 px input; callers choose a size that keeps results unchanged).
    """
    source: Path | BinaryIO
    p: Path | None  # the file errors name
    if isinstance(path, (str, os.PathLike)):
        source = p = Path(path)
        if not p.exists():
            raise ImageError("no such file", p)
        if p.is_dir():
            raise ImageError("is a directory, not an image", p)
    else:
        source, p = path, None
    quiet_libtiff()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im: Image.Image = Image.open(source)
            if im.format not in SUPPORTED_FORMATS:
                raise ImageError(f"unsupported image format {im.format}", p)
            w, h = im.size
            if max_pixels and w * h > max_pixels:
                raise ImageError(
                    f"image is {w}x{h} = {w * h:,} pixels, over the {max_pixels:,} pixel limit "
                    "(raise it with --max-pixels)",
                    p,
                )
            if min(w, h) > 0 and max(w, h) > MAX_ASPECT_RATIO * min(w, h):
                raise ImageError(
                    f"image is {w}x{h} pixels, a strip whose sides differ more than {MAX_ASPECT_RATIO:,}:1 "
                    "(no model here can use it)",
                    p,
                )
            if draft and im.format == "JPEG":
                im.draft("RGB", draft)
            im.seek(0)  # GIF / multi-page TIFF: the first frame
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # a copy otherwise, even with nothing to turn
            return to_rgb(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not a supported image (unrecognised format)", p) from None
    except PermissionError:
        raise ImageError("permission denied", p) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"cannot decode image ({e})", p) from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK, 16-bit and alpha images to 8-bit RGB (alpha composited on white)."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits rather than clip.
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")
