"""Image detail levels: how many tiles of an image SmolVLM2 sees.

At full detail llama.cpp's mtmd upscales every image to the preprocessor's longest edge (2048 px for
SmolVLM2) and cuts it into 512 px tiles plus an overview: 13 encoder passes for a 451x300 photo,
which dominates the cost on a CPU. Lower levels use what llama.cpp offers:
- high:   the model's own tiling (mtmd's defaults).
- tiles N (--max-tiles): mtmd's `image_max_tokens` context parameter caps the tiled area at N tiles.
- low:    only the overview image (one encoder pass), laid out as the model's unsplit image.
- auto:   low when the image is no larger than one tile (upscaling adds tokens, not detail);
          otherwise full tiling on a GPU and at most AUTO_CPU_MAX_TILES tiles on a CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vlmcli.errors import ImageError, InvalidOption, ModelError

if TYPE_CHECKING:
    from PIL import Image

DETAIL_LEVELS = ("low", "high", "auto")
AUTO_CPU_MAX_TILES = 4


@dataclass(frozen=True)
class VisionGeometry:
    tile_size: int  # the encoder's input size (clip.vision.image_size)
    patch_size: int
    scale_factor: int  # pixel-shuffle merge factor
    longest_edge: int  # preprocessor's resize target (clip.vision.preproc_image_size)

    @property
    def tokens_per_tile(self) -> int:
        return (self.tile_size // self.patch_size) ** 2 // (self.scale_factor**2)

    preproc_longest_edge: int = 0  # clip.vision.preproc_image_size as mtmd reads it (0 = absent)

    @classmethod
    def from_mmproj(cls, meta: dict[str, Any], path: str | os.PathLike[str] | None = None) -> VisionGeometry:
        """The geometry of a projector's metadata (gguf_rules has checked the values' ranges)."""
        values = {}
        for key in ("clip.vision.image_size", "clip.vision.patch_size"):
            v = meta.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ModelError(f"{key} = {v}: the vision projector needs a positive {key.rsplit('.', 1)[1]}", path)
            values[key] = v
        size, patch = values["clip.vision.image_size"], values["clip.vision.patch_size"]
        preproc = int(meta.get("clip.vision.preproc_image_size") or 0)
        return cls(
            tile_size=size,
            patch_size=patch,
            scale_factor=int(meta.get("clip.vision.projector.scale_factor") or 1),
            longest_edge=preproc or size,
            preproc_longest_edge=preproc,
        )


# mtmd-image.cpp refuses a resize target outside 1..65536 on either side.
MTMD_MAX_RESIZE = 65536


def check_image_shape(width: int, height: int, geo: VisionGeometry, image_max_tokens: int) -> None:
    """Refuse an image mtmd cannot preprocess, before it is handed over (mtmd only says "code 2").

    Follows mtmd_image_preprocessor_idefics3 (llama.cpp tools/mtmd/mtmd-image.cpp): with no token cap
    and a preprocessor longest edge, the image is first resized to that longest edge with its aspect
    ratio kept, the short side truncated to an integer; a very elongated image (more than
    `longest_edge` times longer than wide) truncates to 0 pixels there. With a cap (image_max_tokens
    > 0) or no longest edge, sizes are rounded up to whole tiles and never reach 0.
    """
    if width <= 0 or height <= 0:
        raise ImageError(f"the image is {width}x{height} pixels; it has no pixels")
    targets: list[tuple[int, int]] = []
    longest = geo.preproc_longest_edge
    if longest > 0 and image_max_tokens <= 0:
        aspect = width / height  # double, as in mtmd
        if width >= height:
            rw, rh = longest, int(longest / aspect)
            rh += rh % 2
        else:
            rw, rh = int(longest * aspect), longest
            rw += rw % 2
        targets.append((rw, rh))
        tile = geo.tile_size
        targets.append((-(-rw // tile) * tile, -(-rh // tile) * tile))
    for tw, th in targets:
        if not (0 < tw <= MTMD_MAX_RESIZE and 0 < th <= MTMD_MAX_RESIZE):
            ratio = max(width, height) / min(width, height)
            raise ImageError(
                f"the image is {width}x{height} pixels, too elongated for this model at full detail: it would "
                f"be resized to {tw}x{th} (its sides may differ at most {longest}:1, this one is {ratio:.0f}:1; "
                "a capped or lower detail level can take it)"
            )


def bounded_size(width: int, height: int, geo: VisionGeometry) -> tuple[int, int] | None:
    """The size to scale an image to before mtmd sees it, or None to hand it over as it is.

    mtmd never uses more than the preprocessor's longest edge (or one tile) of the longest side, but
    under a token cap it works on the bitmap as given, at hundreds of bytes per pixel of the longest
    side (a 1 x 262,144 strip: 100 MB, growing without bound). Beyond twice that edge the image is
    scaled down to it, the aspect ratio kept (a side at least 1 px), so mtmd's own resize still has
    the detail it would have had.
    """
    bound = 2 * max(geo.longest_edge, geo.tile_size)
    longest = max(width, height)
    if longest <= bound:
        return None
    return max(1, round(width * bound / longest)), max(1, round(height * bound / longest))


def mtmd_input(image: Image.Image, geo: VisionGeometry, image_max_tokens: int) -> Image.Image:
    """The image mtmd is given: checked at its own size (check_image_shape), then bounded (bounded_size)."""
    from PIL.Image import Resampling

    check_image_shape(image.width, image.height, geo, image_max_tokens)
    size = bounded_size(image.width, image.height, geo)
    if size is None:
        return image
    return image.resize(size, Resampling.BICUBIC, reducing_gap=3.0)


def validate(detail: str, max_tiles: int | None) -> None:
    if detail not in DETAIL_LEVELS:
        raise InvalidOption("detail", f"unknown detail level {detail!r} (choose low, high or auto)")
    if max_tiles is not None and max_tiles < 0:
        raise InvalidOption("max_tiles", f"the tile cap is {max_tiles}; it must be 0 (overview only) or more")


def choose(
    width: int, height: int, geo: VisionGeometry, detail: str, max_tiles: int | None, on_gpu: bool
) -> tuple[str, int | None]:
    """The level to use for one image: ("low", 1) | ("high", None) | ("tiles", N)."""
    validate(detail, max_tiles)
    if max_tiles is not None:
        return ("low", 1) if max_tiles == 0 else ("tiles", max_tiles)
    if detail == "low":
        return "low", 1
    if detail == "high":
        return "high", None
    # auto
    if max(width, height) <= geo.tile_size:
        return "low", 1
    if on_gpu:
        return "high", None
    # One cap for every larger image: mtmd's cap shrinks the tiled area to fit it, so a photo only
    # a little larger than a tile gets 2 tiles, and one engine needs a single mtmd context.
    return "tiles", AUTO_CPU_MAX_TILES
