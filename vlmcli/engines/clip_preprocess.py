"""CLIP's image preprocessing, as OpenAI CLIP's torchvision transform does it.

Resize(size, BICUBIC) on the shortest side -> CenterCrop(size) -> ToTensor (/255) -> Normalize(mean, std).
The crop offset is torchvision's round((h - size) / 2) (Python's round); transformers' CLIPImageProcessor
floors instead, which differs by one pixel for some odd sizes - the models were trained with torchvision's.
"""

from __future__ import annotations

from typing import Sequence

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


def resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Shortest side to `size` (bicubic), then the centre `size` x `size` crop."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    w, h = resized_size(image.width, image.height, size)
    if (w, h) != image.size:
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


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
