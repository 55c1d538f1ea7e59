"""open_model: the one way every front end opens a model (kind detection, GPU flags, option errors)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vlmcli.engines.ggml import Backend
from vlmcli.errors import InvalidOption, ModelError
from vlmcli.tasks.models import ModelSpec, open_model


@pytest.fixture(scope="module")
def vlm_folder(smolvlm2_gguf, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("vlm-folder")
    for p in (smolvlm2_gguf.model, smolvlm2_gguf.mmproj):
        shutil.copy(p, d / p.name)
    return d


def test_kind_is_detected_when_not_given(clip_gguf: Path, vlm_folder: Path) -> None:
    with open_model(ModelSpec(str(clip_gguf))) as clip:
        assert clip.kind == "clip" and clip.name == clip_gguf.stem and clip.engine.config.projection_dim > 0
    with open_model(ModelSpec(str(vlm_folder), n_ctx=512)) as vlm:
        assert vlm.kind == "vlm" and vlm.engine.n_ctx == 512
        assert vlm.engine.options.detail == "auto"  # no registry entry: the engine default


def test_a_projector_is_not_a_model(smolvlm2_gguf) -> None:
    with pytest.raises(ModelError, match="vision projector"):
        open_model(ModelSpec(str(smolvlm2_gguf.mmproj)))


def test_minus_one_gpu_layers_means_the_gpu_for_clip_too(clip_gguf: Path) -> None:
    # -1 = all layers (llama.cpp's meaning): CLIP goes to the GPU whole, or stays on the CPU of a
    # build without a GPU backend, as llama.cpp does.
    with open_model(ModelSpec(str(clip_gguf), n_gpu_layers=-1), "clip") as clip:
        assert clip.engine.backend.is_cpu == (Backend._gpu_device() is None)
    with open_model(ModelSpec(str(clip_gguf), n_gpu_layers=0), "clip") as clip:
        assert clip.engine.backend.is_cpu


def test_option_errors_name_the_option(clip_gguf: Path, vlm_folder: Path) -> None:
    with pytest.raises(InvalidOption) as e:
        open_model(ModelSpec(" "))
    assert e.value.option == "model"
    with pytest.raises(InvalidOption) as e:
        open_model(ModelSpec(str(clip_gguf), mmproj="x.gguf"), "clip")
    assert e.value.option == "mmproj"
    with pytest.raises(InvalidOption) as e:
        open_model(ModelSpec(str(vlm_folder), max_tiles=-1), "vlm")
    assert e.value.option == "max_tiles"
