"""The ctypes bindings to llama-cpp-python's ggml: known results, the quantizer, refusing bad input."""

from __future__ import annotations

import ctypes
import math
import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from vlmcli.engines import ggml
from vlmcli.engines.ggml import Backend, Graph
from vlmcli.errors import VlmError


@pytest.fixture(scope="module")
def backend():
    b = Backend(n_threads=2)
    yield b
    b.close()


def run(backend: Backend, build, inputs: dict[str, np.ndarray], ndim: int = 2) -> np.ndarray:
    """Build a one-output graph from F32 inputs (numpy arrays, numpy order), compute it, read the output."""
    with Graph(max_tensors=64, graph_size=64) as g:
        tensors = {name: g.input("F32", tuple(reversed(a.shape)), name) for name, a in inputs.items()}
        out = g.output(build(g, tensors))
        backend.allocate(g)
        for name, a in inputs.items():
            backend.set(tensors[name], a.astype(np.float32))
        backend.compute(g)
        return backend.get(out, ndim)


def test_loads_llama_cpp_pythons_own_ggml():
    lib_dir = ggml.llama_cpp_lib_dir()
    assert ggml.lib().path.parent == lib_dir
    assert ggml.lib().path.name.startswith("libggml.so")


def _mapped_inodes() -> dict[str, set[str]]:
    """base library name (libggml-base, ...) -> the distinct files mapped for it."""
    out: dict[str, set[str]] = {}
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and "/libggml" in parts[5]:
            name = os.path.basename(parts[5]).split(".so")[0]
            out.setdefault(name, set()).add(parts[4])  # the inode
    return out


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_one_copy_of_ggml_next_to_libllama():
    ggml.lib()
    # what llama_cpp does on import: load libllama.so from the same folder, by path
    ctypes.CDLL(str(ggml.llama_cpp_lib_dir() / "libllama.so"))
    mapped = _mapped_inodes()
    assert set(mapped) >= {"libggml", "libggml-base", "libggml-cpu"}
    assert all(len(inodes) == 1 for inodes in mapped.values()), mapped


def test_type_enum_matches_gguf_py():
    for name, value in ggml.GGML_TYPES.items():
        if name in GGMLQuantizationType.__members__:
            assert GGMLQuantizationType[name].value == value, name
    assert ggml.block_size("Q8_0") == 32 and ggml.type_size("Q8_0") == 34
    assert ggml.row_size("F16", 64) == 128
    assert ggml.type_id(GGMLQuantizationType.Q4_1) == 3


def float32_dot_bound(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How far float32 dot products over a's and b's last axis may be from exact, in any summation
    order (the kernel ggml picks depends on the CPU and the shape): gamma_(k+1) * sum |a||b|."""
    k = a.shape[-1] + 1  # the terms, and the rounding of a wider accumulator to float32
    return k * 2.0**-24 / (1 - k * 2.0**-24) * (np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64).T)


def test_matmul(backend):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((5, 7)).astype(np.float32)  # nn.Linear weight: 7 inputs -> 5 outputs
    x = rng.standard_normal((3, 7)).astype(np.float32)  # 3 rows
    got = run(backend, lambda g, t: g.mul_mat(t["w"], t["x"]), {"w": w, "x": x})
    assert np.all(np.abs(got - x.astype(np.float64) @ w.T.astype(np.float64)) <= float32_dot_bound(x, w))


def test_norm_scale_add_mul(backend):
    rng = np.random.default_rng(2)
    x, w, b = rng.standard_normal((4, 16)), rng.standard_normal(16), rng.standard_normal(16)
    got = run(
        backend, lambda g, t: g.scale(g.add(g.mul(g.norm(t["x"], 1e-5), t["w"]), t["b"]), 0.5), {"x": x, "w": w, "b": b}
    )
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    np.testing.assert_allclose(got, 0.5 * ((x - mean) / np.sqrt(var + 1e-5) * w + b), rtol=1e-5, atol=1e-5)


def test_soft_max_with_scale_and_causal_mask(backend):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((6, 6))
    mask = np.triu(np.full((6, 6), -np.inf), k=1)
    got = run(backend, lambda g, t: g.soft_max_ext(t["a"], t["m"], 0.25), {"a": a, "m": mask})
    z = a * 0.25 + mask
    want = np.exp(z - z.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(got[np.triu_indices(6, 1)] == 0)


def test_activations(backend):
    x = np.linspace(-5, 5, 64).reshape(2, 32)
    quick = run(backend, lambda g, t: g.gelu_quick(t["x"]), {"x": x})
    np.testing.assert_allclose(quick, x / (1 + np.exp(-1.702 * x)), rtol=2e-3, atol=1e-4)  # an F16 table
    exact = run(backend, lambda g, t: g.gelu_erf(t["x"]), {"x": x})
    erf = np.vectorize(math.erf)(x / math.sqrt(2))
    np.testing.assert_allclose(exact, 0.5 * x * (1 + erf), atol=1e-4)


def test_permute_cont_reshape_concat_repeat(backend):
    rng = np.random.default_rng(4)
    a = rng.standard_normal((2, 3, 4))  # ggml ne = (4, 3, 2)
    got = run(backend, lambda g, t: g.cont(g.permute(t["a"], 1, 0, 2, 3)), {"a": a}, ndim=3)
    np.testing.assert_allclose(got, a.transpose(0, 2, 1))
    got = run(backend, lambda g, t: g.reshape(g.cont(g.transpose(g.reshape(t["a"], 12, 2))), 6, 4), {"a": a})
    np.testing.assert_allclose(got, a.reshape(2, 12).T.reshape(4, 6))
    c = rng.standard_normal(4)
    got = run(backend, lambda g, t: g.concat(g.repeat(t["c"], 4, 1, 2), t["a"], 1), {"c": c, "a": a}, ndim=3)
    np.testing.assert_allclose(got, np.concatenate([np.broadcast_to(c, (2, 1, 4)), a], axis=1))


def test_pad_appends_zeros(backend):
    a = np.random.default_rng(5).standard_normal((2, 3, 5))  # ggml ne = (5, 3, 2)
    got = run(backend, lambda g, t: g.pad(t["a"], 11), {"a": a}, ndim=3)
    np.testing.assert_array_equal(got, np.pad(a.astype(np.float32), ((0, 0), (0, 0), (0, 11))))


def test_get_rows_and_view_rows(backend):
    data = np.arange(40, dtype=np.float32).reshape(10, 4)
    with Graph(max_tensors=16, graph_size=16) as g:
        table = g.input("F32", (4, 10))
        ids = g.input("I32", (3,))
        out = g.output(g.add(g.get_rows(table, ids), g.view_rows(table, 3, first_row=2)))
        backend.allocate(g)
        backend.set(table, data)
        backend.set(ids, np.array([9, 0, 4], dtype=np.int32))
        backend.compute(g)
        got = backend.get(out, 2)
    np.testing.assert_array_equal(got, data[[9, 0, 4]] + data[2:5])


def test_python_shapes_agree_with_ggml():
    L = ggml.lib()
    with Graph(max_tensors=32, graph_size=32) as g:
        x = g.new_tensor("F32", (8, 6, 2))
        w = g.new_tensor("Q8_0", (32, 8))
        results = [
            g.permute(x, 0, 2, 1, 3),
            g.transpose(g.reshape(x, 8, 12)),
            g.cont(g.permute(x, 1, 2, 0, 3)),
            g.reshape(x, 2, 4, 6, 2),
            g.view_rows(g.reshape(x, 8, 12), 5, 3),
            g.concat(x, x, 2),
            g.mul_mat(g.reshape(x, 8, 12), g.new_tensor("F32", (8, 3))),
            w,
        ]
        for t in results:
            assert L.ggml_nelements(t.ptr) == t.n_elements
            assert L.ggml_is_contiguous(t.ptr) == t.is_contiguous()
            assert L.ggml_is_transposed(t.ptr) == t.is_transposed()
            if t.is_contiguous():
                assert L.ggml_nbytes(t.ptr) == t.nbytes


def test_bad_ops_raise_instead_of_aborting():
    with Graph(max_tensors=16, graph_size=16) as g:
        a, b = g.new_tensor("F32", (8, 4)), g.new_tensor("F32", (6, 4))
        with pytest.raises(VlmError, match="mul_mat"):
            g.mul_mat(a, b)
        with pytest.raises(VlmError, match="reshape"):
            g.reshape(a, 5, 5)
        with pytest.raises(VlmError, match="broadcast"):
            g.add(a, b)
        with pytest.raises(VlmError, match="soft_max"):
            g.soft_max_ext(g.transpose(a), None, 1.0)
        with pytest.raises(VlmError, match="reshape"):
            g.reshape(g.transpose(a), 32)
        with pytest.raises(VlmError, match="Q8_0 rows"):
            g.new_tensor("Q8_0", (33, 2))
    with Graph(max_tensors=2) as small:
        small.new_tensor("F32", (1,))
        small.new_tensor("F32", (1,))
        with pytest.raises(VlmError, match="context full"):
            small.new_tensor("F32", (1,))


# --- quantize -------------------------------------------------------------------------------------


def _blocks(x: np.ndarray, n: int) -> np.ndarray:
    return x.reshape(-1, n)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_1", "Q4_1", "Q4_0", "Q5_0", "F16", "BF16"])
def test_quantize_round_trip(qtype):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((6, 128)) * np.array([0.01, 1, 100, 1, 1, 3])[:, None]).astype(np.float32)
    q = ggml.quantize(x, qtype)
    assert q.dtype == np.uint8 and q.shape == (6, ggml.row_size(qtype, 128))
    back = dequantize(q, GGMLQuantizationType[qtype]).reshape(x.shape)
    err = np.abs(back - x)
    blocks, errs = _blocks(x, 32), _blocks(err, 32)
    amax = np.abs(blocks).max(1, keepdims=True)
    spread = blocks.max(1, keepdims=True) - blocks.min(1, keepdims=True)
    # half a quantization step per block; the block scale is stored as F16, whose rounding (2^-11,
    # times up to 127 steps) can add up to ~13% of a half step
    bound = {
        "Q8_0": 0.5 * amax / 127,
        "Q4_0": 0.5 * amax / 8 * 2,
        "Q5_0": 0.5 * amax / 16 * 2,
        "Q4_1": 0.5 * spread / 15,
        "Q5_1": 0.5 * spread / 31,
        "F16": np.abs(blocks) * 2.0**-11,
        "BF16": np.abs(blocks) * 2.0**-8,
    }[qtype]
    assert np.all(errs <= bound * 1.15 + 1e-7), float((errs / (bound + 1e-12)).max())
    assert err.max() > 0 or qtype in ("F16", "BF16")


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_1", "Q4_1", "Q4_0", "Q5_0", "F16"])
def test_dequantize_is_gguf_pys(qtype):
    """ggml's own dequantizer (fast, used at load) and gguf-py's reference give the same values: a
    product of two exact numbers rounded once, bit for bit; the *_1 types add a minimum to it, which
    a compiler may fuse into one FMA (one rounding fewer): within 1 ulp."""
    x = np.random.default_rng(8).standard_normal((5, 96)).astype(np.float32) * 3
    q = ggml.quantize(x, qtype)
    got = ggml.dequantize(q, qtype)
    want = dequantize(q, GGMLQuantizationType[qtype]).reshape(-1).astype(np.float32)
    assert got.dtype == np.float32 and got.shape == (x.size,)
    if qtype.endswith("_1"):
        np.testing.assert_array_max_ulp(got, want, maxulp=1)
    else:
        assert np.array_equal(got, want)
    with pytest.raises(VlmError, match="whole"):
        ggml.dequantize(q.reshape(-1)[:-1], qtype)


def test_quantized_bytes_feed_mul_mat(backend):
    """ggml reads the quantizer's bytes as the same numbers gguf-py dequantizes them to."""
    rng = np.random.default_rng(6)
    w, x = rng.standard_normal((8, 64)).astype(np.float32), rng.standard_normal((3, 64)).astype(np.float32)
    q = ggml.quantize(w, "Q8_0")
    with Graph(max_tensors=8, graph_size=8) as g:
        wt, xt = g.input("Q8_0", (64, 8)), g.input("F32", (64, 3))
        out = g.output(g.mul_mat(wt, xt))
        backend.allocate(g)
        backend.set(wt, q)
        backend.set(xt, x)
        backend.compute(g)
        got = backend.get(out, 2)
    wq = dequantize(q, GGMLQuantizationType.Q8_0).reshape(8, 64)
    # ggml rounds x to Q8_0 too for this product: per block of 32, q = round(x / d), d = max |x| / 127
    # stored as an F16, so each x_i is off by at most d / 2 + 127 d 2^-11, each output by that times
    # the block's sum of |w|
    x_err = np.abs(x.reshape(3, 2, 32)).max(-1) / 127 * (0.5 + 127 * 2.0**-11)
    bound = x_err @ np.abs(wq).reshape(8, 2, 32).sum(-1).T + float32_dot_bound(x, wq)
    assert np.all(np.abs(got - x.astype(np.float64) @ wq.T.astype(np.float64)) <= bound)


def test_quantize_refuses_bad_input():
    with pytest.raises(VlmError, match="multiple of 32"):
        ggml.quantize(np.zeros((4, 33), np.float32), "Q8_0")
    with pytest.raises(VlmError, match="unknown ggml type"):
        ggml.quantize(np.zeros((4, 32), np.float32), "Q9_9")
    with pytest.raises(VlmError, match="cannot quantize"):
        ggml.quantize(np.zeros((4, 256), np.float32), "IQ2_XXS")  # needs an importance matrix
    with pytest.raises(VlmError, match="shape"):
        ggml.quantize(np.zeros((4, 0), np.float32), "Q8_0")
    assert ggml.quantize(np.zeros((0, 32), np.float32), "Q8_0").shape == (0, 34)


def test_backend_refuses_unknown_device():
    with pytest.raises(VlmError, match="no ggml device"):
        Backend(device="NoSuchGPU0")


def test_every_bound_function_is_declared():
    # The class declarations are what mypy checks; _SIGNATURES is what gets bound. They must agree.
    declared = {name for name in ggml._Lib.__annotations__ if name.startswith("ggml_")}
    assert declared == set(ggml._SIGNATURES)
