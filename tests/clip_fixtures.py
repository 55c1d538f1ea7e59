"""Session-scoped pytest fixtures for CLIP: tiny checkpoints in the real HF layout and their GGUFs.

tests/conftest.py registers this module as a pytest plugin (pytest_plugins), so every test sees them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures.clip import build_clip_checkpoint

__all__ = ["clip_checkpoint", "clip_checkpoint_gelu", "clip_gguf", "clip_gguf_q8", "clip_gguf_gelu", "clip_ggufs"]


@pytest.fixture(scope="session")
def clip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny openai-style CLIP (quick_gelu), real vocabulary, image 224 / patch 32."""
    return build_clip_checkpoint(tmp_path_factory.mktemp("clip") / "clip-tiny", activation="quick_gelu", seed=0)


@pytest.fixture(scope="session")
def clip_checkpoint_gelu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny laion-style CLIP (erf gelu)."""
    return build_clip_checkpoint(tmp_path_factory.mktemp("clip") / "clip-tiny-gelu", activation="gelu", seed=1)


def _convert(checkpoint: Path, quant: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlmcli.convert.clip import convert_clip

    return convert_clip(checkpoint, tmp_path_factory.mktemp("clip-gguf"), quant)


@pytest.fixture(scope="session")
def clip_gguf(clip_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny quick_gelu CLIP converted to F16."""
    return _convert(clip_checkpoint, "F16", tmp_path_factory)


@pytest.fixture(scope="session")
def clip_gguf_q8(clip_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny quick_gelu CLIP converted to Q8_0."""
    return _convert(clip_checkpoint, "Q8_0", tmp_path_factory)


@pytest.fixture(scope="session")
def clip_gguf_gelu(clip_checkpoint_gelu: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny gelu CLIP converted to F16."""
    return _convert(clip_checkpoint_gelu, "F16", tmp_path_factory)


@pytest.fixture(scope="session")
def clip_ggufs(
    clip_checkpoint: Path,
    clip_checkpoint_gelu: Path,
    clip_gguf: Path,
    clip_gguf_q8: Path,
    clip_gguf_gelu: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[tuple[str, str], Path]:
    """(activation, type) -> a converted tiny CLIP GGUF (the ones above, plus F32 and gelu Q8_0)."""
    return {
        ("quick_gelu", "F32"): _convert(clip_checkpoint, "F32", tmp_path_factory),
        ("quick_gelu", "F16"): clip_gguf,
        ("quick_gelu", "Q8_0"): clip_gguf_q8,
        ("gelu", "F16"): clip_gguf_gelu,
        ("gelu", "Q8_0"): _convert(clip_checkpoint_gelu, "Q8_0", tmp_path_factory),
    }
