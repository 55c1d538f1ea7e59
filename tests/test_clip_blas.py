"""CLIP's numpy/BLAS path (engines/clip_numpy.py) against the ggml graphs on the same files."""

from __future__ import annotations

import numpy as np
import pytest
from clip_reference import (
    check_batch_independence,
    cosine,
    images,
    one_by_one,
    reference_encode_images,
    reference_encode_texts,
    texts,
)

from vlmcli.engines import clip_numpy
from vlmcli.engines.clip import COMPUTE_PATH_ENV, ClipModel, choose_compute_path
from vlmcli.errors import VlmError


@pytest.fixture(scope="module")
def pair(clip_ggufs):
    """(activation, type) -> (ggml model, blas model) of one file, each loaded once."""
    loaded: dict = {}

    def get(act: str = "quick_gelu", qtype: str = "F16") -> tuple[ClipModel, ClipModel]:
        if (act, qtype) not in loaded:
            path = clip_ggufs[act, qtype]
            loaded[act, qtype] = (
                ClipModel.load(path, n_threads=2, compute="ggml"),
                ClipModel.load(path, n_threads=2, compute="blas"),
            )
        return loaded[act, qtype]

    yield get
    for models in loaded.values():
        for m in models:
            m.close()


@pytest.mark.parametrize(
    "act,qtype,min_cos",
    [
        ("quick_gelu", "F32", 0.99999),
        ("quick_gelu", "F16", 0.99999),
        ("quick_gelu", "Q8_0", 0.999),
        ("gelu", "F16", 0.99999),
        ("gelu", "Q8_0", 0.999),
    ],
)
def test_blas_matches_ggml(pair, clip_ggufs, act, qtype, min_cos):
    """Both paths multiply the same (exactly dequantized) weights, for images and for texts of many
    lengths. ggml also rounds the activations to the weights' type (F16, Q8_0) for its dot products, so
    for quantized files the paths differ by that rounding and the blas one lands nearer the F32 file."""
    g, b = pair(act, qtype)
    assert (g.compute_path, b.compute_path) == ("ggml", "blas")
    px, ids = images(3), texts([0, 1, 6, 8, 9, 40, 75])
    f32 = pair(act, "F32")[1] if act == "quick_gelu" else None
    for encode in ("encode_images", "encode_texts"):
        x = px if encode == "encode_images" else ids
        got, want = getattr(b, encode)(x), getattr(g, encode)(x)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert cosine(got, want).min() >= min_cos
        np.testing.assert_allclose(
            np.linalg.norm(got, axis=1), np.linalg.norm(want, axis=1), rtol=1e-2 if qtype == "Q8_0" else 2e-3
        )
        if qtype == "F32":  # float64 numpy of the same file; ggml's quick_gelu goes through an F16 table
            exact = (reference_encode_images if encode == "encode_images" else reference_encode_texts)(
                clip_ggufs[act, qtype], x
            )
            np.testing.assert_allclose(got, exact, rtol=0, atol=1e-5 * np.abs(exact).max())
        elif f32 is not None:
            exact = getattr(f32, encode)(x)
            assert cosine(got, exact).min() >= cosine(want, exact).min() - 1e-6
    # different inputs, different embeddings (the comparison could not pass on constants)
    out = b.encode_images(px)
    assert cosine(out[:1], out[1:2])[0] < 0.99


@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
def test_blas_results_do_not_depend_on_the_batch(pair, monkeypatch, qtype):
    """The same bits alone, in a batch, reversed, repeated, in chunks of 3, and shared between two
    threads: every matmul runs per sequence, so BLAS's shape-dependent kernels see no batch-mate."""
    _, m = pair("quick_gelu", qtype)
    monkeypatch.setattr(m._numpy, "min_parallel_flops", 0)  # the tiny model would stay on one thread
    ids, px = texts([4, 75, 0, 12, 30, 4, 61, 7], seed=3), images(5, seed=3)
    for encode, inputs in ((m.encode_texts, ids), (m.encode_images, px)):
        alone = check_batch_independence(m, encode, inputs, monkeypatch)
        monkeypatch.setattr(m._numpy, "n_threads", 1)
        assert np.array_equal(encode(inputs), alone)
        monkeypatch.setattr(m._numpy, "n_threads", 2)
    short = [0, 2, 3, 4, 5, 7]  # a narrower token array (every EOT inside) is the same texts
    assert np.array_equal(m.encode_texts(ids[short, :40]), one_by_one(m.encode_texts, ids[short]))


def test_blas_threads_are_restored(pair):
    """The BLAS runs on one thread during a call (the towers' own threads share the work) and gets its
    thread count back afterwards."""
    blas = clip_numpy.blas_threads()
    if not blas.controllable:
        pytest.skip("numpy's BLAS exposes no thread setter")
    _, m = pair()
    before = blas.get()
    m.encode_images(images(2))
    m.encode_texts(texts([3, 9]))
    assert blas.get() == before
    with blas.one_thread():
        assert blas.get() == 1
        with blas.one_thread():
            assert blas.get() == 1
        assert blas.get() == 1
    assert blas.get() == before


def test_the_path_is_chosen_by_device_and_environment(clip_ggufs, monkeypatch):
    monkeypatch.delenv(COMPUTE_PATH_ENV, raising=False)
    assert choose_compute_path(None, on_cpu=True) == "ggml"  # the faster one measured idle
    assert choose_compute_path("blas", on_cpu=True) == "blas"
    assert choose_compute_path("blas", on_cpu=False) == "ggml"  # GPUs keep the graphs
    monkeypatch.setenv(COMPUTE_PATH_ENV, "blas")
    assert choose_compute_path(None, on_cpu=True) == "blas" and choose_compute_path("auto", on_cpu=True) == "blas"
    assert choose_compute_path("ggml", on_cpu=True) == "ggml"  # an explicit request wins
    monkeypatch.setenv(COMPUTE_PATH_ENV, "fast")
    with pytest.raises(VlmError):
        choose_compute_path(None, on_cpu=True)
    monkeypatch.setenv(COMPUTE_PATH_ENV, "ggml")
    with ClipModel.load(clip_ggufs["quick_gelu", "F16"]) as m:
        assert m.compute_path == "ggml" and m._numpy is None
    monkeypatch.setenv(COMPUTE_PATH_ENV, "blas")
    with ClipModel.load(clip_ggufs["quick_gelu", "F16"]) as m:
        assert m.compute_path == "blas" and m.weights_bytes == m._numpy.nbytes
    m.close()  # twice is fine
    with pytest.raises(VlmError, match="closed"):
        m.encode_texts(texts([2]))
    monkeypatch.setenv(COMPUTE_PATH_ENV, "cuda")
    with pytest.raises(VlmError, match="VLM_CLIP_PATH"):
        ClipModel.load(clip_ggufs["quick_gelu", "F16"])


def test_blas_weights_are_float32(pair):
    _, m = pair("quick_gelu", "Q8_0")
    assert all(a.dtype == np.float32 for a in clip_numpy._arrays(m._numpy) if a is not m._numpy.token_embd)
    assert m._numpy.token_embd.dtype in (np.float16, np.float32)
