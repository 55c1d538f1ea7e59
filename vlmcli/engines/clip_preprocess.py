"""CLIP's image preprocessing, as OpenAI CLIP's torchvision transform does it.

Resize(size, BICUBIC) on the shortest side -> CenterCrop(size) -> ToTensor (/255) -> Normalize(mean, std).
The crop offset is torchvision's round((h - size) / 2) (Python's round); transformers' CLIPImageProcessor
floors instead, which differs by one pixel for some odd sizes - the models were trained with torchvision's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# JPEG draft decoding (DCT scaling by 1/2, 1/4, 1/8 inside libjpeg) is several times faster for big
# photos but is not the same filter as a full decode + bicubic. Keeping at least DRAFT_FACTOR x the
# model size before our own bicubic resize bounds the difference of the preprocessed tensor from the
# full decode (absolute, in normalised units; 1 unit is about 0.27 * 255 = 69 grey levels), measured in
# tests/test_clip_preprocess.py: photos (upscaled chelsea.jpg, q92) max 0.03 / mean 0.003 (about 2 grey
# levels at worst); adversarial pixel noise, 3 px stripes and gradients max 0.16 / mean 0.03.
# (Factor 1 would give 0.07 / 0.007 on photos and 0.40 / 0.08 on the adversarial images.)
DRAFT_FACTOR = 2
DRAFT_PHOTO_MAX_DIFF = 0.05
DRAFT_PHOTO_MEAN_DIFF = 0.005
DRAFT_WORST_MAX_DIFF = 0.2
DRAFT_WORST_MEAN_DIFF = 0.04


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) with the shortest side = size and the other truncated as torchvision does."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def crop_box(width: int, height: int, size: int) -> tuple[float, float, float, float] | None:
    """The source rectangle (left, top, right, bottom, in pixels) that Resize(size) + CenterCrop(size)
    keeps, or None when the image already has its resized size (only a crop is needed)."""
    w, h = resized_size(width, height, size)
    if (w, h) == (width, height):
        return None
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    sx, sy = width / w, height / h  # source pixels per resized pixel, as PIL's full resize uses
    return (left * sx, top * sy, (left + size) * sx, (top + size) * sy)


# Above this many pixels the resized image is not made (see resize_and_crop); below it, the result is
# PIL's own resize followed by the crop, exactly as before. 16.7 M pixels (50 MB) covers every image
# with an aspect ratio under about 330:1 (at 224 px); beyond, the full resize would grow without bound.
MAX_RESIZED_PIXELS = 1 << 24


def resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Shortest side to `size` (bicubic), then the centre `size` x `size` crop.

    A 1 x 20000 image would become 224 x 4,480,000 (4 GB) only for all but its central 224 x 224 to
    be thrown away (and a 1 x 10^7 one overflowed PIL). When the resized image would have more than
    MAX_RESIZED_PIXELS, only the kept rectangle is resampled (`_resample_crop`), so work and memory
    are bounded by the input image plus one `size`-wide strip, whatever the shape.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    box = crop_box(image.width, image.height, size)
    if box is None:
        top = int(round((image.height - size) / 2.0))
        left = int(round((image.width - size) / 2.0))
        return image.crop((left, top, left + size, top + size))
    w, h = resized_size(image.width, image.height, size)
    if w * h > MAX_RESIZED_PIXELS:
        return _resample_crop(image, box, size)
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def _resample_crop(image: Image.Image, box: tuple[float, float, float, float], size: int) -> Image.Image:
    """The `size` x `size` resample of `box` as PIL's full resize makes it: its two passes in its order
    (horizontal, then vertical, each rounding to 8 bits), each output pixel's filter at the same source
    position and scale (its support reaching outside the box into the image, as there). The result
    equals resize-then-crop but for float rounding of the filter positions: at most a grey level or
    two on a fraction of a percent of the pixels (tests/test_clip_preprocess.py)."""
    left, top, right, bottom = box
    bicubic = Image.Resampling.BICUBIC
    # The source rows the vertical pass reads: bicubic's support is 2 output pixels, widened by the
    # scale when downscaling; a margin of 2 rows keeps float rounding out of it.
    support = 2.0 * max((bottom - top) / size, 1.0)
    y0 = max(0, int(math.floor(top - support)) - 2)
    y1 = min(image.height, int(math.ceil(bottom + support)) + 2)
    strip = image.crop((0, y0, image.width, y1))  # these rows only
    strip = strip.resize((size, y1 - y0), bicubic, box=(left, 0, right, y1 - y0))  # horizontal pass
    return strip.resize((size, size), bicubic, box=(0, top - y0, size, bottom - y0))  # vertical pass


def normalize(pixels_hwc_uint8: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W): /255, then (x - mean) / std per channel (float32, like torch)."""
    x = pixels_hwc_uint8.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(
    image: Image.Image,
    size: int = 224,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> np.ndarray:
    """An RGB PIL image -> the float32 (3, size, size) tensor CLIP's vision tower takes."""
    cropped = resize_and_crop(image, size)
    return normalize(np.asarray(cropped, dtype=np.uint8), mean, std)


def draft_size(size: int = 224) -> tuple[int, int]:
    """The `draft=` request for vlmcli.images.load_image: JPEGs decode to at least this on both sides.

    Both sides at least DRAFT_FACTOR * size means the shortest side is, whatever the aspect ratio.
    """
    return (DRAFT_FACTOR * size, DRAFT_FACTOR * size)
