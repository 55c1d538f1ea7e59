"""CLIP GGUF interchange with clip.cpp (monatis/clip.cpp), both ways.

CI cannot build clip.cpp, so tests/fixtures/clipcpp.py stands in for it: files written as its converter
and its quantizer write them, and the keys, types and tensor rules its loader and ops need (read from
its source). The README's clip.cpp section gives the real clip.cpp commit checked and the numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures.clip import OPENAI_CONFIG, VIT_L14_OVERRIDES, _deep_update, read_gguf
from fixtures.clipcpp import (
    CLIPCPP_FILE_TYPES,
    CLIPCPP_OPTIONAL_KEYS,
    CLIPCPP_REQUIRED_KEYS,
    CLIPCPP_TENSOR_COUNTS,
    clipcpp_tensor_rules,
    quantize_like_clipcpp,
    read_kv_types,
    rewrite_gguf,
    write_clipcpp_gguf,
)

from vlmcli.convert.clip import QUANT_TYPES, convert_clip, expected_tensors, read_hparams
from vlmcli.engines.clip import ClipModel
from vlmcli.engines.clip_tokenizer import ClipTokenizer, default_tokenizer
from vlmcli.errors import ModelError

TEXTS = ["a photo of a cat", "a diagram", "two dogs playing in the snow at night", ""]


def _pixels(n: int = 3) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((n, 3, 224, 224)).astype(np.float32)


def _tokens() -> np.ndarray:
    return default_tokenizer().tokenize(TEXTS)[0]


def _embed(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with ClipModel.load(path) as m:
        return m.encode_images(_pixels()), m.encode_texts(_tokens())


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def clipcpp_f16(clip_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint as clip.cpp's converter writes it (F16)."""
    return write_clipcpp_gguf(clip_checkpoint, tmp_path_factory.mktemp("clipcpp") / "clip-tiny_ggml-model-f16.gguf")


@pytest.fixture(scope="module")
def clipcpp_f32(clip_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """... and with --use-f32."""
    return write_clipcpp_gguf(
        clip_checkpoint, tmp_path_factory.mktemp("clipcpp") / "clip-tiny_ggml-model-f32.gguf", ftype="F32"
    )


@pytest.fixture(scope="module")
def vlm_f32(clip_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_clip(clip_checkpoint, tmp_path_factory.mktemp("vlm-f32"), "F32")


@pytest.fixture(scope="module")
def reference(vlm_f32: Path) -> tuple[np.ndarray, np.ndarray]:
    """Image and text embeddings of vlm's own F32 conversion."""
    return _embed(vlm_f32)


# --- vlm convert -> clip.cpp ------------------------------------------------------------------------


@pytest.mark.parametrize("quant", QUANT_TYPES)
def test_convert_output_has_what_clipcpp_needs(
    clip_checkpoint: Path, clipcpp_f16: Path, tmp_path: Path, quant: str
) -> None:
    path = convert_clip(clip_checkpoint, tmp_path, quant)
    types = read_kv_types(path)
    kv, tensors = read_gguf(path)
    for key, (vtype, sub) in {**CLIPCPP_REQUIRED_KEYS, **CLIPCPP_OPTIONAL_KEYS}.items():
        assert key in types, f"clip.cpp needs {key}"
        assert types[key] == (int(vtype), None if sub is None else int(sub)), key
    assert len(kv["clip.vision.image_mean"]) == len(kv["clip.vision.image_std"]) == 3
    assert kv["clip.has_text_encoder"] is kv["clip.has_vision_encoder"] is True
    assert CLIPCPP_FILE_TYPES[kv["general.file_type"]] == quant  # its get_ftype() knows it, and it is the truth
    # vlm's extras, which clip.cpp ignores
    assert kv["tokenizer.ggml.merges"] and "clip.logit_scale" in kv

    # clip.cpp's tensor set, names and shapes (so for real sizes its tensor-count table fits), and only
    # types its ops take
    _, theirs = read_gguf(clipcpp_f16)
    assert {n: t.shape for n, t in tensors.items()} == {n: t.shape for n, t in theirs.items()}
    for name, t in tensors.items():
        assert t.type_name in clipcpp_tensor_rules(name), (name, t.type_name)
    assert tensors["v.patch_embd.weight"].type_name == "F16"


@pytest.mark.parametrize("overrides,count", [({}, 397), (VIT_L14_OVERRIDES, 589)])
def test_real_sizes_have_clipcpp_tensor_counts(tmp_path: Path, overrides: dict, count: int) -> None:
    # clip.cpp sizes its compute buffer from the tensor count and exits on a count it does not know
    cfg = json.loads(OPENAI_CONFIG.read_text(encoding="utf-8"))
    _deep_update(cfg, overrides)
    (tmp_path / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    assert len(expected_tensors(read_hparams(tmp_path))) == count
    assert count in CLIPCPP_TENSOR_COUNTS


# --- clip.cpp -> vlm ----------------------------------------------------------------------------------


def test_clipcpp_file_has_its_layout(clipcpp_f16: Path) -> None:
    """The stand-in writes what clip.cpp's converter writes: no merges, no logit scale, F16 embeddings."""
    kv, tensors = read_gguf(clipcpp_f16)
    assert "tokenizer.ggml.merges" not in kv and "clip.logit_scale" not in kv
    assert "tokenizer.ggml.bos_token_id" not in kv
    assert set(CLIPCPP_REQUIRED_KEYS) <= set(kv)
    for name in (
        "t.token_embd.weight",
        "t.position_embd.weight",
        "v.position_embd.weight",
        "v.patch_embd.weight",
        "t.blk.0.attn_q.weight",
        "text_projection.weight",
    ):
        assert tensors[name].type_name == "F16", name
    for name in ("v.class_embd", "t.blk.0.ln1.weight", "v.blk.1.ffn_up.bias"):
        assert tensors[name].type_name == "F32", name


def test_vlm_reads_clipcpp_f16(clipcpp_f16: Path, clip_gguf: Path) -> None:
    with ClipModel.load(clipcpp_f16) as m:
        cfg, form = m.config, m.kernels.form
        images, texts = m.encode_images(_pixels()), m.encode_texts(_tokens())
    # the fallbacks, each with a note for the front end
    assert cfg.logit_scale == pytest.approx(100.0)
    assert len(cfg.notes) == 2
    assert any("logit scale" in n for n in cfg.notes) and any("merges" in n for n in cfg.notes)
    assert cfg.merges == default_tokenizer().merges and cfg.tokens == default_tokenizer().tokens
    assert (cfg.bos_id, cfg.eos_id) == (49406, 49407)
    assert cfg.name == clipcpp_f16.stem  # no general.name: the config's _name_or_path was empty
    assert cfg.file_type == "F16"
    tok = ClipTokenizer(cfg.merges, cfg.tokens, bos_id=cfg.bos_id, eos_id=cfg.eos_id)
    np.testing.assert_array_equal(tok.tokenize(TEXTS)[0], _tokens())

    # vlm's own F16 conversion of the same weights (which keeps the token and position embeddings F32)
    # the F16 embeddings move x a little, and a BF16 kernel (8 significant bits) can round it either way
    bar, cosine = (2.0**-7, 0.9999) if form == "bf16" else (2e-3, 0.99999)
    ours_images, ours_texts = _embed(clip_gguf)
    np.testing.assert_allclose(images, ours_images, rtol=0, atol=bar * np.abs(ours_images).max())
    np.testing.assert_allclose(texts, ours_texts, rtol=0, atol=bar * np.abs(ours_texts).max())
    assert _cosine(images, ours_images).min() > cosine and _cosine(texts, ours_texts).min() > cosine


def test_vlm_reads_clipcpp_f32(clipcpp_f32: Path, reference: tuple[np.ndarray, np.ndarray]) -> None:
    images, texts = _embed(clipcpp_f32)
    # same weights, same types (the patch embedding F16 in both): the same numbers
    np.testing.assert_allclose(images, reference[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(texts, reference[1], rtol=1e-5, atol=1e-6)
    with ClipModel.load(clipcpp_f32) as m:
        assert m.config.file_type == "F32"


@pytest.mark.parametrize("qtype,min_cosine", [("Q8_0", 0.999), ("Q5_1", 0.99), ("Q4_0", 0.95)])
def test_vlm_reads_clipcpp_quantized(
    clipcpp_f16: Path, reference: tuple[np.ndarray, np.ndarray], tmp_path: Path, qtype: str, min_cosine: float
) -> None:
    # clip.cpp's quantizer quantizes the token and position embeddings too
    path = quantize_like_clipcpp(clipcpp_f16, tmp_path / f"clip-tiny_ggml-model-{qtype.lower()}.gguf", qtype)
    _, tensors = read_gguf(path)
    assert tensors["t.token_embd.weight"].type_name == tensors["v.position_embd.weight"].type_name == qtype
    with ClipModel.load(path) as m:
        assert m.config.file_type == qtype
        images, texts = m.encode_images(_pixels()), m.encode_texts(_tokens())
    assert _cosine(images, reference[0]).min() > min_cosine
    assert _cosine(texts, reference[1]).min() > min_cosine


def test_missing_logit_scale_alone(clip_gguf: Path, tmp_path: Path) -> None:
    path = rewrite_gguf(clip_gguf, tmp_path / "no-scale.gguf", drop=("clip.logit_scale",))
    with ClipModel.load(path) as m:
        assert m.config.logit_scale == pytest.approx(100.0)
        assert len(m.config.notes) == 1 and "logit scale" in m.config.notes[0]
        assert m.config.merges == default_tokenizer().merges  # the file's own merges
    with ClipModel.load(clip_gguf) as m:
        assert m.config.notes == []


@pytest.mark.parametrize(
    "change,message",
    [
        ("swapped", "vocabulary is not CLIP's"),
        ("renamed", "vocabulary is not CLIP's"),
        ("shorter", "vocabulary"),  # (the header checks may refuse it first: CLIP's special ids fall outside)
    ],
)
def test_non_clip_vocabulary_without_merges_is_refused(
    clipcpp_f16: Path, tmp_path: Path, change: str, message: str
) -> None:
    tokens = list(default_tokenizer().tokens)
    if change == "swapped":  # same tokens, other ids: CLIP's merges would give wrong ids
        tokens[300], tokens[301] = tokens[301], tokens[300]
    elif change == "renamed":
        tokens[1000] = "hello</w>"
    else:
        tokens = tokens[:1000]
    path = rewrite_gguf(clipcpp_f16, tmp_path / f"{change}.gguf", values={"tokenizer.ggml.tokens": tokens})
    with pytest.raises(ModelError, match=message) as e:
        ClipModel.load(path)
    assert e.value.path == str(path) and "\n" not in str(e.value)


def test_vlm_embed_on_a_clipcpp_file_says_what_it_assumed(clipcpp_f16: Path, tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLM_HOME": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, "-m", "vlmcli", "embed", "--text", "a cat", "--model", str(clipcpp_f16)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if line.startswith(f"vlm: note: {clipcpp_f16}: ")]
    assert len(notes) == 2 and any("logit scale" in n for n in notes) and any("merges" in n for n in notes)
    assert len(json.loads(r.stdout)["embedding"]) > 0
