"""Image loading: formats, orientation, colour modes, the pixel cap and bad files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmcli.errors import ImageError
from vlmcli.images import load_image, looks_like_image

SAMPLE = Path(__file__).resolve().parents[1] / "vlmcli" / "data" / "chelsea.jpg"


def _gradient(w: int = 40, h: int = 24) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w)[None, :]
    a[..., 1] = np.linspace(0, 255, h)[:, None]
    a[..., 2] = 128
    return Image.fromarray(a, "RGB")


@pytest.mark.parametrize(
    "fmt,ext", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("GIF", "gif"), ("BMP", "bmp"), ("TIFF", "tif")]
)
def test_formats_load_as_rgb(tmp_path: Path, fmt: str, ext: str) -> None:
    p = tmp_path / f"img.{ext}"
    _gradient().save(p, fmt)
    im = load_image(p)
    assert im.mode == "RGB" and im.size == (40, 24)
    assert looks_like_image(p)


def test_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    assert load_image(p).getpixel((4, 4))[0] > 200


def test_exif_orientation_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    p = tmp_path / "rot.jpg"
    _gradient(40, 24).save(p, exif=exif.tobytes())
    assert load_image(p).size == (24, 40)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16"])
def test_modes_converted_to_rgb(tmp_path: Path, mode: str) -> None:
    src = _gradient()
    if mode == "I;16":
        im = Image.fromarray(np.asarray(src.convert("L"), np.uint16) * 257).convert("I;16")
    else:
        im = src.convert(mode)
    p = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    im.save(p)
    out = load_image(p)
    assert out.mode == "RGB"
    # Content survives (not a blank image): the gradient still spans a range.
    a = np.asarray(out, np.int32)
    assert a.max() - a.min() > 100


def test_alpha_composited_on_white(tmp_path: Path) -> None:
    p = tmp_path / "clear.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(p)
    assert load_image(p).getpixel((1, 1)) == (255, 255, 255)


def test_pixel_cap(tmp_path: Path) -> None:
    p = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(p)
    with pytest.raises(ImageError, match="pixel limit") as e:
        load_image(p, max_pixels=50_000)
    assert str(p) in str(e.value)
    assert load_image(p, max_pixels=100_000).size == (300, 300)


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    with pytest.raises(ImageError, match="not a supported image"):
        load_image(text)
    assert not looks_like_image(text)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(SAMPLE.read_bytes()[:3000])
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(truncated)
    ico = tmp_path / "x.ico"
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "ICO")
    ico.write_bytes(buf.getvalue())
    with pytest.raises(ImageError, match="unsupported image format"):
        load_image(ico)


def test_sample_image_is_a_real_photo() -> None:
    im = load_image(SAMPLE)
    assert im.size == (451, 300)
