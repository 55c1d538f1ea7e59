"""The CLIP converter: GGUF metadata, tensor names / shapes / types, quantization, ViT-L/14-style
configs, both activations, tokenizer sources, and clear errors for wrong or missing files."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from fixtures.clip import VIT_L14_OVERRIDES, build_clip_checkpoint, read_gguf

from vlmcli.convert.clip import convert_clip
from vlmcli.convert.safetensors_io import load_safetensors
from vlmcli.engines.clip_tokenizer import DEFAULT_MERGES_FILE, read_merges_file, vocabulary_from_merges
from vlmcli.errors import ModelError, VlmError
from vlmcli.gguf.validate import require_kind

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "convert" / "clip.py"


# gguf.GGUFReader needs seconds per CLIP file (a numpy view per vocabulary string), so the tests read
# with fixtures.clip.read_gguf, checked against GGUFReader once in test_quick_reader_agrees_with_gguf.
def _fields(path: Path) -> dict:
    return read_gguf(path)[0]


def _tensors(path: Path) -> dict:
    return read_gguf(path)[1]


def _hf(checkpoint: Path) -> dict[str, np.ndarray]:
    return {k: v.load() for k, v in load_safetensors(checkpoint).items()}


@pytest.fixture(scope="module")
def f16(clip_gguf: Path) -> Path:
    return clip_gguf


def test_quick_reader_agrees_with_gguf(clip_gguf_q8: Path) -> None:
    reader = gguf.GGUFReader(clip_gguf_q8)
    kv, tensors = read_gguf(clip_gguf_q8)
    assert {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")} == kv
    assert [t.name for t in reader.tensors] == list(tensors)
    for t in reader.tensors:
        quick = tensors[t.name]
        assert quick.type_name == t.tensor_type.name
        assert quick.shape == tuple(int(x) for x in reversed(t.shape))
        np.testing.assert_array_equal(quick.raw, np.asarray(t.data).view(np.uint8).reshape(-1))


def test_metadata(clip_gguf: Path) -> None:
    kv = _fields(clip_gguf)
    assert clip_gguf.name == "clip-tiny-F16.gguf"
    assert kv["general.architecture"] == "clip"
    assert kv["general.name"] == "clip-tiny"
    assert kv["general.file_type"] == int(gguf.GGMLQuantizationType.F16)  # clip.cpp's numbering: ggml type ids
    assert kv["general.description"] == "two-tower CLIP model"  # clip.cpp requires it
    assert kv["clip.has_text_encoder"] is True and kv["clip.has_vision_encoder"] is True
    assert kv["clip.has_llava_projector"] is False
    assert kv["clip.use_gelu"] is False  # quick_gelu
    assert "clip.projector_type" not in kv
    expected = {
        "clip.text.context_length": 77,
        "clip.text.embedding_length": 64,
        "clip.text.feed_forward_length": 256,
        "clip.text.projection_dim": 32,
        "clip.text.attention.head_count": 4,
        "clip.text.block_count": 2,
        "clip.vision.image_size": 224,
        "clip.vision.patch_size": 32,
        "clip.vision.embedding_length": 64,
        "clip.vision.feed_forward_length": 256,
        "clip.vision.projection_dim": 32,
        "clip.vision.attention.head_count": 4,
        "clip.vision.block_count": 2,
    }
    for key, value in expected.items():
        assert kv[key] == value, key
    assert kv["clip.text.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert kv["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    np.testing.assert_allclose(kv["clip.vision.image_mean"], [0.48145466, 0.4578275, 0.40821073], rtol=1e-6)
    np.testing.assert_allclose(kv["clip.vision.image_std"], [0.26862954, 0.26130258, 0.27577711], rtol=1e-6)
    assert kv["clip.logit_scale"] == pytest.approx(math.log(100.0), rel=1e-6)  # the stored log value
    raw = clip_gguf.read_bytes()
    key = b"clip.logit_scale"
    at = raw.index(key) + len(key)
    assert int.from_bytes(raw[at : at + 4], "little") == gguf.GGUFValueType.FLOAT32  # stored as float32
    assert require_kind(clip_gguf, "clip").kind == "clip"


def test_tokenizer_metadata(f16: Path) -> None:
    kv = _fields(f16)
    merges = read_merges_file(DEFAULT_MERGES_FILE)
    assert kv["tokenizer.ggml.model"] == "clip"
    assert kv["tokenizer.ggml.tokens"] == vocabulary_from_merges(merges)
    assert len(kv["tokenizer.ggml.tokens"]) == 49408
    assert kv["tokenizer.ggml.merges"] == merges
    assert kv["tokenizer.ggml.bos_token_id"] == 49406 and kv["tokenizer.ggml.eos_token_id"] == 49407


def test_tensor_names_shapes_and_values(clip_checkpoint: Path, f16: Path) -> None:
    hf = _hf(clip_checkpoint)
    t = _tensors(f16)
    n_layers = 2
    assert len(t) == 4 + 16 * n_layers + 7 + 16 * n_layers + 2  # text, vision, projections
    pairs = {
        "t.token_embd.weight": "text_model.embeddings.token_embedding.weight",
        "t.position_embd.weight": "text_model.embeddings.position_embedding.weight",
        "t.post_ln.weight": "text_model.final_layer_norm.weight",
        "v.class_embd": "vision_model.embeddings.class_embedding",
        "v.patch_embd.weight": "vision_model.embeddings.patch_embedding.weight",
        "v.position_embd.weight": "vision_model.embeddings.position_embedding.weight",
        "v.pre_ln.bias": "vision_model.pre_layrnorm.bias",
        "v.post_ln.weight": "vision_model.post_layernorm.weight",
        "text_projection.weight": "text_projection.weight",
        "visual_projection.weight": "visual_projection.weight",
        # the legacy quirk: fc1 (the widening layer) is ffn_down, fc2 is ffn_up
        "t.blk.1.ffn_down.weight": "text_model.encoder.layers.1.mlp.fc1.weight",
        "t.blk.1.ffn_down.bias": "text_model.encoder.layers.1.mlp.fc1.bias",
        "v.blk.0.ffn_up.weight": "vision_model.encoder.layers.0.mlp.fc2.weight",
        "v.blk.0.attn_q.weight": "vision_model.encoder.layers.0.self_attn.q_proj.weight",
        "v.blk.0.attn_out.bias": "vision_model.encoder.layers.0.self_attn.out_proj.bias",
        "t.blk.0.ln1.weight": "text_model.encoder.layers.0.layer_norm1.weight",
        "t.blk.0.ln2.bias": "text_model.encoder.layers.0.layer_norm2.bias",
    }
    for gguf_name, hf_name in pairs.items():
        tensor = t[gguf_name]
        assert tensor.shape == hf[hf_name].shape, gguf_name  # HF orientation (GGUF dims reversed)
        np.testing.assert_allclose(tensor.array(), hf[hf_name], rtol=1e-3, atol=1e-4, err_msg=gguf_name)
    assert t["t.blk.0.ffn_down.weight"].shape == (256, 64)  # fc1: 64 -> 256
    assert t["v.patch_embd.weight"].shape == (64, 3, 32, 32)
    assert t["v.position_embd.weight"].shape == (50, 64)
    assert not any("position_ids" in name for name in t)


def test_types_f16(f16: Path) -> None:
    for name, tensor in _tensors(f16).items():
        matmul = name.endswith(
            ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_out.weight", "ffn_up.weight", "ffn_down.weight")
        ) or name.endswith("projection.weight")
        expected = "F16" if matmul or name == "v.patch_embd.weight" else "F32"  # clip.cpp's conv_2d: F16 kernel
        assert tensor.type_name == expected, name


@pytest.mark.parametrize("quant", ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "F32"])
def test_quant_types(clip_checkpoint: Path, tmp_path: Path, quant: str) -> None:
    path = convert_clip(clip_checkpoint, tmp_path, quant.lower())
    assert path.name == f"clip-tiny-{quant}.gguf"
    kv, t = read_gguf(path)
    # clip.cpp (and llama.cpp's clip loader) read general.file_type as the ggml type id
    assert kv["general.file_type"] == int(gguf.GGMLQuantizationType[quant])
    hf = _hf(clip_checkpoint)
    w = t["v.blk.1.ffn_down.weight"]
    assert w.type_name == quant
    for keep in ("t.token_embd.weight", "v.class_embd", "t.blk.0.ln1.weight", "v.blk.0.attn_q.bias"):
        assert t[keep].type_name == "F32", keep
    assert t["v.patch_embd.weight"].type_name == "F16"  # in every type: clip.cpp's conv_2d has only an F16 kernel
    original = hf["vision_model.encoder.layers.1.mlp.fc1.weight"]
    restored = w.array()
    step = {"F32": 0, "Q8_0": 1 / 127, "Q5_1": 1 / 31, "Q5_0": 1 / 15, "Q4_1": 1 / 15, "Q4_0": 1 / 7}[quant]
    # each block's error is at most about one quantization step of its range
    assert np.abs(restored - original).max() <= step * np.abs(original).max() * 2 + 1e-7


def test_quant_falls_back_to_f16_for_odd_rows(tmp_path: Path) -> None:
    ck = build_clip_checkpoint(tmp_path / "odd", config={"vision_config": {"intermediate_size": 80}})
    t = _tensors(convert_clip(ck, tmp_path / "out", "Q8_0"))
    assert t["v.blk.0.ffn_down.weight"].type_name == "Q8_0"  # rows of 64
    assert t["v.blk.0.ffn_up.weight"].type_name == "F16"  # rows of 80: not a multiple of 32


def test_gelu_checkpoint(clip_gguf_gelu: Path) -> None:
    kv = _fields(clip_gguf_gelu)
    assert kv["clip.use_gelu"] is True
    assert kv["general.name"] == "clip-tiny-gelu"


def test_vit_l14_style_config(tmp_path: Path) -> None:
    # ViT-L/14's shapes (patch 14, vision width 1024 / 16 heads, text 768, projection 768), few layers
    overrides = json.loads(json.dumps(VIT_L14_OVERRIDES))
    overrides["text_config"]["num_hidden_layers"] = 1
    overrides["vision_config"]["num_hidden_layers"] = 1
    ck = build_clip_checkpoint(
        tmp_path / "clip-vit-large-patch14", size="real", config=overrides, dtype="BF16", shards=2
    )
    path = convert_clip(ck, tmp_path / "out", "Q8_0")
    assert path.name == "clip-vit-large-patch14-Q8_0.gguf"
    kv, t = read_gguf(path)
    assert kv["clip.vision.patch_size"] == 14 and kv["clip.vision.image_size"] == 224
    assert kv["clip.vision.embedding_length"] == 1024 and kv["clip.vision.attention.head_count"] == 16
    assert kv["clip.vision.feed_forward_length"] == 4096 and kv["clip.text.embedding_length"] == 768
    assert kv["clip.vision.projection_dim"] == 768 == kv["clip.text.projection_dim"]
    assert t["v.patch_embd.weight"].shape == (1024, 3, 14, 14)
    assert t["v.position_embd.weight"].shape == (257, 1024)  # 16 x 16 patches + class
    assert t["visual_projection.weight"].shape == (768, 1024)
    assert t["v.blk.0.ffn_down.weight"].type_name == "Q8_0"


def test_bf16_weights_convert_exactly(tmp_path: Path) -> None:
    ck = build_clip_checkpoint(tmp_path / "bf16", dtype="BF16")
    path = convert_clip(ck, tmp_path / "out", "F32")
    t = _tensors(path)
    hf = _hf(ck)  # bf16 widened to float32
    np.testing.assert_array_equal(
        t["t.blk.0.attn_k.weight"].array(), hf["text_model.encoder.layers.0.self_attn.k_proj.weight"]
    )


def test_tokenizer_from_vocab_and_merges_files(clip_checkpoint: Path, f16: Path, tmp_path: Path) -> None:
    ck = tmp_path / "no-tokenizer-json"
    shutil.copytree(clip_checkpoint, ck)
    (ck / "tokenizer.json").unlink()
    kv = _fields(convert_clip(ck, tmp_path / "out", "F16"))
    ref = _fields(f16)
    assert kv["tokenizer.ggml.tokens"] == ref["tokenizer.ggml.tokens"]
    assert kv["tokenizer.ggml.merges"] == ref["tokenizer.ggml.merges"]


def test_tokenizer_json_with_pair_merges(clip_checkpoint: Path, f16: Path, tmp_path: Path) -> None:
    ck = tmp_path / "pairs"
    shutil.copytree(clip_checkpoint, ck)
    data = json.loads((ck / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["merges"] = [m.split(" ") for m in data["model"]["merges"]]  # tokenizers >= 0.20 format
    (ck / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    kv = _fields(convert_clip(ck, tmp_path / "out", "F16"))
    assert kv["tokenizer.ggml.merges"] == _fields(f16)["tokenizer.ggml.merges"]


def test_missing_config_keys_take_transformers_defaults(tmp_path: Path) -> None:
    ck = build_clip_checkpoint(tmp_path / "defaults")
    cfg = json.loads((ck / "config.json").read_text())
    for key in ("hidden_act", "layer_norm_eps", "max_position_embeddings", "vocab_size"):
        cfg["text_config"].pop(key)
    for key in ("image_size", "patch_size", "hidden_act", "num_channels"):
        cfg["vision_config"].pop(key)
    (ck / "config.json").write_text(json.dumps(cfg))
    (ck / "preprocessor_config.json").unlink()  # CLIP's own mean / std apply
    kv = _fields(convert_clip(ck, tmp_path / "out", "F16"))
    assert kv["clip.vision.image_size"] == 224 and kv["clip.vision.patch_size"] == 32
    assert kv["clip.text.context_length"] == 77 and kv["clip.use_gelu"] is False
    np.testing.assert_allclose(kv["clip.vision.image_std"], [0.26862954, 0.26130258, 0.27577711], rtol=1e-6)


def test_hf_cache_snapshot_name(clip_checkpoint: Path, tmp_path: Path) -> None:
    snap = (
        tmp_path
        / "hub"
        / "models--openai--clip-vit-base-patch32"
        / "snapshots"
        / "3d74acf9a28c67741b2f4f2ea7635f0aaf6f0268"
    )
    shutil.copytree(clip_checkpoint, snap)
    assert convert_clip(snap, tmp_path / "out").name == "clip-vit-base-patch32-F16.gguf"


def test_script_entry_point(clip_checkpoint: Path, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(SCRIPT), str(clip_checkpoint), "--out", str(tmp_path), "--quant", "q4_1"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    out = Path(r.stdout.strip())
    assert out == tmp_path / "clip-tiny-Q4_1.gguf" and out.is_file()
    bad = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "nope"), "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "nope" in bad.stderr and "Traceback" not in bad.stderr


# --- bad inputs: ModelError naming the file ----------------------------------------------------------------


@pytest.fixture()
def ck_copy(clip_checkpoint: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ck"
    shutil.copytree(clip_checkpoint, dst)
    return dst


def _convert_error(ck: Path, tmp_path: Path, quant: str = "F16") -> ModelError:
    with pytest.raises(ModelError) as info:
        convert_clip(ck, tmp_path / "out", quant)
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True
    return info.value


def test_missing_config(ck_copy: Path, tmp_path: Path) -> None:
    (ck_copy / "config.json").unlink()
    e = _convert_error(ck_copy, tmp_path)
    assert e.path == str(ck_copy / "config.json") and "missing" in e.message


def test_not_a_clip_config(ck_copy: Path, tmp_path: Path) -> None:
    smol = Path(__file__).resolve().parent / "data" / "configs" / "smolvlm2-256m.config.json"
    shutil.copy(smol, ck_copy / "config.json")
    e = _convert_error(ck_copy, tmp_path)
    assert e.path.endswith("config.json") and "not a CLIPModel" in e.message


def test_broken_config_json(ck_copy: Path, tmp_path: Path) -> None:
    (ck_copy / "config.json").write_text("{not json")
    assert "not valid JSON" in _convert_error(ck_copy, tmp_path).message


def test_unsupported_activation(ck_copy: Path, tmp_path: Path) -> None:
    cfg = json.loads((ck_copy / "config.json").read_text())
    cfg["vision_config"]["hidden_act"] = "gelu"  # text stays quick_gelu: one flag cannot say both
    (ck_copy / "config.json").write_text(json.dumps(cfg))
    assert "different activations" in _convert_error(ck_copy, tmp_path).message
    cfg["vision_config"]["hidden_act"] = cfg["text_config"]["hidden_act"] = "relu"
    (ck_copy / "config.json").write_text(json.dumps(cfg))
    assert "unsupported activation" in _convert_error(ck_copy, tmp_path).message


def test_missing_weights(ck_copy: Path, tmp_path: Path) -> None:
    (ck_copy / "model.safetensors").unlink()
    e = _convert_error(ck_copy, tmp_path)
    assert e.path == str(ck_copy / "model.safetensors")
    (ck_copy / "pytorch_model.bin").write_bytes(b"PK")
    e = _convert_error(ck_copy, tmp_path)
    assert e.path == str(ck_copy / "pytorch_model.bin") and "safetensors" in e.message


def test_missing_tensor_and_wrong_shape(ck_copy: Path, tmp_path: Path) -> None:
    from vlmcli.convert.safetensors_io import save_safetensors

    weights = _hf(ck_copy)
    del weights["vision_model.encoder.layers.1.mlp.fc2.bias"]
    save_safetensors(ck_copy / "model.safetensors", weights)
    e = _convert_error(ck_copy, tmp_path)
    assert "vision_model.encoder.layers.1.mlp.fc2.bias" in e.message and e.path.endswith("model.safetensors")

    cfg = json.loads((ck_copy / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 128  # the weights are 256 wide
    (ck_copy / "config.json").write_text(json.dumps(cfg))
    save_safetensors(ck_copy / "model.safetensors", _hf(tmp_path / "ck") | {})
    e = _convert_error(ck_copy, tmp_path)
    assert "shape" in e.message and e.path.endswith("model.safetensors")


def test_truncated_weights(ck_copy: Path, tmp_path: Path) -> None:
    data = (ck_copy / "model.safetensors").read_bytes()
    (ck_copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    e = _convert_error(ck_copy, tmp_path)
    assert e.path.endswith("model.safetensors")


def test_missing_tokenizer(ck_copy: Path, tmp_path: Path) -> None:
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (ck_copy / name).unlink()
    e = _convert_error(ck_copy, tmp_path)
    assert e.path.endswith("tokenizer.json") and "missing" in e.message


def test_vocab_without_merges(ck_copy: Path, tmp_path: Path) -> None:
    (ck_copy / "tokenizer.json").unlink()
    (ck_copy / "merges.txt").unlink()
    assert _convert_error(ck_copy, tmp_path).path.endswith("merges.txt")


def test_vocabulary_of_wrong_size(ck_copy: Path, tmp_path: Path) -> None:
    data = json.loads((ck_copy / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["vocab"] = {k: v for k, v in data["model"]["vocab"].items() if v < 1000}
    data["added_tokens"] = []
    (ck_copy / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    e = _convert_error(ck_copy, tmp_path)
    assert e.path.endswith("tokenizer.json") and "1000 tokens" in e.message


def test_bad_preprocessor_config(ck_copy: Path, tmp_path: Path) -> None:
    (ck_copy / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5]}))
    e = _convert_error(ck_copy, tmp_path)
    assert e.path.endswith("preprocessor_config.json") and "image_mean" in e.message


def test_bad_arguments(clip_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(VlmError, match="Q2_K"):
        convert_clip(clip_checkpoint, tmp_path, "Q2_K")
    with pytest.raises(ModelError) as info:
        convert_clip(tmp_path / "missing", tmp_path)
    assert info.value.path == str(tmp_path / "missing")
