"""vlm's CLIP kernels (engines/clip_kernels.py, _clip_kernels.c) in real ggml graphs, against float64.

Three forms: bf16 (x86-64 CPUs with AVX512_BF16), i16-vnni (AVX512_VNNI) and i16-avx2 (AVX2, FMA, F16C);
a test of a form the CPU lacks skips (the packing runs anywhere). Tolerances come from the formats:
inputs are compared after rounding them exactly as the kernel does (bf16: x and w to BF16; i16: x and w
to 16-bit integers with a scale per 128 of k), so what is left is float32 accumulation: at most
k * 2^-24 of the sum of |x w| (i16: its integer sums are exact, then (blocks + 4) roundings of float32).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from vlmcli.convert.safetensors_io import bf16_bits_to_float32 as from_bits
from vlmcli.convert.safetensors_io import float32_to_bf16_bits as bf16_bits  # nearest, ties to even: as the kernel
from vlmcli.engines import clip_kernels
from vlmcli.engines.clip_kernels import pack, unpack
from vlmcli.engines.ggml import Backend, Graph

FORMS = [
    pytest.param(form, marks=pytest.mark.skipif(not clip_kernels.available(form), reason=f"needs {spec.isa}"))
    for form, spec in clip_kernels.FORMS.items()
]
needs_attention = pytest.mark.skipif(not clip_kernels.attention_available(), reason="the attention op needs AVX2")


def held(a: np.ndarray, form: str) -> np.ndarray:
    """What pack takes for a weight: its float32 values (bf16: its BF16 bits, as the kernel holds them)."""
    return bf16_bits(a) if form == "bf16" else np.asarray(a, np.float32)


def as_kernel_sees(a: np.ndarray, form: str) -> np.ndarray:
    """float64 values of a (x or w) after the kernel's rounding."""
    if form == "bf16":
        return from_bits(bf16_bits(a)).astype(np.float64)
    q, scales = clip_kernels.quantize_i16(np.asarray(a, np.float32))  # rows of x as w's columns (the same rounding)
    return q * np.repeat(scales.astype(np.float64), clip_kernels.I16_BLOCK, axis=1)[:, : a.shape[1]]


def test_packing_round_trips_and_puts_what_a_step_reads_side_by_side():
    rows = np.arange(64 * 48, dtype=np.uint16).reshape(64, 48)  # n = 64 outputs, k = 48
    w = pack(rows, "bf16")  # a step of k reads a pair of k for 32 outputs
    assert w.data.shape == (2, 24, 32, 2) and (w.k, w.n) == (48, 64)
    assert w.data[1, 5, 3].tolist() == [rows[32 + 3, 10], rows[32 + 3, 11]]
    assert np.array_equal(unpack(w), rows)
    assert np.array_equal(unpack(w.stacked(w)), np.concatenate([rows, rows]))
    with pytest.raises(ValueError, match="does not fit"):
        pack(rows[:40], "bf16")  # 40 outputs: not whole panels of 32
    values = np.random.default_rng(1).standard_normal((32, 300)).astype(np.float32)  # k = 300: blocks 128, 128, 44
    values[3, 130] = -9.0  # the largest of column 3's second block: it becomes -4095
    i = pack(values, "i16-avx2")  # a pair of k for 16 outputs, and a scale per output and block
    q, scales = clip_kernels.quantize_i16(values)
    assert i.data.shape == (2, 150, 16, 2) and i.data.dtype == np.int16 and i.scales.shape == (2, 3, 16)
    assert i.data[0, 65, 3].tolist() == [q[3, 130], q[3, 131]] and q[3, 130] == -clip_kernels.I16_MAX
    assert i.scales[0, 1, 3] == np.float32(9.0) / np.float32(clip_kernels.I16_MAX) and np.abs(q).max() <= 4095
    assert np.array_equal(unpack(i), q) and np.array_equal(unpack(i.stacked(i)), np.concatenate([q, q]))
    assert np.array_equal(i.stacked(i).scales, np.concatenate([i.scales, i.scales]))
    assert np.abs(q * np.repeat(scales, 128, axis=1)[:, :300] - values).max() <= 0.5 * scales.max() * (1 + 1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        pack(values[:, :299], "i16-vnni")  # k in pairs


@pytest.mark.skipif(not clip_kernels.available("i16-avx2"), reason="needs AVX2, FMA, F16C")
def test_the_kernels_quantization_is_numpys_bit_for_bit():
    """The C packing (its quantizer is the one the kernel applies to x) against the numpy one the tests'
    references use, from F32 and from F16: ties, a block of zeros, huge and tiny values, a short last block."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((48, 300)) * np.logspace(-20, 20, 48)[:, None]).astype(np.float32)
    w[1, :128] = 0.0
    w[2, 7], w[2, 0] = 4095 * 0.5, 4095.0  # a tie with a scale of 1 (the block's largest is 4095)
    c, ref = pack(w, "i16-avx2"), clip_kernels.pack_i16_numpy(w)
    assert np.array_equal(c.data, ref.data) and np.array_equal(c.scales, ref.scales)
    q = unpack(c)
    assert q[2, 7] == 2048 and q[1, :128].max() == 0 and c.scales[0, 0, 1] == 0  # ties to even; zeros stay zero
    h = (rng.standard_normal((16, 300)) * 3).astype(np.float16)  # F16 values, widened in C as they are packed
    c, ref = pack(h, "i16-avx2"), clip_kernels.pack_i16_numpy(h.astype(np.float32))
    assert np.array_equal(c.data, ref.data) and np.array_equal(c.scales, ref.scales)


@pytest.mark.skipif(not clip_kernels.available("bf16"), reason="needs AVX512_BF16")
def test_the_bf16_packing_from_values_is_numpys_rounding_bit_for_bit():
    """F32 and F16 values packed in C (one pass: rounded to nearest even, then laid out) against the
    same values rounded by numpy and packed from their bits: ties both ways, huge and tiny values."""
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((64, 96)) * np.logspace(-30, 30, 64)[:, None]).astype(np.float32)
    w[0, :4] = np.array([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x80000000], np.uint32).view(np.float32)  # ties, -0
    got = pack(w, "bf16")
    assert got.data.dtype == np.uint16 and np.array_equal(got.data, pack(bf16_bits(w), "bf16").data)
    assert unpack(got)[0, :4].tolist() == [0x3F80, 0x3F82, 0x3F81, 0x8000]
    h = (rng.standard_normal((32, 48)) * 100).astype(np.float16)
    assert np.array_equal(pack(h, "bf16").data, pack(bf16_bits(h.astype(np.float32)), "bf16").data)


class Linear:
    """One linear layer in its own graph on a CPU backend: run(x) -> y; ln = (w, b, eps): a LayerNorm
    of x's rows in the kernel."""

    def __init__(
        self,
        w: np.ndarray,
        bias: np.ndarray | None,
        act: str | None,
        n_threads: int,
        form: str,
        ln: tuple[np.ndarray, np.ndarray, float] | None = None,
    ):
        self.packed = pack(held(w, form), form)
        self.backend = Backend(n_threads=n_threads)
        self.weights = Graph(4)
        values = {"bias": bias, "ln_w": ln[0] if ln else None, "ln_b": ln[1] if ln else None}
        tensors = {name: self.weights.new_tensor("F32", (len(v),)) for name, v in values.items() if v is not None}
        if tensors:
            self.backend.alloc_tensors(self.weights)
            for name, t in tensors.items():
                self.backend.set(t, values[name])
        self.bias = tensors.get("bias")
        self.norm = clip_kernels.Norm(tensors["ln_w"], tensors["ln_b"], ln[2]) if ln else None
        self.act = act

    def run(self, x: np.ndarray, form: str | None = None, residual: np.ndarray | None = None) -> np.ndarray:
        """y for x; form: another form of the same packing than the layer's."""
        w = dataclasses.replace(self.packed, form=form) if form else self.packed
        with Graph(8, 8) as g:
            xi = g.input("F32", (x.shape[1], x.shape[0]))
            ri = g.input("F32", (residual.shape[1], residual.shape[0])) if residual is not None else None
            out = g.output(clip_kernels.linear(g, xi, w, self.bias, self.act, self.norm, ri))
            self.backend.allocate(g)
            self.backend.set(xi, x)
            if ri is not None:
                self.backend.set(ri, residual)
            self.backend.compute(g)
            return self.backend.get(out, 2)

    def close(self) -> None:
        self.weights.close()
        self.backend.close()


def reference(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, act: str | None, form: str):
    """(float64 result on the inputs as the kernel rounds them, its accumulation error bound)."""
    xb, wb = as_kernel_sees(x, form), as_kernel_sees(w, form)
    y = xb @ wb.T + (bias if bias is not None else 0)
    terms = x.shape[1] if form == "bf16" else -(-x.shape[1] // clip_kernels.I16_BLOCK) + 4
    bound = terms * 2.0**-24 * (np.abs(xb) @ np.abs(wb).T) + 2.0**-24 * np.abs(y)
    if act == "gelu_quick":  # the derivative of x * sigmoid(1.702 x) stays below 1.1 in magnitude; the sigmoid
        # to 8 ulp: e^z to 3, 1 / (1 + e) from a 12-bit reciprocal and a Newton step to 4.5, then products
        y, bound = y * 0.5 * (1 + np.tanh(0.851 * y)), 1.1 * bound + 8 * 2.0**-24 * np.abs(y)  # sigmoid by tanh
    return y, bound


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("k,n,rows", [(768, 96, 200), (64, 32, 1), (512, 64, 13), (3072, 32, 50), (588, 32, 9)])
@pytest.mark.parametrize("act", [None, "gelu_quick"])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_matches_float64_within_float32_accumulation(k, n, rows, act, n_threads, form):
    if not clip_kernels.fits(form, k, n):
        pytest.skip(f"k = {k} (the patches of a 14 px ViT) is not whole steps of the {form} kernel")
    rng = np.random.default_rng(k + n + rows)
    x = rng.standard_normal((rows, k)).astype(np.float32) * 2
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    layer = Linear(w, bias, act, n_threads, form)
    try:
        got = layer.run(x)
    finally:
        layer.close()
    want, bound = reference(x, w, bias, act, form)
    assert got.shape == (rows, n) and got.dtype == np.float32
    assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)
    # the comparison can tell the rounding apart: the product on unrounded inputs is further off
    exact = x.astype(np.float64) @ w.astype(np.float64).T + bias
    if act is None:
        assert np.abs(got - want).max() < np.abs(exact - want).max()


@pytest.mark.parametrize("form", FORMS)
def test_without_a_bias_and_with_huge_and_tiny_activations(form):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((24, 64)).astype(np.float32)
    x[0] *= 1e4  # quick GELU far out on both sides: x on the right, 0 on the left, no NaN
    w = (rng.standard_normal((32, 64)) / 8).astype(np.float32)
    layer = Linear(w, None, "gelu_quick", 2, form)
    try:
        got = layer.run(x)
    finally:
        layer.close()
    want, bound = reference(x, w, None, "gelu_quick", form)
    assert np.isfinite(got).all()
    assert np.all(np.abs(got - want) <= bound)


@pytest.mark.parametrize("form", FORMS)
def test_a_row_does_not_depend_on_its_batch_mates_or_the_threads(form):
    """Tiles of 12 (6) rows, blocks of 96 (84) rows, rows or panels shared between threads: each
    output is summed in one fixed order whatever surrounds it."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((130, 256)).astype(np.float32)
    w = (rng.standard_normal((128, 256)) / 16).astype(np.float32)
    bias = rng.standard_normal(128).astype(np.float32)
    one, two = Linear(w, bias, None, 1, form), Linear(w, bias, None, 2, form)
    try:
        full = two.run(x)
        assert np.array_equal(full, one.run(x))
        for i in (0, 5, 11, 12, 83, 84, 95, 96, 129):
            assert np.array_equal(two.run(x[i : i + 1])[0], full[i])
        assert np.array_equal(two.run(x[::-1])[::-1], full)
    finally:
        one.close()
        two.close()


@pytest.mark.parametrize("form", FORMS)
def test_rows_handed_out_to_threads_give_the_same_bits_compute_after_compute(form):
    """Rows that threads share (a block or more each, or fewer panels than threads) are handed out in
    runs as the threads ask: the bits are one thread's whatever the count, and the same graph computed
    again gets every row again (the hand-out starts over)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1100, 256)).astype(np.float32)
    w = (rng.standard_normal((32, 256)) / 16).astype(np.float32)  # 2 panels of 16 (1 of 32): rows are shared
    layers = [Linear(w, None, None, threads, form) for threads in (1, 2, 3)]
    try:
        want = layers[0].run(x)
        for layer in layers[1:]:
            with Graph(8, 8) as g:
                xi = g.input("F32", (x.shape[1], x.shape[0]))
                out = g.output(clip_kernels.linear(g, xi, layer.packed, None, None, None, None))
                layer.backend.allocate(g)
                for _ in range(2):
                    layer.backend.set(xi, x)
                    layer.backend.set(out, np.zeros_like(want))
                    layer.backend.compute(g)
                    assert np.array_equal(layer.backend.get(out, 2), want)
    finally:
        for layer in layers:
            layer.close()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("eps", [0.0, 0.75])
@pytest.mark.parametrize("act", [None, "gelu_quick"])
def test_a_layer_norm_before_and_a_residual_after_are_the_separate_steps_bit_for_bit(form, eps, act):
    """norm(x) @ w + bias (act) + residual in one op against the kernel on numpy's LayerNorm with numpy's
    F32 add after it. Each row is a + s or a - s, as many of each, so the mean (a), the variance (s^2) and
    1 / sqrt(variance + eps) are exact in F32 and both LayerNorms give b +- g / 2 or b +- g, rounded once:
    the same bits. Rows are as many as a block of rows, so threads share rows and panels both."""
    rng = np.random.default_rng(int(eps * 4) + (act is None))
    rows, k, n = 90, 512, 64
    signs = np.array([rng.permutation(np.repeat([-1.0, 1.0], k // 2)) for _ in range(rows)], np.float32)
    x = (3.0 + 0.5 * signs).astype(np.float32)  # mean 3, variance 0.25: rstd 2 (eps 0) or 1 (eps 0.75)
    ln_w, ln_b = rng.standard_normal(k).astype(np.float32), rng.standard_normal(k).astype(np.float32)
    normed = (np.float32(1.0 if eps == 0 else 0.5) * signs * ln_w + ln_b).astype(np.float32)
    w = (rng.standard_normal((n, k)) / 16).astype(np.float32)
    bias, residual = rng.standard_normal(n).astype(np.float32), rng.standard_normal((rows, n)).astype(np.float32)
    for threads in (1, 2):
        fused, plain = Linear(w, bias, act, threads, form, (ln_w, ln_b, eps)), Linear(w, bias, act, threads, form)
        try:
            got = fused.run(x, residual=residual)
            want = plain.run(normed) + residual
            assert np.array_equal(got, want)
            assert np.array_equal(fused.run(x[:1]), plain.run(normed[:1]))  # one row: threads share the panels
        finally:
            fused.close()
            plain.close()


@pytest.mark.parametrize("form", FORMS)
def test_the_norm_and_the_residual_must_fit(form):
    rng = np.random.default_rng(2)
    if clip_kernels.fits(form, 36, 32):  # (bf16 takes k in steps of 16 anyway)
        layer = Linear(
            rng.standard_normal((32, 36)).astype(np.float32),
            None,
            None,
            1,
            form,
            (np.ones(36, np.float32), np.zeros(36, np.float32), 1e-5),
        )
        try:
            with pytest.raises(ValueError, match="layer-norms rows of a multiple of 8"):
                layer.run(rng.standard_normal((4, 36)).astype(np.float32))
        finally:
            layer.close()
    layer = Linear(rng.standard_normal((32, 64)).astype(np.float32), None, None, 1, form)
    try:
        with pytest.raises(ValueError, match="residual of the output's shape"):
            layer.run(rng.standard_normal((4, 64)).astype(np.float32), residual=np.zeros((4, 16), np.float32))
    finally:
        layer.close()


# --- the attention op -----------------------------------------------------------------------------


def run_attention(
    qkv: np.ndarray,
    seqs: list[tuple[int, int]],
    n_heads: int,
    causal: bool,
    n_threads: int = 2,
    queries: list[tuple[int, int]] | None = None,
    int16: bool = False,
):
    """qkv (m, 3 d) -> the op's (m, d) (or (len(queries), d)) in a real ggml graph, computed twice over
    a cleared output: threads take the work as they ask, and the hand-out starts over each compute."""
    backend = Backend(n_threads=n_threads)
    try:
        with Graph(8, 8) as g:
            x = g.input("F32", (qkv.shape[1], qkv.shape[0]))
            asked = None if queries is None else np.array(queries)
            out = g.output(clip_kernels.attention(g, x, np.array(seqs), n_heads, causal, asked, int16))
            backend.allocate(g)
            backend.set(x, qkv)
            backend.compute(g)
            first = backend.get(out, 2)
            backend.set(out, np.zeros_like(first))
            backend.compute(g)
            again = backend.get(out, 2)
            assert np.array_equal(again, first, equal_nan=True)
            return again
    finally:
        backend.close()


def reference_attention(qkv: np.ndarray, seqs, n_heads: int, causal: bool) -> np.ndarray:
    d = qkv.shape[1] // 3
    hd = d // n_heads
    q, k, v = (qkv[:, i * d : (i + 1) * d].astype(np.float64) for i in range(3))
    out = np.full((len(qkv), d), np.nan)
    for first, n in seqs:
        for h in range(n_heads):
            cols = slice(h * hd, (h + 1) * hd)
            s = q[first : first + n, cols] @ k[first : first + n, cols].T / np.sqrt(hd)
            if causal:
                s[np.triu_indices(n, 1)] = -np.inf
            p = np.exp(s - s.max(axis=1, keepdims=True))
            out[first : first + n, cols] = (p / p.sum(axis=1, keepdims=True)) @ v[first : first + n, cols]
    return out


@needs_attention
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d,n_heads", [(128, 2), (64, 4)])
def test_attention_matches_float64_per_packed_sequence(causal, d, n_heads):
    rng = np.random.default_rng(d + causal)
    seqs = [(0, 5), (5, 1), (6, 33), (39, 17)]
    qkv = rng.standard_normal((56, 3 * d)).astype(np.float32) * 1.5
    got = run_attention(qkv, seqs, n_heads, causal)
    want = reference_attention(qkv, seqs, n_heads, causal)
    # float32 sums of hd products and of up to 33 weighted values, an exp good to a few ulp
    bound = 8 * (d // n_heads + 33) * 2.0**-24 * np.abs(qkv[:, 2 * d :]).max()
    assert np.abs(got - want).max() <= bound
    # each sequence sees only its own tokens: alone it gives the same bits
    first, n = seqs[2]
    alone = run_attention(qkv[first : first + n], [(0, n)], n_heads, causal, n_threads=1)
    assert np.array_equal(alone, got[first : first + n])
    if causal:  # a token never sees the ones after it
        changed = qkv.copy()
        changed[first + 20 : first + n] += 1.0
        assert np.array_equal(
            run_attention(changed, seqs, n_heads, causal)[first : first + 20], got[first : first + 20]
        )


@needs_attention
def test_long_sequences_attend_in_the_i16_format():
    """SigLIP's 1,024 patches: with int16 both products run on the i16 matmul's tiles (13-bit values, a
    scale per row and per block of 128), so each token's output keeps a cosine near 1 to the float64
    one; sequences stay independent; short ones keep the F32 path's bits."""
    rng = np.random.default_rng(7)
    d, n_heads, seqs = 128, 2, [(0, 600), (600, 531)]  # lengths off the tiles' 6 rows and 16 columns
    qkv = rng.standard_normal((1131, 3 * d)).astype(np.float32) * 1.5
    got = run_attention(qkv, seqs, n_heads, False, int16=True)
    want = reference_attention(qkv, seqs, n_heads, False)
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() > 0.9999
    assert np.sqrt(((got - want) ** 2).mean() / (want**2).mean()) < 2e-3  # about 13 bits, summed
    f32 = run_attention(qkv, seqs, n_heads, False)
    assert not np.array_equal(got, f32)  # the other number format did run
    alone = run_attention(qkv[600:], [(0, 531)], n_heads, False, n_threads=1, int16=True)
    assert np.array_equal(alone, got[600:])
    for threads in (3, 8):  # 4 (sequence, head) pairs cut into runs of queries so threads get equal shares
        assert np.array_equal(run_attention(qkv, seqs, n_heads, False, n_threads=threads, int16=True), got)
    mixed = [(0, 77), (77, 40), (117, 600)]  # short sequences (F32) cut into runs beside a long one (i16)
    one = run_attention(qkv[:717], mixed, n_heads, False, n_threads=1, int16=True)
    for threads in (4, 5, 7):
        assert np.array_equal(run_attention(qkv[:717], mixed, n_heads, False, n_threads=threads, int16=True), one)
    short = qkv[:77]
    assert np.array_equal(
        run_attention(short, [(0, 77)], n_heads, False, int16=True), run_attention(short, [(0, 77)], n_heads, False)
    )


@needs_attention
@pytest.mark.parametrize("causal", [False, True])
def test_attention_of_named_queries_gives_their_rows_of_the_whole(causal):
    """What a tower's last block asks for: one token per sequence (the class token, the end of a text),
    a sequence named twice (a lone image's pooled row is repeated), in any order."""
    rng = np.random.default_rng(7 + causal)
    seqs = [(0, 5), (5, 1), (6, 33), (39, 17)]
    qkv = rng.standard_normal((56, 3 * 128)).astype(np.float32)
    whole = run_attention(qkv, seqs, 2, causal)
    queries = [(2, 0), (0, 4), (3, 16), (1, 0), (2, 32), (2, 0)]
    got = run_attention(qkv, seqs, 2, causal, queries=queries)
    assert got.shape == (len(queries), 128)
    assert np.array_equal(got, whole[[seqs[s][0] + i for s, i in queries]])


@needs_attention
def test_attention_refuses_what_it_cannot_run():
    with Graph(8, 8) as g:
        x = g.input("F32", (3 * 36, 10))  # heads of 9 floats: not a multiple of the vector width
        with pytest.raises(ValueError, match="heads"):
            clip_kernels.attention(g, x, np.array([(0, 10)]), 4, False)
        y = g.input("F32", (3 * 64, 10))
        with pytest.raises(ValueError, match="do not fit"):
            clip_kernels.attention(g, y, np.array([(0, 6), (6, 6)]), 1, False)
        for queries in ([(1, 4)], [(0, 5)], [(0, -1)], []):  # no sequence 1, past its end, negative, none
            with pytest.raises(ValueError, match="queries"):
                clip_kernels.attention(g, y, np.array([(0, 5)]), 1, False, np.array(queries).reshape(-1, 2))


@pytest.mark.skipif(not clip_kernels.available("i16-vnni"), reason="the i16 kernel's 512-bit form needs AVX512_VNNI")
@pytest.mark.parametrize("k,n,rows", [(768, 96, 200), (64, 48, 1), (512, 64, 13), (3072, 32, 50)])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_i16_vnni_form_gives_the_avx2_forms_bits(k, n, rows, n_threads):
    rng = np.random.default_rng(k * n + rows)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    layer = Linear(w, bias, "gelu_quick", n_threads, "i16-avx2")
    try:
        avx2, vnni = layer.run(x), layer.run(x, form="i16-vnni")
    finally:
        layer.close()
    assert np.array_equal(avx2, vnni)
