"""CLIP's two towers on ggml vs a plain numpy forward pass of the same converted GGUF files."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from pathlib import Path

import gguf
import numpy as np
import pytest
from clip_reference import (
    BOS,
    EOS,
    check_batch_independence,
    cosine,
    images,
    one_by_one,
    reference_encode_images,
    reference_encode_texts,
    reference_model,
    texts,
)

from vlmcli.engines import clip_kernels
from vlmcli.engines.clip import ClipModel, text_lengths
from vlmcli.engines.clip_path import BEST_FIRST, KERNELS_ENV, choose_path
from vlmcli.errors import ModelError, VlmError

_models: dict[Path, ClipModel] = {}


def form_params(forms: Iterable[str]) -> list:
    """vlm's kernel forms as parameters: those this CPU lacks skip."""
    return [
        pytest.param(
            f, marks=pytest.mark.skipif(not clip_kernels.available(f), reason=f"needs {clip_kernels.FORMS[f].isa}")
        )
        for f in forms
    ]


VLM_FORMS = form_params(clip_kernels.FORMS)  # and below, ggml's ops
PATHS = ["ggml", *VLM_FORMS]


def min_cosine(m: ClipModel) -> float:
    """The bar against the float64 forward pass of the file's values, from the number format that runs:
    vlm's kernels round x and w to BF16 (8 significant bits) or to 16-bit integers per 128 values;
    ggml's mul_mat on F16 or F32 weights rounds x to F16 at most; on Q8_0 weights it rounds x to 8 bits."""
    if m.kernels.form is not None:
        return 0.999
    return 0.99 if "Q8_0" in str(m.weights_type) else 0.9999


@pytest.fixture(scope="module")
def model(clip_ggufs):
    """Loads each GGUF once per module (loading parses the 49408-token vocabulary twice)."""

    def get(act: str = "quick_gelu", qtype: str = "F16") -> ClipModel:
        path = clip_ggufs[act, qtype]
        if path not in _models:
            _models[path] = ClipModel.load(path, n_threads=2)
        return _models[path]

    yield get
    for m in _models.values():
        m.close()
    _models.clear()


# --- agreement with the numpy reference -----------------------------------------------------------


FILES = [("quick_gelu", "F32"), ("quick_gelu", "F16"), ("quick_gelu", "Q8_0"), ("gelu", "F16"), ("gelu", "Q8_0")]


@pytest.mark.parametrize("act,qtype", FILES)
def test_matches_numpy_reference(model, clip_ggufs, act, qtype):
    """What a user's machine runs by default, against the reference, within the bar of its number format."""
    m = model(act, qtype)
    px, ids = images(3), texts([1, 8, 40, 75])
    img, txt = m.encode_images(px), m.encode_texts(ids)
    assert img.shape == (3, 32) and txt.shape == (4, 32)
    assert img.dtype == np.float32 and txt.dtype == np.float32
    ref_img = reference_encode_images(clip_ggufs[act, qtype], px)
    ref_txt = reference_encode_texts(clip_ggufs[act, qtype], ids)
    assert cosine(img, ref_img).min() >= min_cosine(m)
    assert cosine(txt, ref_txt).min() >= min_cosine(m)
    # projected but not normalised: the norms agree too
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), np.linalg.norm(ref_img, axis=1), rtol=0.02)
    # different inputs give clearly different embeddings (the test could not pass on constants)
    assert cosine(img[:1], img[1:2])[0] < 0.99 and cosine(txt[:1], txt[1:2])[0] < 0.99


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("act,qtype", FILES)
def test_every_path_keeps_its_quality_bar(clip_ggufs, monkeypatch, path, act, qtype):
    """Each path (VLM_CLIP_KERNELS) on each file type: vlm's kernels hold F16, F32 and Q8_0 weights
    (a Q8_0 value is an 8-bit integer times an F16 scale, which BF16 and I16 hold to within their own
    rounding) as BF16 or 16-bit integers, run both towers' attention themselves (packed sequences) and
    apply quick GELU themselves (erf GELU stays ggml's); the file's type is still what records and
    resume keys name. ggml's ops take the weights as stored."""
    monkeypatch.setenv(KERNELS_ENV, path)
    with ClipModel.load(clip_ggufs[act, qtype]) as m:
        form = clip_kernels.FORMS.get(path)
        assert (m.kernels.form, m.config.file_type) == (form and path, qtype)
        assert m.weights_type == (form.packing.upper() if form else qtype)
        assert m.packs_sequences == ({"t", "v"} if form else set())
        px, ids = images(3), texts([1, 8, 40, 75])
        img, txt = m.encode_images(px), m.encode_texts(ids)
        assert cosine(img, reference_encode_images(clip_ggufs[act, qtype], px)).min() >= min_cosine(m)
        assert cosine(txt, reference_encode_texts(clip_ggufs[act, qtype], ids)).min() >= min_cosine(m)


def test_the_default_path_follows_the_cpu_and_the_override_is_checked(clip_ggufs, monkeypatch):
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    best = next((form for form in BEST_FIRST if clip_kernels.available(form)), None)
    with ClipModel.load(clip_ggufs["quick_gelu", "F16"]) as m:
        assert m.kernels.form == best and choose_path(on_cpu=True).form == best
    assert choose_path(on_cpu=False).form is None  # GPU devices keep ggml's ops
    for form in clip_kernels.FORMS:
        monkeypatch.setenv(KERNELS_ENV, form)
        assert choose_path(on_cpu=False).form is None
        if not clip_kernels.available(form):  # asking for kernels where they cannot run says why
            with pytest.raises(VlmError, match=f"{KERNELS_ENV}={form} needs vlm's {form} kernels"):
                ClipModel.load(clip_ggufs["quick_gelu", "F16"])
    monkeypatch.setenv(KERNELS_ENV, "fast")
    with pytest.raises(VlmError, match=f"unknown {KERNELS_ENV} 'fast'"):
        ClipModel.load(clip_ggufs["quick_gelu", "F16"])


def test_quantized_types_the_kernels_do_not_take_stay_with_ggml(parts, tmp_path, monkeypatch):
    """Q4_0 (chosen for size, which 16-bit packing would undo): ggml's ops, on any CPU, as stored."""
    from vlmcli.engines import ggml

    monkeypatch.delenv(KERNELS_ENV, raising=False)
    kv, tensors = parts
    q4 = {
        name: (ggml.quantize(t, "Q4_0"), gguf.GGMLQuantizationType.Q4_0)
        if t.ndim == 2 and (".attn_" in name or ".ffn_" in name or name.endswith("projection.weight"))
        else t
        for name, t in tensors.items()
    }
    with ClipModel.load(write_gguf(tmp_path / "q4.gguf", kv, q4)) as m:
        assert (m.kernels.form, m.weights_type, m.config.file_type, m.packs_sequences) == (None, "Q4_0", "Q4_0", set())
        assert m.encode_images(images(1)).shape == (1, 32)


# bf16 rounds to 8 significant bits: on the tiny model its error is a third of the gap between the two
# activations, too close to tell apart. The erf GELU is a ggml op after the matmul in every form, so
# the precise forms cover its wiring.
@pytest.mark.parametrize("path", ["ggml", *form_params(f for f in clip_kernels.FORMS if f != "bf16")])
def test_activation_flag_is_used(model, clip_ggufs, monkeypatch, path):
    """The gelu file runs erf gelu: the same weights through quick_gelu would land much further away."""
    assert model("quick_gelu").config.use_gelu is False
    monkeypatch.setenv(KERNELS_ENV, path)
    px = images(2, seed=2)
    with ClipModel.load(clip_ggufs["gelu", "F16"], n_threads=2) as m:
        assert m.config.use_gelu is True and m.kernels.form == (None if path == "ggml" else path)
        got = m.encode_images(px)
    ref = copy.copy(reference_model(str(clip_ggufs["gelu", "F16"])))
    right = ref.encode_images(px)
    ref.use_gelu = False
    wrong = ref.encode_images(px)
    assert np.abs(got - right).max() * 10 < np.abs(got - wrong).max()


@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
@pytest.mark.parametrize("path", PATHS)
def test_results_do_not_depend_on_the_batch(clip_ggufs, monkeypatch, qtype, path):
    """The same bits alone, beside 77-token texts, reversed, in a batch big enough for two threads, in
    chunks of 3: ggml picks kernels (and summation orders) by shape, and no shape comes from a batch-mate.
    With vlm's kernels texts of all lengths share one sequence of tokens: still the same bits."""
    monkeypatch.setenv(KERNELS_ENV, path)
    m = ClipModel.load(clip_ggufs["quick_gelu", qtype], n_threads=2)
    _models[Path(f"{clip_ggufs['quick_gelu', qtype]}#{path}")] = m  # closed with the others
    assert m.packs_sequences == (set() if path == "ggml" else {"t", "v"})
    ids, px = texts([4, 75, 0, 12, 30, 4, 61, 7], seed=3), images(4, seed=3)
    for encode, inputs in ((m.encode_texts, ids), (m.encode_images, px)):
        check_batch_independence(m, encode, inputs, monkeypatch)
    # nor from the width of the token array: a narrower one (every EOT inside) is padded to 77
    short = [0, 2, 3, 4, 5, 7]
    assert np.array_equal(m.encode_texts(ids[short, :40]), one_by_one(m.encode_texts, ids[short]))


def test_text_lengths_come_from_the_text_alone():
    lengths = np.array([1, 7, 8, 9, 33, 64, 72, 73, 77])
    assert text_lengths(lengths, 77).tolist() == [8, 8, 8, 16, 40, 64, 72, 77, 77]
    assert text_lengths(lengths[:4], 10).tolist() == [8, 8, 8, 10]


def test_big_batches_are_chunked(novocab):
    px, ids = images(5, seed=4), texts([2, 4, 6, 8, 10], seed=4)
    with ClipModel.load(novocab, n_threads=1, batch_size=2) as small:
        img_small, txt_small = small.encode_images(px), small.encode_texts(ids)
    with ClipModel.load(novocab) as big:
        assert np.array_equal(img_small, big.encode_images(px))
        assert np.array_equal(txt_small, big.encode_texts(ids))


def test_text_is_pooled_at_the_end_token(model, clip_ggufs):
    m = model("quick_gelu", "F32")
    ids = texts([5, 30], seed=5)
    base = m.encode_texts(ids)
    # tokens after the end token cannot matter (causal attention, pooled at EOT), not even in the
    # last bit: the masked weights are exact zeros, even where those positions are part of the graph
    noisy = ids.copy()
    noisy[0, 7:] = np.random.default_rng(6).integers(256, 49000, 70)
    assert np.array_equal(m.encode_texts(noisy), base)
    # ...and the reference agrees that the pooled state is the EOT one
    assert cosine(
        m.encode_texts(noisy), reference_encode_texts(clip_ggufs["quick_gelu", "F32"], noisy)
    ).min() >= min_cosine(m)
    # a token before the end token does matter
    changed = ids.copy()
    changed[0, 3] = 1000 if ids[0, 3] != 1000 else 1001
    assert cosine(m.encode_texts(changed)[:1], base[:1])[0] < 0.9999
    # pooling somewhere else (e.g. the last position) would give another vector
    shifted = ids.copy()
    shifted[0, 6], shifted[0, 7] = 0, EOS  # same words, EOT one step later after a padding token
    assert cosine(m.encode_texts(shifted)[:1], base[:1])[0] < 0.9999


def test_config_from_gguf(model):
    cfg = model("quick_gelu", "Q8_0").config
    assert (cfg.image_size, cfg.patch_size, cfg.context_length, cfg.vocab_size) == (224, 32, 77, 49408)
    assert (cfg.text_width, cfg.text_layers, cfg.text_heads) == (64, 2, 4)
    assert (cfg.vision_width, cfg.vision_layers, cfg.vision_heads, cfg.projection_dim) == (64, 2, 4, 32)
    assert cfg.logit_scale == pytest.approx(100.0, rel=1e-5)  # exp() of the stored ln(100)
    assert cfg.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert (cfg.bos_id, cfg.eos_id) == (BOS, EOS)
    assert len(cfg.tokens) == 49408 and cfg.tokens[EOS] == "<|endoftext|>" and len(cfg.merges) > 40000
    assert cfg.file_type == "Q8_0"
    assert model("quick_gelu", "F16").config.file_type == "F16"


# --- bad input ------------------------------------------------------------------------------------


def test_bad_pixels_and_tokens(model):
    m = model()
    for bad in (
        np.zeros((1, 3, 223, 223), np.float32),
        np.zeros((3, 224, 224), np.float32),
        np.zeros((1, 3, 224, 224), np.int64),
        [[0.0]],
    ):
        with pytest.raises(VlmError, match="pixels"):
            m.encode_images(bad)  # type: ignore[arg-type]
    nan = images(1)
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(VlmError, match="NaN"):
        m.encode_images(nan)
    for bad in (
        np.full((1, 77), 49408),
        np.full((1, 77), -1),
        np.zeros((1, 78), np.int32),
        np.zeros((1, 77), np.float32),
        np.zeros(77, np.int32),
    ):
        with pytest.raises(VlmError, match="token"):
            m.encode_texts(bad)
    assert m.encode_images(np.zeros((0, 3, 224, 224), np.float32)).shape == (0, 32)
    assert m.encode_texts(np.zeros((0, 77), np.int32)).shape == (0, 32)


def test_closed_model_refuses_work(novocab):
    m = ClipModel.load(novocab)
    m.close()
    m.close()  # twice is fine
    with pytest.raises(VlmError, match="closed"):
        m.encode_images(images(1))


def test_gpu_request_without_gpu_backend_runs_on_the_cpu(novocab):
    # As llama.cpp does with -ngl on a build without a GPU backend (the default -ngl is -1).
    from vlmcli.engines.ggml import Backend

    with ClipModel.load(novocab, n_gpu_layers=99) as m:
        assert m.backend.is_cpu == (Backend._gpu_device() is None)
        assert m.encode_images(images(1)).shape[0] == 1


# --- bad model files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parts(clip_ggufs):
    """The F32 file's metadata (without the big vocabulary) and tensors, to write broken variants."""
    reader = gguf.GGUFReader(clip_ggufs["quick_gelu", "F32"], "r")
    kv = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key.startswith("tokenizer.ggml."):
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        kv[key] = (f.contents(), f.types[0], sub)
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    return kv, tensors


def write_gguf(path: Path, kv: dict, tensors: dict, arch: str = "clip") -> Path:
    w = gguf.GGUFWriter(path, arch=arch)
    for key, (value, vtype, sub) in kv.items():
        w.add_key_value(key, value, vtype, sub)
    for name, data in tensors.items():
        if isinstance(data, tuple):  # (bytes, quantized type)
            w.add_tensor(name, data[0], raw_dtype=data[1])
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def novocab(parts, tmp_path_factory) -> Path:
    """The quick_gelu F32 model without the 49408-token vocabulary: loads in a blink."""
    return write_gguf(tmp_path_factory.mktemp("novocab") / "novocab.gguf", *parts)


def test_file_without_vocabulary_still_runs(novocab, model):
    with ClipModel.load(novocab) as m:
        assert m.config.vocab_size == 49408 and m.config.tokens == []
        assert np.array_equal(m.encode_texts(texts([4])), model("quick_gelu", "F32").encode_texts(texts([4])))


def _broken(
    kv: dict,
    tensors: dict,
    *,
    drop_key: str | None = None,
    set_key: tuple | None = None,
    drop_tensor: str | None = None,
    replace: tuple[str, object] | None = None,
) -> tuple[dict, dict]:
    kv, tensors = dict(kv), dict(tensors)
    if drop_key:
        del kv[drop_key]
    if set_key:
        kv[set_key[0]] = (set_key[1], kv[set_key[0]][1], None)
    if drop_tensor:
        del tensors[drop_tensor]
    if replace:
        tensors[replace[0]] = replace[1]
    return kv, tensors


@pytest.mark.parametrize(
    "case,change,message",
    [
        ("missing-tensor", {"drop_tensor": "v.blk.1.ffn_up.weight"}, "lacks tensor v.blk.1.ffn_up.weight"),
        ("missing-key", {"drop_key": "clip.vision.patch_size"}, "lacks clip.vision.patch_size"),
        ("bad-heads", {"set_key": ("clip.text.attention.head_count", 5)}, "head count"),
        ("wrong-shape", {"replace": ("v.position_embd.weight", np.zeros((49, 64), np.float32))}, "shape"),
        ("wrong-layers", {"set_key": ("clip.text.block_count", 3)}, "lacks tensor t.blk.2"),
        ("quantized-norm", {"replace": ("t.blk.0.ln1.weight", np.zeros(64, np.float16))}, "type F16"),
        ("bad-mean", {"set_key": ("clip.vision.image_mean", [0.5, 0.5])}, "image_mean"),
        ("bad-scale", {"set_key": ("clip.logit_scale", float("nan"))}, "logit_scale"),
    ],
)
def test_inconsistent_clip_files_are_refused(parts, tmp_path, case, change, message):
    path = write_gguf(tmp_path / f"{case}.gguf", *_broken(*parts, **change))
    with pytest.raises(ModelError, match=message) as e:
        ClipModel.load(path)
    assert e.value.path == str(path)


def test_quantized_row_that_does_not_fit_is_refused(parts, tmp_path):
    kv, tensors = parts
    # a Q8_0 projection is fine; its bytes must match the declared shape
    from vlmcli.engines import ggml

    q = ggml.quantize(tensors["text_projection.weight"], "Q8_0")
    ok = write_gguf(
        tmp_path / "q8proj.gguf", kv, {**tensors, "text_projection.weight": (q, gguf.GGMLQuantizationType.Q8_0)}
    )
    with ClipModel.load(ok) as m:
        assert m.encode_texts(texts([3])).shape == (1, 32)
    bad_kv = dict(kv)
    bad_kv["clip.vision.patch_size"] = (16, kv["clip.vision.patch_size"][1], None)  # 224/16: 197 positions
    with pytest.raises(ModelError, match="shape"):
        ClipModel.load(write_gguf(tmp_path / "patch16.gguf", bad_kv, tensors))


def test_wrong_kind_and_corrupt_files(parts, tmp_path, novocab):
    kv, tensors = parts
    with pytest.raises(ModelError, match="no such"):
        ClipModel.load(tmp_path / "missing.gguf")
    # a language model
    lm = write_gguf(tmp_path / "lm.gguf", {}, {"token_embd.weight": np.zeros((8, 4), np.float32)}, arch="llama")
    with pytest.raises(ModelError, match="language model"):
        ClipModel.load(lm)
    # a vision projector (mmproj): arch clip, no text encoder
    mm_kv = {k: v for k, v in kv.items() if not k.startswith("clip.text.")}
    mm_kv["clip.has_text_encoder"] = (False, gguf.GGUFValueType.BOOL, None)
    mm_kv["clip.has_llava_projector"] = (True, gguf.GGUFValueType.BOOL, None)
    mmproj = write_gguf(tmp_path / "mmproj.gguf", mm_kv, {k: v for k, v in tensors.items() if k.startswith("v.")})
    with pytest.raises(ModelError, match="mmproj"):
        ClipModel.load(mmproj)
    # truncated
    data = novocab.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated|corrupt"):
        ClipModel.load(cut)
    # not a GGUF at all
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ModelError, match="not a GGUF"):
        ClipModel.load(junk)


def test_logit_scale_is_exponentiated(parts, tmp_path):
    kv, tensors = parts
    kv = dict(kv)
    kv["clip.logit_scale"] = (math.log(42.0), gguf.GGUFValueType.FLOAT32, None)
    with ClipModel.load(write_gguf(tmp_path / "scale.gguf", kv, tensors)) as m:
        assert m.config.logit_scale == pytest.approx(42.0, rel=1e-5)
