"""Telling image and video files by their first bytes (content sniffing, not the name), without Pillow
or PyAV: the server process checks fetched images with it before a worker decodes them, and folders
given to ask and caption yield the videos in them."""

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


# ISO base media (MP4, MOV, 3GP) files name a brand after "ftyp"; HEIF and AVIF images are ISO files too.
_IMAGE_BRANDS = {b"heic", b"heix", b"hevc", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1", b"avif", b"avis"}
_VIDEO_MAGIC = (
    b"\x1a\x45\xdf\xa3",  # Matroska / WebM
    b"FLV\x01",
    b"\x00\x00\x01\xba",  # MPEG program stream
    b"OggS",  # Ogg (Theora; an audio-only Ogg is refused when it is opened)
    b"\x30\x26\xb2\x75\x8e\x66\xcf\x11",  # ASF / WMV
)


def is_video_header(head: bytes) -> bool:
    """True if `head` (a file's first bytes) starts like a video container PyAV reads."""
    if head[4:8] == b"ftyp":
        return head[8:12] not in _IMAGE_BRANDS
    if head[4:8] in (b"moov", b"mdat", b"wide", b"free") and len(head) >= 8:  # QuickTime without ftyp
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return True
    return head.startswith(_VIDEO_MAGIC)
