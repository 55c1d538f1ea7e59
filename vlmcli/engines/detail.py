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

from dataclasses import dataclass
from typing import Any

from vlmcli.errors import InvalidOption, VlmError

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

    @classmethod
    def from_mmproj(cls, meta: dict[str, Any]) -> VisionGeometry:
        size = int(meta.get("clip.vision.image_size") or 0)
        patch = int(meta.get("clip.vision.patch_size") or 0)
        if size <= 0 or patch <= 0:
            raise VlmError("vision projector has no image_size/patch_size")
        return cls(
            tile_size=size,
            patch_size=patch,
            scale_factor=int(meta.get("clip.vision.projector.scale_factor") or 1),
            longest_edge=int(meta.get("clip.vision.preproc_image_size") or size),
        )


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
