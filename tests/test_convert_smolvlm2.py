"""SmolVLM2 HF -> GGUF conversion: real converter output, loaded by the real llama.cpp and mtmd."""

from __future__ import annotations

import ctypes
import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
from fixtures.smolvlm2 import (
    CHAT_TEMPLATE,
    END_OF_UTTERANCE_ID,
    IMAGE_TOKEN_ID,
    REAL_CONFIG_256M,
    REAL_CONFIG_500M,
    REAL_PREPROCESSOR,
    build_smolvlm2_checkpoint,
    make_config,
)

from vlmcli.convert import convert_checkpoint
from vlmcli.convert.quantize import quantize_gguf
from vlmcli.convert.safetensors_io import (
    float32_to_bf16_bits,
    load_safetensors,
    save_safetensors,
)
from vlmcli.convert.smolvlm2 import (
    convert_smolvlm2,
    expected_vision_tensors,
    permute_for_rope,
    text_hparams,
    vision_hparams,
)
from vlmcli.errors import ModelError, VlmError

PROJECT = Path(__file__).resolve().parents[1]
NAME = "SmolVLM2-256M-Video-Instruct"
QT = gguf.GGMLQuantizationType


# ----------------------------------------------------------------------------- helpers


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass
class TensorInfo:
    name: str
    shape: list[int]  # ggml order (innermost first), as gguf-py reports it
    tensor_type: QT
    offset: int  # from the start of the data section


class Gguf:
    """Header, metadata and tensors of a GGUF file.

    A small reader of its own: gguf-py's GGUFReader takes seconds on a 49k-token vocabulary.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.buf = memoryview(self.path.read_bytes())
        self.pos = 0
        assert bytes(self.buf[:4]) == b"GGUF"
        self.pos = 4
        _version, n_tensors, n_kv = self._read("<I"), self._read("<Q"), self._read("<Q")
        self.fields: dict[str, object] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._read("<I"))
        self.tensors: dict[str, TensorInfo] = {}
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._read("<Q") for _ in range(self._read("<I"))]
            qtype, offset = QT(self._read("<I")), self._read("<Q")
            self.tensors[name] = TensorInfo(name, dims, qtype, offset)
        align = int(self.fields.get("general.alignment", 32))
        self.data_start = -(-self.pos // align) * align

    def _read(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._read("<Q")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8")
        self.pos += n
        return s

    def _value(self, vtype: int):
        if vtype == 8:
            return self._string()
        if vtype == 9:
            sub, n = self._read("<I"), self._read("<Q")
            if sub in _SCALARS and sub != 7:
                dtype = np.dtype(_SCALARS[sub])
                values = np.frombuffer(self.buf, dtype, n, self.pos).tolist()
                self.pos += n * dtype.itemsize
                return values
            return [self._value(sub) for _ in range(n)]
        return self._read(_SCALARS[vtype])

    def __getitem__(self, key: str):
        return self.fields[key]

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def types(self) -> dict[str, QT]:
        return {n: t.tensor_type for n, t in self.tensors.items()}

    def raw(self, name: str) -> bytes:
        t = self.tensors[name]
        block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        nbytes = int(np.prod(t.shape)) // block * type_size
        start = self.data_start + t.offset
        return bytes(self.buf[start : start + nbytes])

    def array(self, name: str) -> np.ndarray:
        """An F32/F16 tensor in numpy (rows, cols) order, as float32."""
        t = self.tensors[name]
        dtype = {QT.F32: np.float32, QT.F16: np.float16}[t.tensor_type]
        return np.frombuffer(self.raw(name), dtype).astype(np.float32).reshape(tuple(reversed(t.shape)))


def _convert(ckpt: Path, out: Path, quant: str = "F16", mmproj_quant: str = "F16"):
    return convert_smolvlm2(ckpt, out, quant=quant, mmproj_quant=mmproj_quant)


@pytest.fixture(scope="module")
def f16_files(smolvlm2_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny checkpoint as an unquantized F16 model + F16 mmproj (values comparable with HF)."""
    return _convert(smolvlm2_checkpoint, tmp_path_factory.mktemp("f16"))


# ----------------------------------------------------------------------------- llama.cpp loads it


def test_file_names_follow_ggml_org(smolvlm2_gguf):
    assert smolvlm2_gguf.model.name == f"{NAME}-Q8_0.gguf"
    assert smolvlm2_gguf.mmproj.name == f"mmproj-{NAME}-F16.gguf"
    assert not list(smolvlm2_gguf.model.parent.glob("*.partial"))
    assert not list(smolvlm2_gguf.model.parent.glob(".*intermediate*"))


def test_llama_cpp_loads_model_and_tokenizes_what_mtmd_inserts(smolvlm2_gguf):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(smolvlm2_gguf.model), vocab_only=False, n_ctx=256, verbose=False)
    try:
        assert llm.n_vocab() == 49280
        assert llm.token_bos() == 1
        assert llm.token_eos() == END_OF_UTTERANCE_ID
        # Every piece of text mtmd inserts around image tiles must map to real ids (never -1).
        for text in (b"\n", b"\n\n", b" ", b"What is in this image?"):
            ids = llm.tokenize(text, add_bos=False, special=True)
            assert ids and all(0 <= i < 49280 for i in ids), text
            assert llm.detokenize(ids) == text
        assert llm.tokenize(b"\n\n", add_bos=False, special=True) == [llm.tokenize(b"\n\n", add_bos=False)[0]]
        specials = (
            b"<fake_token_around_image><global-img><row_1_col_1><row_6_col_6><image><end_of_utterance><|im_start|>"
        )
        assert llm.tokenize(specials, add_bos=False, special=True) == [
            49189,
            49152,
            49153,
            49188,
            IMAGE_TOKEN_ID,
            49279,
            1,
        ]
        assert llm.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
        # A forward pass runs and gives finite logits.
        llm.eval(llm.tokenize(b"<|im_start|>User: Hello<end_of_utterance>\nAssistant:", add_bos=False, special=True))
        assert np.isfinite(np.asarray(llm.scores[llm.n_tokens - 1])).all()
    finally:
        llm.close()


def test_mtmd_loads_mmproj_and_slices_like_the_real_model(smolvlm2_gguf):
    import llama_cpp
    from llama_cpp import mtmd_cpp as mtmd

    llm = llama_cpp.Llama(model_path=str(smolvlm2_gguf.model), n_ctx=512, n_batch=512, verbose=False)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu = False
    params.n_threads = 2
    params.print_timings = False
    params.warmup = False
    ctx = mtmd.mtmd_init_from_file(str(smolvlm2_gguf.mmproj).encode(), llm.model, params)
    assert ctx, "mtmd_init_from_file failed"
    bitmap = chunks = None
    try:
        assert mtmd.mtmd_support_vision(ctx)
        width, height = 451, 300  # the README's observed case: 3 x 4 tiles + the overview
        pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        bitmap = mtmd.mtmd_bitmap_init(width, height, (ctypes.c_uint8 * pixels.size).from_buffer_copy(pixels.tobytes()))
        prompt = b"<|im_start|>User:" + mtmd.mtmd_default_marker() + b"What is this?<end_of_utterance>\nAssistant:"
        text = mtmd.mtmd_input_text()
        text.text, text.text_len, text.add_special, text.parse_special = prompt, len(prompt), False, True
        chunks = mtmd.mtmd_input_chunks_init()
        rc = mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
        assert rc == 0
        n_chunks = mtmd.mtmd_input_chunks_size(chunks)
        image_tokens = [
            mtmd.mtmd_input_chunk_get_n_tokens(mtmd.mtmd_input_chunks_get(chunks, i))
            for i in range(n_chunks)
            if mtmd.mtmd_input_chunk_get_type(mtmd.mtmd_input_chunks_get(chunks, i)) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE
        ]
        assert n_chunks == 27
        assert image_tokens == [4] * 13  # 128 px tiles, patch 16, pixel shuffle 4 -> 4 tokens each
        n_past = llama_cpp.llama_pos(0)
        assert mtmd.mtmd_helper_eval_chunks(ctx, llm.ctx, chunks, 0, 0, 512, True, ctypes.byref(n_past)) == 0
        assert n_past.value == mtmd.mtmd_helper_get_n_pos(chunks)
    finally:
        if chunks:
            mtmd.mtmd_input_chunks_free(chunks)
        if bitmap:
            mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(ctx)
        llm.close()


# ----------------------------------------------------------------------------- language model layout


def test_language_model_metadata(f16_files):
    g = Gguf(f16_files.model)
    assert g["general.architecture"] == "llama"
    assert g["general.type"] == "model"
    assert g["general.name"]
    assert g["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    expected = {
        "llama.block_count": 2,
        "llama.context_length": 8192,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.attention.key_length": 16,
        "llama.attention.value_length": 16,
        "llama.rope.dimension_count": 16,
        "llama.vocab_size": 49280,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": END_OF_UTTERANCE_ID,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    for key, value in expected.items():
        assert g[key] == value, key
    assert g["llama.rope.freq_base"] == pytest.approx(100000.0)
    assert g["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    tokens, types = g["tokenizer.ggml.tokens"], g["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 49280
    assert tokens[0] == "<|endoftext|>" and tokens[1] == "<|im_start|>" and tokens[2] == "<|im_end|>"
    assert tokens[49152] == "<global-img>" and tokens[49153] == "<row_1_col_1>" and tokens[49188] == "<row_6_col_6>"
    assert tokens[49189] == "<fake_token_around_image>" and tokens[IMAGE_TOKEN_ID] == "<image>"
    assert tokens[END_OF_UTTERANCE_ID] == "<end_of_utterance>"
    for i in (0, 1, 2, 49152, 49170, 49189, IMAGE_TOKEN_ID, END_OF_UTTERANCE_ID):
        assert types[i] == gguf.TokenType.CONTROL, i
    assert types[300] == gguf.TokenType.NORMAL
    assert "Ċ Ċ" in g["tokenizer.ggml.merges"]


def test_language_model_tensors_names_shapes_types(f16_files):
    g = Gguf(f16_files.model)
    names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(2):
        names |= {
            f"blk.{i}.{n}.weight"
            for n in (
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "attn_norm",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
                "ffn_norm",
            )
        }
    assert set(g.tensors) == names
    # ggml shapes are (cols, rows): reversed numpy order.
    assert list(g.tensors["token_embd.weight"].shape) == [64, 49280]
    assert list(g.tensors["blk.0.attn_k.weight"].shape) == [64, 32]
    assert list(g.tensors["blk.1.ffn_down.weight"].shape) == [128, 64]
    for name, qtype in g.types().items():
        assert qtype == (QT.F32 if name.endswith("norm.weight") else QT.F16), name


def test_q_and_k_are_permuted_for_llama_rope(smolvlm2_checkpoint, f16_files):
    hf = load_safetensors(smolvlm2_checkpoint)
    g = Gguf(f16_files.model)
    q = hf["model.text_model.layers.1.self_attn.q_proj.weight"].load()
    k = hf["model.text_model.layers.1.self_attn.k_proj.weight"].load()
    v = hf["model.text_model.layers.1.self_attn.v_proj.weight"].load()
    np.testing.assert_allclose(g.array("blk.1.attn_q.weight"), permute_for_rope(q, 4), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(g.array("blk.1.attn_k.weight"), permute_for_rope(k, 2), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(g.array("blk.1.attn_v.weight"), v, rtol=1e-3, atol=1e-6)
    assert not np.allclose(g.array("blk.1.attn_q.weight"), q, rtol=1e-3)  # the permutation did something
    # Each head's rotate-half pairs (j, j + d/2) become adjacent rows (2j, 2j + 1).
    head_dim = 16
    np.testing.assert_allclose(g.array("blk.1.attn_q.weight")[1], q[head_dim // 2], rtol=1e-3, atol=1e-6)


def test_rope_theta_from_either_config_layout(tmp_path):
    for layout in ("text_config", "rope_parameters"):
        config = make_config(size="tiny", rope_layout=layout)
        config["text_config"]["num_hidden_layers"] = 1
        if layout == "text_config":
            config["text_config"]["rope_theta"] = 123456.0
        else:
            config["text_config"]["rope_parameters"]["rope_theta"] = 123456.0
        ckpt = build_smolvlm2_checkpoint(tmp_path / layout / NAME, config, size="real")
        assert ("rope_theta" in json.loads((ckpt / "config.json").read_text())["text_config"]) == (
            layout == "text_config"
        )
        files = _convert(ckpt, tmp_path / layout / "out")
        assert Gguf(files.model)["llama.rope.freq_base"] == pytest.approx(123456.0), layout


def test_missing_text_num_attention_heads_defaults_to_32():
    config = make_config(size="real")
    del config["text_config"]["num_attention_heads"]
    del config["text_config"]["num_key_value_heads"]
    del config["text_config"]["head_dim"]
    h = text_hparams(config, Path("config.json"))
    assert (h.heads, h.kv_heads, h.head_dim) == (32, 32, 576 // 32)


# ----------------------------------------------------------------------------- mmproj layout


def test_mmproj_metadata(f16_files):
    g = Gguf(f16_files.mmproj)
    pre = json.loads(REAL_PREPROCESSOR.read_text())
    expected = {
        "general.architecture": "clip",
        "general.type": "mmproj",
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_F16),
        "clip.has_vision_encoder": True,
        "clip.projector_type": "idefics3",
        "clip.use_gelu": True,
        "clip.vision.image_size": 128,
        "clip.vision.patch_size": 16,
        "clip.vision.embedding_length": 64,
        "clip.vision.feed_forward_length": 128,
        "clip.vision.block_count": 2,
        "clip.vision.attention.head_count": 4,
        "clip.vision.projection_dim": 64,
        "clip.vision.projector.scale_factor": 4,
        "clip.vision.preproc_image_size": 512,  # preprocessor size.longest_edge (tiny: 4 tiles of 128)
    }
    for key, value in expected.items():
        assert g[key] == value, key
    assert g["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-6)
    assert g["clip.vision.image_mean"] == pytest.approx(pre["image_mean"])
    assert g["clip.vision.image_std"] == pytest.approx(pre["image_std"])


def test_mmproj_tensors_names_shapes_types(f16_files):
    g = Gguf(f16_files.mmproj)
    names = {
        "v.patch_embd.weight",
        "v.patch_embd.bias",
        "v.position_embd.weight",
        "v.post_ln.weight",
        "v.post_ln.bias",
        "mm.model.fc.weight",
    }
    for i in range(2):
        for t in ("attn_q", "attn_k", "attn_v", "attn_out", "ln1", "ln2", "ffn_up", "ffn_down"):
            names |= {f"v.blk.{i}.{t}.weight", f"v.blk.{i}.{t}.bias"}
    assert set(g.tensors) == names
    assert list(g.tensors["v.patch_embd.weight"].shape) == [16, 16, 3, 64]
    assert list(g.tensors["v.position_embd.weight"].shape) == [64, 64]
    assert list(g.tensors["mm.model.fc.weight"].shape) == [64 * 16, 64]
    assert list(g.tensors["v.blk.0.ffn_up.weight"].shape) == [64, 128]  # HF mlp.fc1
    for name, qtype in g.types().items():
        is_matrix = len(g.tensors[name].shape) == 2 and name != "v.position_embd.weight"
        assert qtype == (QT.F16 if is_matrix else QT.F32), name


def test_mmproj_q8_0_keeps_embeddings_norms_biases_f32(smolvlm2_checkpoint, tmp_path):
    files = _convert(smolvlm2_checkpoint, tmp_path, quant="F16", mmproj_quant="Q8_0")
    assert files.mmproj.name == f"mmproj-{NAME}-Q8_0.gguf"
    g = Gguf(files.mmproj)
    assert g["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    types = g.types()
    assert types["v.patch_embd.weight"] == QT.F32 and types["v.position_embd.weight"] == QT.F32
    assert types["v.blk.1.ln2.weight"] == QT.F32 and types["v.blk.1.attn_q.bias"] == QT.F32
    assert types["v.blk.1.attn_q.weight"] == QT.Q8_0 and types["mm.model.fc.weight"] == QT.Q8_0


def test_real_256m_mmproj_has_198_tensors(tmp_path):
    """The formula against the published count, and a real conversion with 12 vision layers."""
    config = json.loads(REAL_CONFIG_256M.read_text())
    h = vision_hparams(
        config, json.loads(REAL_PREPROCESSOR.read_text()), text_hparams(config, REAL_CONFIG_256M), REAL_CONFIG_256M
    )
    assert len(expected_vision_tensors(h)) == 198
    tiny12 = make_config(size="tiny")
    tiny12["vision_config"]["num_hidden_layers"] = 12
    tiny12["text_config"]["num_hidden_layers"] = 1
    ckpt = build_smolvlm2_checkpoint(tmp_path / NAME, tiny12, size="real")
    g = Gguf(_convert(ckpt, tmp_path / "out").mmproj)
    assert len(g.tensors) == 198
    assert g["clip.vision.block_count"] == 12


def test_missing_vision_keys_get_transformers_defaults(tmp_path):
    config = make_config(size="tiny", drop_vision_keys=True)
    config["text_config"]["num_hidden_layers"] = 1
    config["vision_config"]["num_hidden_layers"] = 1
    ckpt = build_smolvlm2_checkpoint(tmp_path / NAME, config, size="real")
    vision = json.loads((ckpt / "config.json").read_text())["vision_config"]
    assert not {"hidden_size", "num_attention_heads", "intermediate_size"} & set(vision)
    g = Gguf(_convert(ckpt, tmp_path / "out").mmproj)
    assert g["clip.vision.embedding_length"] == 1152
    assert g["clip.vision.attention.head_count"] == 16
    assert g["clip.vision.feed_forward_length"] == 3072
    assert list(g.tensors["v.blk.0.ffn_up.weight"].shape) == [1152, 3072]
    # image_size / patch_size defaults too (224 / 32), checked on the config alone.
    del config["vision_config"]["image_size"], config["vision_config"]["patch_size"]
    config["scale_factor"] = 7
    h = vision_hparams(config, {}, text_hparams(config, Path("c")), Path("c"))
    assert (h.image_size, h.patch_size, h.preproc_image_size, h.image_mean) == (224, 32, 224, [0.5, 0.5, 0.5])


def test_500m_config_hparams():
    config = json.loads(REAL_CONFIG_500M.read_text())
    t = text_hparams(config, REAL_CONFIG_500M)
    v = vision_hparams(config, json.loads(REAL_PREPROCESSOR.read_text()), t, REAL_CONFIG_500M)
    assert (t.hidden, t.layers, t.heads, t.kv_heads, t.head_dim, t.rope_theta) == (960, 32, 15, 5, 64, 100000.0)
    assert (v.hidden, v.layers, v.image_size, v.patch_size, v.scale_factor, v.preproc_image_size) == (
        768,
        12,
        512,
        16,
        4,
        2048,
    )


# ----------------------------------------------------------------------------- inputs: shards, dtypes, vocab


def test_sharded_and_f32_checkpoints_convert_to_the_same_tensors(smolvlm2_checkpoint, f16_files, tmp_path):
    sharded = build_smolvlm2_checkpoint(tmp_path / "sharded" / NAME, seed=0, shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-0000*-of-00003.safetensors"))) == 3
    assert not (sharded / "model.safetensors").exists()
    from_shards = Gguf(_convert(sharded, tmp_path / "sharded-out").model)
    reference = Gguf(f16_files.model)
    for name in reference.tensors:
        assert from_shards.raw(name) == reference.raw(name), name

    f32 = build_smolvlm2_checkpoint(tmp_path / "f32" / NAME, seed=0, dtype="f32")
    assert load_safetensors(f32)["model.text_model.norm.weight"].dtype == "F32"
    assert load_safetensors(smolvlm2_checkpoint)["model.text_model.norm.weight"].dtype == "BF16"
    from_f32 = Gguf(_convert(f32, tmp_path / "f32-out").model)
    # bf16 keeps 8 mantissa bits: the same weights, within bf16 rounding.
    np.testing.assert_allclose(
        from_f32.array("blk.0.ffn_up.weight"), reference.array("blk.0.ffn_up.weight"), rtol=1e-2, atol=1e-4
    )
    hf = load_safetensors(f32)["model.text_model.layers.0.mlp.up_proj.weight"].load()
    np.testing.assert_allclose(from_f32.array("blk.0.ffn_up.weight"), hf, rtol=1e-3, atol=1e-6)


def test_bf16_round_trip():
    values = np.array([1.0, -2.5, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 3.0e38, np.nan], dtype=np.float32)
    bits = float32_to_bf16_bits(values)
    assert bits[:4].tolist() == [0x3F80, 0xC020, 0x3F80, 0x3F82]  # ties round to even
    assert np.isnan((bits.astype(np.uint32) << 16).view(np.float32)[5])


def test_safetensors_io_round_trip(tmp_path):
    tensors = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.array([1, -2, 3], dtype=np.int64),
        "c": np.linspace(-1, 1, 6, dtype=np.float16).reshape(2, 3),
    }
    path = save_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    loaded = load_safetensors(path)
    assert {n: t.dtype for n, t in loaded.items()} == {"a": "F32", "b": "I64", "c": "F16"}
    for name, array in tensors.items():
        np.testing.assert_array_equal(loaded[name].load(), array)
    as_bf16 = load_safetensors(save_safetensors(tmp_path / "y.safetensors", {"a": tensors["a"]}, dtype="BF16"))
    assert as_bf16["a"].dtype == "BF16"
    np.testing.assert_array_equal(as_bf16["a"].load(), tensors["a"])  # small integers are exact in bf16
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}     ")
    with pytest.raises(ModelError, match="bad.safetensors"):
        load_safetensors(tmp_path / "bad.safetensors")


def test_ids_missing_from_tokenizer_are_padded(tmp_path):
    ckpt = build_smolvlm2_checkpoint(tmp_path / NAME, config=_one_layer_config(), size="real")
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    gap = [t for t, i in tok["model"]["vocab"].items() if i in (40000, 49200)]
    assert len(gap) == 2
    for t in gap:
        del tok["model"]["vocab"][t]
    (ckpt / "tokenizer.json").write_text(json.dumps(tok))
    g = Gguf(_convert(ckpt, tmp_path / "out").model)
    tokens, types = g["tokenizer.ggml.tokens"], g["tokenizer.ggml.token_type"]
    assert len(tokens) == 49280
    assert (tokens[40000], tokens[49200]) == ("[PAD40000]", "[PAD49200]")
    assert types[40000] == types[49200] == gguf.TokenType.UNUSED


def test_chat_template_from_chat_template_json_or_jinja(tmp_path):
    ckpt = build_smolvlm2_checkpoint(tmp_path / NAME, config=_one_layer_config(), size="real")
    tok_cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    del tok_cfg["chat_template"]
    (ckpt / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    assert Gguf(_convert(ckpt, tmp_path / "a").model)["tokenizer.chat_template"] == CHAT_TEMPLATE  # chat_template.json
    (ckpt / "chat_template.jinja").write_text("{{ 'jinja' }}")
    assert Gguf(_convert(ckpt, tmp_path / "b").model)["tokenizer.chat_template"] == "{{ 'jinja' }}"


def _one_layer_config() -> dict:
    config = make_config(size="tiny")
    config["text_config"]["num_hidden_layers"] = 1
    config["vision_config"]["num_hidden_layers"] = 1
    return config


# ----------------------------------------------------------------------------- quantization


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Text rows of 256 so llama.cpp's K-quants apply without fallbacks."""
    config = make_config(size="tiny")
    config["text_config"].update(
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    )
    config["vision_config"]["num_hidden_layers"] = 1
    return build_smolvlm2_checkpoint(tmp_path_factory.mktemp("wide") / NAME, config, size="real")


@pytest.mark.parametrize(
    ("quant", "file_type", "weight_types"),
    [
        ("F16", gguf.LlamaFileType.MOSTLY_F16, {QT.F16}),
        ("Q8_0", gguf.LlamaFileType.MOSTLY_Q8_0, {QT.Q8_0}),
        ("Q4_K_M", gguf.LlamaFileType.MOSTLY_Q4_K_M, {QT.Q4_K, QT.Q6_K}),
        ("Q5_K_M", gguf.LlamaFileType.MOSTLY_Q5_K_M, {QT.Q5_K, QT.Q6_K}),
    ],
)
def test_each_quant_type_writes_that_type(wide_checkpoint, tmp_path, quant, file_type, weight_types):
    import llama_cpp

    files = _convert(wide_checkpoint, tmp_path, quant=quant)
    assert files.model.name == f"{NAME}-{quant}.gguf"
    g = Gguf(files.model)
    assert g["general.file_type"] == int(file_type)
    matrices = {t for n, t in g.types().items() if not n.endswith("norm.weight")}
    assert matrices == weight_types
    assert {t for n, t in g.types().items() if n.endswith("norm.weight")} == {QT.F32}
    assert g["tokenizer.ggml.pre"] == "smollm" and len(g["tokenizer.ggml.tokens"]) == 49280
    llm = llama_cpp.Llama(model_path=str(files.model), n_ctx=64, verbose=False)
    try:
        assert llm.tokenize(b"\n\n", add_bos=False) != []
    finally:
        llm.close()


def test_quantize_gguf_checks_inputs(f16_files, tmp_path):
    with pytest.raises(VlmError, match="Q8_0, Q4_K_M, Q5_K_M"):
        quantize_gguf(f16_files.model, tmp_path / "x.gguf", "Q3_XX")
    with pytest.raises(ModelError, match="expected a language model"):
        quantize_gguf(f16_files.mmproj, tmp_path / "x.gguf", "Q8_0")
    with pytest.raises(ModelError, match="no such model file"):
        quantize_gguf(tmp_path / "missing.gguf", tmp_path / "x.gguf", "Q8_0")
    out = quantize_gguf(f16_files.model, tmp_path / "q.gguf", "Q8_0", n_threads=1)
    assert Gguf(out)["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert not (tmp_path / "x.gguf").exists()


# ----------------------------------------------------------------------------- bad inputs


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_bad_checkpoints_raise_errors_naming_the_file(smolvlm2_checkpoint, tmp_path):
    with pytest.raises(ModelError, match="no such checkpoint folder"):
        convert_checkpoint(tmp_path / "nowhere", tmp_path / "out")

    no_config = _copy_checkpoint(smolvlm2_checkpoint, tmp_path / "no-config" / NAME)
    (no_config / "config.json").unlink()
    with pytest.raises(ModelError) as e:
        convert_checkpoint(no_config, tmp_path / "out")
    assert e.value.path == str(no_config / "config.json")

    other = _copy_checkpoint(smolvlm2_checkpoint, tmp_path / "other" / NAME)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="unsupported architecture LlamaForCausalLM"):
        convert_checkpoint(other, tmp_path / "out")
    with pytest.raises(ModelError, match="not SmolVLM2"):
        convert_smolvlm2(other, tmp_path / "out")

    missing = _copy_checkpoint(smolvlm2_checkpoint, tmp_path / "missing" / NAME)
    tensors = {
        n: t.load() for n, t in load_safetensors(missing).items() if n != "model.text_model.layers.1.mlp.up_proj.weight"
    }
    save_safetensors(missing / "model.safetensors", tensors)
    with pytest.raises(ModelError, match="missing tensor model.text_model.layers.1.mlp.up_proj.weight") as e:
        convert_checkpoint(missing, tmp_path / "out")
    assert e.value.path == str(missing / "model.safetensors")

    no_tokenizer = _copy_checkpoint(smolvlm2_checkpoint, tmp_path / "no-tok" / NAME)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="missing tokenizer.json"):
        convert_checkpoint(no_tokenizer, tmp_path / "out")

    wrong_shape = _copy_checkpoint(smolvlm2_checkpoint, tmp_path / "shape" / NAME)
    config = json.loads((wrong_shape / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    (wrong_shape / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="config.json implies"):
        convert_checkpoint(wrong_shape, tmp_path / "out")

    with pytest.raises(VlmError, match="valid: F16, Q8_0, Q4_K_M, Q5_K_M"):
        convert_smolvlm2(smolvlm2_checkpoint, tmp_path / "out", quant="Q2_K")
    with pytest.raises(VlmError, match="valid: F16, Q8_0"):
        convert_smolvlm2(smolvlm2_checkpoint, tmp_path / "out", mmproj_quant="Q4_K_M")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------- dispatch, CLI, script


def test_convert_checkpoint_dispatches_to_smolvlm2(smolvlm2_checkpoint, tmp_path):
    paths = convert_checkpoint(smolvlm2_checkpoint, tmp_path, quant="F16")
    assert [p.name for p in paths] == [f"{NAME}-F16.gguf", f"mmproj-{NAME}-F16.gguf"]
    assert all(p.is_file() for p in paths)


def test_convert_checkpoint_dispatches_to_clip(clip_checkpoint, tmp_path):
    paths = convert_checkpoint(clip_checkpoint, tmp_path)
    assert len(paths) == 1 and paths[0].name.endswith("-F16.gguf")
    g = Gguf(paths[0])
    assert g["general.architecture"] == "clip" and g["clip.has_text_encoder"] and g["clip.has_vision_encoder"]
    with pytest.raises(ModelError, match="SmolVLM2 checkpoints only"):
        convert_checkpoint(clip_checkpoint, tmp_path / "x", mmproj_quant="Q8_0")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)


def test_cli_convert_and_quantize(smolvlm2_checkpoint, tmp_path):
    r = _run(
        "-m",
        "vlmcli",
        "convert",
        str(smolvlm2_checkpoint),
        "--out",
        str(tmp_path),
        "--quant",
        "F16",
        "--mmproj-quant",
        "Q8_0",
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines == [str(tmp_path / f"{NAME}-F16.gguf"), str(tmp_path / f"mmproj-{NAME}-Q8_0.gguf")]
    assert all(Path(p).is_file() for p in lines)

    r = _run("-m", "vlmcli", "quantize", lines[0], str(tmp_path / "small.gguf"), "--quant", "Q4_K_M")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "small.gguf")
    assert Gguf(tmp_path / "small.gguf")["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)


def test_cli_errors_are_one_line(tmp_path):
    r = _run("-m", "vlmcli", "convert", str(tmp_path / "nowhere"))
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.strip() == f"vlm: error: {tmp_path / 'nowhere'}: no such checkpoint folder"
    r = _run("-m", "vlmcli", "quantize", str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf"), "--quant", "Q9")
    assert r.returncode == 1
    assert "unknown quantization 'Q9'; valid: F16, Q8_0, Q4_K_M, Q5_K_M" in r.stderr
    assert "Traceback" not in r.stderr


def test_converter_runs_as_a_script(smolvlm2_checkpoint, tmp_path):
    r = _run(
        str(PROJECT / "scripts" / "convert" / "smolvlm2.py"),
        str(smolvlm2_checkpoint),
        "--out",
        str(tmp_path),
        "--quant",
        "F16",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(tmp_path / f"{NAME}-F16.gguf"), str(tmp_path / f"mmproj-{NAME}-F16.gguf")]
