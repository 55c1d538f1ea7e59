"""Telling image files by their first bytes (content sniffing, not the name), without Pillow: the
server process checks fetched images with it before a worker decodes them."""

from __future__ import annotations

# Leading bytes of the formats vlmcli.images decodes (WebP is checked apart: RIFF....WEBP).
MAGIC = (
    b"\xff\xd8\xff",  # JPEG / MPO
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
)
HEAD_BYTES = 16  # enough for every signature above


def is_image_header(head: bytes) -> bool:
    """True if `head` (a file's first bytes) starts like a supported image format."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return head.startswith(MAGIC)
