"""Small random photos on disk for the batch tests (local and Ray): a folder with a subfolder, a
name with a space, a PNG, a file that claims to be a JPEG and is not, and a text file to skip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

__all__ = ["write_photo", "photos"]


def write_photo(path: Path, seed: int, size: tuple[int, int] = (48, 36)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    a = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(a).save(path, quality=90) if path.suffix == ".jpg" else Image.fromarray(a).save(path)
    return path


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    write_photo(root / "a.jpg", 1)
    write_photo(root / "b b.png", 2)
    write_photo(root / "sub" / "c.jpg", 3)
    (root / "sub" / "d.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "readme.txt").write_text("not an image")
    return root
