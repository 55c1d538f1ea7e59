"""CLIP preprocessing against an independent numpy implementation of CLIP's recipe, and the JPEG draft
tolerance documented in vlmcli/engines/clip_preprocess.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmcli.engines import clip_preprocess as cp
from vlmcli.engines.clip_preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, draft_size, preprocess
from vlmcli.images import load_image

SAMPLE = Path(__file__).resolve().parents[1] / "vlmcli" / "data" / "chelsea.jpg"
ONE_GREY_LEVEL = 1 / 255 / min(OPENAI_CLIP_STD)  # about 0.0146 in normalised units


# --- an independent reference: PIL's antialiased bicubic (a = -0.5) written out in numpy ---------------


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    scale = n_in / n_out
    filter_scale = max(scale, 1.0)  # downscaling widens the kernel (antialiasing)
    support = 2.0 * filter_scale
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        centre = (o + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        k = np.arange(lo, hi)
        w = _bicubic((k - centre + 0.5) / filter_scale)
        m[o, lo:hi] = w / w.sum()
    return m


def _reference_resize(a: np.ndarray, w: int, h: int) -> np.ndarray:
    x = np.einsum("ow,hwc->hoc", _resample_matrix(a.shape[1], w), a.astype(np.float64))
    x = np.clip(np.round(x), 0, 255)  # 8-bit between the two passes, like PIL
    y = np.einsum("oh,hwc->owc", _resample_matrix(a.shape[0], h), x)
    return np.clip(np.round(y), 0, 255).astype(np.uint8)


def reference_clip_preprocess(a: np.ndarray, size: int = 224) -> np.ndarray:
    """OpenAI CLIP: Resize(size, bicubic) on the shortest side, CenterCrop(size), ToTensor, Normalize."""
    h, w = a.shape[:2]
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    if (nw, nh) != (w, h):
        a = _reference_resize(a, nw, nh)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    a = a[top : top + size, left : left + size]
    x = (a.astype(np.float32) / 255.0 - np.array(OPENAI_CLIP_MEAN, np.float32)) / np.array(OPENAI_CLIP_STD, np.float32)
    return x.transpose(2, 0, 1)


# ---------------------------------------------------------------------------------------------------------

SIZES = [
    (451, 300),
    (300, 451),
    (100, 60),
    (640, 480),
    (50, 50),
    (1000, 999),
    (224, 224),
    (225, 224),
    (224, 301),
    (301, 224),
]


@pytest.mark.parametrize("w,h", SIZES)
def test_matches_reference_on_noise(w: int, h: int) -> None:
    a = np.random.default_rng(w * 1000 + h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    ours = preprocess(Image.fromarray(a), 224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    ref = reference_clip_preprocess(a)
    assert ours.shape == (3, 224, 224) and ours.dtype == np.float32
    diff = np.abs(ours - ref)
    # PIL works in fixed point: at most one grey level off, on a tiny fraction of pixels
    assert diff.max() <= ONE_GREY_LEVEL * 1.01
    assert (diff > 1e-5).mean() < 2e-3


def test_matches_reference_on_photo() -> None:
    im = load_image(SAMPLE)
    diff = np.abs(preprocess(im) - reference_clip_preprocess(np.asarray(im)))
    assert diff.max() <= ONE_GREY_LEVEL * 1.01 and (diff > 1e-5).mean() < 1e-3


@pytest.mark.parametrize("w,h,left,top", [(224, 301, 0, 38), (301, 224, 38, 0), (224, 303, 0, 40), (225, 224, 0, 0)])
def test_crop_offset_rounds_like_torchvision(w: int, h: int, left: int, top: int) -> None:
    # no resize (shortest side is already 224): the crop is exact, and round() is Python's (38.5 -> 38)
    a = np.random.default_rng(7).integers(0, 256, (h, w, 3), dtype=np.uint8)
    ours = preprocess(Image.fromarray(a))
    crop = a[top : top + 224, left : left + 224]
    expected = (crop.astype(np.float32) / 255 - np.float32(OPENAI_CLIP_MEAN)) / np.float32(OPENAI_CLIP_STD)
    np.testing.assert_array_equal(ours, expected.transpose(2, 0, 1))


def test_other_size_mean_std() -> None:
    a = np.full((40, 80, 3), 255, np.uint8)
    out = preprocess(Image.fromarray(a), 14, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert out.shape == (3, 14, 14)
    np.testing.assert_allclose(out[:, 0, 0], [2.0, 1.0, 0.5], rtol=1e-6)


def test_non_rgb_input_is_converted() -> None:
    grey = Image.fromarray(np.full((30, 30), 128, np.uint8), "L")
    out = preprocess(grey)
    assert out.shape == (3, 224, 224)
    np.testing.assert_allclose(
        out[:, 5, 5], (128 / 255 - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD), rtol=1e-5
    )


def test_draft_size() -> None:
    assert draft_size(224) == (448, 448)
    assert draft_size(336) == (672, 672)


# --- JPEG draft mode: the tolerance the module documents --------------------------------------------------


def _photo(scale: int) -> Image.Image:
    src = Image.open(SAMPLE).convert("RGB")
    return src.resize((src.width * scale, src.height * scale), Image.Resampling.BICUBIC)


def _adversarial(kind: str) -> Image.Image:
    yy, xx = np.mgrid[0:1800, 0:2400]
    if kind == "noise":
        return Image.fromarray(np.random.default_rng(0).integers(0, 256, (1800, 2400, 3), dtype=np.uint8))
    if kind == "stripes":
        return Image.fromarray((((xx // 3 + yy // 7) % 2) * 255).astype(np.uint8)).convert("RGB")
    return Image.fromarray(np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8))


def _draft_vs_full(tmp_path: Path, im: Image.Image, name: str) -> tuple[float, float, tuple[int, int]]:
    p = tmp_path / f"{name}.jpg"
    im.save(p, quality=92)
    full = preprocess(load_image(p))
    drafted = load_image(p, draft=draft_size(224))
    diff = np.abs(preprocess(drafted) - full)
    return float(diff.max()), float(diff.mean()), drafted.size


@pytest.mark.parametrize("scale,rotate", [(4, False), (8, False), (8, True)])
def test_draft_tolerance_on_photos(tmp_path: Path, scale: int, rotate: bool) -> None:
    im = _photo(scale)
    if rotate:
        im = im.rotate(90, expand=True)
    worst, mean, drafted_size = _draft_vs_full(tmp_path, im, f"photo{scale}")
    assert min(drafted_size) < min(im.size)  # draft mode really decoded a smaller image
    assert min(drafted_size) >= 448
    assert worst <= cp.DRAFT_PHOTO_MAX_DIFF and mean <= cp.DRAFT_PHOTO_MEAN_DIFF


@pytest.mark.parametrize("kind", ["noise", "stripes", "gradient"])
def test_draft_tolerance_worst_case(tmp_path: Path, kind: str) -> None:
    worst, mean, drafted_size = _draft_vs_full(tmp_path, _adversarial(kind), kind)
    assert drafted_size == (600, 450)
    assert worst <= cp.DRAFT_WORST_MAX_DIFF and mean <= cp.DRAFT_WORST_MEAN_DIFF


def test_small_jpeg_is_not_drafted(tmp_path: Path) -> None:
    p = tmp_path / "small.jpg"
    Image.open(SAMPLE).save(p, quality=95)  # 451 x 300: already under 2 x 224 on the short side
    assert load_image(p, draft=draft_size(224)).size == (451, 300)


# --- bounded preprocessing of any shape: the crop is resampled without the full resized image ------------


@pytest.mark.parametrize(
    "w,h", [(300, 451), (2000, 37), (37, 2000), (1, 300), (300, 1), (5, 7), (2, 1000), (1000, 2), (3000, 10), (60, 100)]
)
def test_bounded_crop_resample_matches_resize_then_crop(w: int, h: int) -> None:
    """The path taken above MAX_RESIZED_PIXELS gives the pixels of PIL's full resize + centre crop
    (up to float rounding of filter positions); compared here on shapes the full resize can still make."""
    a = np.random.default_rng(w * 7 + h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(a)
    rw, rh = cp.resized_size(w, h, 224)
    full = np.asarray(im.resize((rw, rh), Image.Resampling.BICUBIC)).astype(int)
    top, left = int(round((rh - 224) / 2.0)), int(round((rw - 224) / 2.0))
    ours = np.asarray(cp._resample_crop(im, cp.crop_box(w, h, 224), 224)).astype(int)
    diff = np.abs(full[top : top + 224, left : left + 224] - ours)
    assert diff.max() <= 2 and (diff > 0).mean() < 5e-3


@pytest.mark.parametrize("w,h", [(1, 20000), (20000, 1), (1, 10_000_000)])
def test_extreme_shapes_preprocess_to_the_central_square(w: int, h: int) -> None:
    """A 1 x 20000 image resized whole would be 224 x 4,480,000 (4 GB); a 1 x 10^7 one overflowed PIL.
    Only the central square is kept, so a column striped by row keeps the stripes of its middle."""
    a = np.zeros((h, w, 3), np.uint8)
    if h > w:
        a[h // 2 :, :, 0] = 255  # lower half red: the centre crop straddles the boundary
    else:
        a[:, w // 2 :, 0] = 255
    x = preprocess(Image.fromarray(a))
    assert x.shape == (3, 224, 224) and np.isfinite(x).all()
    red = x[0] > 0  # normalised red channel above the mean: the red half
    frac = red.mean()
    assert 0.3 < frac < 0.7  # the boundary runs through the middle of the crop
